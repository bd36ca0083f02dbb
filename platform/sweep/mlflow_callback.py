"""Records a sweep in MLflow from the Ray Tune driver: a parent run per sweep, a child run per
trial keyed by trial id, metrics per epoch, the best checkpoints, plots and the registered model.

All MLflow calls go through `cmx.tracking` (which journals them while the server is down). The
state (experiment id, parent run, trial id -> run id) lives in the sweep directory, so a sweep
resumed with `Tuner.restore` continues the same runs, and a retried trial continues its own.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer
from ray import tune

from cmx.cluster.ray_compat import checkpoint_manager
from cmx.core import metrics as M
from cmx.core.config import dump_yaml
from cmx.core.errors import TrackingError
from cmx.core.files import read_utf8
from cmx.core.metrics import DIVERGED, NODE_ID, REJECTED, TrialStatus, better
from cmx.core.paths import cmx_home
from cmx.core.search_space import decode_params
from cmx.core.sweep_spec import SweepSpec, trial_run_config
from cmx.core.uris import is_uri
from cmx.pipelines.checkpoint import resolve_checkpoint
from cmx.sweep.results import trial_status  # the one definition of a trial's outcome
from cmx.tracking import provenance as P
from cmx.tracking import store as T
from cmx.tracking.model import build_model_dir
from cmx.tracking.plots import TrialSummary, sweep_plots
from cmx.tracking.tracker import Tracker

log = logging.getLogger("cmx.tracking")

HISTORY_FILE = "cmx-mlflow-history.jsonl"  # every epoch logged, for the plots at the end
PARENT = "sweep"


def trial_key(trial_id: str) -> str:
    return f"trial:{trial_id}"


# A trial's outcome as the state file holds it: the `cmx.status` tag's spelling ("stopped_early").
StatusTag = Annotated[
    TrialStatus,
    BeforeValidator(lambda v: TrialStatus.from_tag(v) if isinstance(v, str) else v),
    PlainSerializer(lambda s: s.tag, return_type=str),
]


class BestValue(BaseModel):
    """A trial's best objective value so far and the epoch it came at."""

    value: float
    epoch: int


class SweepTotals(BaseModel):
    """Epochs trained by all trials and the best value so far: the sweep run's own curves."""

    epochs: int = 0
    best: float | None = None
    best_trial: str | None = None


class CallbackState(BaseModel):
    """What the callback remembers across driver restarts and trial retries.

    Saved in the Tracker's `meta` (in `cmx-mlflow.json`), one key per field, next to the Tracker's
    own keys (`pending_runs`, `registered`), which it ignores and leaves alone. Version 1 is the
    layout older sweeps wrote without a `version` key, so their files load unchanged.
    """

    model_config = ConfigDict(extra="ignore")

    version: int = 1
    epochs: dict[str, int] = Field(default_factory=dict)  # run key -> last epoch logged
    best: dict[str, BestValue] = Field(default_factory=dict)  # trial id -> its best value
    ended: list[str] = Field(default_factory=list)  # run keys ended
    kept: dict[str, float] = Field(default_factory=dict)  # trial id -> value of its uploaded checkpoint
    status: dict[str, StatusTag] = Field(default_factory=dict)  # trial id -> outcome
    params: dict[str, dict[str, Any]] = Field(default_factory=dict)  # trial id -> searched values
    sweep: SweepTotals = Field(default_factory=SweepTotals)
    resumes: int = 0  # driver restarts that continued the sweep run
    retries: dict[str, int] = Field(default_factory=dict)  # run key -> retries of its trial
    forgotten: list[str] = Field(default_factory=list)  # run keys deleted: trials the restored sweep lost

    def write_to(self, meta: dict[str, Any]) -> None:
        """Put every field into `meta` as JSON values (the Tracker's `meta_writer`)."""
        meta.update(self.model_dump(mode="json"))


class MLflowTrackingCallback(tune.Callback):
    """A Tune callback on the sweep driver that records the sweep in MLflow."""

    def __init__(self, *, spec: SweepSpec, experiment_dir: str, source_text: str) -> None:
        self.spec = spec
        self.source_text = source_text
        # Fails with one clear line before Ray starts a single trial.
        self.uri = T.check_tracking_reachable(spec.tracking.uri)
        self.experiment_dir = _state_dir(spec, experiment_dir)
        objective = spec.objectives()[0]
        self.metric, self.mode = objective.metric, objective.mode
        self._tracker: Tracker | None = None
        self._state: CallbackState | None = None  # loaded from the tracker's state file with it
        self._checked: set[str] = set()  # runs whose last logged epoch this driver has checked

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks with the experiment state; clients and files stay behind.
        state = self.__dict__.copy()
        state["_tracker"] = None
        state["_state"] = None
        state["_checked"] = set()
        return state

    # ---------------------------------------------------------------- helpers

    @property
    def tracker(self) -> Tracker:
        return self._loaded()[0]

    @property
    def state(self) -> CallbackState:
        """What this callback keeps in the state file."""
        return self._loaded()[1]

    def _loaded(self) -> tuple[Tracker, CallbackState]:
        """The tracker and this callback's state, read from the state file on first use."""
        if self._tracker is None or self._state is None:
            tracker = Tracker(self.experiment_dir, self.uri, experiment=self.spec.tracking.experiment or self.spec.name)
            self._state = CallbackState.model_validate(tracker.meta)
            tracker.meta_writer = self._state.write_to  # every save of the state file holds it
            self._tracker = tracker
            self._start_parent()
        return self._tracker, self._state

    def _params(self, trial: Any) -> dict[str, Any]:
        """The trial's searched values, decoded (lists and mappings as in the space file)."""

        return decode_params(self.spec, {k: v for k, v in (trial.config or {}).items() if k in self.spec.space})

    def _trial_config(self, trial: Any) -> Any:
        """The trial's full TrainConfig, as `run_trial` builds it (its logged config.yaml is what
        `cmx train --from-run` re-creates the trial from)."""

        return trial_run_config(self.spec, self._params(trial))

    def _guard(self, what: str, fn: Any, *args: Any) -> None:
        """Tracking must never stop a sweep: an unexpected error is logged, the sweep goes on."""
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - see docstring
            log.warning(
                "MLflow tracking: %s failed: %s: %s",
                what,
                type(e).__name__,
                str(e).splitlines()[0][:300],
            )
            log.debug("details", exc_info=True)

    # ---------------------------------------------------------------- parent

    def _start_parent(self) -> None:
        t, spec = self.tracker, self.spec
        tags = {
            **P.environment_tags(),
            **P.config_tags(spec.base),
            T.TAG_ROLE: "sweep",
            T.TAG_SWEEP: str(spec.name),
            T.TAG_OBJECTIVE: f"{self.mode} {self.metric}",
            "cmx.search_seed": str(spec.search.seed),
            "cmx.experiment_dir": str(self.experiment_dir),
            "mlflow.source.name": "cmx sweep",
        }
        new = t.start_run(PARENT, name=str(spec.name), tags=tags)
        if new:
            data = spec.model_dump(mode="json")
            data["tracking"]["uri"] = P.redact_uri(self.uri)
            space = {f"space.{k}": json.dumps(v) for k, v in data.pop("space").items()}
            t.log(PARENT, params={**P.flatten(data), **space})
            t.log_text(PARENT, self.source_text or "", "search-space.yaml")
            data["space"] = spec.model_dump(mode="json")["space"]
            t.log_text(PARENT, yaml.safe_dump(data, sort_keys=False), "sweep-resolved.yaml")
        else:
            self.state.resumes += 1
            t.log(PARENT, tags={"cmx.resumes": str(self.state.resumes)})
        t.save()

    def setup(
        self, stop: Any = None, num_samples: int | None = None, total_num_samples: int | None = None, **info: Any
    ) -> None:
        self._guard("starting the sweep run", lambda: self.tracker)

    # ---------------------------------------------------------------- trials

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._guard("starting a trial run", self._trial_start, trial)

    def _trial_start(self, trial: Any) -> None:
        t, key = self.tracker, trial_key(trial.trial_id)
        if key in self.state.ended:  # a finished trial restarted (resume_errored): continue its run
            self.state.ended.remove(key)
        try:
            cfg = self._trial_config(trial)
        except Exception as e:  # noqa: BLE001 - an invalid sampled config: the trial will fail and say why
            cfg, bad = None, str(e)
        r = self.spec.resources
        gpus = r.gpus if r.workers == 1 else r.gpus_per_worker * r.workers
        tags = {
            **P.environment_tags(),
            T.TAG_ROLE: "trial",
            T.TAG_SWEEP: str(self.spec.name),
            T.TAG_TRIAL: trial.trial_id,
            T.TAG_OBJECTIVE: f"{self.mode} {self.metric}",
            "cmx.search_seed": str(self.spec.search.seed),
            "cmx.device": f"cuda x{gpus:g}" if gpus else "cpu",
            "cmx.workers": str(r.workers),
            "mlflow.source.name": "cmx sweep",
        }
        if cfg is not None:
            tags.update(P.config_tags(cfg))
        new = t.start_run(key, name=f"trial_{trial.trial_id}", parent=PARENT, tags=tags)
        self.state.params[trial.trial_id] = self._params(trial)
        if new:
            self._checked.add(key)  # created by this driver: nothing sent before it
            params = {f"search.{k}": v for k, v in self._params(trial).items()}
            if cfg is not None:
                params = {**P.flatten(cfg.model_dump(mode="json")), **P.model_cost_params(cfg)}
                t.log_text(key, dump_yaml(cfg), "config.yaml")
            else:
                t.log(key, tags={"cmx.config_error": bad[:500]})
            t.log(key, params=params, tags={"cmx.searched": ", ".join(self.spec.space)})
        t.save()

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self._guard("logging a result", self._trial_result, trial, result)

    def _trial_result(self, trial: Any, result: dict[str, Any]) -> None:
        t, key, tid = self.tracker, trial_key(trial.trial_id), trial.trial_id
        if not t.has_run(key):  # a trial restored by Tune without on_trial_start
            self._trial_start(trial)
        if result.get(REJECTED):
            t.log(key, tags={"cmx.rejected": "broke a constraint; not trained"})
            return
        if result.get(DIVERGED):
            t.log(key, tags={"cmx.diverged_epoch": str(result.get(M.EPOCH, "?"))})
            return
        epoch = M.epochs_of(result)
        if key not in self._checked:
            self._check_last_epoch(key)
        last = self.state.epochs.get(key, 0)
        if epoch <= last:
            # Re-reported after a retry from an earlier checkpoint: that epoch is logged already,
            # and a deterministic resume reports the same values.
            return
        values = {k: float(result[k]) for k in (*M.ALL, *M.TRIAL_ONLY) if _finite(result.get(k))}
        tags = {}
        if result.get("hostname"):
            tags["cmx.trial_host"] = str(result["hostname"])
        if result.get(NODE_ID):
            tags["cmx.node_id"] = str(result[NODE_ID])
        t.log(key, metrics={k: v for k, v in values.items() if k in M.ALL}, step=epoch, tags=tags)
        self.state.epochs[key] = epoch
        with open(self.experiment_dir / HISTORY_FILE, "a") as f:
            f.write(json.dumps({"trial_id": tid, M.EPOCH: epoch, **values}) + "\n")
        value = values.get(self.metric)
        if value is not None:
            best = self.state.best.get(tid)
            if best is None or better(value, best.value, self.mode):
                self.state.best[tid] = BestValue(value=value, epoch=epoch)
        sweep = self.state.sweep
        sweep.epochs += 1
        if value is not None and better(value, sweep.best, self.mode):
            sweep.best = value
            sweep.best_trial = tid
        parent_metrics = {"sweep/epochs_trained": float(sweep.epochs)}
        if sweep.best is not None:
            parent_metrics[f"sweep/best/{self.metric}"] = sweep.best
        t.log(PARENT, metrics=parent_metrics, step=sweep.epochs)
        t.save()

    def _check_last_epoch(self, key: str) -> None:
        """A run this driver continues: the last epoch its predecessor sent may have reached MLflow
        after the state file was last saved (a kill in between); never log that epoch twice."""
        logged = self.tracker.last_logged_step(key, M.EPOCH_SECONDS)
        if logged is not None and logged > self.state.epochs.get(key, 0):
            log.info("MLflow run %s already holds epoch %d: continuing after it", key, logged)
            self.state.epochs[key] = logged
        self._checked.add(key)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._guard("finishing a trial run", self._trial_end, trial, None)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._guard("finishing a failed trial run", self._trial_end, trial, _error_line(trial))

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        def recover() -> None:
            key = trial_key(trial.trial_id)
            retries = self.state.retries
            retries[key] = retries.get(key, 0) + 1
            self.tracker.log(
                key,
                tags={
                    "cmx.retries": str(retries[key]),
                    "cmx.last_error": _error_line(trial) or "?",
                },
            )
            self.tracker.save()

        self._guard("recording a retry", recover)

    def _trial_end(self, trial: Any, error: str | None) -> None:
        t, key, tid = self.tracker, trial_key(trial.trial_id), trial.trial_id
        if not t.has_run(key):
            self._trial_start(trial)
        last = dict(trial.last_result or {})
        status = trial_status(self.spec, last, error)
        best = self.state.best.get(tid)
        tags = {"cmx.epochs": str(self.state.epochs.get(key, 0))}
        if error:
            tags["cmx.error"] = error[:500]
        if best is not None and status.usable:
            t.log(key, metrics={f"best/{self.metric}": best.value}, step=best.epoch)
            tags["cmx.best_epoch"] = str(best.epoch)
            self._keep_checkpoint(trial, best.value)
        t.end_run(key, status, tags=tags)
        if key not in self.state.ended:
            self.state.ended.append(key)
        self.state.status[tid] = status
        t.save()

    # ---------------------------------------------------------------- checkpoints

    def _keep_checkpoint(self, trial: Any, value: float) -> None:
        """Upload the trial's best checkpoint while it is among the best k; prune the one it displaces."""
        k = self.spec.tracking.keep_best_checkpoints
        t, kept, tid = self.tracker, self.state.kept, trial.trial_id
        if k <= 0:
            return
        ranking = sorted({**kept, tid: value}.items(), key=lambda kv: kv[1], reverse=self.mode == "max")
        if tid not in dict(ranking[:k]):
            t.log(trial_key(tid), tags={"cmx.checkpoint": f"not kept (outside the best {k})"})
            return
        with _checkpoint_dir(trial) as ckpt:
            if ckpt is None:
                t.log(trial_key(tid), tags={"cmx.checkpoint": "none reported"})
                return
            t.log_artifact(trial_key(tid), ckpt, "checkpoint")
        kept[tid] = value
        t.log(trial_key(tid), tags={"cmx.checkpoint": "kept"})
        for other, _ in ranking[k:]:
            if other in kept:
                kept.pop(other)
                t.delete_artifacts(trial_key(other), "checkpoint")
                t.log(trial_key(other), tags={"cmx.checkpoint": f"pruned (outside the best {k})"})

    # ---------------------------------------------------------------- end

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self._guard("finishing the sweep run", self._experiment_end, trials)

    def _experiment_end(self, trials: list) -> None:
        from ray.tune.experiment import Trial

        t = self.tracker
        interrupted = any(tr.status not in (Trial.TERMINATED, Trial.ERROR) for tr in trials)
        for tr in trials:
            key = trial_key(tr.trial_id)
            if t.has_run(key) and key not in self.state.ended:
                t.end_run(key, TrialStatus.INTERRUPTED)
                self.state.ended.append(key)
        self._drop_forgotten_trials(trials)
        self._guard("plotting the sweep", self._plots)
        statuses = self.state.status
        best_tid = self._best_trial_id()
        tags = {
            "cmx.trials": str(len(trials)),
            **{f"cmx.trials.{s.tag}": str(n) for s, n in _count(statuses.values()).items()},
        }
        if best_tid is not None:
            best = self.state.best[best_tid]
            tags.update({"cmx.best_trial": best_tid, "cmx.best_value": f"{best.value:.6g}"})
            t.log(
                PARENT,
                metrics={f"best/{self.metric}": best.value},
                step=self.state.sweep.epochs,
            )
        t.log(PARENT, tags=tags)
        if not interrupted and best_tid is not None:
            trial = next((tr for tr in trials if tr.trial_id == best_tid), None)
            if trial is not None:
                self._guard("registering the best model", self._register, trial)
        if interrupted:
            status = TrialStatus.INTERRUPTED
        elif statuses and all(s.failure for s in statuses.values()):
            status = TrialStatus.FAILED
        else:
            status = TrialStatus.COMPLETED
        t.end_run(PARENT, status)
        t.save()
        if not t.flush(force=True):
            log.warning(
                "%d MLflow call(s) not delivered yet (store unreachable); send them with: cmx runs replay %s",
                t.pending(), self.experiment_dir,
            )  # fmt: skip

    def _drop_forgotten_trials(self, trials: list) -> None:
        """Delete the runs of trials Tune no longer knows: a trial started just before the driver
        was killed, before Tune saved its state, is re-proposed under a new id after the restore
        (seen with a SIGKILLed driver), so its old run would be a duplicate."""
        known = {trial_key(tr.trial_id) for tr in trials}
        for key in [k for k in self.tracker.state["runs"] if k.startswith("trial:") and k not in known]:
            if key in self.state.forgotten:
                continue
            if key not in self.state.ended:
                self.tracker.end_run(key, TrialStatus.INTERRUPTED, tags={"cmx.forgotten": "not in the restored sweep"})
                self.state.ended.append(key)
            self.tracker.delete_run(key)
            self.state.forgotten.append(key)
            self.state.status.pop(key.removeprefix("trial:"), None)
            self.state.best.pop(key.removeprefix("trial:"), None)

    def _best_trial_id(self) -> str | None:
        statuses = self.state.status
        usable = [(tid, b.value) for tid, b in self.state.best.items() if tid in statuses and statuses[tid].usable]
        if not usable:
            return None
        return (max if self.mode == "max" else min)(usable, key=lambda kv: kv[1])[0]

    def _plots(self) -> None:

        history: dict[str, list[dict[str, float]]] = {}
        path = self.experiment_dir / HISTORY_FILE
        if path.is_file():
            text = read_utf8(path, what="epoch history", error=TrackingError, hint="move it aside")
            for line in text.splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                history.setdefault(row.pop("trial_id"), []).append(row)
        params = self.state.params
        r = self.spec.resources
        gpus = r.gpus if r.workers == 1 else r.gpus_per_worker * r.workers
        summaries = []
        for tid, status in self.state.status.items():
            best = self.state.best.get(tid)
            summaries.append(TrialSummary(
                trial_id=tid, status=status, params=params.get(tid, {}),
                history=sorted(history.get(tid, []), key=lambda row: row[M.EPOCH]),
                best=best.value if best else None, gpus=gpus,
            ))  # fmt: skip
        out = self.experiment_dir / "cmx-mlflow-plots"
        for png in sweep_plots(self.spec, summaries, out):
            self.tracker.log_artifact(PARENT, png, "plots")

    def _register(self, trial: Any) -> None:

        best, key = self.state.best[trial.trial_id], trial_key(trial.trial_id)
        with _checkpoint_dir(trial) as ckpt:
            if ckpt is None:
                log.warning("MLflow: trial %s left no checkpoint; no model registered", trial.trial_id)
                return
            with tempfile.TemporaryDirectory() as tmp:
                model_dir = build_model_dir(resolve_checkpoint(ckpt), Path(tmp) / "model")
                self.tracker.log_artifact(key, model_dir, "model")
        self.tracker.register_model(
            key,
            model_name=self.spec.tracking.registered_model,
            artifact_path="model",
            tags={
                T.TAG_SWEEP: str(self.spec.name),
                T.TAG_TRIAL: trial.trial_id,
                "cmx.metric": self.metric,
                "cmx.value": f"{best.value:.6g}",
                "cmx.epoch": str(best.epoch),
            },
            description=(
                f"Best trial {trial.trial_id} of sweep {self.spec.name}: {self.metric}={best.value:.4f} "
                f"at epoch {best.epoch}. Input: float32 NCHW normalised with the config's mean/std."
            ),
        )


# ---------------------------------------------------------------- module helpers


def _state_dir(spec: SweepSpec, experiment_dir: str) -> Path:
    """The sweep directory when it is local; for s3:// storage a local directory under $CMX_HOME."""
    if is_uri(experiment_dir):
        path = cmx_home() / "mlflow" / "sweeps" / str(spec.name)
    else:
        path = Path(experiment_dir).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))


def _count(values: Iterable[TrialStatus]) -> dict[TrialStatus, int]:
    out: dict[TrialStatus, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


def _error_line(trial: Any) -> str | None:
    """The last line of the trial's error (the exception), if Tune wrote one."""
    try:
        path = trial.error_file
        if path and Path(path).is_file():
            lines = [ln for ln in Path(path).read_text(errors="replace").splitlines() if ln.strip()]
            return lines[-1][:500] if lines else "error"
    except Exception:  # noqa: BLE001 - an error message is best effort
        pass
    return "error"


class _checkpoint_dir:  # noqa: N801 - used as a context manager, like contextlib's
    """The trial's best checkpoint (by the objective, as Tune ranks them) as a local directory."""

    def __init__(self, trial: Any) -> None:
        self.trial = trial
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    def __enter__(self) -> Path | None:
        manager = checkpoint_manager(self.trial)
        result = getattr(manager, "best_checkpoint_result", None) if manager is not None else None
        checkpoint = result.checkpoint if result is not None else self.trial.checkpoint
        if checkpoint is None:
            return None
        local = Path(checkpoint.path)
        if not is_uri(checkpoint.path) and local.is_dir():
            return local
        self._tmp = tempfile.TemporaryDirectory(prefix="cmx-ckpt-")
        return Path(checkpoint.to_directory(self._tmp.name))

    def __exit__(self, *exc: object) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
