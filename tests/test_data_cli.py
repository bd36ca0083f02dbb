"""`cmx data ...` end to end through the installed `cmx` script: outputs, exit codes, one-line errors."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from support.cli import run_cmx
from support.data import make_dirty_folder

from cmx.cli import data as cli_data
from cmx.pipelines import beton

pytestmark = pytest.mark.timeout(300)


def one_line_error(out: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in out.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_help_shows_the_ffcv_imagenet_defaults() -> None:
    assert (
        cli_data.DEFAULT_MAX_RESOLUTION,
        cli_data.DEFAULT_WRITE_MODE,
        cli_data.DEFAULT_JPEG_QUALITY,
        cli_data.DEFAULT_COMPRESS_PROBABILITY,
    ) == (
        beton.DEFAULT_MAX_RESOLUTION,
        beton.DEFAULT_WRITE_MODE,
        beton.DEFAULT_JPEG_QUALITY,
        beton.DEFAULT_COMPRESS_PROBABILITY,
    )
    out = run_cmx("data", "convert", "--help")
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    for shown in (
        "default: 500",
        "default: proportion",
        "default: 90",
        "default: 0.5",
        "--workers",
        "--limit",
        "--strict",
    ):
        assert shown in text, shown


def test_convert_inspect_verify(tmp_path: Path) -> None:
    src, bad = make_dirty_folder(tmp_path / "src")
    out_file = tmp_path / "out" / "d.beton"
    out = run_cmx("data", "convert", str(src), str(out_file), "--workers", "2", "--max-resolution", "32")
    assert out.returncode == 0, out.stderr
    assert "12 images, 3 classes" in out.stdout
    assert "skipped 2 unreadable image(s)" in out.stderr and all(b in out.stderr for b in bad)

    out = run_cmx("data", "inspect", str(out_file))
    assert out.returncode == 0 and "12 samples" in out.stdout
    assert all(f"{c}" in out.stdout for c in ("cat", "dog", "emu")) and "image (rgb_image)" in out.stdout
    info = json.loads(run_cmx("data", "inspect", str(out_file), "--json").stdout)
    assert info["class_counts"] == {"cat": 4, "dog": 4, "emu": 4}

    out = run_cmx("data", "verify", str(out_file))
    assert out.returncode == 0 and "ok: 12 of 12" in out.stdout

    one_line_error(run_cmx("data", "convert", str(src), str(out_file)), "already exists", "--overwrite")
    one_line_error(
        run_cmx("data", "convert", str(src), str(tmp_path / "s.beton"), "--strict"),
        "unreadable image",
        "--strict",
    )
    assert not (tmp_path / "s.beton").exists()


@pytest.mark.parametrize("content", [b"", b"not a beton at all" * 20])
def test_bad_files_give_one_line(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "x.beton"
    path.write_bytes(content)
    for command in ("inspect", "verify"):
        one_line_error(run_cmx("data", command, str(path)), str(path), "not an FFCV .beton")
    one_line_error(run_cmx("data", "inspect", str(tmp_path / "missing.beton")), "file not found")
    one_line_error(
        run_cmx("data", "convert", str(tmp_path / "nope"), str(tmp_path / "y.beton")), "image folder not found"
    )


def test_builtin_fashion_mnist_small_and_idempotent(tmp_path: Path) -> None:
    from cmx.pipelines.beton import dataset_info
    from cmx.pipelines.fashion_mnist import CLASS_DIRS, source_dir

    if not (source_dir() / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("dataset-fashion-mnist is not installed")
    out = run_cmx("data", "builtin", "fashion-mnist", str(tmp_path / "fm"), "--limit-per-class", "3", "--workers", "1")
    assert out.returncode == 0, out.stderr
    assert "exported" in out.stdout and "30 train / 30 val, 10 classes" in out.stdout
    info = dataset_info(tmp_path / "fm" / "train.beton")
    assert info.class_names == list(CLASS_DIRS) and info.num_samples == 30 and info.grayscale
    assert set(info.class_counts.values()) == {3}
    assert dataset_info(tmp_path / "fm" / "val").num_samples == 30
    again = run_cmx("data", "builtin", "fashion-mnist", str(tmp_path / "fm"), "--limit-per-class", "3")
    assert again.returncode == 0 and "already complete" in again.stdout


def test_builtin_fashion_mnist_missing_package(tmp_path: Path) -> None:
    out = run_cmx(
        "data",
        "builtin",
        "fashion-mnist",
        str(tmp_path / "fm"),
        env={"CMX_FASHION_MNIST_DIR": str(tmp_path / "none")},
    )
    one_line_error(out, "Fashion-MNIST not found", "apt-get install dataset-fashion-mnist")
