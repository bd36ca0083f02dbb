"""Which trial checkpoints a sweep keeps, deleted only once a resume can no longer need them.

Tune's own `CheckpointConfig(num_to_keep=...)` deletes a superseded checkpoint the moment the next
one registers, but the experiment state on storage is written every 10 s or more: a driver killed
in between leaves state that points at a deleted checkpoint, and `--resume` then fails that trial
("Could not recover from checkpoint as it does not exist on storage anymore"). Here Tune keeps
every checkpoint and this callback deletes, per trial, those that are neither the latest nor among
the best `keep_best` by the objective, and only `grace_s` after a newer one registered (the
experiment state has been saved many times by then).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any

from ray.tune import Callback

log = logging.getLogger(__name__)

MIN_GRACE_S = 300.0  # Tune saves its state at least every max(10 s, 19 x the time a save takes)


def default_grace_s() -> float:
    """MIN_GRACE_S, or three experiment-state periods when TUNE_GLOBAL_CHECKPOINT_S sets a longer one."""
    try:
        period = float(os.environ.get("TUNE_GLOBAL_CHECKPOINT_S", "auto"))
    except ValueError:
        return MIN_GRACE_S
    return max(MIN_GRACE_S, 3 * period)


@dataclass
class _Kept:
    checkpoint: Any  # ray.tune.Checkpoint
    score: float
    superseded_at: float | None = None  # when a newer checkpoint of the same trial registered


class CheckpointRetention(Callback):
    """Keep each trial's latest checkpoint and its best `keep_best`; delete the rest after `grace_s`."""

    def __init__(self, metric: str, mode: str, keep_best: int = 2, grace_s: float | None = None) -> None:
        self.metric, self.keep_best = metric, keep_best
        self.sign = 1.0 if mode == "max" else -1.0
        self.grace_s = default_grace_s() if grace_s is None else grace_s
        self.kept: dict[str, list[_Kept]] = {}

    def on_checkpoint(self, iteration: int, trials: list[Any], trial: Any, checkpoint: Any, **info: Any) -> None:
        value = (getattr(trial, "last_result", None) or {}).get(self.metric)
        score = self.sign * float(value) if isinstance(value, int | float) and not math.isnan(value) else -math.inf
        entries = self.kept.setdefault(trial.trial_id, [])
        now = time.monotonic()
        for entry in entries:
            if entry.superseded_at is None:
                entry.superseded_at = now
        entries.append(_Kept(checkpoint, score))
        self.prune(trial.trial_id, now)

    def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result: dict, **info: Any) -> None:
        self.prune(trial.trial_id, time.monotonic())

    def prune(self, trial_id: str, now: float) -> list[str]:
        """Delete what may go now; returns the deleted checkpoint paths."""
        entries = self.kept.get(trial_id, [])
        best = sorted(entries, key=lambda e: e.score, reverse=True)[: self.keep_best]
        deleted = []
        for entry in list(entries):
            old_enough = entry.superseded_at is not None and now - entry.superseded_at >= self.grace_s
            if old_enough and not any(entry is b for b in best):
                ckpt = entry.checkpoint
                with contextlib.suppress(FileNotFoundError, OSError):
                    ckpt.filesystem.delete_dir(ckpt.path)
                    deleted.append(ckpt.path)
                entries.remove(entry)
        if deleted:
            log.debug("deleted %d superseded checkpoints of %s", len(deleted), trial_id)
        return deleted
