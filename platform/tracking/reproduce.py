"""`cmx train --from-run RUN_ID`: a tracked run's config rebuilt from MLflow, its data checked
against the fingerprints it logged, and the new run's metrics compared with the original's."""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from typing import Any

import yaml

from cmx.core import metrics as M
from cmx.core.config import TrainConfig, apply_overrides, load_yaml, set_dotted, validate_config
from cmx.core.errors import ConfigError, DataError, TrackingError
from cmx.core.files import data_fingerprint
from cmx.core.yaml_files import yaml_value
from cmx.tracking.provenance import redact_uri
from cmx.tracking.store import TAG_ROLE, TAG_STATUS, check_tracking_reachable, make_client

TAG_REPRODUCES = "cmx.reproduces"  # on the new run: the id of the run it re-creates
TAG_REPRODUCTION = "cmx.reproduction"  # on the new run: "exact" or how far its metrics are off
CONFIG_ARTIFACT = "config.yaml"  # the resolved config, logged by `cmx train` runs and sweep trials
# Per-epoch metrics a deterministic run repeats bit for bit (timings and memory never do).
REPRODUCIBLE = (M.TRAIN_LOSS, M.VAL_LOSS, M.VAL_TOP1, M.VAL_TOP5, M.LR)
# Params logged next to the flattened config that are not config keys (`model_cost_params`, trials).
_NOT_CONFIG = ("model.num_params", "model.flops")
_FINGERPRINT_TAG = ("cmx.data.", "_fingerprint")  # cmx.data.<split>_fingerprint -> data.<split>_path
# Runs that trained one config and logged it: `cmx train`, sweep trials, confirm-stage re-runs.
_TRAINING_ROLES = ("train", "trial", "confirm")
_UNCHECKABLE = ("unavailable", "remote ")  # fingerprints `data_fingerprint` gives without reading data


@dataclass
class SourceRun:
    """A tracked training run or sweep trial, as `--from-run` rebuilds it."""

    run_id: str
    name: str
    role: str
    config: TrainConfig
    config_from: str  # "config.yaml artifact" or "params"
    fingerprints: dict[str, str]  # data split ("train", "val", ...) -> fingerprint the run logged
    history: dict[str, dict[int, float]]  # metric -> epoch -> value, for REPRODUCIBLE metrics
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def stopped_after(self) -> int | None:
        """The last epoch of a trial the sweep's scheduler stopped before `loop.epochs`, else None."""
        if self.tags.get(TAG_STATUS) != M.TrialStatus.SCHEDULER_STOPPED.tag:
            return None
        last = max((e for values in self.history.values() for e in values), default=0)
        return last if 0 < last < self.config.loop.epochs else None


@dataclass
class Difference:
    """One metric at one epoch whose values differ (or that only one run has)."""

    metric: str
    epoch: int
    original: float | None
    new: float | None

    @property
    def delta(self) -> float:
        """|new - original|; inf when one side is missing."""
        if self.original is None or self.new is None:
            return math.inf
        return abs(self.new - self.original)


@dataclass
class Comparison:
    """The new run's per-epoch metrics against the original run's, on the epochs both have."""

    run_id: str
    compared: int  # values compared
    epochs: list[int]
    differences: list[Difference]
    only_original: list[int]  # epochs the original logged that the new run did not train
    only_new: list[int]

    @property
    def exact(self) -> bool:
        """Every compared value is equal and both runs have the same epochs."""
        return self.compared > 0 and not self.differences and not self.only_original and not self.only_new

    def summary(self) -> str:
        """One line: equal, or the largest difference and the epochs one run lacks."""
        span = f"epochs {self.epochs[0]}-{self.epochs[-1]}" if self.epochs else "no common epochs"
        if not self.differences:
            text = f"all {self.compared} values of {', '.join(REPRODUCIBLE)} equal over {span}"
        else:
            worst = max(self.differences, key=lambda d: d.delta)
            text = (
                f"{len(self.differences)} of {self.compared} values differ over {span}; largest: {worst.metric} "
                f"epoch {worst.epoch}: {_num(worst.original)} -> {_num(worst.new)} (|Δ| {worst.delta:.3g})"
            )
        if self.only_original:
            text += f"; the original also logged epochs {_epochs(self.only_original)}"
        if self.only_new:
            text += f"; only this run has epochs {_epochs(self.only_new)}"
        return text


def load_source_run(run_id: str, uri: str | None, overrides: tuple[str, ...] | list[str] = ()) -> SourceRun:
    """The run's config (its `config.yaml` artifact, else its params) with `overrides` applied, its
    data fingerprints and per-epoch metrics. TrackingError when the store has no such run or it is
    not a training run."""
    resolved = check_tracking_reachable(uri)
    client = make_client(resolved)
    run = _get_run(client, run_id, resolved)
    tags = dict(run.data.tags)
    role = tags.get(TAG_ROLE, "")
    if role not in _TRAINING_ROLES:
        what = f"a {role} run" if role else "not a cmx training run (no cmx.role tag)"
        hint = "pass one of its trials' run ids (`cmx runs trials`)" if role == "sweep" else "pass a train or trial run"
        raise TrackingError(f"run {run_id} is {what}", hint)
    data, config_from = _config_data(client, run)
    apply_overrides(data, list(overrides))
    config = validate_config(TrainConfig, data, f"run {run_id} ({config_from})")
    fingerprints = {
        key[len(_FINGERPRINT_TAG[0]) : -len(_FINGERPRINT_TAG[1])]: value
        for key, value in tags.items()
        if key.startswith(_FINGERPRINT_TAG[0]) and key.endswith(_FINGERPRINT_TAG[1])
    }
    history = {
        metric: {int(m.step): float(m.value) for m in client.get_metric_history(run_id, metric)}
        for metric in REPRODUCIBLE
    }
    name = run.info.run_name or tags.get("mlflow.runName", run_id)
    return SourceRun(run_id, name, role, config, config_from, fingerprints, history, tags)


def _get_run(client: Any, run_id: str, uri: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException:
        raise TrackingError(
            f"no run with id {run_id!r} in the MLflow store {redact_uri(uri)}",
            "copy the id from `cmx runs list` / `cmx runs trials`, or point --tracking-uri at the store that has it",
        ) from None


def _config_data(client: Any, run: Any) -> tuple[dict[str, Any], str]:
    """The run's config as a dict: its logged `config.yaml` exactly, else rebuilt from its params."""
    run_id = run.info.run_id
    if any(a.path == CONFIG_ARTIFACT for a in client.list_artifacts(run_id)):
        with tempfile.TemporaryDirectory(prefix="cmx-from-run-") as tmp:
            path = client.download_artifacts(run_id, CONFIG_ARTIFACT, tmp)
            return load_yaml(path), f"{CONFIG_ARTIFACT} artifact"
    params = dict(run.data.params)
    if not params or any(key.startswith("search.") for key in params):  # a trial whose config did not validate
        raise TrackingError(
            f"run {run_id} logged neither a {CONFIG_ARTIFACT} artifact nor its full config as params",
            "train it again from its config file (`cmx train -c`)",
        )
    return params_to_config(params), "params"


def params_to_config(params: dict[str, str]) -> dict[str, Any]:
    """Invert `provenance.flatten`: dotted keys -> nested mapping, values parsed back as YAML."""
    data: dict[str, Any] = {}
    for key, text in sorted(params.items()):
        if key in _NOT_CONFIG:
            continue
        if text.endswith("…") and len(text) == 6000:
            raise TrackingError(
                f"param {key} was cut to MLflow's 6000 characters", "train it again from its config file"
            )
        if text == "None":
            value: Any = None
        else:
            try:
                value = yaml_value(text)
            except yaml.YAMLError:  # not YAML: the string itself
                value = text
        try:
            set_dotted(data, key, value)
        except ConfigError as e:
            raise TrackingError(f"param {key} does not fit the config layout ({e.message})") from None
    return data


def check_fingerprints(source: SourceRun, config: TrainConfig) -> list[str]:
    """Compare the data `config` points at with the fingerprints the run logged; DataError (one
    line, naming the file and both fingerprints) on the first mismatch. Returns what was checked."""
    checked = []
    for split, logged in sorted(source.fingerprints.items()):
        key = f"data.{split}_path"
        path = getattr(config.data, f"{split}_path", None)
        if logged.startswith(_UNCHECKABLE) or logged == "missing":
            continue  # the run could not fingerprint it either
        if not path:
            raise DataError(
                f"run {source.run_id} trained with {key} (fingerprint {logged}), the rebuilt config has none",
                f"pass --set {key}=PATH",
            )
        now = data_fingerprint(path)
        if now != logged:
            found = "missing" if now == "missing" else f"fingerprint {now}"
            raise DataError(
                f"{key} {path}: {found}, run {source.run_id} logged {logged}",
                f"point --set {key}=PATH at the data that run used",
            )
        checked.append(f"{split} {path}")
    return checked


def compare(source: SourceRun, history: list[dict[str, Any]]) -> Comparison:
    """The new run's epochs (the trainer's `result.history`) against the original's logged values."""
    new: dict[int, dict[str, Any]] = {int(row[M.EPOCH]): row for row in history}
    original_epochs = sorted({e for values in source.history.values() for e in values})
    common = sorted(set(original_epochs) & set(new))
    differences, compared = [], 0
    for epoch in common:
        for metric in REPRODUCIBLE:
            a = source.history.get(metric, {}).get(epoch)
            b = new[epoch].get(metric)
            if a is None and b is None:
                continue
            compared += 1
            if a is None or b is None or float(a) != float(b):
                differences.append(Difference(metric, epoch, a, None if b is None else float(b)))
    return Comparison(
        run_id=source.run_id,
        compared=compared,
        epochs=common,
        differences=differences,
        only_original=[e for e in original_epochs if e not in new],
        only_new=sorted(e for e in new if e not in set(original_epochs)),
    )


def _num(value: float | None) -> str:
    return "none" if value is None else repr(value)


def _epochs(epochs: list[int]) -> str:
    return ", ".join(str(e) for e in epochs) if len(epochs) <= 4 else f"{epochs[0]}-{epochs[-1]}"
