"""Scan an ImageFolder (`ROOT/<class>/<image>`) and turn any PIL image into 8-bit RGB.

Both loader backends and the `.beton` writer read images through `load_rgb`, so the pixels FFCV
stores are exactly the pixels torchvision would see.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

from cmx.core.errors import DataError

# Transparent pixels are composited onto white: what a viewer shows, and deterministic (the RGB
# values under alpha=0 are arbitrary, often black, in PNGs written by common tools).
ALPHA_BACKGROUND = (255, 255, 255)
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_16BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}


def image_extensions() -> frozenset[str]:
    """File extensions (lower case, with dot) of every format PIL can open."""
    Image.init()
    return frozenset(ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


@dataclass(frozen=True)
class FolderScan:
    """The files of an ImageFolder in torchvision's order: classes sorted, files sorted per class."""

    root: Path
    class_names: list[str]
    samples: list[tuple[Path, int]]
    ignored: list[Path] = field(default_factory=list)  # files without an image extension
    # Linked folders not followed: a symlink loop (`self -> .`) or a second link to a folder
    # already scanned, whose images would otherwise be counted again (or forever).
    skipped_links: list[Path] = field(default_factory=list)

    @property
    def class_to_idx(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.class_names)}

    @property
    def class_counts(self) -> dict[str, int]:
        counts = dict.fromkeys(self.class_names, 0)
        for _, label in self.samples:
            counts[self.class_names[label]] += 1
        return counts


DEFAULT_VAL_FRACTION = 1 / 6  # Fashion-MNIST: 10,000 of the official 60,000 training images


@dataclass(frozen=True)
class SplitIndices:
    """A stratified train/val carve: sorted indices into the labels it was made from."""

    train: np.ndarray
    val: np.ndarray
    fraction: float
    seed: int


def stratified_split(labels: np.ndarray | list[int], fraction: float, seed: int = 0) -> SplitIndices:
    """Carve `fraction` of every class into val, the rest into train; the same seed gives the same carve.

    Each class gives round(n * fraction) images to val, at least one and never all of them, so
    both splits hold every class (a class of one image is an error).
    """
    if not 0.0 < fraction < 1.0:
        raise DataError(f"validation fraction {fraction}: must be between 0 and 1", "use e.g. 0.1 or 1/6")
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    train: list[np.ndarray] = []
    val: list[np.ndarray] = []
    for c in np.unique(labels):
        idx = np.nonzero(labels == c)[0]
        if len(idx) < 2:
            raise DataError(
                f"class {int(c)} has {len(idx)} image: a validation split needs at least 2 per class",
                "add images to that class or remove it",
            )
        k = min(max(int(round(len(idx) * fraction)), 1), len(idx) - 1)
        chosen = rng.permutation(idx)
        val.append(chosen[:k])
        train.append(chosen[k:])
    empty = np.zeros(0, dtype=np.int64)
    return SplitIndices(
        train=np.sort(np.concatenate(train)) if train else empty,
        val=np.sort(np.concatenate(val)) if val else empty,
        fraction=fraction,
        seed=seed,
    )


def find_classes(root: str | Path) -> list[str]:
    """Sorted class folder names, as torchvision's `ImageFolder` (hidden folders are skipped)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: image folder not found", "pass a folder laid out as ROOT/<class>/<image>")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataError(
            f"{root}: no class folders found",
            "an ImageFolder has one sub-folder per class: ROOT/<class>/<image>",
        )
    if len(classes) < 2:
        raise DataError(
            f"{root}: only one class folder ({classes[0]}); a classifier needs at least two",
            "add a folder per class under ROOT (is ROOT one level too deep?)",
        )
    return classes


def _walk_once(top: Path, seen: set[str], skipped: list[Path]) -> Iterator[tuple[str, list[str]]]:
    """`os.walk(top)` following links, each real folder once; hidden folders pruned.

    A linked folder whose real path was already visited (a loop, or the same folder twice) is not
    entered: it is listed in `skipped` instead.
    """
    real = os.path.realpath(top)
    if real in seen:
        skipped.append(top)
        return
    seen.add(real)
    for dirpath, dirnames, fnames in os.walk(top, followlinks=True):
        keep = []
        for d in sorted(dirnames):
            if d.startswith("."):
                continue
            sub = os.path.join(dirpath, d)
            sub_real = os.path.realpath(sub)
            if sub_real in seen:
                skipped.append(Path(sub))
                continue
            seen.add(sub_real)
            keep.append(d)
        dirnames[:] = keep
        yield dirpath, fnames


def scan_image_folder(root: str | Path) -> FolderScan:
    """List an ImageFolder without decoding anything (torchvision's `make_dataset` order)."""
    root = Path(root)
    classes = find_classes(root)
    extensions = image_extensions()
    samples: list[tuple[Path, int]] = []
    ignored: list[Path] = []
    skipped_links: list[Path] = []
    seen: set[str] = {os.path.realpath(root)}  # a link back to ROOT would re-scan every class
    for label, name in enumerate(classes):
        found = 0
        for dirpath, fnames in sorted(_walk_once(root / name, seen, skipped_links)):
            for fname in sorted(fnames):
                path = Path(dirpath) / fname
                if fname.startswith("."):  # .DS_Store, AppleDouble "._x.jpg" files
                    continue
                if path.suffix.lower() in extensions:
                    samples.append((path, label))
                    found += 1
                else:
                    ignored.append(path)
        if not found and skipped_links and skipped_links[-1] == root / name:
            raise DataError(
                f"{root / name}: links to a folder already scanned as another class",
                "every class needs a folder of its own images",
            )
        if not found:
            raise DataError(
                f"{root / name}: class folder has no image files",
                "remove the empty folder or add images (every folder under ROOT is a class)",
            )
    return FolderScan(root=root, class_names=classes, samples=samples, ignored=ignored, skipped_links=skipped_links)


@contextmanager
def _strict_pil() -> Iterator[None]:
    """Truncated files must raise (a library elsewhere may have set LOAD_TRUNCATED_IMAGES)."""
    old = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # EXIF/palette chatter; real problems raise
            yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = old


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB: EXIF rotation applied, alpha composited on white, 16-bit scaled."""
    img = ImageOps.exif_transpose(img) or img
    if img.mode == "RGB":
        return img
    mode = img.mode
    if mode in _16BIT_MODES or mode == "I":
        arr = np.asarray(img).astype(np.int64)
        if mode in _16BIT_MODES or arr.max(initial=0) > 255:
            arr = np.clip(arr, 0, 65535) >> 8  # 16-bit -> 8-bit keeps the high byte
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        floats = np.asarray(img, dtype=np.float64)
        if floats.size and np.nanmax(floats) <= 1.0:
            floats = floats * 255.0
        floats = np.nan_to_num(floats, nan=0.0)
        return Image.fromarray(np.clip(np.rint(floats), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def open_rgb(path: str | Path) -> Image.Image:
    """Open, fully decode and convert one image; `DataError` naming the file if that fails."""
    try:
        with _strict_pil(), Image.open(path) as img:
            img.load()
            out = to_rgb(img)
            out.load()
            return out
    except DataError:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{path}: unreadable image ({reason})", "replace or delete the file") from None


def load_rgb(path: str | Path) -> Image.Image:
    """The `ImageFolder` loader both backends use (same pixels as the `.beton` writer stores)."""
    return open_rgb(path)


def load_rgb_array(path: str | Path) -> np.ndarray:
    """`load_rgb` as a contiguous uint8 HxWx3 array, the only input FFCV's writer accepts."""
    arr = np.ascontiguousarray(np.asarray(open_rgb(path), dtype=np.uint8))
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise DataError(f"{path}: decoded to shape {arr.shape}, not HxWx3", "replace the file")
    return arr


@dataclass(frozen=True)
class ImageCheck:
    """The result of decoding one file: its size and mode, or why it is unusable."""

    path: Path
    width: int = 0
    height: int = 0
    mode: str = ""
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def check_image(path: str | Path) -> ImageCheck:
    """Decode one file completely (catches truncation) and convert it to RGB; never raises."""
    path = Path(path)
    try:
        with _strict_pil(), Image.open(path) as img:
            mode = img.mode
            img.load()
            rgb = to_rgb(img)
            rgb.load()
            width, height = rgb.size
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        return ImageCheck(path, error=reason)
    if width < 1 or height < 1:
        return ImageCheck(path, width, height, mode, error="empty image")
    return ImageCheck(path, width, height, mode)
