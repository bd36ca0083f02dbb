"""benchmarks/gpu_check.sh's CPU side: its options, its plan, and a clear stop without a GPU."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


def gpu_check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=120, cwd=REPO)


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def test_dry_run_prints_the_four_steps_and_checks_the_scripts(tmp_path: Path) -> None:
    out = gpu_check("--dry-run", "--out", str(tmp_path / "gpu"), "--budget-s", "300")
    assert out.returncode == 0, out.stderr
    for step in ("1. model", "2. train", "3. cli", "4. sweep"):
        assert step in out.stdout
    assert "budget 300 s" in out.stdout and str(tmp_path / "gpu") in out.stdout
    assert "device:" in out.stdout
    assert not (tmp_path / "gpu").exists()  # a dry run writes nothing


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bogus"], "unknown argument '--bogus'"),
        (["--budget-s", "5"], "--budget-s needs a whole number of seconds >= 60"),
        (["--budget-s", "lots"], "--budget-s needs a whole number"),
        (["--out"], "--out needs a folder"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(args: list[str], message: str) -> None:
    out = gpu_check(*args)
    assert out.returncode == 2
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0], out.stderr


def test_out_that_is_a_file_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "results"
    target.write_text("not a folder")
    out = gpu_check("--dry-run", "--out", str(target))
    assert out.returncode == 2 and "is not a folder" in out.stderr
    assert target.read_text() == "not a folder"


@pytest.mark.skipif(cuda_available(), reason="this machine has a GPU: the real run is benchmarks/gpu_check.sh")
def test_without_a_gpu_it_stops_before_running_anything(tmp_path: Path) -> None:
    out = gpu_check("--out", str(tmp_path / "gpu"))
    assert out.returncode == 1
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "no CUDA device" in lines[0], out.stderr
    assert not (tmp_path / "gpu").exists()


def test_help_lists_the_steps_and_options() -> None:
    out = gpu_check("--help")
    assert out.returncode == 0
    assert "--dry-run" in out.stdout and "cmx sweep" in out.stdout
