"""Hostile search files and run configs: validation gaps and constraint evaluation limits.

Every case runs the real CLI (`cmx sweep --space FILE --dry-run`, `cmx train --config FILE`) and must
end with exit code 2, exactly one stderr line starting `error:` that names the file and the key, no
traceback, no Ray, nothing written outside the test's folder, within a few seconds.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.cli import run_cmx

from cmx.core.constraints import MAX_EXPONENT, evaluate_rule
from cmx.core.sweep_spec import MAX_GRID_TRIALS, constraint_config, load_sweep_spec, trial_config

LIMIT_S = 5.0  # an error about the input must come at once
BASE = {
    "model": {"name": "convmixer_nano"},
    "data": {"backend": "ffcv", "resolution": 28, "val_resolution": 28},
    "loop": {"epochs": 3},
}
SPACE = {"model.depth": {"type": "int", "low": 2, "high": 6}}


def spec_file(tmp_path: Path, **sections: Any) -> Path:
    data: dict[str, Any] = {"base": BASE, "space": SPACE, **sections}
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def run_refused(tmp_path: Path, *args: str, needles: tuple[str, ...]) -> str:
    """Run cmx ARGS; assert the one-line refusal naming every needle; return that line."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    before = listing(tmp_path)
    start = time.monotonic()
    out = run_cmx(*args, home=home, timeout=60, report_ray=True)
    elapsed = time.monotonic() - start
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("error:"), lines[0]
    assert "Traceback" not in out.stderr + out.stdout
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert out.stdout.strip().splitlines()[-1] == "NO_RAY", out.stdout
    assert listing(tmp_path) == before
    assert elapsed < LIMIT_S, f"took {elapsed:.1f}s"
    return lines[0]


def refused_sweep(tmp_path: Path, path: Path, *needles: str, extra: tuple[str, ...] = ()) -> str:
    return run_refused(tmp_path, "sweep", "--space", str(path), "--dry-run", *extra, needles=(str(path), *needles))


# ------------------------------------------------------------------ constraints


@pytest.mark.parametrize(
    ("rule", "key"),
    [
        ("model.foo * 2 < 3", "model.foo"),
        ("modle.depth < 3", "modle.depth"),
        ("model.__class__ == 1", "model.__class__"),
        ("len(model.__dict__) > 0", "model.__dict__"),
        ("__import__ == 1", "__import__"),
        ("model.depth.real > 1", "model.depth.real"),
    ],
)
def test_constraint_naming_an_unknown_key_is_one_line(tmp_path: Path, rule: str, key: str) -> None:
    line = refused_sweep(tmp_path, spec_file(tmp_path, constraints=["model.depth > 0", rule]), "constraints[1]", key)
    assert rule in line


@pytest.mark.parametrize(
    "rule",
    [
        "10**10**10 > 0",
        "(10**1000)**1000 > 0",
        "2**1000 * 2**1000 * 2**1000 * 2**1000 * 2**1000 > 0",
        "'a' * 10**9 == 'a'",
        "[1] * 10**9 == [1]",
        "model.depth / 0 > 1",
        "(-8) ** 0.5 > 1",
        "model.depth + " * 400 + "1 > 0",
        "(" * 300 + "1" + ")" * 300 + " > 0",
        "min() > 0",
        "model > 1",
        "data.val_batch_size > 1",
    ],
)
def test_constraint_that_cannot_evaluate_is_one_line_at_once(tmp_path: Path, rule: str) -> None:
    refused_sweep(tmp_path, spec_file(tmp_path, constraints=[rule]), "constraints[0]")


def test_evaluator_bounds_powers_and_operand_types() -> None:
    assert evaluate_rule(f"2**{MAX_EXPONENT} > 0", {})
    for rule in ("10**10**10 > 0", "9**9**9 > 0", "'x' * 3 == 'xxx'", "True + 1 == 2"):
        with pytest.raises(ValueError, match="rule"):
            evaluate_rule(rule, {})
    with pytest.raises(ValueError, match="unknown config key"):
        evaluate_rule("model.__class__ == 1", {"model": {}})


def test_constraint_sees_the_variants_values(tmp_path: Path) -> None:
    """model.dim is not sampled and left at None in the config: the rule reads the variant's dim."""
    from cmx.models.factory import variant_arguments

    path = spec_file(
        tmp_path,
        space={**SPACE, "model.drop_rate": {"type": "choice", "values": [None, 0.1]}},
        constraints=["model.dim * model.depth <= 4096", "model.drop_rate < 0.5"],
    )
    spec = load_sweep_spec(path)
    cfg = trial_config(spec, {"model.depth": 3, "model.drop_rate": None})
    assert cfg.model.dim is None
    seen = constraint_config(cfg, spec.constraints, variant_arguments)
    assert seen["model"]["dim"] == variant_arguments("convmixer_nano")["dim"]
    assert seen["model"]["drop_rate"] == 0.0
    assert evaluate_rule(spec.constraints[0], seen)

    home = tmp_path / "home"
    out = run_cmx("sweep", "--space", str(path), "--dry-run", home=home, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr and "error" not in out.stderr
    assert "rejected" not in out.stdout


# ------------------------------------------------------------------ strict value types


@pytest.mark.parametrize(
    ("space", "bad"),
    [
        ({"model.dim": {"type": "choice", "values": [16, True, 16.0, "32"]}}, "True"),
        ({"model.dim": {"type": "choice", "values": [16, "32"]}}, "'32'"),
        ({"model.dim": {"type": "choice", "values": [16, 16.0]}}, "16.0"),
        ({"model.dim": {"type": "grid", "values": [16, False]}}, "False"),
        ({"model.dim": {"type": "float", "low": 16, "high": 64}}, "16.0"),
        ({"model.dim": {"type": "int", "low": True, "high": 64}}, "True"),
        ({"model.dim": {"type": "int", "low": "8", "high": 64}}, "'8'"),
        ({"model.dim": {"type": "int", "low": 8, "high": 64.5}}, "64.5"),
        ({"optim.lr": {"type": "float", "low": False, "high": 0.1}}, "False"),
        ({"optim.lr": {"type": "loguniform", "low": True, "high": 2}}, "True"),
        ({"loop.channels_last": {"type": "choice", "values": [True, 1]}}, "1"),
        ({"schedule.name": {"type": "choice", "values": ["cosine", 3]}}, "3"),
        ({"model.kernel_size": {"type": "choice", "values": [3, [3, True]]}}, "True"),
    ],
)
def test_every_value_a_sweep_may_sample_has_the_fields_type(tmp_path: Path, space: dict, bad: str) -> None:
    (key,) = space
    refused_sweep(tmp_path, spec_file(tmp_path, space=space), key, bad)


def test_numeric_strings_stay_valid_for_float_fields(tmp_path: Path) -> None:
    """YAML 1.1 reads `1e-4` as a string; a float field keeps taking it (and ints)."""
    path = tmp_path / "space.yaml"
    path.write_text(
        yaml.safe_dump({"base": BASE, "space": {"model.depth": {"type": "int", "low": 2, "high": 4}}})
        + "  optim.lr: {type: choice, values: [1e-4, 1.0e-3, 1]}\n"
    )
    spec = load_sweep_spec(path)
    assert trial_config(spec, {"optim.lr": "1e-4"}).optim.lr == pytest.approx(1e-4)


# ------------------------------------------------------------------ samples and grids


@pytest.mark.parametrize("samples", ["0", "-3"])
def test_samples_below_one_is_one_line(tmp_path: Path, samples: str) -> None:
    refused_sweep(tmp_path, spec_file(tmp_path), "--samples", samples, "num_samples", extra=("--samples", samples))


@pytest.mark.parametrize("value", [0, -1, True, "8"])
def test_num_samples_in_the_file_is_checked(tmp_path: Path, value: object) -> None:
    refused_sweep(tmp_path, spec_file(tmp_path, search={"num_samples": value}), "search.num_samples")


def test_huge_grid_is_refused_without_enumerating_it(tmp_path: Path) -> None:
    keys = ["model.depth", "model.dim", "model.patch_size", "optim.lr", "optim.weight_decay", "loop.seed", "loop.mixup"]
    space = {k: {"type": "grid", "values": list(range(1, 11))} for k in keys}
    space["loop.mixup"]["values"] = [float(v) for v in range(10)]
    space["optim.lr"]["values"] = [v / 100 for v in range(1, 11)]
    space["optim.weight_decay"]["values"] = [v / 100 for v in range(10)]
    line = refused_sweep(
        tmp_path,
        spec_file(tmp_path, space=space, search={"algorithm": "grid"}),
        "search.algorithm",
        f"{MAX_GRID_TRIALS:,}",
    )
    assert "80,000,000 trials" in line and "10,000,000 grid points" in line


def test_grid_plan_says_how_many_trials(tmp_path: Path) -> None:
    space = {
        "model.depth": {"type": "grid", "values": [2, 3, 4]},
        "schedule.name": {"type": "grid", "values": ["cosine", "onecycle"]},
    }
    path = spec_file(tmp_path, space=space, search={"algorithm": "grid", "num_samples": 2})
    assert load_sweep_spec(path).planned_trials() == 12
    out = run_cmx("sweep", "--space", str(path), "--dry-run", home=tmp_path / "home", timeout=120)
    assert out.returncode == 0, out.stderr
    assert "12 trials (a grid of 6 points × 2 samples" in out.stdout


# ------------------------------------------------------------------ points_to_evaluate


@pytest.mark.parametrize(
    ("point", "needle"),
    [
        ({"model.depth": "x"}, "'x'"),
        ({"model.depth": True}, "True"),
        ({"model.depth": 99}, "99"),
        ({"model.dim": 16}, "not a space key"),
    ],
)
def test_bad_point_names_file_index_and_key(tmp_path: Path, point: dict, needle: str) -> None:
    (key,) = point
    search = {"points_to_evaluate": [{"model.depth": 3}, point]}
    refused_sweep(tmp_path, spec_file(tmp_path, search=search), f"search.points_to_evaluate[1].{key}", needle)


def test_point_outside_a_choice_is_refused(tmp_path: Path) -> None:
    space = {"schedule.name": {"type": "choice", "values": ["cosine", "onecycle"]}}
    search = {"points_to_evaluate": [{"schedule.name": "step"}]}
    refused_sweep(
        tmp_path, spec_file(tmp_path, space=space, search=search), "points_to_evaluate[0].schedule.name", "'step'"
    )


# ------------------------------------------------------------------ data.mean / data.std


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"std": [0, 0, 0]}, "data.std"),
        ({"std": [0.2, -0.2, 0.2]}, "data.std"),
        ({"std": [0.2, 0.2, float("inf")]}, "data.std"),
        ({"std": [0.2, 0.2]}, "data.std"),
        ({"mean": [float("nan"), 0.5, 0.5]}, "data.mean"),
    ],
)
def test_bad_normalisation_names_the_field(tmp_path: Path, data: dict, key: str) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({**BASE, "data": {**BASE["data"], **data}}))
    run_refused(tmp_path, "train", "--config", str(config), needles=(str(config), key))
    base = {**BASE, "data": {**BASE["data"], **data}}
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({"base": base, "space": SPACE}))
    refused_sweep(tmp_path, path, f"base.{key}")
