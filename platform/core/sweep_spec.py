"""The search-space file (`cmx sweep --space search.yaml`), validated into typed objects.

Every error names the file, the key and the fix, and is raised before Ray starts.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, TypeAdapter, ValidationError, field_validator, model_validator

from cmx.core import metrics
from cmx.core.config import (
    MAX_EPOCHS,
    StrictModel,
    TrainConfig,
    apply_overrides,
    get_dotted,
    load_yaml,
    resolve_data_paths,
    set_dotted,
    validate_config,
)
from cmx.core.constraints import compile_rule, evaluate_rule, rule_keys
from cmx.core.errors import ConfigError
from cmx.core.uris import check_storage_location, check_tracking_uri, is_uri

# ------------------------------------------------------------------ distributions

MAX_GRID_TRIALS = 100_000  # grid points × num_samples a grid sweep may expand to
MAX_CONFIRM_RUNS = 100  # full-budget re-runs (top_k × seeds) one confirm stage may ask for
# A confirm re-run's Tune config (cmx.confirm): {"of": the trial it confirms, "seed": its loop.seed,
# "config": that trial's own Tune config}; `cmx.sweep.trial.run_trial` trains it at the full budget.
CONFIRM_KEY = "cmx_confirm"


def _range_end(v: Any, *, integer: bool) -> Any:
    """A YAML `true` is not the number 1, and an int range's ends are ints (not '3', not 3.0)."""
    if isinstance(v, bool) or (integer and not isinstance(v, int)):
        raise ValueError(f"must be {'an integer' if integer else 'a number'}, not {type(v).__name__} {v!r}")
    return v


# Ends of an int range (2**53: floats and Optuna still hold every int exactly). The fields a range
# samples bound it further: its low and high ends are validated as values of those fields.
# Float ends must be finite (no .inf, no .nan).
MAX_INT = 2**53


class IntDist(StrictModel):
    """Integers in [low, high] (inclusive), optionally on a step grid or log scale."""

    type: Literal["int"]
    low: int = Field(ge=-MAX_INT, le=MAX_INT)
    high: int = Field(ge=-MAX_INT, le=MAX_INT)
    step: int = Field(1, ge=1, le=MAX_INT)
    log: bool = False

    @field_validator("low", "high", "step", mode="before")
    @classmethod
    def _int_ends(cls, v: Any) -> Any:
        return _range_end(v, integer=True)

    @model_validator(mode="after")
    def _check(self) -> IntDist:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must be <= high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("log scale needs low > 0")
        if self.log and self.step != 1:
            raise ValueError("log scale needs step 1")
        return self


class FloatDist(StrictModel):
    """Floats in [low, high], uniform or log-uniform."""

    type: Literal["float"]
    low: float = Field(allow_inf_nan=False)
    high: float = Field(allow_inf_nan=False)
    log: bool = False

    @field_validator("low", "high", mode="before")
    @classmethod
    def _float_ends(cls, v: Any) -> Any:
        return _range_end(v, integer=False)

    @model_validator(mode="after")
    def _check(self) -> FloatDist:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must be <= high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"log scale needs low > 0 (got {self.low})")
        return self


class LogUniformDist(StrictModel):
    """Shorthand for `{type: float, log: true}`."""

    type: Literal["loguniform"]
    low: float = Field(allow_inf_nan=False)
    high: float = Field(allow_inf_nan=False)

    @field_validator("low", "high", mode="before")
    @classmethod
    def _float_ends(cls, v: Any) -> Any:
        return _range_end(v, integer=False)

    @model_validator(mode="after")
    def _check(self) -> LogUniformDist:
        if self.low <= 0:
            raise ValueError(f"loguniform needs low > 0 (got {self.low})")
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must be <= high ({self.high})")
        return self


class ChoiceDist(StrictModel):
    """One of a list of YAML values (lists and mappings included)."""

    type: Literal["choice"]
    values: list[Any]

    @field_validator("values")
    @classmethod
    def _non_empty(cls, v: list[Any]) -> list[Any]:
        if not v:
            raise ValueError("choice needs at least one value")
        return v


class GridDist(StrictModel):
    """Every value is tried (crossed with the other grid parameters)."""

    type: Literal["grid"]
    values: list[Any]

    @field_validator("values")
    @classmethod
    def _non_empty(cls, v: list[Any]) -> list[Any]:
        if not v:
            raise ValueError("grid needs at least one value")
        return v


Distribution = Annotated[IntDist | FloatDist | LogUniformDist | ChoiceDist | GridDist, Field(discriminator="type")]

# ------------------------------------------------------------------ sections

Algorithm = Literal["optuna-tpe", "random", "optuna-cmaes", "grid"]


class Objective(StrictModel):
    """One metric to optimise."""

    metric: str = metrics.VAL_TOP1
    mode: Literal["max", "min"] = "max"


class SearchConfig(StrictModel):
    """How configurations are proposed."""

    algorithm: Algorithm = "optuna-tpe"
    seed: int = 0
    metric: str = metrics.VAL_TOP1
    mode: Literal["max", "min"] = "max"
    num_samples: int = Field(8, ge=1, strict=True)
    max_concurrent: int | None = Field(None, ge=1)
    time_budget: float | None = Field(None, gt=0, description="seconds for the whole sweep")
    points_to_evaluate: list[dict[str, Any]] = Field(default_factory=list)
    objectives: list[Objective] = Field(
        default_factory=list, description="two or more for a multi-objective (Pareto) search"
    )
    warm_start: list[str] = Field(
        default_factory=list,
        description="earlier sweeps (names, same storage) whose finished trials that fit this space seed the sampler",
    )

    @model_validator(mode="after")
    def _check(self) -> SearchConfig:
        known = set(metrics.ALL) | set(metrics.TRIAL_ONLY)
        for name in [self.metric] + [o.metric for o in self.objectives]:
            if name in metrics.TEST:
                raise ValueError(
                    f"{name!r} is measured on the held-out test split after the sweep and is never "
                    f"optimised; search on {metrics.VAL_TOP1!r} or another val/ metric"
                )
            if name not in known:
                raise ValueError(f"unknown metric {name!r}; known: {', '.join(sorted(known))}")
        if len(self.objectives) == 1:
            raise ValueError("objectives needs two or more entries (use metric/mode for one)")
        if self.objectives and self.algorithm not in ("optuna-tpe", "random"):
            raise ValueError("multi-objective search needs algorithm optuna-tpe or random")
        if self.warm_start and self.algorithm == "grid":
            raise ValueError("warm_start needs an Optuna algorithm (optuna-tpe, optuna-cmaes, random), not grid")
        if len(set(self.warm_start)) != len(self.warm_start):
            raise ValueError("warm_start names a sweep twice")
        return self


class SchedulerConfig(StrictModel):
    """Early stopping of weak trials (time unit: epochs)."""

    name: Literal["asha", "asha-promotion", "hyperband", "median", "none"] = Field(
        "asha",
        description="asha: Tune's ASHA, a trial stops at a rung below the cut-off so far; asha-promotion: "
        "trials pause at each rung and the top 1/reduction_factor of those that reached it resume",
    )
    grace_period: int = Field(1, ge=1, le=MAX_EPOCHS, description="epochs every trial gets before it may stop")
    reduction_factor: float = Field(3.0, gt=1.0)
    max_epochs: int | None = Field(None, ge=1, le=MAX_EPOCHS, description="default: base.loop.epochs")
    metric: str | None = Field(
        None, description="what trials are compared on at each rung; default: the search's (first) objective"
    )
    mode: Literal["max", "min"] | None = Field(None, description="default: the direction `metric` improves in")

    @model_validator(mode="after")
    def _check(self) -> SchedulerConfig:
        per_epoch = sorted(m for m in metrics.ALL if m in metrics.MODES)
        if self.metric is not None and self.metric not in per_epoch:
            raise ValueError(f"unknown scheduler metric {self.metric!r}; per-epoch metrics: {', '.join(per_epoch)}")
        if self.mode is not None and self.metric is None:
            raise ValueError("scheduler.mode needs scheduler.metric (the objective's mode is used otherwise)")
        return self


class ResourcesConfig(StrictModel):
    """What one trial uses. `workers > 1` makes each trial data-parallel (Ray Train)."""

    cpus: float = Field(1.0, gt=0)
    gpus: float = Field(0.0, ge=0)
    workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    max_failures: int = Field(2, ge=0, description="retries of a failed trial, from its checkpoint")
    reuse_actors: bool = Field(True, description="run successive trials in the same Ray actor")

    def describe(self) -> str:
        """What one trial takes, for people: `1 CPU, 0 GPU` or `4 workers × (1 CPU, 1 GPU)`."""
        if self.workers == 1:
            return f"{self.cpus:g} CPU, {self.gpus:g} GPU"
        return f"{self.workers} workers × ({self.cpus_per_worker:g} CPU, {self.gpus_per_worker:g} GPU)"


class StorageConfig(StrictModel):
    """Where Ray Tune keeps sweep state and checkpoints (shared storage on a cluster)."""

    path: str | None = Field(None, description="local/NFS path or s3://...; default $CMX_HOME/sweeps")


class TrackingConfig(StrictModel):
    """MLflow settings."""

    enabled: bool = True
    uri: str | None = Field(None, description="default: $MLFLOW_TRACKING_URI or sqlite under $CMX_HOME")
    experiment: str | None = Field(None, description="default: the sweep name")
    keep_best_checkpoints: int = Field(3, ge=0, description="trials whose best checkpoint is logged")
    registered_model: str = "cmx-convmixer"


class ConfirmConfig(StrictModel):
    """The optional final stage: the top-k configurations re-trained at the full budget with new seeds."""

    top_k: int = Field(3, ge=1, le=MAX_CONFIRM_RUNS, strict=True, description="configurations to confirm")
    seeds: int = Field(
        3,
        ge=1,
        le=MAX_CONFIRM_RUNS,
        strict=True,
        description="re-runs of each, with new loop.seed values (>= 2: a std)",
    )

    @model_validator(mode="after")
    def _check(self) -> ConfirmConfig:
        if self.seeds < 2:
            raise ValueError(f"seeds must be at least 2 (got {self.seeds}): a std over seeds needs two re-runs")
        if self.top_k * self.seeds > MAX_CONFIRM_RUNS:
            raise ValueError(f"top_k x seeds = {self.top_k * self.seeds} re-runs, over the cap of {MAX_CONFIRM_RUNS}")
        return self


class SweepSpec(StrictModel):
    """A whole search-space file."""

    name: str | None = None
    base: TrainConfig
    space: dict[str, Distribution]
    constraints: list[str] = Field(default_factory=list, description="rules every config must pass")
    search: SearchConfig = Field(default_factory=SearchConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    confirm: ConfirmConfig | None = Field(None, description="re-train the top-k with new seeds after the search")

    @field_validator("space")
    @classmethod
    def _non_empty_space(cls, v: dict[str, Any]) -> dict[str, Any]:
        if not v:
            raise ValueError("space must list at least one parameter")
        data_paths = [k for k in v if k in ("data.train_path", "data.val_path", "data.test_path")]
        if data_paths:
            raise ValueError(f"{data_paths[0]} cannot be searched: every trial trains and validates on the same data")
        return v

    @property
    def max_epochs(self) -> int:
        """The epoch budget of one full trial."""
        return self.scheduler.max_epochs or self.base.loop.epochs

    def grid_points(self) -> int:
        """How many points the `grid` entries cross to (the product of their lengths; nothing enumerated)."""
        return math.prod(len(d.values) for d in self.space.values() if isinstance(d, GridDist))

    def planned_trials(self) -> int:
        """Trials the sweep runs: num_samples, times the grid's points with `search.algorithm: grid`."""
        grid = self.grid_points() if self.search.algorithm == "grid" else 1
        return grid * self.search.num_samples

    def objectives(self) -> list[Objective]:
        """The metrics being optimised (one unless multi-objective)."""
        return self.search.objectives or [Objective(metric=self.search.metric, mode=self.search.mode)]

    def stopping_objective(self) -> Objective:
        """What the scheduler ranks trials on: scheduler.metric, else the first objective."""
        s = self.scheduler
        if s.metric is None:
            return self.objectives()[0]
        return Objective(metric=s.metric, mode=s.mode or metrics.MODES[s.metric])


# ------------------------------------------------------------------ loading

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def load_sweep_spec(path: str | Path, overrides: tuple[str, ...] = ()) -> SweepSpec:
    """Read, resolve `base:` and validate a search-space file."""
    path = Path(path)
    data = load_yaml(path)
    base = data.get("base")
    if isinstance(base, str):
        base_path = (path.parent / base).resolve()
        data["base"] = load_yaml(base_path)
        resolve_data_paths(data["base"], base_path.parent)
    elif base is None:
        raise ConfigError(f"{path}: missing key 'base'", "add the training config trials start from")
    elif isinstance(base, dict):
        resolve_data_paths(base, path.parent)
    apply_overrides(data, overrides)
    spec = validate_config(SweepSpec, data, str(path))
    if spec.name is None:
        spec.name = path.stem
    if not _NAME.match(spec.name):
        raise ConfigError(f"{path}: name {spec.name!r} is not a valid sweep name", "use letters, digits, - _ .")
    if spec.tracking.uri:
        check_tracking_uri(spec.tracking.uri, f"{path}: tracking.uri")
    if spec.storage.path:
        check_storage_location(spec.storage.path, f"{path}: storage.path")
    check_space_paths(spec, str(path))
    check_points(spec, str(path))
    check_grid_size(spec, str(path))
    check_constraints_parse(spec, str(path))
    check_scheduler_fits_search(spec, str(path))
    check_confirm(spec, str(path))
    return spec


def check_confirm(spec: SweepSpec, source: str) -> None:
    """`confirm:` ranks configurations by one objective and needs trials to choose from."""
    if spec.confirm is None:
        return
    if len(spec.objectives()) > 1:
        raise ConfigError(
            f"{source}: confirm: a multi-objective search has a Pareto front, not one winner to confirm",
            "remove confirm:, or search one objective (search.metric / search.mode)",
        )
    if spec.storage.path and is_uri(spec.storage.path):
        raise ConfigError(
            f"{source}: confirm: the stage reads the sweep folder, and storage.path {spec.storage.path} is a URI",
            "use a local or shared (NFS) storage.path, or remove confirm:",
        )
    if spec.confirm.top_k > spec.planned_trials():
        raise ConfigError(
            f"{source}: confirm.top_k {spec.confirm.top_k} is more than the {spec.planned_trials()} trials the sweep runs",
            f"use confirm.top_k <= {spec.planned_trials()}",
        )


def check_scheduler_fits_search(spec: SweepSpec, source: str) -> None:
    """asha-promotion caps the trials at work through the searcher, which `grid` does not have."""
    capped = spec.search.max_concurrent is not None or spec.resources.workers > 1
    if spec.scheduler.name == "asha-promotion" and spec.search.algorithm == "grid" and capped:
        raise ConfigError(
            f"{source}: scheduler.name: asha-promotion cannot cap the trials at once for search.algorithm: grid "
            "(search.max_concurrent or data-parallel resources.workers)",
            "use search.algorithm: random or optuna-tpe, or scheduler.name: asha",
        )


def check_space_paths(spec: SweepSpec, source: str) -> None:
    """Every searched key must be a real config field, and every value must validate."""
    base = spec.base.model_dump(mode="json")
    for key, dist in spec.space.items():
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        try:
            node = get_dotted(base, parent) if parent else base
        except (KeyError, TypeError):
            node = None
        if not isinstance(node, dict) or key.rsplit(".", 1)[-1] not in node:
            raise ConfigError(
                f"{source}: space key {key!r} is not a training config field",
                "use a dotted path such as model.depth, optim.lr or schedule.name",
            )
        for value in _representative_values(dist):
            trial = spec.base.model_dump(mode="json")
            apply_overrides(trial, [])
            _set(trial, key, value)
            try:
                validate_config(TrainConfig, trial, source)
            except ConfigError as e:
                raise ConfigError(
                    f"{source}: space.{key}: value {value!r} is invalid ({e.message.split(': ', 1)[-1]})",
                    "fix the range or the values",
                ) from None
            check_value_type(key, value, f"{source}: space.{key}")


def _set(data: dict[str, Any], dotted: str, value: Any) -> None:

    set_dotted(data, dotted, value)


def _representative_values(dist: Any) -> list[Any]:
    if isinstance(dist, (ChoiceDist, GridDist)):
        return list(dist.values)
    return [dist.low, dist.high]


def check_constraints_parse(spec: SweepSpec, source: str) -> None:
    """Constraints must parse and only name config keys (checked against the schema, before Ray starts)."""
    base = spec.base.model_dump(mode="json")
    for i, rule in enumerate(spec.constraints):
        try:
            tree = compile_rule(rule)
        except ValueError as e:
            raise ConfigError(f"{source}: constraints[{i}]: {e}", "e.g. 'model.dim * model.depth <= 4096'") from None
        for key in rule_keys(tree):
            node: Any = base
            for part in key.split("."):
                node = node.get(part, _MISSING) if isinstance(node, dict) else _MISSING
            if node is _MISSING:
                raise ConfigError(
                    f"{source}: constraints[{i}] {rule!r}: unknown config key {key!r}",
                    "name training config fields such as model.dim, model.depth or optim.lr",
                )


_MISSING = object()


# ------------------------------------------------------------------ strict values


@cache
def _field_adapter(key: str) -> TypeAdapter[Any] | None:
    """A TypeAdapter for the type of TrainConfig field `key` (dotted), or None if it is not one."""
    cls: Any = TrainConfig
    parts = key.split(".")
    for i, part in enumerate(parts):
        field = cls.model_fields.get(part) if isinstance(cls, type) and issubclass(cls, BaseModel) else None
        if field is None or field.annotation is None:
            return None
        if i == len(parts) - 1:
            return TypeAdapter(field.annotation)
        cls = field.annotation
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
            models = [a for a in getattr(cls, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)]
            cls = models[0] if models else None
    return None


def check_value_type(key: str, value: Any, where: str) -> None:
    """A value a sweep may sample must already have the field's type: no `true` for an int (it would be 1),
    no '32' and no 16.0 for an int (a float range over an int field would sample 23.7). Float fields take
    ints, and numeric strings (YAML 1.1 reads `1e-4` as a string)."""
    adapter = _field_adapter(key)
    if adapter is None:
        return
    try:
        adapter.validate_json(json.dumps(value), strict=True)
        return
    except (ValidationError, ValueError) as e:
        msg = e.errors()[0]["msg"] if isinstance(e, ValidationError) else str(e)
    if isinstance(value, str):
        try:
            adapter.validate_json(json.dumps(float(value)), strict=True)
            return
        except (ValidationError, ValueError):
            pass
    raise ConfigError(
        f"{where}: value {value!r} is invalid (not of the field's type: {msg})",
        "write the value as the field's type, e.g. 16 (not true, '16' or 16.0) for an integer",
    )


def check_points(spec: SweepSpec, source: str) -> None:
    """Every `search.points_to_evaluate` entry names searched keys with values the search could sample."""
    for i, point in enumerate(spec.search.points_to_evaluate):
        for key, value in point.items():
            where = f"{source}: search.points_to_evaluate[{i}].{key}"
            dist = spec.space.get(key)
            if dist is None:
                raise ConfigError(f"{where}: {key!r} is not a space key", f"use one of: {', '.join(spec.space)}")
            check_value_type(key, value, where)
            if isinstance(dist, (ChoiceDist, GridDist)):
                ok = any(type(value) is type(v) and value == v for v in dist.values)
                allowed = f"one of {dist.values}"
            else:
                ok = isinstance(value, (int, float)) and not isinstance(value, bool) and dist.low <= value <= dist.high
                allowed = f"in [{dist.low}, {dist.high}]"
            if not ok:
                raise ConfigError(f"{where}: value {value!r} is not {allowed}", "fix the point or the space")
        data = spec.base.model_dump(mode="json")
        for key, value in point.items():
            _set(data, key, value)
        validate_config(TrainConfig, data, f"{source}: search.points_to_evaluate[{i}]")


def check_grid_size(spec: SweepSpec, source: str) -> None:
    """A grid sweep is refused past MAX_GRID_TRIALS trials (computed, never enumerated)."""
    if spec.search.algorithm != "grid":
        return
    total = spec.planned_trials()
    if total > MAX_GRID_TRIALS:
        raise ConfigError(
            f"{source}: search.algorithm grid expands to {total:,} trials ({spec.grid_points():,} grid points × "
            f"search.num_samples {spec.search.num_samples}), over the cap of {MAX_GRID_TRIALS:,}",
            "use fewer grid values, or make some a choice or range with search.algorithm: random",
        )


# ------------------------------------------------------------------ constraint evaluation

ModelDefaults = Callable[[str], dict[str, Any]]


def constraint_config(cfg: TrainConfig, rules: list[str], model_defaults: ModelDefaults | None) -> dict[str, Any]:
    """The config a trial's constraints see: model fields left at None take the variant's own values
    (`model_defaults(name)`, from cmx.models: core cannot import it), looked up only when a rule needs one."""
    data = cfg.model_dump(mode="json")
    model = data["model"]
    needed = any(
        key.startswith("model.") and model.get(key[len("model.") :], 0) is None
        for rule in rules
        for key in rule_keys(compile_rule(rule))
    )
    if model_defaults is not None and needed:
        resolved = model_defaults(cfg.model.name)
        for field, value in model.items():
            if value is None and field in resolved:
                model[field] = resolved[field]
    return data


def check_constraints_evaluate(spec: SweepSpec, source: str, model_defaults: ModelDefaults | None) -> None:
    """Every rule evaluates (to True or False, never an error) at the space's low and high ends, before Ray starts."""
    if not spec.constraints:
        return
    ends = [
        {k: (d.values[0] if isinstance(d, (ChoiceDist, GridDist)) else d.low) for k, d in spec.space.items()},
        {k: (d.values[-1] if isinstance(d, (ChoiceDist, GridDist)) else d.high) for k, d in spec.space.items()},
    ]
    for params in ends:
        try:
            cfg = trial_config(spec, params)
        except ConfigError:
            continue  # these ends do not go together; each value alone was checked by check_space_paths
        config = constraint_config(cfg, spec.constraints, model_defaults)
        for i, rule in enumerate(spec.constraints):
            try:
                evaluate_rule(rule, config)
            except ValueError as e:
                raise ConfigError(
                    f"{source}: constraints[{i}]: {e} (at {params})",
                    "name fields that have a value (sampled, set in base, or the variant's) and keep to numbers",
                ) from None


def trial_config(spec: SweepSpec, params: dict[str, Any]) -> TrainConfig:
    """The base config with one trial's sampled values applied."""
    data = spec.base.model_dump(mode="json")
    for key, value in params.items():
        _set(data, key, value)
    return validate_config(TrainConfig, data, f"trial {params}")


def trial_run_config(spec: SweepSpec, params: dict[str, Any], seed: int | None = None) -> TrainConfig:
    """The config a trial trains with, as its MLflow run logs it: the base with its values, the full
    epoch budget, a confirm re-run's `seed`, and for a single-process trial the thread count its
    CPUs give (CPU results depend on it; `cmx train --from-run` needs it)."""
    cfg = trial_config(spec, params)
    cfg.loop.epochs = spec.max_epochs
    if seed is not None:
        cfg.loop.seed = seed
    if spec.resources.workers == 1:
        cfg.loop.threads = max(1, int(spec.resources.cpus))
    return cfg


def is_finite_number(x: Any) -> bool:
    """True for a real, finite float/int."""
    return isinstance(x, (int, float)) and math.isfinite(float(x))
