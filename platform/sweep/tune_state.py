"""Tune's saved sweep state, kept whole on local storage when the driver is killed mid-save.

Tune writes its state files (experiment state, search algorithm, searcher, callbacks, tuner) to a
staging directory and then copies them into the sweep directory, in place: a driver killed during
that copy (SIGKILL, OOM, a crashed node) leaves a truncated file there, and `Tuner.restore` then
fails ("Ran out of input") and starts the sweep over. So with each state save, `StateBackup` keeps
a complete copy of the newest files in `.cmx-tune-state/` (written aside, switched atomically),
and `repair_torn_state` puts that copy back before a resume when any saved file is cut off.
Object stores (s3://) write each object whole and need none of this.
"""

from __future__ import annotations

import json
import logging
import os
import pickletools
import shutil
import time
from pathlib import Path
from typing import Any

from ray import tune

from cmx.core.errors import ConfigError
from cmx.core.files import atomic_path, atomic_write_text
from cmx.core.paths import safe_child

log = logging.getLogger("cmx.sweep")

BACKUP_DIR = ".cmx-tune-state"
CURRENT_FILE = "CURRENT"  # names the complete copy
# What `Tuner.restore` reads, newest session first (Tune picks the greatest name per pattern).
STATE_PATTERNS = (
    "experiment_state-*.json",
    "search_gen_state-*.json",
    "basic-variant-state-*.json",
    "searcher-state-*.pkl",
    "callback-states-*.pkl",
    "tuner.pkl",
)


def newest_state_files(directory: Path) -> list[Path]:
    """The file of each kind that a restore from `directory` would read."""
    found = []
    for pattern in STATE_PATTERNS:
        matches = sorted(p for p in directory.glob(pattern) if p.is_file())
        if matches:
            found.append(matches[-1])
    return found


def is_whole(path: Path) -> bool:
    """True when the file parses to the end: JSON for the experiment state, a pickle for the
    rest (walked opcode by opcode, nothing is unpickled)."""
    try:
        data = path.read_bytes()
        if path.name.startswith("experiment_state-"):
            json.loads(data)
            return True
        ops = list(pickletools.genops(data))
        return bool(ops) and ops[-1][0].name == "STOP"
    except (OSError, ValueError):
        return False


def _fsync_copy(src: Path, dst: Path) -> None:
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        shutil.copyfileobj(fin, fout)
        fout.flush()
        os.fsync(fout.fileno())


def save_backup(staging: Path, experiment_dir: Path) -> Path | None:
    """Copy the newest whole state files from `staging` into a new backup set; None if incomplete."""
    files = newest_state_files(staging)
    if not any(f.name.startswith("experiment_state-") for f in files) or not all(map(is_whole, files)):
        return None
    root = experiment_dir / BACKUP_DIR
    target = root / f"{time.time_ns()}-{os.getpid()}"  # never the set CURRENT names
    target.mkdir(parents=True)
    for f in files:
        _fsync_copy(f, target / f.name)
    atomic_write_text(root / CURRENT_FILE, target.name, fsync=True)
    for old in root.iterdir():
        if old.is_dir() and old.name != target.name:
            shutil.rmtree(old, ignore_errors=True)
    return target


def current_backup(experiment_dir: Path) -> Path | None:
    """The complete backup set, if one was written."""
    pointer = experiment_dir / BACKUP_DIR / CURRENT_FILE
    if not pointer.is_file():
        return None
    try:  # the pointer's content becomes a path: it must name a set inside BACKUP_DIR
        target = safe_child(pointer.parent, pointer.read_text(errors="replace").strip(), f"{pointer}: backup set")
    except ConfigError as e:
        raise ValueError(e.message) from None
    return target if target.is_dir() and not target.is_symlink() else None


def repair_torn_state(experiment_dir: str | Path) -> list[str]:
    """Replace cut-off state files by the last complete copy; returns the names restored.

    Raises ValueError (with what to do) when a file is cut off and no complete copy exists.
    """
    experiment_dir = Path(experiment_dir)
    torn = [f.name for f in newest_state_files(experiment_dir) if not is_whole(f)]
    if not torn:
        return []
    backup = current_backup(experiment_dir)
    if backup is None or not all(map(is_whole, backup.iterdir())):
        raise ValueError(f"{', '.join(torn)} cut off and no complete copy in {BACKUP_DIR}/")
    restored = []
    for f in sorted(backup.iterdir()):
        with atomic_path(experiment_dir / f.name) as tmp:
            _fsync_copy(f, tmp)
        restored.append(f.name)
    # A torn file from a later save than the copy would still be the newest of its kind: set aside.
    for name in torn:
        path = experiment_dir / name
        if path.exists() and not is_whole(path):
            path.replace(experiment_dir / BACKUP_DIR / f"{name}.torn")
    log.warning(
        "sweep state in %s was cut off when its driver died (%s): restored the last complete copy",
        experiment_dir,
        ", ".join(torn),
    )
    return restored


class StateBackup(tune.Callback):
    """Keeps the last complete copy of Tune's state files beside them (local storage only)."""

    def __init__(self, experiment_dir: str | Path) -> None:
        self.experiment_dir = Path(experiment_dir)
        self._staging: Path | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"experiment_dir": self.experiment_dir, "_staging": None}

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        if self._staging is None and trials:
            self._staging = Path(trials[0].local_experiment_path)

    def get_state(self) -> dict[str, Any] | None:
        """Called by Tune as it writes a state snapshot, after the other state files."""
        if self._staging is not None:
            try:
                save_backup(self._staging, self.experiment_dir)
            except OSError as e:
                log.warning("sweep state backup skipped: %s", e)
        return None
