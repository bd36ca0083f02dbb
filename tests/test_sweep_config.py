"""The search-space file: every malformed input gives one clear line, exit code 2, and no Ray start."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from cmx.cli.main import main
from cmx.cluster.runtime import NodeCapacity
from cmx.core.constraints import evaluate_rule
from cmx.core.search_space import decode_params, preview
from cmx.core.sweep_spec import load_sweep_spec
from cmx.sweep.resources import ResourcePlan, plan_resources

BASE = {
    "model": {"name": "convmixer_nano"},
    "data": {"backend": "ffcv", "resolution": 28, "val_resolution": 28},
    "loop": {"epochs": 3},
}
GOOD = {
    "base": BASE,
    "space": {
        "model.depth": {"type": "int", "low": 2, "high": 6},
        "optim.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
        "model.kernel_size": {"type": "choice", "values": [3, 5, [3, 5], [[3, 5], 7]]},
        "schedule.name": {"type": "choice", "values": ["onecycle", "cosine"]},
    },
    "constraints": ["model.depth * 2 <= 12"],
    "search": {"num_samples": 4, "seed": 7},
}


def write(tmp_path: Path, data: object, name: str = "space.yaml") -> Path:
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return p


def with_(path: str | tuple[str, ...], value: object) -> dict:
    data = yaml.safe_load(yaml.safe_dump(GOOD))
    node = data
    keys = path.split(".") if isinstance(path, str) else list(path)
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value
    return data


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(args)
    out = capsys.readouterr()
    return int(exc.value.code or 0), out.out, out.err


def test_good_file_validates_and_previews(tmp_path: Path) -> None:
    spec = load_sweep_spec(write(tmp_path, GOOD))
    assert spec.name == "space" and spec.search.num_samples == 4
    first = preview(spec, 4)
    assert preview(spec, 4) == first, "same seed must give the same configs"
    assert all(2 <= p["model.depth"] <= 6 for p in first)
    kernels = [p["model.kernel_size"] for p in first]
    assert all(k in (3, 5, [3, 5], [[3, 5], 7]) for k in kernels), kernels


def test_structured_choices_round_trip(tmp_path: Path) -> None:
    spec = load_sweep_spec(write(tmp_path, GOOD))
    assert decode_params(spec, {"model.kernel_size": "[[3, 5], 7]"}) == {"model.kernel_size": [[3, 5], 7]}


def test_dry_run_prints_plan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(["sweep", "--space", str(write(tmp_path, GOOD)), "--dry-run"], capsys)
    assert code == 0, err
    assert "model.depth" in out and "first sampled configs" in out and "at once" in out
    assert "ray" not in sys.modules or not __import__("ray").is_initialized()


BAD_CASES = [
    ("invalid YAML", "base: {model: [\n", "invalid YAML"),
    ("top level list", "- 1\n- 2\n", "top level must be a mapping"),
    ("unknown top key", with_("serach", {"seed": 1}), "unknown key 'serach'"),
    ("unknown search key", with_("search.num_sampels", 3), "did you mean 'num_samples'"),
    ("unknown base key", with_("base.optim", {"learning_rate": 0.1}), "unknown key 'base.optim.learning_rate'"),
    (
        "low > high",
        with_(("space", "model.depth"), {"type": "int", "low": 8, "high": 2}),
        "low (8) must be <= high (2)",
    ),
    ("loguniform low <= 0", with_(("space", "optim.lr"), {"type": "loguniform", "low": 0, "high": 1}), "low > 0"),
    ("empty choice", with_(("space", "schedule.name"), {"type": "choice", "values": []}), "at least one value"),
    ("unknown distribution", with_(("space", "optim.lr"), {"type": "normal", "low": 0, "high": 1}), "space.optim.lr"),
    ("unknown metric", with_("search.metric", "val/acc"), "unknown metric 'val/acc'"),
    ("unknown scheduler metric", with_("scheduler.metric", "val/acc"), "unknown scheduler metric 'val/acc'"),
    ("scheduler mode alone", with_("scheduler.mode", "min"), "scheduler.mode needs scheduler.metric"),
    (
        "unknown space key",
        with_("space", {"model.dept": {"type": "int", "low": 1, "high": 2}}),
        "not a training config field",
    ),
    (
        "invalid space value",
        with_("space", {"schedule.name": {"type": "choice", "values": ["cosine", "warp"]}}),
        "'warp' is invalid",
    ),
    ("missing base", {"space": GOOD["space"]}, "missing key 'base'"),
    ("bad constraint", with_("constraints", ["import os"]), "constraints[0]"),
    ("cpus beyond any node", with_("resources", {"cpus": 512}), "resources.cpus=512"),
    ("gpus on a cpu machine", with_("resources", {"gpus": 1}), "resources.gpus=1"),
    ("empty space", with_("space", {}), "at least one parameter"),
]


@pytest.mark.parametrize(("case", "content", "expected"), BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_malformed_input_is_one_clear_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, content: object, expected: str
) -> None:
    path = write(tmp_path, content)
    code, _, err = run_cli(["sweep", "--space", str(path), "--dry-run"], capsys)
    assert code == 2, (case, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert expected in lines[0], lines[0]
    assert str(path) in lines[0] or "resources" in lines[0]
    assert "Traceback" not in err
    assert "ray" not in sys.modules or not __import__("ray").is_initialized()


def test_scheduler_ranks_on_its_own_metric(tmp_path: Path) -> None:
    """scheduler.metric changes what ASHA compares (mode from the metric); the search's objective stays."""
    from cmx.sweep.tuner import build_scheduler

    default = build_scheduler(load_sweep_spec(write(tmp_path, GOOD)))
    assert (default.metric, default._mode) == ("val/top1", "max")
    spec = load_sweep_spec(write(tmp_path, with_("scheduler", {"name": "asha", "metric": "train/loss"})))
    asha = build_scheduler(spec)
    assert (asha.metric, asha._mode) == ("train/loss", "min")  # Ray keeps mode private
    assert spec.objectives()[0].metric == "val/top1"
    explicit = with_("scheduler", {"name": "median", "metric": "val/loss", "mode": "min"})
    assert build_scheduler(load_sweep_spec(write(tmp_path, explicit))).metric == "val/loss"


def test_dry_run_names_the_scheduler_metric(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, with_("scheduler", {"name": "asha", "metric": "train/loss"}))
    code, out, err = run_cli(["sweep", "--space", str(path), "--dry-run"], capsys)
    assert code == 0, err
    assert "ranks trials on min train/loss" in " ".join(out.split()), out


def test_missing_space_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["sweep", "--space", str(tmp_path / "nope.yaml")], capsys)
    assert code == 2 and "file not found" in err


def test_constraints_evaluate() -> None:
    cfg = {"model": {"dim": 256, "depth": 8, "kernel_size": [3, 5]}}
    assert evaluate_rule("model.dim * model.depth <= 4096", cfg)
    assert not evaluate_rule("model.depth > 8 or len(model.kernel_size) == 3", cfg)
    with pytest.raises(ValueError, match="unknown config key"):
        evaluate_rule("model.width > 3", cfg)
    with pytest.raises(ValueError, match="not allowed|may be called"):
        evaluate_rule("__import__('os').system('true')", cfg)


def test_resource_plan_counts_trials_that_fit(tmp_path: Path) -> None:
    spec = load_sweep_spec(write(tmp_path, with_("resources", {"cpus": 1})))
    nodes = [NodeCapacity("a", "h", 4, 0), NodeCapacity("b", "h", 2, 0)]
    assert plan_resources(spec, nodes) == ResourcePlan({"CPU": 1.0}, None, 1, 6)
    dp = load_sweep_spec(write(tmp_path, with_("resources", {"workers": 2, "cpus_per_worker": 2}), "dp.yaml"))
    plan = plan_resources(dp, nodes)
    assert plan.trial_bundle == {"CPU": 0.01} and plan.worker_bundle == {"CPU": 2.0} and plan.concurrent == 1


@pytest.mark.parametrize("name", ["search.yaml", "imagenet-search.yaml"])
def test_shipped_examples_validate(name: str) -> None:
    spec = load_sweep_spec(Path(__file__).resolve().parents[1] / "examples" / name)
    assert spec.space and spec.search.num_samples >= 8
    first = preview(spec, 3)
    assert first[0] == spec.search.points_to_evaluate[0]
