"""Metric names, defined once and used by the trainer, the sweep and the tracker."""

from __future__ import annotations

TRAIN_LOSS = "train/loss"
VAL_LOSS = "val/loss"
VAL_TOP1 = "val/top1"
VAL_TOP5 = "val/top5"
LR = "train/lr"
IMAGES_PER_SEC = "train/images_per_sec"
EPOCH_SECONDS = "time/epoch_seconds"
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


def epochs_of(result: dict) -> int:
    """Epochs a trial had finished at this result: the trainer's own `epoch`, not Tune's
    `training_iteration`, which restarts at 1 when a data-parallel trial resumes (its checkpoints
    live in Ray Train's run, so Tune restores no iteration count)."""
    return int(result.get(EPOCH, result.get("training_iteration", 0)) or 0)
