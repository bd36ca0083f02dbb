"""Hostile config files and hostile sizes: every command that reads a YAML file (run config, search
file, cluster file, saved spec, `--set` values) fails with one line and exit 2, fast, and writes
nothing; model/data sizes and sweep ranges are bounded by the schema before anything is allocated.
"""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from support.cli import run_cmx

from cmx.core.config import MAX_DEPTH, MAX_DIM, MAX_RESOLUTION, ModelConfig, load_yaml
from cmx.core.errors import ConfigError
from cmx.core.yaml_files import MAX_CONFIG_BYTES, MAX_YAML_NODES, parse_yaml

FAST = 3.0  # seconds a refused file may take, process start included (the CLI starts in ~1 s)


def alias_bomb() -> str:
    """Nine levels of nine aliases: 9**9 strings once expanded (a "billion laughs")."""
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, 10):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]")
    return "\n".join(lines) + "\n"


def _binary(p: Path) -> None:
    p.write_bytes(bytes(range(256)) * 64)


def _latin1(p: Path) -> None:
    p.write_bytes("name: café\nbase: {}\n".encode("latin-1"))


def _huge(p: Path) -> None:
    with p.open("wb") as f:  # 50 MB of one long key: reading, let alone parsing it, would be slow
        f.seek(50 * 1024 * 1024 - 1)
        f.write(b"a")


def _duplicate(p: Path) -> None:
    p.write_text("name: first\nbase: {}\nname: second\n")


def _bomb(p: Path) -> None:
    p.write_text(alias_bomb())


HOSTILE: dict[str, tuple[Callable[[Path], None], tuple[str, ...]]] = {
    # kind: (writer, words the error line must hold besides the file name)
    "binary": (_binary, ("not UTF-8",)),
    "latin1": (_latin1, ("not UTF-8", "0xe9", "line 1")),
    "huge": (_huge, ("52,428,800 bytes", f"{MAX_CONFIG_BYTES:,}-byte limit")),
    "duplicate": (_duplicate, ("duplicate key 'name'", "line 3", "first on line 1")),
    "alias-bomb": (_bomb, ("alias", f"{MAX_YAML_NODES:,}")),
}

COMMANDS = {
    "train": ("train", "--no-tracking", "--config"),
    "sweep": ("sweep", "--dry-run", "--space"),
    "cluster": ("cluster", "check"),
}


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def assert_one_error(out: object, *needles: str, code: int = 2) -> str:
    """Exit `code`, no traceback, stderr exactly one non-empty line starting `error:` holding `needles`."""
    rc, stderr = out.returncode, out.stderr  # type: ignore[attr-defined]
    assert "Traceback" not in stderr + out.stdout, stderr  # type: ignore[attr-defined]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error:"), stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert rc == code, (rc, stderr)
    return lines[0]


def run_fast(tmp_path: Path, *args: str) -> object:
    """`cmx ARGS` with a home in tmp_path; must finish within FAST seconds and write nothing."""
    before = listing(tmp_path)
    start = time.monotonic()
    out = run_cmx(*args, home=tmp_path / "home", cwd=tmp_path, timeout=30)
    took = time.monotonic() - start
    assert took < FAST, f"took {took:.1f} s"
    assert listing(tmp_path) == before, "the command wrote files"
    return out


# ------------------------------------------------------------------ hostile files, every reader


@pytest.mark.parametrize("kind", list(HOSTILE))
@pytest.mark.parametrize("command", list(COMMANDS))
def test_hostile_file_is_one_line(tmp_path: Path, command: str, kind: str) -> None:
    write, needles = HOSTILE[kind]
    path = tmp_path / f"{kind}.yaml"
    write(path)
    out = run_fast(tmp_path, *COMMANDS[command], str(path))
    assert_one_error(out, str(path), *needles)


def test_hostile_base_file_of_a_sweep(tmp_path: Path) -> None:
    _bomb(tmp_path / "base.yaml")
    space = tmp_path / "space.yaml"
    space.write_text("base: base.yaml\nspace:\n  model.depth: {type: int, low: 2, high: 4}\n")
    out = run_fast(tmp_path, "sweep", "--dry-run", "--space", str(space))
    assert_one_error(out, "base.yaml", "alias")


@pytest.mark.parametrize("kind", ["binary", "duplicate", "alias-bomb"])
def test_hostile_saved_spec_on_resume(tmp_path: Path, kind: str) -> None:
    saved = tmp_path / "home" / "sweeps" / "old" / "cmx-sweep.yaml"
    saved.parent.mkdir(parents=True)
    HOSTILE[kind][0](saved)
    out = run_fast(tmp_path, "sweep", "--resume", "old", "--dry-run")
    assert_one_error(out, "cmx-sweep.yaml")


def test_hostile_saved_spec_in_status(tmp_path: Path) -> None:
    saved = tmp_path / "home" / "sweeps" / "old" / "cmx-sweep.yaml"
    saved.parent.mkdir(parents=True)
    _bomb(saved)
    out = run_fast(tmp_path, "sweep", "status", "old")
    assert_one_error(out, "cmx-sweep.yaml", "alias")


def test_alias_bomb_in_set_value(tmp_path: Path) -> None:
    flow = "{" + ", ".join(alias_bomb().strip().splitlines()) + "}"  # the bomb on one line
    out = run_fast(tmp_path, "train", "--no-tracking", "--set", f"model.kernel_size={flow}")
    assert_one_error(out, "--set model.kernel_size", "alias")


def test_empty_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_yaml(empty) == {}
    out = run_fast(tmp_path, "sweep", "--dry-run", "--space", str(empty))
    assert_one_error(out, str(empty), "missing key 'base'")
    out = run_cmx("train", "--no-tracking", "--config", str(empty), home=tmp_path / "home", timeout=60)
    assert_one_error(out, "data.train_path")  # defaults only: no data to train on


def test_special_file_is_refused(tmp_path: Path) -> None:
    out = run_fast(tmp_path, "train", "--no-tracking", "--config", "/dev/zero")
    assert_one_error(out, "/dev/zero", "not a regular file")


# ------------------------------------------------------------------ the loader itself


def test_loader_keeps_safe_yaml_features() -> None:
    text = "base: &b {lr: 1, wd: 2}\nrun:\n  <<: *b\n  lr: 3\nlist: [*b, *b]\n"
    assert parse_yaml(text, "x") == {
        "base": {"lr": 1, "wd": 2},
        "run": {"lr": 3, "wd": 2},
        "list": [{"lr": 1, "wd": 2}] * 2,
    }
    with pytest.raises(ConfigError, match="could not determine a constructor"):
        parse_yaml("!!python/object/apply:os.system [echo hi]", "x")


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("a: &a [1, *a]\n", "refers to the node that contains it"),
        ("[" * 10_000 + "]" * 10_000, "nested more than"),
        ("x: " + "9" * 5000 + "\n", "integer too long"),
        ("a:\n  b: 1\n  b: 2\n", "duplicate key 'b' (first on line 2)"),
    ],
)
def test_loader_refusals_name_the_line(text: str, needle: str) -> None:
    with pytest.raises(ConfigError, match="line") as e:
        parse_yaml(text, "f.yaml")
    assert needle in e.value.message and e.value.message.startswith("f.yaml: line ")


def test_alias_bomb_is_refused_fast_in_bounded_memory() -> None:
    tracemalloc.start()
    start = time.monotonic()
    with pytest.raises(ConfigError, match="alias bomb"):
        parse_yaml(alias_bomb(), "bomb.yaml")
    took = time.monotonic() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert took < 1.0 and peak < 20 * 1024 * 1024, (took, peak)


def test_file_at_the_limit_is_read(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_text("# " + "x" * (MAX_CONFIG_BYTES - 20) + "\nname: ok\n")
    assert path.stat().st_size <= MAX_CONFIG_BYTES
    assert load_yaml(path) == {"name": "ok"}


# ------------------------------------------------------------------ sizes that explode


def base_config(tmp_path: Path, section: str, key: str, value: object) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({section: {key: value}}))
    return path


@pytest.mark.parametrize(
    ("section", "key", "value", "limit"),
    [
        ("model", "depth", 10**7, str(MAX_DEPTH)),
        ("model", "dim", 10**12, str(MAX_DIM)),
        ("model", "patch_size", 10**6, "1024"),
        ("model", "kernel_size", 100_001, "1023"),
        ("model", "kernel_size", [{"blocks": 10**9, "kernel_size": 3}], "1024"),
        ("model", "kernel_size", [3] * 2000, "1024"),
        ("data", "resolution", 100_000, str(MAX_RESOLUTION)),
        ("data", "val_resolution", 100_000, str(MAX_RESOLUTION)),
        ("data", "batch_size", 10**9, "65536"),
        ("data", "val_batch_size", 10**9, "65536"),
        ("loop", "epochs", 10**9, "100000"),
    ],
)
def test_size_over_the_limit_is_one_line(tmp_path: Path, section: str, key: str, value: object, limit: str) -> None:
    path = base_config(tmp_path, section, key, value)
    out = run_fast(tmp_path, "train", "--no-tracking", "--config", str(path))
    line = assert_one_error(out, str(path), f"{section}.{key}", limit)
    assert len(line) < 400  # a long list is cut, not printed whole


def test_sizes_at_the_limit_are_accepted() -> None:
    cfg = ModelConfig(dim=MAX_DIM, depth=MAX_DEPTH, patch_size=1024, kernel_size=[1023] * MAX_DEPTH)
    assert cfg.overrides()["dim"] == MAX_DIM
    stages = ModelConfig(kernel_size=[{"blocks": MAX_DEPTH, "kernel_size": [3, 5, 7, 9]}])
    assert stages.kernel_size is not None


def test_size_via_set_is_one_line(tmp_path: Path) -> None:
    out = run_fast(tmp_path, "train", "--no-tracking", "--set", "model.dim=1000000000000")
    assert_one_error(out, "model.dim", str(MAX_DIM))


def sweep_file(tmp_path: Path, space: str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(f"base: {{model: {{name: convmixer_tiny}}}}\nspace:\n  {space}\n")
    return path


@pytest.mark.parametrize(
    ("space", "needles"),
    [
        ("optim.lr: {type: float, low: 0.001, high: .inf}", ("space.optim.lr.high", "finite")),
        ("optim.lr: {type: float, low: .nan, high: 0.1}", ("space.optim.lr.low", "finite")),
        ("optim.lr: {type: loguniform, low: 1.0e-4, high: .inf}", ("space.optim.lr.high", "finite")),
        ("optim.lr: {type: float, low: -.inf, high: 0.1}", ("space.optim.lr.low", "finite")),
        ("model.depth: {type: int, low: 2, high: 10000000}", ("model.depth", str(MAX_DEPTH))),
        ("model.dim: {type: int, low: 8, high: 1000000000000}", ("model.dim", str(MAX_DIM))),
        ("data.resolution: {type: int, low: 32, high: 100000}", ("data.resolution", str(MAX_RESOLUTION))),
        ("loop.seed: {type: int, low: 0, high: 100000000000000000000}", ("space.loop.seed.high",)),
        ("model.dim: {type: choice, values: [64, 1000000]}", ("model.dim", str(MAX_DIM))),
    ],
)
def test_sweep_range_over_the_limit_is_one_line(tmp_path: Path, space: str, needles: tuple[str, ...]) -> None:
    path = sweep_file(tmp_path, space)
    out = run_fast(tmp_path, "sweep", "--dry-run", "--space", str(path))
    assert_one_error(out, str(path), *needles)


def test_sweep_range_within_the_limits_plans(tmp_path: Path) -> None:
    path = sweep_file(tmp_path, f"model.depth: {{type: int, low: 2, high: {MAX_DEPTH}}}")
    out = run_cmx("sweep", "--dry-run", "--space", str(path), home=tmp_path / "home", timeout=60)
    assert out.returncode == 0, out.stderr


def test_sweep_list_skips_a_damaged_sweep_and_names_it(tmp_path: Path) -> None:
    storage = tmp_path / "sweeps"
    (storage / "bad").mkdir(parents=True)
    (storage / "bad" / "cmx-sweep.yaml").write_text("name: bad\nspace: {a: 1}\nspace: {b: 2}\n")
    out = run_cmx("sweep", "list", "--storage", str(storage), home=tmp_path / "home")
    assert out.returncode == 0, out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("skipped:") and "bad/cmx-sweep.yaml" in lines[0], out.stderr
    assert "duplicate key 'space'" in lines[0] and "Traceback" not in out.stderr
