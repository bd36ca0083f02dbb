"""`cmx train` as an MLflow run of its own: params and tags up front, metrics every epoch, the
outcome, best checkpoint and metrics log at the end."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cmx.core import metrics as M
from cmx.core.config import TrainConfig, dump_yaml
from cmx.pipelines.trainer import METRICS_FILE, read_metrics, read_result
from cmx.tracking.provenance import config_tags, environment_tags, flatten, model_cost_params
from cmx.tracking.store import TAG_ROLE, check_tracking_reachable, short
from cmx.tracking.tracker import Tracker

if TYPE_CHECKING:
    pass

log = logging.getLogger("cmx.tracking")
EXPERIMENT = "cmx-train"  # `$MLFLOW_EXPERIMENT_NAME` wins


class TrainReporter:
    """The reporter `cmx train` passes to the trainer: logs each epoch's metrics at step=epoch."""

    def __init__(self, tracker: Tracker, key: str) -> None:
        self.tracker, self.key = tracker, key

    @property
    def run_id(self) -> str | None:
        """The MLflow run id (None while its creation waits in the journal)."""
        return self.tracker.run_id(self.key)

    def __call__(self, report: Any) -> None:
        self.log_epoch(int(report.epoch), report.metrics)

    def log_epoch(self, epoch: int, metrics: dict[str, Any]) -> None:
        """Log one epoch once: an epoch re-reported after a resume from an earlier checkpoint is skipped."""
        if epoch <= int(self.tracker.meta.get("last_epoch", 0)):
            return
        self.tracker.log(self.key, metrics={k: v for k, v in metrics.items() if k in M.ALL}, step=epoch)
        self.tracker.meta["last_epoch"] = epoch
        self.tracker.save()


@contextlib.contextmanager
def train_run(
    config: TrainConfig, run_dir: Path, *, uri: str | None = None, tags: dict[str, str] | None = None
) -> Iterator[TrainReporter]:
    """An MLflow run around one `cmx train`; yields the trainer's reporter and ends the run with the
    outcome in `run_dir/result.json` (FAILED on an exception, KILLED on Ctrl-C). `tags` are set
    on the run when it starts (the CLI's worker count, the run it reproduces).

    Raises TrackingError before anything trains when the store is unreachable. The run's state and
    journal live in `run_dir`, so `--resume` continues the same MLflow run.
    """

    run_dir = Path(run_dir).expanduser().resolve()
    tracker = Tracker(
        run_dir, check_tracking_reachable(uri), experiment=os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT
    )
    key = "train"
    tags = {
        **environment_tags(),
        **config_tags(config),
        TAG_ROLE: "train",
        "cmx.device": _device(config.loop.device),
        "mlflow.source.name": "cmx train",
        **(tags or {}),
    }
    if tracker.start_run(key, name=run_dir.name, tags=tags):
        tracker.log(key, params={**flatten(config.model_dump(mode="json")), **model_cost_params(config)})
        tracker.log_text(key, dump_yaml(config), "config.yaml")
    reporter = TrainReporter(tracker, key)
    try:
        yield reporter
    except KeyboardInterrupt:
        tracker.end_run(key, M.TrialStatus.INTERRUPTED)
        raise
    except BaseException as e:
        tracker.end_run(key, M.TrialStatus.FAILED, tags={"cmx.error": short(f"{type(e).__name__}: {e}", 500)})
        raise
    else:
        _finish(reporter, run_dir)
    finally:
        if not tracker.flush(force=True):
            log.warning(
                "%d MLflow call(s) not delivered yet; send them with: cmx runs replay %s", tracker.pending(), run_dir
            )


def _device(requested: str) -> str:
    if requested != "auto":
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _finish(reporter: TrainReporter, run_dir: Path) -> None:
    """Epochs not reported live (data-parallel runs), best metrics, checkpoint, status."""

    tracker, key = reporter.tracker, reporter.key
    for row in read_metrics(run_dir):
        reporter.log_epoch(int(row[M.EPOCH]), row)
    result = read_result(run_dir)
    ends = (  # the trainer's own; SCHEDULER_STOPPED when asked to stop after an epoch (stop_after)
        M.TrialStatus.COMPLETED, M.TrialStatus.PATIENCE_STOPPED, M.TrialStatus.DIVERGED, M.TrialStatus.SCHEDULER_STOPPED,
    )  # fmt: skip
    status = result.status if result and result.status in ends else M.TrialStatus.FAILED
    tags = {"cmx.message": short(result.message, 500)} if result else {}
    if result and result.best_checkpoint:
        tracker.log_artifact(key, result.best_checkpoint, "checkpoint")
    if (run_dir / METRICS_FILE).is_file():
        tracker.log_artifact(key, run_dir / METRICS_FILE)
    if result and result.best_metrics:
        best = {f"best/{k}": v for k, v in result.best_metrics.items() if k in M.ALL}
        tracker.log(key, metrics=best, step=result.epochs_completed)
    tracker.end_run(key, status, tags=tags)
