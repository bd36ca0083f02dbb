"""Fashion-MNIST from the Debian package `dataset-fashion-mnist`, as ImageFolders and `.beton` files.

The official split: 60,000 train / 10,000 test images, 28x28 grayscale, 10 balanced classes.
Exported as three roles: `train` and `val` carved from the official train split (stratified,
seeded; 1/6 by default: 50,000 / 10,000), and `test` = the official test split, which a sweep
never searches on.
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
from cmx.pipelines.images import DEFAULT_VAL_FRACTION, stratified_split

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
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
SPLITS = ("train", "val", "test")
JPEG_QUALITY = 95  # 28x28 grayscale: q95 keeps mean error under 1 grey level
MARKER = ".cmx-export.json"
# 2: val carved from the official train split, test = the official test split (1 exported the
# official test split as `val`, which sweeps then selected on; such an export is redone).
EXPORT_VERSION = 2


@dataclass(frozen=True)
class FashionMNISTExport:
    """Where the export is: three ImageFolders and (optionally) three `.beton` files."""

    root: Path
    train_dir: Path
    val_dir: Path
    test_dir: Path
    train_beton: Path | None
    val_beton: Path | None
    test_beton: Path | None
    class_names: list[str]
    num_train: int
    num_val: int
    num_test: int
    val_fraction: float
    seed: int
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
    """(images uint8 (N, 28, 28), labels int64 (N,)) of the official "train" or "test" split."""
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


def _select(labels: np.ndarray, limit_per_class: int | None, among: np.ndarray | None = None) -> np.ndarray:
    """Indices (of `among`, default all) in official order, at most `limit_per_class` of each class."""
    idx = np.arange(len(labels)) if among is None else np.sort(among)
    if limit_per_class is None:
        return idx
    keep = np.concatenate([idx[labels[idx] == c][:limit_per_class] for c in range(len(CLASS_LABELS))])
    return np.sort(keep)


def split_indices(
    train_labels: np.ndarray, test_labels: np.ndarray, *, val_fraction: float, seed: int, limit_per_class: int | None
) -> dict[str, np.ndarray]:
    """Official indices of each role: train and val carved from the official train labels
    (stratified, seeded), test from the official test labels; each at most `limit_per_class` per class."""
    carve = stratified_split(train_labels, val_fraction, seed)
    return {
        "train": _select(train_labels, limit_per_class, carve.train),
        "val": _select(train_labels, limit_per_class, carve.val),
        "test": _select(test_labels, limit_per_class),
    }


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
    val_fraction: float = DEFAULT_VAL_FRACTION,
    seed: int = 0,
    write_betons: bool = True,
    progress: bool = True,
    workers: int | None = None,
) -> FashionMNISTExport:
    """Export train/, val/ and test/ ImageFolders of JPEGs (+ train/val/test `.beton`); skip if already done.

    val is `val_fraction` of each class of the official train split (chosen by `seed`), train the
    rest of it, test the official test split. The `.beton` files are converted from the exported
    JPEGs (raw mode, no resizing), so both loader backends see identical pixels.
    """

    out_dir = Path(out_dir).expanduser()
    if limit_per_class is not None and limit_per_class < 1:
        raise ConfigError(f"--limit-per-class {limit_per_class}: must be >= 1")
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(
            f"--val-fraction {val_fraction}: must be between 0 and 1", "the default is 1/6 (10,000 images)"
        )
    params = {
        "version": EXPORT_VERSION,
        "limit_per_class": limit_per_class,
        "val_fraction": val_fraction,
        "seed": seed,
        "betons": write_betons,
    }
    marker = out_dir / MARKER
    names = list(CLASS_DIRS)
    dirs = {split: out_dir / split for split in SPLITS}
    betons = {split: out_dir / f"{split}.beton" for split in SPLITS}

    def result(counts: dict[str, int], skipped: bool) -> FashionMNISTExport:
        b = betons if write_betons else dict.fromkeys(SPLITS)
        return FashionMNISTExport(
            root=out_dir,
            train_dir=dirs["train"],
            val_dir=dirs["val"],
            test_dir=dirs["test"],
            train_beton=b["train"],
            val_beton=b["val"],
            test_beton=b["test"],
            class_names=names,
            num_train=counts["train"],
            num_val=counts["val"],
            num_test=counts["test"],
            val_fraction=val_fraction,
            seed=seed,
            skipped=skipped,
        )

    if marker.is_file():
        # A damaged marker only means the export is done again.
        try:
            done = read_json(marker, what="export marker", error=DataError, hint="")
        except DataError:
            done = None
        if (
            isinstance(done, dict)
            and done.get("params") == params
            and all(d.is_dir() for d in dirs.values())
            and (not write_betons or all(b.is_file() for b in betons.values()))
        ):
            return result({split: int(done[f"num_{split}"]) for split in SPLITS}, skipped=True)
        # A different export of ours (or an older version, whose val was the official test split): replace it.
        marker.unlink()
        for p in dirs.values():
            shutil.rmtree(p, ignore_errors=True)
        for p in betons.values():
            for q in (p, sidecar_path(p)):
                q.unlink(missing_ok=True)
    for p in (*dirs.values(), *betons.values()):
        if p.exists():
            raise DataError(f"{p}: already exists and is not a cmx export", "choose an empty directory")
    src = source_dir()
    official = {name: load_split(name, src) for name in FILES}
    chosen = split_indices(
        official["train"][1], official["test"][1], val_fraction=val_fraction, seed=seed, limit_per_class=limit_per_class
    )
    counts = {}
    for split in SPLITS:
        images, labels = official["test" if split == "test" else "train"]
        tmp = out_dir / f".{split}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        _write_folder(tmp, images, labels, chosen[split], progress)
        os.replace(tmp, dirs[split])
        counts[split] = len(chosen[split])
    if write_betons:
        for split in SPLITS:
            convert_image_folder(
                dirs[split],
                betons[split],
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
                **{f"num_{split}": counts[split] for split in SPLITS},
                "roles": {
                    "train": "official train split minus val",
                    "val": f"{val_fraction:.4g} of each class of the official train split (seed {seed})",
                    "test": "official test split",
                },
                "class_labels": list(CLASS_LABELS),
            },
            indent=2,
        )
        + "\n"
    )
    return result(counts, skipped=False)
