"""`data.cache_dir`: fetch a dataset (a .beton or an ImageFolder) once per node onto local disk.

On a cluster the betons live on shared storage (S3 or NFS); FFCV reads them with random access
every epoch, which a network filesystem serves far slower than a local NVMe. The first trial on a
node copies the file into the node-local cache; every later trial on that node (and concurrent
ones, which wait on a file lock) reuses it. The copy is written to a temporary name and renamed
into place, so a reader never sees a partial file, and a crashed copy leaves only garbage that the
next fetch removes. A changed source (size or modification time) is fetched again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from cmx.core.errors import DataError
from cmx.core.files import atomic_write_text, file_lock, fsync_file, leftover_temps, read_json
from cmx.core.uris import is_uri

META_SUFFIX = ".cmx-cache.json"


@dataclass(frozen=True)
class CacheResult:
    """Where the data is on this node, and whether this call copied it."""

    path: Path
    copied: bool
    seconds: float
    bytes: int


def _filesystem(source: str) -> tuple[object, str]:
    """(pyarrow filesystem, path in it) for a local path or a URI such as s3://bucket/key."""
    from pyarrow import fs

    if is_uri(source):
        return fs.FileSystem.from_uri(source)
    return fs.LocalFileSystem(), str(Path(source).expanduser().resolve())


def _source_signature(filesystem: object, path: str) -> dict[str, object]:
    """Size and mtime of a file, or of every file under a folder: what decides a re-fetch."""
    from pyarrow import fs

    info = filesystem.get_file_info(path)  # type: ignore[attr-defined]
    if info.type == fs.FileType.NotFound:
        raise DataError(f"{path}: not found", "check data.train_path / data.val_path")
    if info.type == fs.FileType.File:
        return {"size": info.size, "mtime_ns": info.mtime_ns}
    entries = filesystem.get_file_info(fs.FileSelector(path, recursive=True))  # type: ignore[attr-defined]
    files = sorted((e.path, e.size, e.mtime_ns) for e in entries if e.type == fs.FileType.File)
    digest = hashlib.sha256(json.dumps(files).encode()).hexdigest()[:16]
    return {"size": sum(f[1] or 0 for f in files), "files": len(files), "digest": digest}


def cache_name(source: str) -> str:
    """`<hash of the full source>-<basename>`: two datasets' `train.beton` never collide."""
    base = source.rstrip("/").rsplit("/", 1)[-1] or "data"
    return f"{hashlib.sha256(source.encode()).hexdigest()[:12]}-{base}"


def fetch_to_cache(source: str | Path, cache_dir: str | Path) -> CacheResult:
    """Return the node-local copy of `source` under `cache_dir`, copying it first if needed."""
    from pyarrow import fs

    started = time.monotonic()
    source = str(source)
    cache = Path(cache_dir).expanduser()
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"data.cache_dir {cache}: cannot create ({e.strerror})", "use a writable local path") from None
    filesystem, src_path = _filesystem(source)
    name = cache_name(source if is_uri(source) else src_path)
    dest = cache / name
    meta_path = cache / (name + META_SUFFIX)
    with file_lock(cache / (name + ".lock")):
        signature = _source_signature(filesystem, src_path)
        if dest.exists() and meta_path.exists():
            with contextlib.suppress(DataError):  # a damaged meta file only means a fresh copy
                meta = read_json(meta_path, what="cache meta", error=DataError, hint="")
                if isinstance(meta, dict) and meta.get("signature") == signature:
                    return CacheResult(dest, False, time.monotonic() - started, int(signature["size"]))  # type: ignore[call-overload]
        _remove_leftovers(cache, name)
        need = int(signature["size"])  # type: ignore[call-overload]
        free = shutil.disk_usage(cache).free
        if need > free:
            raise DataError(
                f"data.cache_dir {cache}: {source} needs {need / 1e9:.1f} GB, {free / 1e9:.1f} GB free",
                "free space or point data.cache_dir at a larger local disk",
            )
        tmp = cache / f"{name}.tmp-{os.getpid()}"
        info = filesystem.get_file_info(src_path)  # type: ignore[attr-defined]
        if info.type == fs.FileType.File:
            fs.copy_files(src_path, str(tmp), source_filesystem=filesystem, destination_filesystem=fs.LocalFileSystem())
        else:
            tmp.mkdir()
            fs.copy_files(src_path, str(tmp), source_filesystem=filesystem, destination_filesystem=fs.LocalFileSystem())
        _fsync(tmp)
        if dest.exists():  # a stale copy of a changed source
            _remove(dest)
        os.replace(tmp, dest)
        atomic_write_text(meta_path, json.dumps({"source": source, "signature": signature, "fetched_at": time.time()}))
    return CacheResult(dest, True, time.monotonic() - started, need)


def _fsync(path: Path) -> None:
    """Flush a copied file (or a folder's files) so a node crash right after the rename cannot
    leave a complete-looking but truncated cache entry."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for f in files:
        fsync_file(f)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _remove_leftovers(cache: Path, name: str) -> None:
    """Temporary copies left by a fetch that was killed (we hold the lock: nobody is writing)."""
    for p in cache.glob(f"{name}.tmp-*"):
        _remove(p)
    for p in leftover_temps(cache / (name + META_SUFFIX)):
        _remove(p)


def local_data_path(source: str, cache_dir: str | None) -> Path:
    """The path a loader should open: the node-local copy when `cache_dir` is set."""
    if cache_dir:
        return fetch_to_cache(source, cache_dir).path
    if is_uri(source):
        raise DataError(f"{source}: loaders read local files only", "set data.cache_dir to fetch it to local disk once")
    return Path(source).expanduser()
