"""Where cmx keeps its state on this machine: data, runs, sweeps, the local MLflow store."""

from __future__ import annotations

import os
from pathlib import Path

from cmx.core.errors import ConfigError


def cmx_home() -> Path:
    """`$CMX_HOME`, or `~/.cmx`; created on first use."""
    home = Path(os.environ.get("CMX_HOME") or Path.home() / ".cmx").expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    return home


def data_dir() -> Path:
    """Default folder for built-in datasets and converted .beton files."""
    return cmx_home() / "data"


def runs_dir() -> Path:
    """Default folder for `cmx train` run directories."""
    return cmx_home() / "runs"


def sweeps_dir() -> Path:
    """Default Ray Tune storage path for sweeps."""
    return cmx_home() / "sweeps"


def jit_cache_dir() -> Path:
    """numba's on-disk cache for what FFCV compiles: `$NUMBA_CACHE_DIR`, else `$XDG_CACHE_HOME/cmx/numba`
    (`~/.cache/cmx/numba`). One per machine, shared by every `$CMX_HOME`: entries are keyed by code."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return Path(os.environ["NUMBA_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "cmx" / "numba"


def safe_child(parent: str | Path, name: str, what: str) -> Path:
    """`parent/name`, refusing a `name` that would leave `parent` (`..`, an absolute path, a `/`).

    Every name that becomes a folder (run names, sweep names, pointers read from disk) goes through
    here, so no input can make cmx write or delete outside the folder it belongs in.
    """
    text = str(name)
    if not text or text in (".", "..") or "/" in text or "\\" in text or "\0" in text:
        raise ConfigError(
            f"{what} {text!r} is not a plain name (no '/', '..' or absolute paths)",
            f"use letters, digits, - _ . ; it becomes a folder under {parent}",
        )
    return Path(parent) / text


def check_dir_target(path: str | Path, what: str, hint: str | None = None) -> None:
    """Refuse a local folder cmx is about to create or write into when it is a regular file, lies
    under one, or cannot be created there; creates nothing (so `--dry-run` can run it too)."""
    target = Path(path).expanduser()
    probe = target
    while not probe.exists() and probe != probe.parent:
        if probe.is_symlink():  # a dangling link: creating through it would write elsewhere
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        where = "is a file" if probe == target else f"lies under the file {probe}"
        raise ConfigError(
            f"{what} {target} {where}, not a folder", hint or f"point {what} at a folder (or a path to create)"
        )
    if not probe.exists() or not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(
            f"{what} {target} cannot be {'written' if probe == target else 'created'} ({probe} is not writable)",
            hint or f"point {what} at a folder you can write",
        )
