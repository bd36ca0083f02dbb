"""Turn a validated search space into Optuna distributions and samplers (no Ray here).

Optuna's categorical values must be None/bool/int/float/str, so a `choice` whose values include
lists or mappings (e.g. per-block kernel lists) is sampled as JSON strings and decoded back.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from cmx.core.sweep_spec import ChoiceDist, FloatDist, GridDist, IntDist, LogUniformDist, SweepSpec

_PRIMITIVE = (type(None), bool, int, float, str)


def _needs_encoding(values: list[Any]) -> bool:
    return not all(isinstance(v, _PRIMITIVE) for v in values)


def encode_choice(value: Any) -> str:
    """A stable text form of a non-primitive choice value."""
    return json.dumps(value, sort_keys=True)


def optuna_space(spec: SweepSpec) -> dict[str, Any]:
    """Optuna distributions for every searched key (grid entries become categorical)."""
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    out: dict[str, Any] = {}
    for key, dist in spec.space.items():
        if isinstance(dist, IntDist):
            out[key] = IntDistribution(dist.low, dist.high, step=dist.step, log=dist.log)
        elif isinstance(dist, FloatDist):
            out[key] = FloatDistribution(dist.low, dist.high, log=dist.log)
        elif isinstance(dist, LogUniformDist):
            out[key] = FloatDistribution(dist.low, dist.high, log=True)
        else:
            values = dist.values
            choices = [encode_choice(v) for v in values] if _needs_encoding(values) else values
            out[key] = CategoricalDistribution(choices)
    return out


def decode_params(spec: SweepSpec, params: dict[str, Any]) -> dict[str, Any]:
    """Map sampled values back to YAML values (undo JSON encoding of structured choices)."""
    decoded: dict[str, Any] = {}
    for key, value in params.items():
        dist = spec.space.get(key)
        if isinstance(dist, (ChoiceDist, GridDist)) and _needs_encoding(dist.values):
            lookup = {encode_choice(v): v for v in dist.values}
            value = lookup.get(value, value) if isinstance(value, str) else value
        decoded[key] = value
    return decoded


def encode_params(spec: SweepSpec, params: dict[str, Any]) -> dict[str, Any]:
    """The inverse of decode_params, for `points_to_evaluate`."""
    out = {}
    for key, value in params.items():
        dist = spec.space.get(key)
        if isinstance(dist, (ChoiceDist, GridDist)) and _needs_encoding(dist.values):
            value = encode_choice(value)
        out[key] = value
    return out


def make_sampler(spec: SweepSpec) -> Any:
    """The Optuna sampler for the configured algorithm, seeded."""
    import optuna

    algo, seed = spec.search.algorithm, spec.search.seed
    if algo == "optuna-tpe":
        # A few random start-up trials, then TPE; small sweeps need fewer than Optuna's 10.
        startup = max(2, min(10, spec.search.num_samples // 3))
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup)
    if algo == "optuna-cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    return optuna.samplers.RandomSampler(seed=seed)


def grid_size(spec: SweepSpec) -> int:
    """How many points a `grid` algorithm enumerates (product of grid lengths; nothing is enumerated)."""
    return spec.grid_points()


def preview(spec: SweepSpec, n: int = 5, history: list[Any] | None = None) -> list[dict[str, Any]]:
    """The first `n` configs the sampler proposes with this seed (same as the sweep's first);
    `history`: finished `FrozenTrial`s the sweep's study starts with (its warm start)."""
    import optuna

    if spec.search.algorithm == "grid":
        import itertools

        grid_keys = [k for k, d in spec.space.items() if isinstance(d, GridDist)]
        combos = itertools.product(*(spec.space[k].values for k in grid_keys))  # type: ignore[union-attr]
        return [dict(zip(grid_keys, c, strict=True)) for c in itertools.islice(combos, n)]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    directions: list[Literal["maximize", "minimize"]] = [
        "maximize" if o.mode == "max" else "minimize" for o in spec.objectives()
    ]
    study = optuna.create_study(sampler=make_sampler(spec), directions=directions)
    if history:
        study.add_trials(history)
    space = optuna_space(spec)
    out = []
    for point in spec.search.points_to_evaluate[:n]:
        out.append(dict(point))
    while len(out) < n:
        trial = study.ask(space)
        out.append(decode_params(spec, trial.params))
    return out
