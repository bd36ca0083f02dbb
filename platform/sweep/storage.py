"""The sweep directory: where it lives, and the small files cmx keeps beside Tune's state there,
on a local path or a URI (s3://, gs://, file://).

URIs go through `pyarrow.fs`, the filesystem layer Ray Tune itself uses for `storage_path`, so any
storage Tune can write to, cmx can keep its spec and best config in.
"""

from __future__ import annotations

import hashlib
import json
import stat
from pathlib import Path

from cmx.core.errors import ConfigError
from cmx.core.paths import sweeps_dir
from cmx.core.sweep_spec import SweepSpec
from cmx.core.uris import is_uri

# What cmx keeps beside Tune's state in a sweep directory.
SPEC_FILE = "cmx-sweep.yaml"  # the validated spec, saved in the experiment dir
SOURCE_FILE = "cmx-space.yaml"  # the user's file as written
BEST_CONFIG_FILE = "best-config.yaml"
STUDY_FILE = "optuna-study.journal"  # the sweep's Optuna study (local storage; cmx.sweep.study)


def _remote(location: str) -> tuple[object, str]:
    import pyarrow.fs

    try:
        return pyarrow.fs.FileSystem.from_uri(location)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError, message names the scheme
        raise ConfigError(
            f"storage {location}: {e}", "use a local path or an s3:// / gs:// URI Ray can reach"
        ) from None


def read_text(folder: str, name: str) -> str | None:
    """The file `folder/name` as text, or None when it does not exist."""
    if not is_uri(folder):
        path = Path(folder) / name
        return path.read_text() if path.is_file() else None
    import pyarrow.fs

    fs, root = _remote(folder)
    target = f"{root.rstrip('/')}/{name}"
    if fs.get_file_info(target).type != pyarrow.fs.FileType.File:  # type: ignore[attr-defined]
        return None
    with fs.open_input_stream(target) as stream:  # type: ignore[attr-defined]
        return stream.read().decode()


def write_text(folder: str, name: str, text: str) -> str:
    """Write `folder/name` (creating `folder`); returns where it went."""
    if not is_uri(folder):
        path = Path(folder) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return str(path)
    fs, root = _remote(folder)
    fs.create_dir(root, recursive=True)  # type: ignore[attr-defined]
    target = f"{root.rstrip('/')}/{name}"
    with fs.open_output_stream(target) as stream:  # type: ignore[attr-defined]
        stream.write(text.encode())
    return f"{folder.rstrip('/')}/{name}"


def remove_dir(folder: str) -> None:
    """Delete `folder` and everything under it, if it exists."""
    if not is_uri(folder):
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
        return
    import pyarrow.fs

    fs, root = _remote(folder)
    if fs.get_file_info(root).type == pyarrow.fs.FileType.Directory:  # type: ignore[attr-defined]
        fs.delete_dir(root)  # type: ignore[attr-defined]


def check_removable(folder: str) -> None:
    """`--fresh` deletes `folder`: only one that holds a sweep (its SPEC_FILE) or nothing at all.

    Anything else (a user's folder that --storage/--name happen to name, a file, a symlink) is
    refused with one line, before Ray starts and before anything is deleted.
    """
    hint = "give --name or --storage a folder of its own; --fresh only replaces an earlier sweep"
    if not is_uri(folder):
        path = Path(folder)
        if path.is_symlink():
            raise ConfigError(f"--fresh will not delete {folder}: it is a symlink", hint)
        if not path.exists():
            return
        if not path.is_dir():
            raise ConfigError(f"--fresh will not delete {folder}: it is a file, not a sweep folder", hint)
        if (path / SPEC_FILE).is_file() or not any(path.iterdir()):
            return
        raise ConfigError(f"--fresh will not delete {folder}: it holds no cmx sweep (no {SPEC_FILE})", hint)
    import pyarrow.fs

    fs, root = _remote(folder)
    info = fs.get_file_info(root)  # type: ignore[attr-defined]
    if info.type == pyarrow.fs.FileType.NotFound:
        return
    if info.type != pyarrow.fs.FileType.Directory:
        raise ConfigError(f"--fresh will not delete {folder}: it is a file, not a sweep folder", hint)
    entries = fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=False))  # type: ignore[attr-defined]
    if not entries or any(e.base_name == SPEC_FILE and e.type == pyarrow.fs.FileType.File for e in entries):
        return
    raise ConfigError(f"--fresh will not delete {folder}: it holds no cmx sweep (no {SPEC_FILE})", hint)


def check_trusted(root: str, folder: str) -> None:
    """Refuse local sweep storage others can write: resuming unpickles Tune's state from it, so
    whoever can write there can run code on the driver (docs/scaling.md, Who can write the storage).

    A world-writable storage root is accepted only with the sticky bit (as /tmp has): others can
    then add folders but not replace this sweep's.
    """
    if is_uri(root):
        return
    for place, label in ((Path(root), "storage folder"), (Path(folder), "sweep folder")):
        if not place.is_dir():
            continue
        mode = place.stat().st_mode
        if mode & stat.S_IWOTH and not (label == "storage folder" and mode & stat.S_ISVTX):
            raise ConfigError(
                f"{label} {place} is world-writable: anyone could plant state this sweep runs on resume",
                f"chmod o-w {place} (whoever can write a sweep's storage can run code on the driver)",
            )


def experiment_root(spec: SweepSpec) -> str:
    """Tune's storage_path for this sweep."""
    return spec.storage.path or str(sweeps_dir())


def experiment_path(spec: SweepSpec) -> str:
    """Where this sweep's state lives (storage/name)."""
    root = experiment_root(spec)
    return f"{root.rstrip('/')}/{spec.name}"


def spec_fingerprint(spec: SweepSpec) -> str:
    """A hash of what defines the sweep, to refuse resuming with a changed space (tracking and
    the confirm stage that follows the search do not count)."""
    data = spec.model_dump(mode="json")
    data.pop("tracking", None)
    data.pop("confirm", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
