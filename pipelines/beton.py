"""FFCV `.beton` files: convert an ImageFolder (writer under a watchdog), inspect, verify.

Reading (`read_beton`, `inspect_beton`, `verify_beton`, `dataset_info`) parses the file with
numpy alone: no `import ffcv` (4.4 s), no numba, and a corrupt file cannot crash or hang the
process. Only `write_beton` imports FFCV.

Each `X.beton` has a sidecar `X.beton.json` with the class names (sorted folder names, the same
mapping as torchvision's `ImageFolder`), counts, skipped files and the write options.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from cmx.core.errors import ConfigError, DataError
from cmx.core.files import atomic_path, atomic_write_text, read_json
from cmx.pipelines.ffcv_compat import ffcv_imported, watched_writer_class
from cmx.pipelines.images import (
    FolderScan,
    ImageCheck,
    SplitIndices,
    check_image,
    load_rgb_array,
    scan_image_folder,
    stratified_split,
)

WriteMode = Literal["smart", "jpg", "raw", "proportion"]
WRITE_MODES: tuple[str, ...] = ("smart", "jpg", "raw", "proportion")

# FFCV ImageNet defaults (ffcv-imagenet README: `./write_imagenet.sh 500 0.50 90`, write_mode
# proportion; chunk_size 100 in write_imagenet.py).
DEFAULT_MAX_RESOLUTION = 500
DEFAULT_WRITE_MODE: WriteMode = "proportion"
DEFAULT_JPEG_QUALITY = 90
DEFAULT_COMPRESS_PROBABILITY = 0.5
# FFCV's own smart_threshold default is None, which makes "smart" store every image raw. We store
# an image as JPEG when its raw pixels exceed this many bytes (a 256x256 RGB image).
DEFAULT_SMART_THRESHOLD = 256 * 256 * 3
SIDECAR_VERSION = 1

# --------------------------------------------------------------------------- the file format
# Copied from ffcv/types.py (format version 2, FFCV 1.0.x) so reading needs no ffcv import;
# tests/test_data_beton.py checks these against ffcv's own Reader.
FORMAT_VERSION = 2
HEADER_TYPE = np.dtype(
    [
        ("version", "<u2"),
        ("num_fields", "<u2"),
        ("page_size", "<u4"),
        ("num_samples", "<u8"),
        ("alloc_table_ptr", "<u8"),
    ],
    align=True,
)
ALLOC_TABLE_TYPE = np.dtype([("sample_id", "<u8"), ("ptr", "<u8"), ("size", "<u8")])
FIELD_DESC_TYPE = np.dtype([("type_id", "<u1"), ("name", ("<u1", 16)), ("arguments", ("<u1", (1024,)))], align=True)
IMAGE_META_TYPE = np.dtype([("mode", "<u1"), ("width", "<u2"), ("height", "<u2"), ("data_ptr", "<u8")])
_BYTES_META = np.dtype([("ptr", "<u8"), ("size", "<u8")])
FIELD_TYPES: dict[int, tuple[str, np.dtype]] = {
    0: ("float", np.dtype("<f8")),
    1: ("int", np.dtype("<i8")),
    2: ("rgb_image", IMAGE_META_TYPE),
    3: ("bytes", _BYTES_META),
    4: ("ndarray", np.dtype("<u8")),
    5: ("json", _BYTES_META),
    6: ("torch_tensor", np.dtype("<u8")),
}
IMAGE_MODE_JPG, IMAGE_MODE_RAW = 0, 1
MIN_PAGE_SIZE = 1 << 21


def sidecar_path(beton: str | Path) -> Path:
    """`X.beton` -> `X.beton.json`."""
    beton = Path(beton)
    return beton.with_name(beton.name + ".json")


@dataclass
class BetonFile:
    """A structurally valid `.beton`: header, fields, per-sample metadata and allocation table."""

    path: Path
    file_size: int
    num_samples: int
    page_size: int
    fields: dict[str, str]  # name -> type ("rgb_image", "int", ...)
    metadata: np.ndarray  # one structured record per sample, fields named as in the file
    alloc_table: np.ndarray

    def field_values(self, name: str) -> np.ndarray:
        return self.metadata[name]


def _bad(path: Path, what: str) -> DataError:
    return DataError(f"{path}: {what}", "re-create it with `cmx data convert` (or check the path)")


def read_beton(path: str | Path) -> BetonFile:
    """Parse and bounds-check a `.beton`; one `DataError` for a missing, truncated or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found", "check the path, or create it with `cmx data convert`")
    size = path.stat().st_size
    if size < HEADER_TYPE.itemsize:
        raise _bad(path, f"not an FFCV .beton ({size} bytes, truncated or empty)")
    header = np.fromfile(path, dtype=HEADER_TYPE, count=1)[0]
    version, num_fields = int(header["version"]), int(header["num_fields"])
    page_size, num_samples = int(header["page_size"]), int(header["num_samples"])
    alloc_ptr = int(header["alloc_table_ptr"])
    if version != FORMAT_VERSION or not 1 <= num_fields <= 64:
        raise _bad(path, "not an FFCV .beton (unknown header)")
    if page_size < MIN_PAGE_SIZE or page_size & (page_size - 1):
        raise _bad(path, f"not an FFCV .beton (bad page size {page_size})")
    fields_end = HEADER_TYPE.itemsize + num_fields * FIELD_DESC_TYPE.itemsize
    if size < fields_end:
        raise _bad(path, "truncated (field table incomplete)")
    descs = np.fromfile(path, dtype=FIELD_DESC_TYPE, count=num_fields, offset=HEADER_TYPE.itemsize)
    fields: dict[str, str] = {}
    dtypes = []
    for d in descs:
        type_id = int(d["type_id"])
        try:
            name = d["name"].tobytes().decode("ascii").split("\x00")[0]
        except UnicodeDecodeError:
            raise _bad(path, "not an FFCV .beton (bad field name)") from None
        if type_id not in FIELD_TYPES or not name or name in fields:
            raise _bad(path, f"not an FFCV .beton (field {name!r} has unknown type {type_id})")
        kind, dtype = FIELD_TYPES[type_id]
        fields[name] = kind
        dtypes.append((name, dtype))
    meta_type = np.dtype(dtypes, align=True)
    meta_end = fields_end + num_samples * meta_type.itemsize
    if alloc_ptr == 0:
        raise _bad(path, "incomplete: the writer never finished (no allocation table)")
    if meta_end > size or alloc_ptr > size or alloc_ptr < meta_end:
        raise _bad(path, f"truncated or corrupt ({size} bytes; the header points past the end)")
    if (size - alloc_ptr) % ALLOC_TABLE_TYPE.itemsize:
        raise _bad(path, "truncated or corrupt (allocation table has a partial entry)")
    metadata = np.fromfile(path, dtype=meta_type, count=num_samples, offset=fields_end)
    alloc = np.fromfile(path, dtype=ALLOC_TABLE_TYPE, offset=alloc_ptr)
    if alloc.size and (np.any(alloc["ptr"] + alloc["size"] > alloc_ptr) or np.any(alloc["ptr"] < meta_end)):
        raise _bad(path, "corrupt (a data region lies outside the data area)")
    known_ptrs = np.sort(alloc["ptr"])
    for name, kind in fields.items():
        if kind != "rgb_image":
            continue
        m = metadata[name]
        if np.any((m["mode"] != IMAGE_MODE_JPG) & (m["mode"] != IMAGE_MODE_RAW)):
            raise _bad(path, f"corrupt (field {name!r} has an unknown image mode)")
        if np.any(m["width"] == 0) or np.any(m["height"] == 0):
            raise _bad(path, f"corrupt (field {name!r} has an empty image)")
        pos = np.searchsorted(known_ptrs, m["data_ptr"])
        if np.any(pos >= known_ptrs.size) or np.any(known_ptrs[np.minimum(pos, known_ptrs.size - 1)] != m["data_ptr"]):
            raise _bad(
                path,
                f"truncated or corrupt (field {name!r}: data missing from the allocation table)",
            )
    return BetonFile(path, size, num_samples, page_size, fields, metadata, alloc)


# --------------------------------------------------------------------------- sidecar + info


@dataclass
class DatasetInfo:
    """What a trainer needs to know about a dataset, from a `.beton` sidecar or an ImageFolder."""

    path: Path
    kind: Literal["beton", "folder"]
    num_samples: int
    class_names: list[str]
    class_counts: dict[str, int]
    grayscale: bool = False  # every source image was single-channel (stored as RGB anyway)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def in_chans(self) -> int:
        """Channels the loaders produce: always 3 (grayscale is stored as RGB)."""
        return 3


def read_sidecar(beton: str | Path) -> dict[str, Any] | None:
    """The sidecar's JSON, or None when there is none; `DataError` when it is unreadable."""
    p = sidecar_path(beton)
    if not p.is_file():
        return None
    data = read_json(p, what="sidecar", error=DataError, hint="delete it and re-run `cmx data convert`")
    if not isinstance(data, dict) or not isinstance(data.get("class_names"), list):
        raise DataError(f"{p}: sidecar has no class_names", "re-run `cmx data convert`")
    _check_sidecar_types(p, data)
    return data


# key -> (accepted types, in words): what `convert_image_folder` writes. A hand-edited or foreign
# sidecar fails as one DataError naming the key, not as a TypeError in a later sum or format.
_SIDECAR_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "num_samples": ((int,), "an integer"),
    "file_bytes": ((int,), "an integer"),
    "cmx_sidecar_version": ((int,), "an integer"),
    "grayscale": ((bool,), "true or false"),
    "class_to_idx": ((dict,), "an object"),
    "class_counts": ((dict,), "an object"),
    "source_width": ((dict,), "an object"),
    "source_height": ((dict,), "an object"),
    "write_options": ((dict,), "an object"),
    "skipped": ((list,), "a list"),
    "skipped_links": ((list,), "a list"),
    "source": ((str,), "a string"),
    "created": ((str,), "a string"),
}


def _check_sidecar_types(p: Path, data: dict[str, Any]) -> None:
    def bad(key: str, value: Any, words: str) -> DataError:
        shown = json.dumps(value)[:40]
        return DataError(f"{p}: {key} is {shown}, expected {words}", "delete it and re-run `cmx data convert`")

    for key, (types, words) in _SIDECAR_TYPES.items():
        if key not in data:
            continue
        value = data[key]
        is_bool = isinstance(value, bool)
        if not isinstance(value, types) or (is_bool and bool not in types):
            raise bad(key, value, words)
        if key in ("num_samples", "file_bytes") and data[key] < 0:
            raise bad(key, value, "a count >= 0")
    names = data["class_names"]
    if not all(isinstance(c, str) and c for c in names):
        raise bad("class_names", names, "a list of non-empty strings")
    if len(set(names)) != len(names):
        raise bad("class_names", names, "a list of distinct names")
    for key in ("source_width", "source_height"):
        stats = data.get(key, {"min": 0, "max": 0})
        if not all(
            isinstance(stats.get(k), (int, float)) and not isinstance(stats.get(k), bool) for k in ("min", "max")
        ):
            raise bad(key, stats, "an object with numeric min and max")


def _labels_field(bf: BetonFile) -> str | None:
    if "label" in bf.fields and bf.fields["label"] == "int":
        return "label"
    ints = [n for n, k in bf.fields.items() if k == "int"]
    return ints[0] if ints else None


def dataset_info(path: str | Path) -> DatasetInfo:
    """Samples, classes and counts of a `.beton` (sidecar + labels) or an ImageFolder directory."""
    path = Path(path)
    if path.is_dir():
        scan = scan_image_folder(path)
        return DatasetInfo(path, "folder", len(scan.samples), scan.class_names, scan.class_counts)
    bf = read_beton(path)
    side = read_sidecar(path)
    label_field = _labels_field(bf)
    labels = bf.field_values(label_field).astype(np.int64) if label_field else np.zeros(0, np.int64)
    if side is not None:
        names = [str(c) for c in side["class_names"]]
        if side.get("num_samples", bf.num_samples) != bf.num_samples:
            raise DataError(
                f"{sidecar_path(path)}: says {side.get('num_samples')} samples, {path.name} has {bf.num_samples}",
                "the two files are from different conversions; re-run `cmx data convert`",
            )
    else:
        names = [str(i) for i in range(int(labels.max()) + 1)] if labels.size else []
    if labels.size and (labels.min() < 0 or labels.max() >= max(len(names), 1)):
        raise DataError(f"{path}: labels outside 0..{len(names) - 1}", "re-run `cmx data convert`")
    counts = np.bincount(labels, minlength=len(names)) if labels.size else np.zeros(len(names), int)
    grayscale = bool(side.get("grayscale", False)) if side else False
    return DatasetInfo(
        path,
        "beton",
        bf.num_samples,
        names,
        {n: int(c) for n, c in zip(names, counts, strict=True)},
        grayscale,
    )


# --------------------------------------------------------------------------- inspect / verify


def _stats(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {"min": 0, "median": 0, "mean": 0, "max": 0}
    return {
        "min": int(values.min()),
        "median": float(np.median(values)),
        "mean": round(float(values.mean()), 1),
        "max": int(values.max()),
    }


def inspect_beton(path: str | Path) -> dict[str, Any]:
    """A summary for `cmx data inspect`: samples, classes with counts, sizes, fields, bytes."""
    path = Path(path)
    bf = read_beton(path)
    info = dataset_info(path)
    side = read_sidecar(path) or {}
    out: dict[str, Any] = {
        "path": str(path),
        "file_bytes": bf.file_size,
        "num_samples": bf.num_samples,
        "page_size": bf.page_size,
        "fields": dict(bf.fields),
        "num_classes": info.num_classes,
        "class_counts": info.class_counts,
        "sidecar": str(sidecar_path(path)) if side else None,
    }
    for name, kind in bf.fields.items():
        if kind == "rgb_image":
            m = bf.field_values(name)
            out["image_field"] = name
            out["stored_width"] = _stats(m["width"].astype(np.int64))
            out["stored_height"] = _stats(m["height"].astype(np.int64))
            out["jpeg_fraction"] = round(float(np.mean(m["mode"] == IMAGE_MODE_JPG)), 4) if m.size else 0.0
            break
    for key in ("source_width", "source_height", "write_options", "skipped", "source", "created"):
        if key in side:
            out[key] = side[key]
    return out


@dataclass
class VerifyReport:
    """`verify_beton`'s result: every sample decoded, the failures listed."""

    path: Path
    num_samples: int
    decoded: int
    errors: list[tuple[int, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def _decode_sample(data: np.ndarray, mode: int, width: int, height: int) -> str | None:
    """Decode one stored image as FFCV would; the problem, or None."""
    if mode == IMAGE_MODE_RAW:
        return (
            None
            if data.size == width * height * 3
            else f"raw image has {data.size} bytes, expected {width * height * 3}"
        )
    import cv2  # opencv links the same libjpeg-turbo family FFCV decodes with

    img = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if img is None:
        return "JPEG data does not decode"
    if img.shape[:2] != (height, width):
        return f"JPEG decodes to {img.shape[1]}x{img.shape[0]}, metadata says {width}x{height}"
    return None


def verify_beton(path: str | Path, *, progress: bool = True) -> VerifyReport:
    """Decode every image and check every label; structural damage raises `DataError`."""
    path = Path(path)
    bf = read_beton(path)
    info = dataset_info(path)
    report = VerifyReport(path, bf.num_samples, 0)
    label_field = _labels_field(bf)
    if label_field is not None and info.num_classes:
        bad = np.nonzero((bf.field_values(label_field) < 0) | (bf.field_values(label_field) >= info.num_classes))[0]
        report.errors.extend((int(i), "label out of range") for i in bad)
    sizes = dict(zip(bf.alloc_table["ptr"].tolist(), bf.alloc_table["size"].tolist(), strict=True))
    image_fields = [n for n, k in bf.fields.items() if k == "rgb_image"]
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    try:
        with _progress(bf.num_samples, f"verify {path.name}", progress) as advance:
            for i in range(bf.num_samples):
                for name in image_fields:
                    rec = bf.metadata[name][i]
                    ptr = int(rec["data_ptr"])
                    data = np.asarray(mm[ptr : ptr + sizes[ptr]])
                    problem = _decode_sample(data, int(rec["mode"]), int(rec["width"]), int(rec["height"]))
                    if problem:
                        report.errors.append((i, f"{name}: {problem}"))
                report.decoded += 1
                advance(1)
    finally:
        del mm
    return report


# --------------------------------------------------------------------------- progress


@contextlib.contextmanager
def _progress(total: int, description: str, enabled: bool) -> Iterator[Callable[[int], None]]:
    """A tqdm bar on stderr (TQDM_DISABLE=1 silences it), or nothing."""
    if not enabled:
        yield lambda n: None
        return
    from tqdm import tqdm

    bar = tqdm(total=total, desc=description, unit="img", file=sys.stderr, dynamic_ncols=True, leave=False)
    try:
        yield bar.update
    finally:
        bar.close()


# --------------------------------------------------------------------------- writing


class _ImageSamples:
    """An indexed dataset for FFCV's writer: re-decodes each checked file as uint8 HxWx3."""

    def __init__(self, samples: Sequence[tuple[Path, int]]) -> None:
        self.samples = list(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        path, label = self.samples[i]
        return load_rgb_array(path), int(label)


def _page_size_for(max_sample_bytes: int) -> int:
    """Smallest power of two >= 8 MiB (FFCV's default) that holds the largest sample twice over.

    A sample larger than a page makes FFCV's worker raise (and its writer hang).
    """
    need = max(4 * MIN_PAGE_SIZE, 2 * max_sample_bytes + (1 << 20))
    return 1 << (need - 1).bit_length()


def _resized(width: int, height: int, max_resolution: int | None) -> tuple[int, int]:
    """The size FFCV stores (its `resizer`: longest side down to max_resolution, never up)."""
    if max_resolution is None or max(width, height) <= max_resolution:
        return width, height
    ratio = max_resolution / max(width, height)
    return int(ratio * width), int(ratio * height)


class IndexedSamples(Protocol):
    """What FFCV's writer reads: `len()` and (uint8 HxWx3 image, label) by index."""

    def __len__(self) -> int: ...
    def __getitem__(self, i: int) -> tuple[np.ndarray, int]: ...


def write_beton(
    out: str | Path,
    dataset: IndexedSamples,
    *,
    max_resolution: int | None = DEFAULT_MAX_RESOLUTION,
    write_mode: WriteMode = DEFAULT_WRITE_MODE,
    jpeg_quality: int = DEFAULT_JPEG_QUALITY,
    compress_probability: float = DEFAULT_COMPRESS_PROBABILITY,
    smart_threshold: int = DEFAULT_SMART_THRESHOLD,
    workers: int | None = None,
    max_sample_bytes: int | None = None,
    stall_timeout: float = 600.0,
    start_timeout: float = 20.0,
    progress: bool = True,
) -> None:
    """Write (uint8 HxWx3 image, label) samples to `out` with FFCV; a worker failure raises `DataError`.

    Writes `out` in place: callers wanting atomicity pass a temporary name (as `convert_image_folder`).
    """
    if write_mode not in WRITE_MODES:
        raise ConfigError(f"write mode {write_mode!r}: expected one of {', '.join(WRITE_MODES)}")
    if len(dataset) == 0:
        raise DataError(f"{out}: nothing to write (0 samples)", "check the source folder")

    with ffcv_imported():
        from ffcv.fields import IntField, RGBImageField

        writer_cls = watched_writer_class()
    workers = max(1, min(workers or os.cpu_count() or 1, len(dataset)))
    page_size = _page_size_for(max_sample_bytes or 0)
    fields = {
        "image": RGBImageField(
            write_mode=write_mode,
            max_resolution=max_resolution,
            smart_threshold=smart_threshold,
            jpeg_quality=jpeg_quality,
            compress_probability=compress_probability,
        ),
        "label": IntField(),
    }
    writer = writer_cls(str(out), fields, page_size=page_size, num_workers=workers)
    writer.stall_timeout, writer.start_timeout = stall_timeout, start_timeout
    chunk = max(1, min(100, len(dataset) // (workers * 4) or 1))
    with _progress(len(dataset), f"write {Path(out).name}", progress) as advance:
        writer.on_progress = advance
        writer.from_indexed_dataset(dataset, chunksize=chunk)


@dataclass
class ConversionReport:
    """What `convert_image_folder` wrote, and what it skipped."""

    out: Path
    sidecar: Path
    num_samples: int
    class_names: list[str]
    class_counts: dict[str, int]
    skipped: list[tuple[str, str]]  # (path, reason)
    ignored: list[str]  # files without an image extension
    seconds: float
    file_bytes: int
    skipped_links: list[str] = field(default_factory=list)  # linked folders not followed (loops, repeats)


def _check_all(paths: list[Path], workers: int, progress: bool) -> list[ImageCheck]:
    """Decode every file (in `workers` processes for large folders).

    The workers are spawned, not forked: a fork of a process with threads (Ray's, gRPC's, torch's,
    when cmx is used as a library) can leave a child stuck on a lock it copied, which then ignores
    the pool's SIGTERM and hangs its shutdown. A spawned worker imports only `cmx.pipelines.images`.
    """
    with _progress(len(paths), "check images", progress) as advance:
        if workers <= 1 or len(paths) < 64:
            results = []
            for p in paths:
                results.append(check_image(p))
                advance(1)
            return results
        with mp.get_context("spawn").Pool(workers) as pool:
            results = []
            for r in pool.imap(check_image, paths, chunksize=16):
                results.append(r)
                advance(1)
            return results


def evenly_spaced(n: int, limit: int | None) -> np.ndarray:
    """`limit` indices spread evenly over range(n) (all classes of a sorted ImageFolder appear)."""
    if limit is None or limit >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, num=limit).round().astype(np.int64))


def convert_image_folder(
    src: str | Path,
    out: str | Path,
    *,
    max_resolution: int | None = DEFAULT_MAX_RESOLUTION,
    write_mode: WriteMode = DEFAULT_WRITE_MODE,
    jpeg_quality: int = DEFAULT_JPEG_QUALITY,
    compress_probability: float = DEFAULT_COMPRESS_PROBABILITY,
    smart_threshold: int = DEFAULT_SMART_THRESHOLD,
    workers: int | None = None,
    limit: int | None = None,
    strict: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    carve: tuple[str, SplitIndices] | None = None,
    scan: FolderScan | None = None,
) -> ConversionReport:
    """ImageFolder -> `.beton` + sidecar: check and convert every image, write under a watchdog, rename.

    Unreadable files are skipped and listed (`strict=True` makes them an error). Nothing named
    `out` exists until the file is complete. Folders of 64+ images are checked in spawned
    processes: a script calling this needs `if __name__ == "__main__":`, as multiprocessing's
    spawn requires (the `cmx` command has it). `carve` ("train" or "val", a `stratified_split` of
    the folder's samples) converts only that role's images (`scan`: the folder already scanned).
    """
    start = time.perf_counter()
    src, out = Path(src), Path(out)
    if not 1 <= jpeg_quality <= 100:
        raise ConfigError(f"--jpeg-quality {jpeg_quality}: must be 1..100")
    if not 0.0 <= compress_probability <= 1.0:
        raise ConfigError(f"--compress-probability {compress_probability}: must be 0..1")
    if max_resolution is not None and not 8 <= max_resolution <= 65535:
        raise ConfigError(f"--max-resolution {max_resolution}: must be 8..65535")
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit {limit}: must be >= 1")
    if out.exists() and not overwrite:
        raise DataError(f"{out}: already exists", "pass --overwrite to replace it, or choose another name")
    if out.is_dir():
        raise DataError(f"{out}: is a directory", "give a file name such as train.beton")
    workers = max(1, workers or os.cpu_count() or 1)
    scan = scan or scan_image_folder(src)
    samples = scan.samples
    if carve is not None:
        role, split = carve
        samples = [samples[i] for i in (split.train if role == "train" else split.val)]
    chosen = [samples[i] for i in evenly_spaced(len(samples), limit)]
    checks = _check_all([p for p, _ in chosen], workers, progress)
    good = [(s, c) for s, c in zip(chosen, checks, strict=True) if c.ok]
    skipped = [(str(c.path), c.error or "") for c in checks if not c.ok]
    if skipped and strict:
        path, reason = skipped[0]
        more = f" (and {len(skipped) - 1} more)" if len(skipped) > 1 else ""
        raise DataError(
            f"{path}: unreadable image ({reason}){more}",
            "fix or delete it, or drop --strict to skip",
        )
    if not good:
        raise DataError(f"{src}: none of the {len(chosen)} images could be read", "check the folder's files")
    for c in (c for _, c in good):
        w, h = _resized(c.width, c.height, max_resolution)
        if max(w, h) > 65535:
            raise DataError(f"{c.path}: {w}x{h} is too large for FFCV (max side 65535)", "pass --max-resolution")
    stored = [_resized(c.width, c.height, max_resolution) for _, c in good]
    max_bytes = max(w * h * 3 for w, h in stored)
    out.parent.mkdir(parents=True, exist_ok=True)
    # `out` gets its name when the block ends, after the sidecar: it appears only when both are complete.
    with atomic_path(out) as tmp:
        write_beton(
            tmp,
            _ImageSamples([s for s, _ in good]),
            max_resolution=max_resolution,
            write_mode=write_mode,
            jpeg_quality=jpeg_quality,
            compress_probability=compress_probability,
            smart_threshold=smart_threshold,
            workers=workers,
            max_sample_bytes=max_bytes,
            progress=progress,
        )
        written = read_beton(tmp)  # the finished file must parse before it gets its real name
        if written.num_samples != len(good):
            raise DataError(f"{out}: wrote {written.num_samples} samples, expected {len(good)}", "re-run")
        counts = dict.fromkeys(scan.class_names, 0)
        for (_, label), _ in good:
            counts[scan.class_names[label]] += 1
        widths = np.array([c.width for _, c in good])
        heights = np.array([c.height for _, c in good])
        side = {
            "cmx_sidecar_version": SIDECAR_VERSION,
            "source": str(src.resolve()),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),  # noqa: UP017 (py3.10)
            "num_samples": len(good),
            "class_names": scan.class_names,
            "class_to_idx": scan.class_to_idx,
            "class_counts": counts,
            "grayscale": all(c.mode in ("L", "1", "I;16", "I", "F", "LA") for _, c in good),
            "source_width": _stats(widths),
            "source_height": _stats(heights),
            "skipped": [{"path": p, "reason": r} for p, r in skipped],
            "skipped_links": [str(p) for p in scan.skipped_links],
            "write_options": {
                "max_resolution": max_resolution,
                "write_mode": write_mode,
                "jpeg_quality": jpeg_quality,
                "compress_probability": compress_probability,
                "smart_threshold": smart_threshold,
                "limit": limit,
                **(
                    {"carve": {"role": carve[0], "fraction": carve[1].fraction, "seed": carve[1].seed}} if carve else {}
                ),
            },
            "file_bytes": written.file_size,
        }
        atomic_write_text(sidecar_path(out), json.dumps(side, indent=2) + "\n")
    return ConversionReport(
        out=out,
        sidecar=sidecar_path(out),
        num_samples=len(good),
        class_names=scan.class_names,
        class_counts=counts,
        skipped=skipped,
        ignored=[str(p) for p in scan.ignored],
        seconds=time.perf_counter() - start,
        file_bytes=out.stat().st_size,
        skipped_links=[str(p) for p in scan.skipped_links],
    )


def convert_with_val_split(
    src: str | Path,
    out: str | Path,
    val_out: str | Path,
    *,
    val_fraction: float,
    seed: int = 0,
    **options: Any,
) -> tuple[ConversionReport, ConversionReport]:
    """ImageFolder -> a train `.beton` (`out`) and a validation `.beton` (`val_out`): `val_fraction`
    of each class, chosen by `seed` (`stratified_split`), goes to val, the rest to train. Disjoint
    by construction; `options` are `convert_image_folder`'s."""
    if Path(out).expanduser().absolute() == Path(val_out).expanduser().absolute():
        raise ConfigError(
            f"--val-out {val_out}: is OUT itself", "give the validation split its own file, e.g. val.beton"
        )
    for p in (out, val_out):
        if Path(p).exists() and not options.get("overwrite"):
            raise DataError(f"{p}: already exists", "pass --overwrite to replace it, or choose another name")
    scan = scan_image_folder(src)
    split = stratified_split([label for _, label in scan.samples], val_fraction, seed)
    train = convert_image_folder(src, out, carve=("train", split), scan=scan, **options)
    val = convert_image_folder(src, val_out, carve=("val", split), scan=scan, **options)
    return train, val


def report_dict(report: ConversionReport) -> dict[str, Any]:
    """A JSON-able form of a ConversionReport."""
    d = asdict(report)
    d["out"], d["sidecar"] = str(report.out), str(report.sidecar)
    return d
