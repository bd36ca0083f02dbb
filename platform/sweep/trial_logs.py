"""Keep every epoch's row in a trial's result.json / progress.csv across pauses and retries.

When a trial starts again from a checkpoint (resumed by `asha-promotion`, retried after a lost
node), Tune's JSON and CSV loggers first copy the file back from the sweep's storage, over the
driver's own copy. The storage copy is refreshed only with each experiment-state save (every
≥ 10 s), so the rows logged since were lost: a trial paused at epoch 1 and resumed a second later
had a result.json starting at epoch 2. Tune runs user callbacks before its default loggers, so this
callback pushes the driver's copy to storage first, when it is the longer one (rows only append).

A trial that starts over (its driver killed before Tune's state knew its last checkpoint, or a
data-parallel trial that Ray Train resumes behind Tune's back) reports epochs it had reported
before, and Tune appends them: a re-run killed after epoch 1 and restarted had the rows 1, 1, 2.
So before Tune logs a result for epoch e, the rows for epochs ≥ e are cut from the driver's copy:
the files hold the run as it went on, one row per epoch.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path
from typing import Any

import pyarrow.fs
from ray import tune

from cmx.core import metrics

log = logging.getLogger("cmx.sweep")

LOG_FILES = ("result.json", "progress.csv")


def _epoch(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def cut_json_rows(path: Path, from_epoch: float) -> int:
    """Drop the rows of `path` (one JSON object a line) whose epoch is ≥ `from_epoch`, in place
    (Tune's logger appends through an open handle); the number dropped."""
    if not path.is_file():
        return 0
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None  # a torn last line from a killed driver: a later row supersedes it
        epoch = _epoch(row.get(metrics.EPOCH)) if isinstance(row, dict) else from_epoch
        if epoch is None or epoch < from_epoch:
            kept.append(line)
    return _rewrite(path, "".join(kept), len(lines) - len(kept))


def cut_csv_rows(path: Path, from_epoch: float) -> int:
    """The same for a CSV with a header row and an `epoch` column."""
    if not path.is_file():
        return 0
    text = path.read_text(encoding="utf-8")
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if not header or metrics.EPOCH not in header:
        return 0
    column = header.index(metrics.EPOCH)
    out = io.StringIO(newline="")
    writer = csv.writer(out)
    writer.writerow(header)
    dropped = 0
    for row in reader:
        epoch = _epoch(row[column]) if column < len(row) else from_epoch
        if epoch is not None and epoch >= from_epoch:
            dropped += 1
        else:
            writer.writerow(row)
    return _rewrite(path, out.getvalue(), dropped)


def _rewrite(path: Path, text: str, dropped: int) -> int:
    if dropped:
        with path.open("r+", encoding="utf-8", newline="") as f:  # same inode: Tune's handle stays valid
            f.write(text)
            f.truncate()
    return dropped


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
    """Before a trial restarts from a checkpoint, its logged rows go to storage; before an epoch is
    logged again, its earlier rows go (see module doc)."""

    def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result: dict, **info: Any) -> None:
        epoch = _epoch(result.get(metrics.EPOCH))
        if epoch is None or epoch < 1:
            return  # a rejected config's single row, or a result without an epoch
        local = Path(trial.local_path)
        dropped = cut_json_rows(local / LOG_FILES[0], epoch) + cut_csv_rows(local / LOG_FILES[1], epoch)
        if dropped:
            log.info(
                "trial %s started over at epoch %d: its earlier rows from there are replaced", trial.trial_id, epoch
            )

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
