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
    assert "exported" in out.stdout and "30 train / 30 val / 30 test, 10 classes" in out.stdout
    assert "val: 0.1667 of each class of the official train split (seed 0)" in out.stdout
    for split in ("train", "val", "test"):
        info = dataset_info(tmp_path / "fm" / f"{split}.beton")
        assert info.class_names == list(CLASS_DIRS) and info.num_samples == 30 and info.grayscale
        assert set(info.class_counts.values()) == {3}
        assert dataset_info(tmp_path / "fm" / split).num_samples == 30
    again = run_cmx("data", "builtin", "fashion-mnist", str(tmp_path / "fm"), "--limit-per-class", "3")
    assert again.returncode == 0 and "already complete" in again.stdout


def test_builtin_fashion_mnist_carves_val_from_the_official_train_split(tmp_path: Path) -> None:
    import numpy as np

    from cmx.pipelines.fashion_mnist import MARKER, load_split, source_dir, split_indices

    if not (source_dir() / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("dataset-fashion-mnist is not installed")
    # The full carve, from the real labels (no images written): 50,000 / 10,000 / 10,000, stratified.
    train_labels, test_labels = load_split("train")[1], load_split("test")[1]
    full = split_indices(train_labels, test_labels, val_fraction=1 / 6, seed=0, limit_per_class=None)
    assert [len(full[s]) for s in ("train", "val", "test")] == [50_000, 10_000, 10_000]
    assert set(np.bincount(train_labels[full["val"]])) == {1000}
    assert set(np.bincount(train_labels[full["train"]])) == {5000}
    assert not set(full["train"]) & set(full["val"])
    again = split_indices(train_labels, test_labels, val_fraction=1 / 6, seed=0, limit_per_class=None)
    assert np.array_equal(again["val"], full["val"])
    other = split_indices(train_labels, test_labels, val_fraction=1 / 6, seed=1, limit_per_class=None)
    assert not np.array_equal(other["val"], full["val"])
    # Exported: file names are official indices; val's and train's come from the official train
    # split and never overlap; test's are the first of each class of the official test split.
    fm = tmp_path / "fm"
    out = run_cmx("data", "builtin", "fashion-mnist", str(fm), "--limit-per-class", "2", "--no-beton", "--seed", "5")
    assert out.returncode == 0, out.stderr
    assert "20 train / 20 val / 20 test" in out.stdout and "(seed 5)" in out.stdout
    names = {s: {int(p.stem) for p in (fm / s).rglob("*.jpg")} for s in ("train", "val", "test")}
    assert len(names["train"]) == len(names["val"]) == 20 and not names["train"] & names["val"]
    chosen = split_indices(train_labels, test_labels, val_fraction=1 / 6, seed=5, limit_per_class=2)
    assert names == {s: set(chosen[s].tolist()) for s in ("train", "val", "test")}
    expected_test = {int(i) for c in range(10) for i in np.nonzero(test_labels == c)[0][:2]}
    assert names["test"] == expected_test
    # An export of the old layout (its `val` was the official test split) is redone, not reused.
    marker = json.loads((fm / MARKER).read_text())
    marker["params"]["version"] = 1
    (fm / MARKER).write_text(json.dumps(marker))
    redo = run_cmx("data", "builtin", "fashion-mnist", str(fm), "--limit-per-class", "2", "--no-beton", "--seed", "5")
    assert redo.returncode == 0 and "exported" in redo.stdout and "already complete" not in redo.stdout


def test_convert_carves_a_validation_split(tmp_path: Path) -> None:
    from support.data import make_square_folder

    from cmx.pipelines.beton import dataset_info
    from cmx.pipelines.images import scan_image_folder, stratified_split

    src = make_square_folder(tmp_path / "src", size=12, per_class=6)  # 3 classes x 6 images
    train, val = tmp_path / "train.beton", tmp_path / "val.beton"
    args = ("--val-out", str(val), "--val-fraction", "0.5", "--seed", "3", "--write-mode", "raw", "--workers", "1")
    out = run_cmx("data", "convert", str(src), str(train), *args)
    assert out.returncode == 0, out.stderr
    assert "carved 0.5 of each class into validation (seed 3): 9 train / 9 val images" in out.stdout
    t, v = dataset_info(train), dataset_info(val)
    assert set(t.class_counts.values()) == set(v.class_counts.values()) == {3}
    side = json.loads(Path(f"{val}.json").read_text())
    assert side["write_options"]["carve"] == {"role": "val", "fraction": 0.5, "seed": 3}
    # Which images went where is the library's seeded carve: disjoint, the same for the same seed.
    labels = [label for _, label in scan_image_folder(src).samples]
    a, b = stratified_split(labels, 0.5, 3), stratified_split(labels, 0.5, 3)
    assert a.val.tolist() == b.val.tolist() and not set(a.train) & set(a.val)
    # Pixel check: the val file holds exactly the carved images (each image here is unique).
    from cmx.pipelines.images import load_rgb_array

    carved = {load_rgb_array(scan_image_folder(src).samples[i][0]).tobytes() for i in a.val}
    stored = {bytes(img) for img in _decoded_images(val)}
    assert stored == carved
    again = run_cmx("data", "convert", str(src), str(train), *args)
    one_line_error(again, "already exists", "--overwrite")
    bad = run_cmx("data", "convert", str(src), str(tmp_path / "x.beton"), "--val-fraction", "0.2")
    assert bad.returncode != 0 and "--val-fraction needs --val-out" in bad.stderr


def _decoded_images(path: Path) -> list[bytes]:
    """Every stored image of a raw-mode `.beton`, as RGB bytes (read at each sample's data pointer)."""
    import numpy as np

    from cmx.pipelines.beton import read_beton

    bf = read_beton(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    sizes = dict(zip(bf.alloc_table["ptr"].tolist(), bf.alloc_table["size"].tolist(), strict=True))
    return [
        bytes(mm[int(r["data_ptr"]) : int(r["data_ptr"]) + sizes[int(r["data_ptr"])]]) for r in bf.field_values("image")
    ]


def test_builtin_fashion_mnist_missing_package(tmp_path: Path) -> None:
    out = run_cmx(
        "data",
        "builtin",
        "fashion-mnist",
        str(tmp_path / "fm"),
        env={"CMX_FASHION_MNIST_DIR": str(tmp_path / "none")},
    )
    one_line_error(out, "Fashion-MNIST not found", "apt-get install dataset-fashion-mnist")
