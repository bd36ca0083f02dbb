"""The architecture as checked rules (docs/architecture.md explains them): the import-linter layer
contract, top-of-module imports, small documented subpackages, an import path kept for old
pickles, and the version gates of the two modules that reach into Ray's and FFCV's internals."""

from __future__ import annotations

import ast
import pickle
import re
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest

from cmx.core.errors import ClusterError, CmxError, DataError

REPO = Path(__file__).resolve().parents[1]
# Where each source folder is mapped (pyproject.toml [tool.setuptools] package-dir).
SOURCES = {"platform": "cmx", "models": "cmx.models", "pipelines": "cmx.pipelines"}
CLI = REPO / "platform" / "cli"
HEAVY = ("torch", "ray", "mlflow", "ffcv", "optuna")
MAX_MODULES = 12  # per subpackage of platform/, __init__.py not counted
# Run in a fresh interpreter with a module name: prints the first of HEAVY whose code starts to run
# while that module is imported (and stops right there), or "-" when none does.
HEAVY_PROBE = f"""
import importlib, os, sys
HEAVY = {HEAVY!r}

class StopAtHeavy:
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top not in HEAVY:
            return None
        for finder in sys.meta_path:
            spec = None if finder is self else finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None:  # a lookup alone (importlib.util.find_spec) does not count
            def exec_module(module):
                print(top, flush=True)
                os._exit(0)
            spec.loader.exec_module = exec_module
        return spec

already = [m for m in HEAVY if m in sys.modules]
if already:
    print(already[0])
    sys.exit(0)
sys.meta_path.insert(0, StopAtHeavy())
importlib.import_module(sys.argv[1])
print("-")
"""


def source_files() -> list[Path]:
    return sorted(p for folder in SOURCES for p in (REPO / folder).rglob("*.py"))


def module_name(path: Path) -> str:
    """`platform/cli/main.py` -> `cmx.cli.main`; a package's `__init__.py` -> the package."""
    rel = path.relative_to(REPO)
    parts = [*SOURCES[rel.parts[0]].split("."), *rel.parts[1:-1]]
    if rel.name != "__init__.py":
        parts.append(rel.stem)
    return ".".join(parts)


def is_module(dotted: str) -> bool:
    """Whether `dotted` (cmx...) names a module or package file in this repo."""
    parts = dotted.split(".")
    if parts[:2] in (["cmx", "models"], ["cmx", "pipelines"]):
        base, rest = REPO / parts[1], parts[2:]
    else:
        base, rest = REPO / "platform", parts[1:]
    target = base.joinpath(*rest)
    return target.with_suffix(".py").is_file() or (target / "__init__.py").is_file()


def function_level_cmx_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of each cmx module imported inside a function of `path`."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if in_function and isinstance(child, ast.Import):
                found.extend((child.lineno, a.name) for a in child.names if a.name.split(".")[0] == "cmx")
            elif in_function and isinstance(child, ast.ImportFrom):
                if child.level:  # relative: resolved against this file's package
                    base = ".".join(package.split(".")[: len(package.split(".")) - child.level + 1])
                    source = f"{base}.{child.module}" if child.module else base
                else:
                    source = child.module or ""
                if source.split(".")[0] == "cmx":
                    for alias in child.names:  # `from cmx.tracking import store` imports a module
                        sub = f"{source}.{alias.name}"
                        found.append((child.lineno, sub if is_module(sub) else source))
            visit(child, inner)

    visit(ast.parse(path.read_text(), filename=str(path)), False)
    return found


def heavy_at_load(module: str) -> str:
    """The first of HEAVY that importing `module` loads, "-" for none (a fresh interpreter)."""
    out = subprocess.run(
        [sys.executable, "-c", HEAVY_PROBE, module], capture_output=True, text=True, timeout=300, cwd=REPO
    )
    lines = out.stdout.split()
    if out.returncode != 0 or not lines:
        return f"import failed: {(out.stderr.strip().splitlines() or ['?'])[-1]}"
    return lines[-1]


# ---------------------------------------------------------------- (a) the import contracts


def test_import_linter_contracts_are_kept() -> None:
    pyproject = (REPO / "pyproject.toml").read_text()
    contracts = re.findall(r'^\[\[tool\.importlinter\.contracts\]\]\s*\nname = "([^"]+)"', pyproject, re.M)
    assert contracts, "no [[tool.importlinter.contracts]] in pyproject.toml"
    out = subprocess.run(
        [str(Path(sys.executable).parent / "lint-imports")], capture_output=True, text=True, timeout=300, cwd=REPO
    )
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    assert f"Contracts: {len(contracts)} kept, 0 broken." in text, text[-4000:]
    for name in contracts:
        assert f"{name} KEPT" in text, (name, text[-4000:])


# ---------------------------------------------------------------- (b) imports at the top


def test_cmx_imports_are_at_module_level_outside_the_cli() -> None:
    offenders = [
        f"{path.relative_to(REPO)}:{line} imports {module} inside a function"
        for path in source_files()
        if CLI not in path.parents
        for line, module in function_level_cmx_imports(path)
    ]
    assert not offenders, "import these at the top of the module:\n" + "\n".join(offenders)


def test_cli_defers_only_cmx_modules_that_load_heavy_libraries() -> None:
    """`cmx --help` stays instant because the CLI imports heavy modules inside its commands; a
    deferred import of a module that loads none of torch/ray/mlflow/ffcv/optuna belongs at the top."""
    deferred = [
        (path.relative_to(REPO), line, module)
        for path in sorted(CLI.glob("*.py"))
        for line, module in function_level_cmx_imports(path)
    ]
    modules = sorted({module for _, _, module in deferred})
    with ThreadPoolExecutor(max_workers=4) as pool:
        heavy = dict(zip(modules, pool.map(heavy_at_load, modules), strict=True))
    why = {m: f"loads none of {'/'.join(HEAVY)}" if h == "-" else h for m, h in heavy.items()}
    offenders = [
        f"{path}:{line} imports {module} inside a function, but {module} {why[module]}"
        for path, line, module in deferred
        if heavy[module] not in HEAVY
    ]
    assert not offenders, "import these at the top of the module:\n" + "\n".join(offenders)


# ---------------------------------------------------------------- (c) small, documented packages


def test_platform_subpackages_stay_small() -> None:
    sizes = {
        pkg.name: len([p for p in pkg.glob("*.py") if p.name != "__init__.py"])
        for pkg in sorted((REPO / "platform").iterdir())
        if (pkg / "__init__.py").is_file()
    }
    assert sizes, "no subpackages found under platform/"
    too_big = {name: n for name, n in sizes.items() if n > MAX_MODULES}
    assert not too_big, f"more than {MAX_MODULES} modules (split the package): {too_big}"


def test_architecture_doc_names_every_module_file() -> None:
    doc = REPO / "docs" / "architecture.md"
    if not doc.is_file():
        pytest.skip("docs/architecture.md is not written yet")
    text = doc.read_text()
    missing = [str(p.relative_to(REPO)) for p in source_files() if str(p.relative_to(REPO)) not in text]
    assert not missing, "docs/architecture.md does not mention:\n" + "\n".join(missing)


# ---------------------------------------------------------------- (d) old import paths


def test_pickles_naming_the_pre_0_2_model_path_still_load() -> None:
    """Models registered by cmx 0.1 pickled `cmx.tracking_model.ConvMixerPyfunc`."""
    from cmx.tracking.model import ConvMixerPyfunc

    assert pickle.loads(b"ccmx.tracking_model\nConvMixerPyfunc\n.") is ConvMixerPyfunc
    # An instance, as protocol 0 writes it, with the module path of the time.
    old = pickle.dumps(ConvMixerPyfunc(), protocol=0).replace(b"cmx.tracking.model\n", b"cmx.tracking_model\n")
    assert b"cmx.tracking_model\n" in old
    assert type(pickle.loads(old)) is ConvMixerPyfunc


# ---------------------------------------------------------------- (e) version gates


@pytest.fixture(params=["ray", "ffcv"])
def compat(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Any, str, type[CmxError]]]:
    """(module, distribution, error class); the module's cached answer is forgotten before and after."""
    if request.param == "ray":
        from cmx.cluster import ray_compat as module

        error: type[CmxError] = ClusterError
    else:
        from cmx.pipelines import ffcv_compat as module

        error = DataError
    forget = getattr(module.check_version, "cache_clear", lambda: None)
    forget()
    yield module, request.param, error
    monkeypatch.undo()
    forget()


def test_version_gate_accepts_the_installed_release(compat: tuple[Any, str, type[CmxError]]) -> None:
    module, dist, _ = compat
    installed = version(dist)
    assert module.check_version() == installed
    low, high = module.TESTED
    parts = tuple(int(p) for p in re.findall(r"\d+", installed)[:3])
    assert low <= parts < high


@pytest.mark.parametrize("tested", [((0, 1, 0), (0, 2, 0)), ((99, 0, 0), (100, 0, 0))], ids=["newer", "older"])
def test_version_gate_refuses_releases_outside_the_range_in_one_line(
    compat: tuple[Any, str, type[CmxError]],
    tested: tuple[tuple[int, ...], tuple[int, ...]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    module, dist, error = compat
    monkeypatch.setattr(module, "TESTED", tested)
    with pytest.raises(error) as e:
        module.check_version()
    line = e.value.one_line()
    assert "\n" not in line, line
    assert version(dist) in line and "outside the range cmx was tested with" in line, line
    assert e.value.hint and "pip install" in e.value.hint, line
