"""Metric names, defined once and used by the trainer, the sweep and the tracker."""

from __future__ import annotations

from enum import StrEnum

TRAIN_LOSS = "train/loss"
VAL_LOSS = "val/loss"
VAL_TOP1 = "val/top1"
VAL_TOP5 = "val/top5"
# The held-out test split: measured once per chosen finished trial, after the sweep, never
# reported to a searcher or scheduler (not in ALL or MODES, so no sweep can optimise them).
TEST_TOP1 = "test/top1"
TEST_TOP5 = "test/top5"
TEST_LOSS = "test/loss"
TEST = (TEST_LOSS, TEST_TOP1, TEST_TOP5)
TEST_SCORE_FILE = "cmx-test.json"  # in a trial's folder: its best checkpoint's TEST metrics, kept
LR = "train/lr"
IMAGES_PER_SEC = "train/images_per_sec"
EPOCH_SECONDS = "time/epoch_seconds"
# Where a start or resume spent its seconds before training (reported with its first epoch).
SETUP_PREFIX = "time/setup/"
SETUP_SECONDS = "time/setup_seconds"  # their sum: trial start to the first batch
# imports and trial: the sweep trial (cmx.sweep.trial); the rest: the trainer (cmx.pipelines.trainer.SetupClock)
SETUP_PHASES = ("imports", "trial", "runtime", "restore", "loaders", "model", "first_batch")
PEAK_MEMORY_MB = "system/peak_memory_mb"
EPOCH = "epoch"

ALL = (TRAIN_LOSS, VAL_LOSS, VAL_TOP1, VAL_TOP5, LR, IMAGES_PER_SEC, EPOCH_SECONDS, PEAK_MEMORY_MB)
# Direction in which each metric improves; used to validate a sweep's metric/mode.
MODES = {
    TRAIN_LOSS: "min",
    VAL_LOSS: "min",
    VAL_TOP1: "max",
    VAL_TOP5: "max",
    IMAGES_PER_SEC: "max",
    EPOCH_SECONDS: "min",
    PEAK_MEMORY_MB: "min",
}

# Reported by sweep trials next to the training metrics (for multi-objective searches).
PARAMS_M = "model/params_m"
GFLOPS = "model/gflops"
TRIAL_ONLY = (PARAMS_M, GFLOPS)
MODES[PARAMS_M] = "min"
MODES[GFLOPS] = "min"

# Flags a trial reports instead of metrics when it did not train normally.
REJECTED = "trial/rejected"
NODE_ID = "trial/node_id"
DIVERGED = "trial/diverged"


class TrialStatus(StrEnum):
    """How a sweep trial or a `cmx train` run ended (or that it has not started): one member per
    meaning. The value is what tables and JSON show; `tag` is the spelling persisted in MLflow's
    `cmx.status` tag and in the tracking state file (they differ only for SCHEDULER_STOPPED)."""

    COMPLETED = "completed"  # trained every epoch it was given
    SCHEDULER_STOPPED = "stopped early"  # cut by the sweep's scheduler (ASHA) before max epochs
    PATIENCE_STOPPED = "early_stopped"  # the trainer stopped itself: no improvement for `patience` epochs
    DIVERGED = "diverged"  # the loss became non-finite
    FAILED = "failed"  # raised an error
    REJECTED = "rejected"  # broke a constraint, never trained
    INTERRUPTED = "interrupted"  # the run (or the sweep driver) was stopped before it ended
    PENDING = "pending"  # a sweep trial with no result yet

    @property
    def tag(self) -> str:
        """The spelling in MLflow's `cmx.status` tag and the tracking state file (no spaces)."""
        return self.value.replace(" ", "_")

    @classmethod
    def from_tag(cls, text: str) -> TrialStatus:
        """The member whose value or tag is `text`; ValueError for anything else."""
        for member in cls:
            if text in (member.value, member.tag):
                return member
        raise ValueError(f"not a cmx trial status: {text!r}")

    @property
    def usable(self) -> bool:
        """True when the trial's metric values mean something (it trained normally, maybe cut short)."""
        return self in (TrialStatus.COMPLETED, TrialStatus.SCHEDULER_STOPPED)

    @property
    def failure(self) -> bool:
        """True when the trial ended without a usable result: failed, rejected or diverged."""
        return self in (TrialStatus.FAILED, TrialStatus.REJECTED, TrialStatus.DIVERGED)

    @property
    def finished(self) -> bool:
        """True when a sweep trial ended for good: usable or not, but neither pending nor interrupted."""
        return self.usable or self.failure


def better(a: float, b: float | None, mode: str) -> bool:
    """True when `a` improves on `b` in direction `mode` ("max" or "min"); anything beats None."""
    return b is None or (a > b if mode == "max" else a < b)


def epochs_of(result: dict) -> int:
    """Epochs a trial had finished at this result: the trainer's own `epoch`, not Tune's
    `training_iteration`, which restarts at 1 when a data-parallel trial resumes (its checkpoints
    live in Ray Train's run, so Tune restores no iteration count)."""
    return int(result.get(EPOCH, result.get("training_iteration", 0)) or 0)
