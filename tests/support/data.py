"""Real image folders for the data tests: tiny JPEG/PNG files of several sizes and modes."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("cat", "dog", "emu")
# Smooth content keeps JPEG error small, so backends can be compared pixel by pixel.
BASE_COLOURS = {"cat": (200, 60, 40), "dog": (40, 160, 90), "emu": (60, 70, 210)}


def smooth_image(width: int, height: int, colour: tuple[int, int, int], seed: int) -> np.ndarray:
    """A uint8 HxWx3 gradient with a soft blob: realistic for JPEG, distinct per class."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    cy, cx = rng.uniform(0.3, 0.7) * height, rng.uniform(0.3, 0.7) * width
    blob = np.exp(-(((y - cy) / (0.3 * height)) ** 2 + ((x - cx) / (0.3 * width)) ** 2))
    ramp = (x / max(width - 1, 1) + y / max(height - 1, 1)) / 2
    img = np.empty((height, width, 3))
    for c in range(3):
        img[..., c] = colour[c] * (0.5 + 0.3 * ramp) + 60 * blob
    return np.clip(img, 0, 255).astype(np.uint8)


def make_clean_folder(root: Path) -> Path:
    """3 classes x 4 readable images: JPEG RGB, grayscale JPEG, RGBA PNG, palette PNG; 16-48 px."""
    sizes = [(32, 32), (48, 24), (20, 40), (16, 16)]
    for ci, name in enumerate(CLASSES):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for k, (w, h) in enumerate(sizes):
            arr = smooth_image(w, h, BASE_COLOURS[name], seed=10 * ci + k)
            img = Image.fromarray(arr, "RGB")
            if k == 0:
                img.save(d / f"{name}_{k}_rgb.jpg", quality=95)
            elif k == 1:
                img.convert("L").save(d / f"{name}_{k}_gray.jpg", quality=95)
            elif k == 2:
                rgba = img.convert("RGBA")
                alpha = np.full((h, w), 255, np.uint8)
                alpha[: h // 4] = 0  # a transparent band: must come out white
                rgba.putalpha(Image.fromarray(alpha, "L"))
                rgba.save(d / f"{name}_{k}_rgba.png")
            else:
                img.convert("P", palette=Image.Palette.ADAPTIVE, colors=32).save(d / f"{name}_{k}_pal.png")
    return root


def make_dirty_folder(root: Path) -> tuple[Path, list[str]]:
    """The clean folder plus a truncated JPEG, a garbage .jpg and a non-image; returns bad names."""
    make_clean_folder(root)
    good = root / "cat" / "cat_0_rgb.jpg"
    data = good.read_bytes()
    (root / "dog" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "emu" / "garbage.jpg").write_bytes(b"this is not an image" * 10)
    (root / "emu" / "notes.txt").write_text("ignored: not an image extension\n")
    return root, ["truncated.jpg", "garbage.jpg"]


def make_square_folder(root: Path, size: int = 24, per_class: int = 3) -> Path:
    """Same-size RGB PNGs (lossless), for pixel-exact checks."""
    for ci, name in enumerate(CLASSES):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            arr = smooth_image(size, size, BASE_COLOURS[name], seed=100 + 10 * ci + k)
            Image.fromarray(arr, "RGB").save(d / f"{k}.png")
    return root


def copy_folder(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
