"""The confirm stage in MLflow: each re-run a nested run under the sweep's parent run, tagged with
the trial it confirms and its seed; the summary (winner, table, JSON) logged to the parent run.

The sweep's `Tracker` state file in the sweep folder holds the parent run, so the re-runs join it
and a continued confirm stage continues the same runs (its own keys `confirm:<trial>:<seed>`).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from ray import tune

from cmx.confirm.plan import SUMMARY_FILE, TABLE_FILE, ConfirmSummary
from cmx.core import metrics as M
from cmx.core.config import dump_yaml
from cmx.core.metrics import DIVERGED, REJECTED
from cmx.core.search_space import decode_params
from cmx.core.sweep_spec import CONFIRM_KEY, SweepSpec, trial_run_config
from cmx.sweep.results import trial_status
from cmx.tracking import provenance as P
from cmx.tracking import store as T
from cmx.tracking.tracker import Tracker

log = logging.getLogger("cmx.tracking")

PARENT = "sweep"  # the sweep's parent run key (cmx.sweep.mlflow_callback.PARENT)
TAG_OF = "cmx.confirm.of"
TAG_SEED = "cmx.confirm.seed"
TAG_WINNER = "cmx.confirm.winner"
EPOCHS_META = "confirm_epochs"  # Tracker meta: run key -> last epoch logged
GENERATION_META = "confirm_generation"  # Tracker meta: +1 each time the stage starts over (--fresh)


def rerun_key(tracker: Tracker, of: str, seed: int) -> str:
    """The re-run's run key in the sweep's Tracker (a stage started over gets new runs)."""
    return f"confirm:{int(tracker.meta.get(GENERATION_META, 0))}:{of}:{seed}"


def forget_reruns(spec: SweepSpec, sweep_dir: str | Path) -> None:
    """The stage starts over: its earlier re-runs' runs are deleted (MLflow keeps them restorable)."""
    t = open_tracker(spec, sweep_dir)
    if t is None:
        return
    prefix = rerun_key(t, "", 0).rsplit(":", 2)[0] + ":"
    for key in [k for k in t.state["runs"] if k.startswith(prefix)]:
        t.delete_run(key)
    t.meta[GENERATION_META] = int(t.meta.get(GENERATION_META, 0)) + 1
    t.save()
    t.flush(force=True)


def open_tracker(spec: SweepSpec, sweep_dir: str | Path) -> Tracker | None:
    """The sweep's Tracker, or None (with a warning) when the sweep has no parent run to join."""
    uri = T.check_tracking_reachable(spec.tracking.uri)
    tracker = Tracker(sweep_dir, uri, experiment=spec.tracking.experiment or spec.name)
    if not tracker.has_run(PARENT):
        log.warning("MLflow: sweep %s has no tracked run in %s; the confirm stage is not tracked", spec.name, sweep_dir)
        return None
    return tracker


class ConfirmTracking(tune.Callback):
    """Records each confirm re-run as a nested run of the sweep's parent run."""

    def __init__(self, *, spec: SweepSpec, sweep_dir: str) -> None:
        self.spec = spec
        self.sweep_dir = sweep_dir
        self.metric = spec.objectives()[0].metric
        T.check_tracking_reachable(spec.tracking.uri)  # one clear line before Ray starts a re-run
        self._tracker: Tracker | None = None
        self._opened = False

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_tracker=None, _opened=False)
        return state

    @property
    def tracker(self) -> Tracker | None:
        if not self._opened:
            self._tracker = open_tracker(self.spec, self.sweep_dir)
            self._opened = True
        return self._tracker

    def _guard(self, what: str, fn: Any, *args: Any) -> None:
        """Tracking never stops the stage: an error is logged and the re-runs go on."""
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - see docstring
            log.warning("MLflow tracking: %s failed: %s: %s", what, type(e).__name__, str(e).splitlines()[0][:300])

    def _point(self, trial: Any) -> dict[str, Any]:
        return dict((trial.config or {})[CONFIRM_KEY])

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._guard("starting a re-run", self._start, trial)

    def _start(self, trial: Any) -> None:
        t = self.tracker
        if t is None:
            return
        point = self._point(trial)
        key = rerun_key(t, point["of"], point["seed"])
        params = decode_params(self.spec, {k: v for k, v in point["config"].items() if k in self.spec.space})
        cfg = trial_run_config(self.spec, params, int(point["seed"]))
        tags = {
            **P.environment_tags(),
            **P.config_tags(cfg),
            T.TAG_ROLE: T.ROLE_CONFIRM,
            T.TAG_SWEEP: str(self.spec.name),
            T.TAG_TRIAL: trial.trial_id,
            TAG_OF: str(point["of"]),
            TAG_SEED: str(point["seed"]),
            "mlflow.source.name": "cmx sweep confirm",
        }
        if t.start_run(key, name=f"confirm_{point['of']}_seed{point['seed']}", parent=PARENT, tags=tags):
            t.log(key, params={**P.flatten(cfg.model_dump(mode="json")), **P.model_cost_params(cfg)})
            t.log_text(key, dump_yaml(cfg), "config.yaml")
        t.save()

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self._guard("logging a re-run's epoch", self._result, trial, result)

    def _result(self, trial: Any, result: dict[str, Any]) -> None:
        t = self.tracker
        if t is None or result.get(REJECTED) or result.get(DIVERGED):
            return
        point = self._point(trial)
        key = rerun_key(t, point["of"], point["seed"])
        if not t.has_run(key):
            self._start(trial)
        epochs: dict[str, int] = t.meta.setdefault(EPOCHS_META, {})
        epoch = M.epochs_of(result)
        if epoch <= epochs.get(key, 0):
            return  # re-reported after a retry: logged already
        values = {k: float(result[k]) for k in M.ALL if _finite(result.get(k))}
        t.log(key, metrics=values, step=epoch)
        epochs[key] = epoch
        t.save()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._guard("ending a re-run", self._end, trial, None)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._guard("ending a failed re-run", self._end, trial, "error")

    def _end(self, trial: Any, error: str | None) -> None:
        t = self.tracker
        if t is None:
            return
        point = self._point(trial)
        key = rerun_key(t, point["of"], point["seed"])
        if not t.has_run(key):
            self._start(trial)
        status = trial_status(self.spec, dict(trial.last_result or {}), error)
        t.end_run(key, status, tags={"cmx.epochs": str(t.meta.get(EPOCHS_META, {}).get(key, 0))})
        t.save()

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        t = self._tracker
        if t is not None:
            t.flush(force=True)


def log_summary(spec: SweepSpec, sweep_dir: str | Path, summary: ConfirmSummary) -> None:
    """The winner (tags and mean ± std metrics), the table and the JSON on the sweep's parent run,
    and each re-run's values at its best epoch on its own run."""
    t = open_tracker(spec, sweep_dir)
    if t is None:
        return
    for r in summary.reruns:
        key = rerun_key(t, r.of, r.seed)
        if t.has_run(key) and r.values:
            at_best = {k if k in M.TEST else f"best/{k}": v for k, v in r.values.items()}
            t.log(key, metrics=at_best, step=r.best_epoch or 0)
    tags = {"cmx.confirm.complete": str(summary.complete).lower(), "cmx.confirm.search_winner": summary.search_winner}
    win = summary.winner_summary()
    values: dict[str, float] = {}
    if win is not None:
        tags[TAG_WINNER] = win.of
        for name, stat in win.stats.items():
            values[f"confirm/{name}/mean"] = stat.mean
            if stat.std is not None:
                values[f"confirm/{name}/std"] = stat.std
        tags[f"{TAG_WINNER}.{summary.metric}"] = win.stats[summary.metric].show()
    t.log(PARENT, metrics=values, tags={k: v for k, v in tags.items() if v is not None})
    for name in (SUMMARY_FILE, TABLE_FILE):
        t.log_artifact(PARENT, Path(sweep_dir) / name, "confirm")
    t.save()
    if not t.flush(force=True):
        log.warning("%d MLflow call(s) not delivered yet; send them with: cmx runs replay %s", t.pending(), sweep_dir)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))
