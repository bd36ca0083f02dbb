"""Reading the text and YAML files cmx is given (run config, search file, cluster file, `--set`
values, saved specs): one policy for all of them.

- the size is checked before the file is read (`MAX_CONFIG_BYTES`, 1 MiB);
- the bytes must be UTF-8 (a BOM is allowed); a binary or Latin-1 file is one error naming it;
- YAML is read at `yaml.safe_load` level (no Python objects), with duplicate keys rejected
  (PyYAML silently keeps the last) and aliases bounded: a document may expand to at most
  `MAX_YAML_NODES` nodes, nest at most `MAX_YAML_DEPTH` deep, and never refer to itself, so an
  alias bomb ("billion laughs") fails at once instead of eating memory downstream.

Every problem is a `ConfigError` naming the file (and line), never a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from yaml.events import AliasEvent
from yaml.nodes import MappingNode, Node, SequenceNode

from cmx.core.errors import ConfigError

MAX_CONFIG_BYTES = 1024 * 1024  # a config, search or cluster file is a few KiB
MAX_YAML_NODES = 100_000  # after alias expansion
MAX_YAML_DEPTH = 64  # nested mappings and lists

_MERGE_TAG = "tag:yaml.org,2002:merge"
_FLAT = "write the values out, without deep nesting or self-referring aliases"


class YamlRefused(yaml.MarkedYAMLError):
    """Valid YAML that cmx refuses: a duplicate key, too many nodes after aliases, too deep, an int
    too long. `note` is the hint."""

    def __str__(self) -> str:
        return str(self.problem)  # the mark is shown by `parse_yaml`; the note is the hint


class BoundedSafeLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that rejects duplicate keys, recursive aliases, alias bombs and deep nesting."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._sizes: dict[int, int] = {}  # id(node) -> its node count with aliases expanded
        self._depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        alias = self.check_event(AliasEvent)
        mark = self.peek_event().start_mark
        self._depth += 1
        if self._depth > MAX_YAML_DEPTH:
            raise YamlRefused(None, None, f"nested more than {MAX_YAML_DEPTH} levels deep", mark, _FLAT)
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if alias:
            size = self._sizes.get(id(node))
            if size is None:
                raise YamlRefused(None, None, "an alias refers to the node that contains it", mark, _FLAT)
        elif isinstance(node, SequenceNode):
            size = 1 + sum(self._sizes[id(child)] for child in node.value)
        elif isinstance(node, MappingNode):
            size = 1 + sum(self._sizes[id(k)] + self._sizes[id(v)] for k, v in node.value)
        else:
            size = 1
        if size > MAX_YAML_NODES:
            raise YamlRefused(
                None, None, f"aliases expand it to more than {MAX_YAML_NODES:,} values (an alias bomb?)", mark, _FLAT
            )
        self._sizes[id(node)] = size
        return node

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, MappingNode):
            first: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == _MERGE_TAG:
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    seen = first.get(key)
                except TypeError:
                    continue  # an unhashable key: SafeConstructor reports it
                if seen is not None:
                    problem = f"duplicate key {key!r} (first on line {seen + 1})"
                    raise YamlRefused(None, None, problem, key_node.start_mark, "write each key once")
                first[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)

    def construct_bounded_int(self, node: Node) -> int:
        """An int of PyYAML's; one longer than Python converts (4300 digits) is a YAML error here."""
        try:
            return self.construct_yaml_int(node)
        except ValueError:
            raise YamlRefused(None, None, "an integer too long to read", node.start_mark, "fix the value") from None


BoundedSafeLoader.add_constructor("tag:yaml.org,2002:int", BoundedSafeLoader.construct_bounded_int)


def yaml_value(text: str) -> Any:
    """Parse YAML text with `BoundedSafeLoader`; raises `yaml.YAMLError` (`YamlRefused` for refusals)."""
    return yaml.load(text, Loader=BoundedSafeLoader)  # noqa: S506 - a SafeLoader subclass


def parse_yaml(text: str, source: str) -> Any:
    """Parse YAML text; any problem is one ConfigError naming `source` and the line."""
    try:
        return yaml_value(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}:" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        hint = e.note if isinstance(e, YamlRefused) and e.note else "fix the syntax there"
        raise ConfigError(f"{source}:{where} invalid YAML ({problem})", hint) from None


def read_text_file(path: str | Path, *, limit: int = MAX_CONFIG_BYTES, what: str = "file") -> str:
    """A UTF-8 text file of at most `limit` bytes; the size is checked before reading."""
    p = Path(path)
    try:
        if not p.exists():
            raise ConfigError(f"{p}: {what} not found", "check the path")
        if not p.is_file():
            raise ConfigError(f"{p}: {what} is not a regular file", "give the path of a YAML file")
        size = p.stat().st_size
        if size > limit:
            raise ConfigError(
                f"{p}: {what} is {size:,} bytes, over the {limit:,}-byte limit",
                "give the small YAML file itself, not data or a generated file",
            )
        with p.open("rb") as f:
            data = f.read(limit + 1)  # the file may have grown since stat
    except OSError as e:
        raise ConfigError(
            f"{p}: cannot read {what} ({e.strerror or e})", "check the path and its permissions"
        ) from None
    if len(data) > limit:
        raise ConfigError(f"{p}: {what} is over the {limit:,}-byte limit", "give the small YAML file itself")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError(
            f"{p}: {what} is not UTF-8 text (byte 0x{data[e.start]:02x} at line {line})",
            "save it as UTF-8 (a binary file is not a config)",
        ) from None


def load_yaml_file(path: str | Path, *, limit: int = MAX_CONFIG_BYTES) -> Any:
    """`read_text_file` then `parse_yaml`: the parsed document (None for an empty file)."""
    return parse_yaml(read_text_file(path, limit=limit), str(path))
