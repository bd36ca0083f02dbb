"""Keep every epoch's row in a trial's result.json / progress.csv across pauses and retries.

When a trial starts again from a checkpoint (resumed by `asha-promotion`, retried after a lost
node), Tune's JSON and CSV loggers first copy the file back from the sweep's storage, over the
driver's own copy. The storage copy is refreshed only with each experiment-state save (every
≥ 10 s), so the rows logged since were lost: a trial paused at epoch 1 and resumed a second later
had a result.json starting at epoch 2. Tune runs user callbacks before its default loggers, so this
callback pushes the driver's copy to storage first, when it is the longer one (rows only append).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pyarrow.fs
from ray import tune

log = logging.getLogger("cmx.sweep")

LOG_FILES = ("result.json", "progress.csv")


def push_if_longer(local: Path, remote: str, filesystem: Any) -> bool:
    """Copy `local` over `remote` when it holds more bytes; True when copied."""
    if not local.is_file():
        return False
    info = filesystem.get_file_info(remote)
    if info.type == pyarrow.fs.FileType.File and (info.size or 0) >= local.stat().st_size:
        return False
    pyarrow.fs.copy_files(local.as_posix(), remote, destination_filesystem=filesystem)
    return True


class KeepTrialLogs(tune.Callback):
    """Before a trial restarts from a checkpoint, its logged rows go to storage (see module doc)."""

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        if not trial.checkpoint:
            return  # a first start: nothing logged yet
        storage = trial.storage
        for name in LOG_FILES:
            remote = Path(storage.trial_fs_path, name).as_posix()
            try:
                push_if_longer(Path(trial.local_path, name), remote, storage.storage_filesystem)
            except OSError as e:  # storage briefly unreachable: Tune's own copy still works
                log.warning("could not keep %s of trial %s: %s", name, trial.trial_id, e)
