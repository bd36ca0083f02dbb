"""File helpers shared by every layer: atomic writes, and an exclusive lock shared by the
processes of one machine."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cmx.core.errors import CmxError
from cmx.core.uris import is_uri


@contextlib.contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if missing); the kernel releases it if the holder dies."""
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def temp_path(path: Path) -> Path:
    """The hidden, per-process name `path` is written under before its rename."""
    # The same directory keeps os.replace atomic; the pid keeps concurrent writers apart.
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_path(path: str | Path, *, fsync: bool = False) -> Iterator[Path]:
    """Yield a temp path to write; it replaces `path` if the block succeeds, else it is removed."""
    # Readers see the old file or the whole new one, never a part. `fsync` flushes the file
    # before the rename and the directory after it: the new file then survives a power loss too.
    path = Path(path)
    tmp = temp_path(path)
    try:
        yield tmp
        if fsync:
            fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if fsync:
        fsync_dir(path.parent)


def leftover_temps(path: Path) -> list[Path]:
    """Temp files of `path` that writers killed before their rename left behind."""
    return sorted(path.parent.glob(f".{path.name}.tmp-*"))


def atomic_write_text(path: str | Path, text: str, *, fsync: bool = False) -> None:
    """Write `text` to `path` through `atomic_path`: never a half-written file."""
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_text(text)


def fsync_file(path: Path) -> None:
    """Flush a written file's data to disk."""
    fd = os.open(path, os.O_RDONLY)  # fsync flushes the file's data whichever descriptor asks
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(directory: Path) -> None:
    """Persist a rename inside `directory` (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_utf8(path: str | Path, *, what: str, error: type[CmxError], hint: str, limit: int = 256 << 20) -> str:
    """A text file cmx wrote (a JSON-lines log, a journal), read defensively: size checked before
    reading, UTF-8; anything else is one `error(message, hint)` naming the file."""
    p = Path(path)
    try:
        size = p.stat().st_size
        if size > limit:
            raise error(f"{p}: {what} is {size:,} bytes, over the {limit:,}-byte limit", hint)
        with p.open("rb") as f:
            return f.read(limit + 1).decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else " ".join(str(e).split())[:120]
        raise error(f"{p}: unreadable {what} ({reason})", hint) from None


def read_json(path: str | Path, *, what: str, error: type[CmxError], hint: str, limit: int = 256 << 20) -> Any:
    """A JSON file cmx wrote (sidecar, state, marker), read like `read_utf8` and parsed; a file that
    is not JSON is the same one-line `error`."""
    text = read_utf8(path, what=what, error=error, hint=hint, limit=limit)
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise error(f"{Path(path)}: unreadable {what} ({' '.join(str(e).split())[:120]})", hint) from None


_FINGERPRINTS: dict[tuple, str] = {}
_EDGE = 1 << 20  # bytes hashed at each end of a data file


def data_fingerprint(path: str | None) -> str:
    """Size and hash of a dataset's index: a `.beton`'s first and last MiB (header, metadata and
    allocation table live there) plus its class-names sidecar, or an ImageFolder's sorted file
    list with sizes. Cheap: reads at most 2 MiB or lists a directory."""
    if not path or is_uri(path):
        return "unavailable" if not path else f"remote {path}"
    p = Path(path).expanduser()
    if not p.exists():
        return "missing"
    st = p.stat()
    key: tuple = (str(p.resolve()), st.st_mtime, st.st_size)
    if p.is_dir():  # a file added or removed changes its class folder's mtime, not the top's
        key += tuple(sorted((c.name, c.stat().st_mtime) for c in p.iterdir() if c.is_dir()))
    if key in _FINGERPRINTS:
        return _FINGERPRINTS[key]
    h = hashlib.sha256()
    if p.is_file():
        with open(p, "rb") as f:
            h.update(f.read(_EDGE))
            if st.st_size > _EDGE:
                f.seek(max(_EDGE, st.st_size - _EDGE))
                h.update(f.read(_EDGE))
        sidecar = p.with_name(p.name + ".json")
        if sidecar.is_file():
            h.update(sidecar.read_bytes())
        text = f"file bytes={st.st_size} sha256={h.hexdigest()[:16]}"
    else:
        files = total = 0
        for item in sorted(x for x in p.rglob("*") if x.is_file() and not x.name.startswith(".")):
            size = item.stat().st_size
            h.update(f"{item.relative_to(p)}\t{size}\n".encode())
            files, total = files + 1, total + size
        text = f"folder files={files} bytes={total} sha256={h.hexdigest()[:16]}"
    _FINGERPRINTS[key] = text
    return text
