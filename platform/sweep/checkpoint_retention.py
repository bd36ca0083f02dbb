"""Bounded checkpoint storage per trial that never breaks `cmx sweep --resume`.

Tune's own `CheckpointConfig(num_to_keep=...)` deletes a superseded checkpoint the moment a new
one is registered, while the experiment state on storage (what `Tuner.restore` reads) still points
at it until the next state save, ~10 s later. A driver killed in that window left a sweep whose
resume failed the trial with "Could not recover from checkpoint as it does not exist on storage
anymore". So Tune keeps every checkpoint (`num_to_keep=None`) and this callback deletes the
superseded ones (neither a trial's latest nor among its best `keep_best` by the objective) only
after they were already superseded at two earlier experiment-state saves: no saved state, nor the
one still being uploaded, can refer to them any more.

Tune calls `Callback.get_state` while it writes each experiment-state snapshot; that is the clock.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from ray import tune

from cmx.cluster.ray_compat import checkpoint_manager, forget_checkpoint

log = logging.getLogger("cmx.sweep")

SAVES_BEFORE_DELETE = 2  # superseded at this many earlier state saves -> safe to delete


def superseded(manager: Any, keep_best: int) -> list[Any]:
    """A trial's checkpoint results that are neither its latest nor among its best `keep_best`.

    `manager` is the trial's Tune checkpoint manager: its results are sorted worst to best by the
    score attribute (by registration time when there is none).
    """
    results = list(manager.best_checkpoint_results)
    keep = set(map(id, results[-keep_best:])) if keep_best > 0 else set()
    latest = manager.latest_checkpoint_result
    if latest is not None:
        keep.add(id(latest))
    return [r for r in results if id(r) not in keep]


def _path(result: Any) -> str:
    return str(result.checkpoint.path)


def delete_checkpoint(manager: Any, result: Any) -> None:
    """Remove a checkpoint from storage and from the trial's list (as Tune's num_to_keep does)."""
    checkpoint = result.checkpoint
    with contextlib.suppress(FileNotFoundError):
        checkpoint.filesystem.delete_dir(checkpoint.path)
    # The manager's list is what Tune reports as the trial's checkpoints (ResultGrid, restore).
    forget_checkpoint(manager, result)


class CheckpointRetention(tune.Callback):
    """Deletes each trial's superseded checkpoints once no saved experiment state can need them."""

    def __init__(self, keep_best: int = 1) -> None:
        self.keep_best = keep_best
        self._trials: list[Any] = []
        self._seen: dict[str, int] = {}  # checkpoint path -> state saves it was superseded at
        self.deleted = 0

    def __getstate__(self) -> dict[str, Any]:
        # Pickled with the experiment state: no trial objects, no counters from this driver.
        return {"keep_best": self.keep_best, "_trials": [], "_seen": {}, "deleted": 0}

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        self._trials = trials

    def get_state(self) -> dict[str, Any] | None:
        """Called by Tune as it snapshots the experiment: advance every superseded checkpoint's count."""
        try:
            self._on_state_saved()
        except Exception as e:  # noqa: BLE001 - pruning must never stop a sweep
            log.warning("checkpoint clean-up skipped: %s: %s", type(e).__name__, e)
        return None

    def _on_state_saved(self) -> None:
        seen: dict[str, int] = {}
        for trial in self._trials:
            manager = checkpoint_manager(trial)
            if manager is None:
                continue
            for result in superseded(manager, self.keep_best):
                path = _path(result)
                count = self._seen.get(path, 0) + 1
                if count > SAVES_BEFORE_DELETE:
                    delete_checkpoint(manager, result)
                    self.deleted += 1
                else:
                    seen[path] = count
        self._seen = seen

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        """Finished trials are never restored from their latest checkpoint: prune them now."""
        from ray.tune.experiment import Trial

        for trial in trials:
            manager = checkpoint_manager(trial)
            if manager is None or trial.status != Trial.TERMINATED:
                continue
            for result in superseded(manager, self.keep_best):
                delete_checkpoint(manager, result)
                self.deleted += 1
