"""The package installs as `cmx`, leaves the standard `platform` module alone, and its CLI is instant."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from support.cli import run_cmx

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


def run(args: list[str], cwd: Path = REPO, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300, **kw)


def test_platform_folder_is_not_a_regular_package() -> None:
    assert (REPO / "platform").is_dir()
    assert not (REPO / "platform" / "__init__.py").exists()


def test_import_platform_from_repo_root_gives_stdlib() -> None:
    out = run([PY, "-c", "import platform, sysconfig; print(platform.__file__); print(platform.python_version())"])
    assert out.returncode == 0, out.stderr
    path = out.stdout.splitlines()[0]
    assert Path(path).parent == Path(__import__("sysconfig").get_paths()["stdlib"])
    # torch imports `platform` too; it must still work from the repo root.
    out = run([PY, "-c", "import torch; print(torch.__version__)"])
    assert out.returncode == 0, out.stderr


def test_cmx_imports_as_namespace_mapped_packages() -> None:
    code = "import cmx.core.config, cmx.models, cmx.pipelines; print(cmx.core.config.__file__)"
    out = run([PY, "-c", code], cwd=Path("/"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("config.py")


def test_help_is_instant_no_heavy_imports() -> None:
    code = (
        "import sys\nfrom click.testing import CliRunner\nfrom cmx.cli import cli\n"
        "r = CliRunner().invoke(cli, ['--help'])\nassert r.exit_code == 0, r.output\n"
        "heavy = [m for m in ('torch', 'ray', 'mlflow', 'ffcv', 'optuna') if m in sys.modules]\n"
        "print(r.output)\nassert not heavy, heavy\n"
    )
    out = run([PY, "-c", code])
    assert out.returncode == 0, out.stdout + out.stderr
    for command in ("train", "sweep", "data", "models"):
        assert command in out.stdout


def test_version() -> None:
    out = run_cmx("--version", cwd=REPO)
    assert out.returncode == 0
    assert "cmx, version" in out.stdout


def test_cli_error_is_one_line_with_nonzero_exit(tmp_path: Path) -> None:
    bad = tmp_path / "run.yaml"
    bad.write_text("model: {name: convmixer_tiny}\noptim: {lr: -1}\n")
    out = run_cmx("train", "--config", str(bad), cwd=REPO)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert str(bad) in lines[0] and "optim.lr" in lines[0]
    assert "Traceback" not in out.stderr
    out = run_cmx("--debug", "train", "--config", str(bad), cwd=REPO)
    assert out.returncode != 0 and "Traceback" in out.stderr


@pytest.mark.slow
def test_non_editable_wheel_contains_the_mapped_packages(tmp_path: Path) -> None:
    out = run([PY, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(REPO)])
    assert out.returncode == 0, out.stderr[-2000:]
    wheel = next(tmp_path.glob("cmx-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "cmx/cli/main.py" in names and "cmx/core/config.py" in names
    for sub in ("core", "cli", "sweep", "confirm", "tracking", "cluster"):
        assert f"cmx/{sub}/__init__.py" in names, sub
    assert any(n.startswith("cmx/models/") for n in names)
    assert any(n.startswith("cmx/pipelines/") for n in names)
    assert not any(n.startswith("platform/") for n in names)
    assert "cmx/__init__.py" not in names
