"""Small text files beside Tune's state, on a local path or a URI (s3://, gs://, file://).

URIs go through `pyarrow.fs`, the filesystem layer Ray Tune itself uses for `storage_path`, so any
storage Tune can write to, cmx can keep its spec and best config in.
"""

from __future__ import annotations

from pathlib import Path

from cmx.errors import ConfigError


def is_uri(location: str) -> bool:
    """True for `scheme://...` locations (handled by pyarrow.fs), False for local paths."""
    return "://" in location


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
