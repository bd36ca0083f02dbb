"""Fashion-MNIST from the Debian package `dataset-fashion-mnist`, as ImageFolders and `.beton` files.

The official split: 60,000 train / 10,000 test images, 28x28 grayscale, 10 balanced classes.
Folder names carry the official label index (`0_t-shirt_top` ... `9_ankle_boot`) so that sorted
folder names, the ImageFolder mapping, give the official labels.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cmx.core.errors import ConfigError, DataError
from cmx.core.files import read_json
from cmx.pipelines.beton import _progress, convert_image_folder, sidecar_path

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASS_LABELS = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
CLASS_DIRS = tuple(f"{i}_{name.lower().replace('/', '_').replace(' ', '_')}" for i, name in enumerate(CLASS_LABELS))
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "val": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
JPEG_QUALITY = 95  # 28x28 grayscale: q95 keeps mean error under 1 grey level
MARKER = ".cmx-export.json"
EXPORT_VERSION = 1


@dataclass(frozen=True)
class FashionMNISTExport:
    """Where the export is: two ImageFolders and (optionally) two `.beton` files."""

    root: Path
    train_dir: Path
    val_dir: Path
    train_beton: Path | None
    val_beton: Path | None
    class_names: list[str]
    num_train: int
    num_val: int
    skipped: bool = False  # True when an identical export was already complete


def source_dir() -> Path:
    """`$CMX_FASHION_MNIST_DIR`, or the Debian package's folder."""
    return Path(os.environ.get("CMX_FASHION_MNIST_DIR") or DEBIAN_DIR)


def _read_idx(path: Path, magic: int) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(
            f"{path}: unreadable ({e})",
            "reinstall: sudo apt-get install --reinstall dataset-fashion-mnist",
        ) from None
    (got,) = struct.unpack(">I", data[:4])
    if got != magic:
        raise DataError(f"{path}: not an idx file (magic {got})", "reinstall dataset-fashion-mnist")
    ndim = magic & 0xFF
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise DataError(f"{path}: truncated idx file", "reinstall dataset-fashion-mnist")
    return arr.reshape(dims)


def load_split(split: str, src: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28), labels int64 (N,)) of the official train or test ("val") split."""
    src = src or source_dir()
    img_name, lab_name = FILES[split]
    missing = [n for n in (img_name, lab_name) if not (src / n).is_file()]
    if missing:
        raise DataError(
            f"Fashion-MNIST not found: {src / missing[0]} is missing",
            "install it with `sudo apt-get install dataset-fashion-mnist` (or set CMX_FASHION_MNIST_DIR)",
        )
    images = _read_idx(src / img_name, 0x0803)
    labels = _read_idx(src / lab_name, 0x0801).astype(np.int64)
    if len(images) != len(labels):
        raise DataError(
            f"{src}: {len(images)} images but {len(labels)} labels",
            "reinstall dataset-fashion-mnist",
        )
    return images, labels


def _select(labels: np.ndarray, limit_per_class: int | None) -> np.ndarray:
    """Indices in official order, at most `limit_per_class` of each class."""
    if limit_per_class is None:
        return np.arange(len(labels))
    keep = np.zeros(len(labels), dtype=bool)
    for c in range(len(CLASS_LABELS)):
        keep[np.nonzero(labels == c)[0][:limit_per_class]] = True
    return np.nonzero(keep)[0]


def _write_folder(out: Path, images: np.ndarray, labels: np.ndarray, idx: np.ndarray, progress: bool) -> None:
    from PIL import Image

    for name in CLASS_DIRS:
        (out / name).mkdir(parents=True, exist_ok=True)
    with _progress(len(idx), f"export {out.name}", progress) as advance:
        for i in idx:
            path = out / CLASS_DIRS[labels[i]] / f"{i:05d}.jpg"
            Image.fromarray(images[i], "L").save(path, quality=JPEG_QUALITY)
            advance(1)


def export_fashion_mnist(
    out_dir: Path,
    *,
    limit_per_class: int | None = None,
    write_betons: bool = True,
    progress: bool = True,
    workers: int | None = None,
) -> FashionMNISTExport:
    """Export train/ and val/ ImageFolders of JPEGs (+ train.beton / val.beton); skip if already done.

    The `.beton` files are converted from the exported JPEGs (raw mode, no resizing), so both
    loader backends see identical pixels.
    """

    out_dir = Path(out_dir).expanduser()
    if limit_per_class is not None and limit_per_class < 1:
        raise ConfigError(f"--limit-per-class {limit_per_class}: must be >= 1")
    params = {"version": EXPORT_VERSION, "limit_per_class": limit_per_class, "betons": write_betons}
    marker = out_dir / MARKER
    names = list(CLASS_DIRS)
    train_dir, val_dir = out_dir / "train", out_dir / "val"
    train_beton, val_beton = out_dir / "train.beton", out_dir / "val.beton"
    if marker.is_file():
        # A damaged marker only means the export is done again.
        try:
            done = read_json(marker, what="export marker", error=DataError, hint="")
        except DataError:
            done = None
        if (
            isinstance(done, dict)
            and done.get("params") == params
            and train_dir.is_dir()
            and val_dir.is_dir()
            and (not write_betons or (train_beton.is_file() and val_beton.is_file()))
        ):
            return FashionMNISTExport(
                out_dir,
                train_dir,
                val_dir,
                train_beton if write_betons else None,
                val_beton if write_betons else None,
                names,
                done["num_train"],
                done["num_val"],
                skipped=True,
            )
        # A different export of ours: replace it.
        marker.unlink()
        for p in (train_dir, val_dir):
            shutil.rmtree(p, ignore_errors=True)
        for p in (train_beton, val_beton):
            for q in (p, sidecar_path(p)):
                q.unlink(missing_ok=True)
    for p in (train_dir, val_dir, train_beton, val_beton):
        if p.exists():
            raise DataError(f"{p}: already exists and is not a cmx export", "choose an empty directory")
    src = source_dir()
    counts = {}
    for split, folder in (("train", train_dir), ("val", val_dir)):
        images, labels = load_split(split, src)
        idx = _select(labels, limit_per_class)
        tmp = out_dir / f".{split}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        _write_folder(tmp, images, labels, idx, progress)
        os.replace(tmp, folder)
        counts[split] = len(idx)
    if write_betons:
        for folder, beton in ((train_dir, train_beton), (val_dir, val_beton)):
            convert_image_folder(
                folder,
                beton,
                write_mode="raw",
                max_resolution=None,
                workers=workers,
                overwrite=True,
                strict=True,
                progress=progress,
            )
    marker.write_text(
        json.dumps(
            {
                "params": params,
                "num_train": counts["train"],
                "num_val": counts["val"],
                "class_labels": list(CLASS_LABELS),
            },
            indent=2,
        )
        + "\n"
    )
    return FashionMNISTExport(
        out_dir,
        train_dir,
        val_dir,
        train_beton if write_betons else None,
        val_beton if write_betons else None,
        names,
        counts["train"],
        counts["val"],
    )
