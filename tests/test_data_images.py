"""ImageFolder scanning and the RGB conversion both backends and the writer share."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from support.data import CLASSES, make_clean_folder, make_dirty_folder

from cmx.core.errors import DataError
from cmx.pipelines.images import check_image, load_rgb_array, scan_image_folder, to_rgb


def test_scan_matches_torchvision_imagefolder(tmp_path: Path) -> None:
    from torchvision.datasets import ImageFolder

    root = make_clean_folder(tmp_path / "clean")
    scan = scan_image_folder(root)
    tv = ImageFolder(str(root))
    assert scan.class_names == list(CLASSES) == tv.classes
    assert [(str(p), y) for p, y in scan.samples] == tv.samples
    assert scan.class_counts == {"cat": 4, "dog": 4, "emu": 4}


def test_scan_skips_hidden_and_lists_non_images(tmp_path: Path) -> None:
    root, _ = make_dirty_folder(tmp_path / "dirty")
    (root / ".ipynb_checkpoints").mkdir()
    (root / "cat" / "._cat_0_rgb.jpg").write_bytes(b"AppleDouble")
    scan = scan_image_folder(root)
    assert scan.class_names == list(CLASSES)
    assert [p.name for p in scan.ignored] == ["notes.txt"]
    assert not any(p.name.startswith(".") for p, _ in scan.samples)


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda r: None, "image folder not found"),
        (lambda r: r.mkdir(), "no class folders"),
        (lambda r: [(r / c).mkdir(parents=True) for c in "ab"], "class folder has no image files"),
    ],
)
def test_scan_errors(tmp_path: Path, setup, message: str) -> None:
    root = tmp_path / "src"
    setup(root)
    with pytest.raises(DataError, match=message):
        scan_image_folder(root)


def test_modes_become_8bit_rgb(tmp_path: Path) -> None:
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:2, :, 3] = 0  # transparent rows -> white background
    rgba[2:, :, 3] = 255
    out = np.asarray(to_rgb(Image.fromarray(rgba, "RGBA")))
    assert out.dtype == np.uint8 and out.shape == (4, 4, 3)
    assert (out[:2] == 255).all() and (out[2:] == [200, 0, 0]).all()

    gray = Image.fromarray(np.full((3, 5), 77, np.uint8), "L")
    assert (np.asarray(to_rgb(gray)) == 77).all()

    sixteen = Image.fromarray(np.full((3, 3), 0xAB00, np.uint16))
    assert sixteen.mode.startswith("I;16")
    assert (np.asarray(to_rgb(sixteen)) == 0xAB).all()

    floats = Image.fromarray(np.full((2, 2), 0.5, np.float32), "F")
    assert (np.asarray(to_rgb(floats)) == 128).all()

    path = tmp_path / "p.png"
    Image.fromarray(np.arange(16, dtype=np.uint8).reshape(4, 4), "L").convert("P").save(path)
    arr = load_rgb_array(path)
    assert arr.shape == (4, 4, 3) and arr.flags["C_CONTIGUOUS"]


def test_check_image_reports_bad_files(tmp_path: Path) -> None:
    root, bad = make_dirty_folder(tmp_path / "dirty")
    assert check_image(root / "cat" / "cat_2_rgba.png").ok
    for name, folder in zip(bad, ("dog", "emu"), strict=True):
        result = check_image(root / folder / name)
        assert not result.ok and result.error
    with pytest.raises(DataError, match="truncated.jpg: unreadable image"):
        load_rgb_array(root / "dog" / "truncated.jpg")
