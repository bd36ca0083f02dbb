"""Rejection rules between sweep parameters, e.g. `model.dim * model.depth <= 4096`.

A rule is a Python-syntax expression over dotted config keys, numbers, arithmetic, comparisons,
`and`/`or`/`not`, `in`, and `len()`. It is parsed with `ast` and evaluated over a whitelist of
node types: no names other than config keys, no calls other than len/min/max/sum, no attributes
that start with `_` (no `__class__`, `model.__dict__`). Evaluation is bounded: a rule is at most
`MAX_RULE_CHARS` long, arithmetic takes numbers only (no `'a' * 10**9`), an exponent is at most
`MAX_EXPONENT` and no integer grows past `MAX_INT_BITS` bits, so `10**10**10 > 0` is an error at
once, not a hang.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable
from typing import Any

_BINOPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_CMPOPS = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b,
}
_FUNCS: dict[str, Callable[..., Any]] = {"len": len, "min": min, "max": max, "sum": sum}

MAX_RULE_CHARS = 1000
MAX_EXPONENT = 1024
MAX_INT_BITS = 4096


def rule_keys(tree: ast.AST) -> list[str]:
    """The dotted config keys a parsed rule reads (outermost names and attributes only), in order."""
    keys: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, (ast.Name, ast.Attribute)):
            key = _dotted(node)
            if key and key not in keys:
                keys.append(key)
            return
        for child in ast.iter_child_nodes(node):
            if not (isinstance(node, ast.Call) and child is node.func):
                visit(child)

    visit(tree)
    return keys


def _number(value: Any, rule: str) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"rule {rule!r}: arithmetic needs numbers, got {type(value).__name__} {value!r:.40}")
    return value


def _arith(op: type[ast.operator], left: Any, right: Any, rule: str) -> Any:
    """One arithmetic step on numbers, refused before it could take long or grow without bound."""
    a, b = _number(left, rule), _number(right, rule)
    if op is ast.Pow and abs(b) > MAX_EXPONENT:
        raise ValueError(f"rule {rule!r}: exponent {b!r:.40} is over {MAX_EXPONENT}")
    if op is ast.Pow and isinstance(a, int) and isinstance(b, int) and a.bit_length() * b > MAX_INT_BITS:
        raise ValueError(f"rule {rule!r}: {a}**{b} is too large (over {MAX_INT_BITS} bits)")
    try:
        out = _BINOPS[op](a, b)
    except (ZeroDivisionError, OverflowError) as e:
        raise ValueError(f"rule {rule!r}: {e}") from None
    if isinstance(out, int) and out.bit_length() > MAX_INT_BITS:
        raise ValueError(f"rule {rule!r}: an intermediate value is over {MAX_INT_BITS} bits")
    if isinstance(out, complex):
        raise ValueError(f"rule {rule!r}: a negative number to a fractional power is not a real number")
    return out


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        head = _dotted(node.value)
        return f"{head}.{node.attr}" if head else None
    return None


def compile_rule(rule: str) -> ast.Expression:
    """Parse a rule; ValueError names what is not allowed."""
    if not isinstance(rule, str):
        raise ValueError(f"a rule is a string such as 'model.dim * model.depth <= 4096', got {rule!r:.60}")
    if len(rule) > MAX_RULE_CHARS:
        raise ValueError(f"rule {rule[:40]!r}... is {len(rule)} characters, over {MAX_RULE_CHARS}")
    try:
        tree = ast.parse(rule, mode="eval")
    except (SyntaxError, RecursionError, MemoryError) as e:
        raise ValueError(f"cannot parse {rule!r}: {getattr(e, 'msg', None) or 'nested too deeply'}") from None
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_"):
            raise ValueError(f"{rule!r}: unknown config key {_dotted(node) or node.attr!r} (no key starts with _)")
        if isinstance(node, ast.Name) and node.id.startswith("_"):
            raise ValueError(f"{rule!r}: unknown config key {node.id!r} (no key starts with _)")
        if isinstance(node, ast.Call):
            if not (isinstance(node.func, ast.Name) and node.func.id in _FUNCS):
                raise ValueError(f"{rule!r}: only {', '.join(_FUNCS)} may be called")
        elif not isinstance(
            node,
            (
                ast.Expression,
                ast.BoolOp,
                ast.And,
                ast.Or,
                ast.UnaryOp,
                ast.Not,
                ast.USub,
                ast.UAdd,
                ast.BinOp,
                ast.Compare,
                ast.Constant,
                ast.Name,
                ast.Attribute,
                ast.Load,
                ast.List,
                ast.Tuple,
                *_BINOPS,
                *_CMPOPS,
            ),
        ):
            raise ValueError(f"{rule!r}: {type(node).__name__} is not allowed in a rule")
    return tree


def evaluate_rule(rule: str, config: dict[str, Any]) -> bool:
    """True when `config` (a nested mapping) satisfies the rule."""

    def ev(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, (ast.Name, ast.Attribute)):
            key = _dotted(node)
            value: Any = config
            for part in (key or "").split("."):
                if not isinstance(value, dict) or part not in value or part.startswith("_"):
                    raise ValueError(f"rule {rule!r}: unknown config key {key!r}")
                value = value[part]
            return value
        if isinstance(node, (ast.List, ast.Tuple)):
            return [ev(e) for e in node.elts]
        if isinstance(node, ast.BoolOp):
            values = (ev(v) for v in node.values)
            return all(values) if isinstance(node.op, ast.And) else any(values)
        if isinstance(node, ast.UnaryOp):
            v = ev(node.operand)
            if isinstance(node.op, ast.Not):
                return not v
            return -_number(v, rule) if isinstance(node.op, ast.USub) else _number(v, rule)
        if isinstance(node, ast.BinOp):
            return _arith(type(node.op), ev(node.left), ev(node.right), rule)
        if isinstance(node, ast.Compare):
            left = ev(node.left)
            for op, comp in zip(node.ops, node.comparators, strict=True):
                right = ev(comp)
                if not _CMPOPS[type(op)](left, right):
                    return False
                left = right
            return True
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):  # compile_rule allows only names
            return _FUNCS[node.func.id](*[ev(a) for a in node.args])
        raise ValueError(f"rule {rule!r}: {type(node).__name__} is not allowed")

    try:
        return bool(ev(compile_rule(rule)))
    except (TypeError, ZeroDivisionError, OverflowError, RecursionError) as e:
        raise ValueError(f"rule {rule!r}: {e}") from None


def violated(rules: list[str], config: dict[str, Any]) -> str | None:
    """The first rule `config` breaks, or None."""
    for rule in rules:
        if not evaluate_rule(rule, config):
            return rule
    return None
