"""The confirm stage: `confirm:` in the search file, and `cmx sweep confirm NAME`, on real Ray Tune
re-runs of tiny FFCV trials, tracked in a real MLflow sqlite store."""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.cli import run_cmx
from support.ray_processes import kill_ray_started_with, private_ray_tmp
from support.sweeps import trial_rows, write_spec

from cmx.core import metrics as M
from cmx.core.errors import ConfigError
from cmx.core.sweep_spec import load_sweep_spec
from cmx.sweep.storage import spec_fingerprint

NAME = "conf"

# ---------------------------------------------------------------- the search file's `confirm:`


@pytest.mark.parametrize(
    ("confirm", "message"),
    [
        ({"top_k": 0}, "confirm.top_k: Input should be greater than or equal to 1"),
        ({"seeds": 1}, "seeds must be at least 2 (got 1): a std over seeds needs two re-runs"),
        ({"top_k": 3.5}, "confirm.top_k: Input should be a valid integer"),
        ({"top_k": 20, "seeds": 6}, "top_k x seeds = 120 re-runs, over the cap of 100"),
        ({"top_k": 7}, "confirm.top_k 7 is more than the 6 trials the sweep runs"),
        ({"top-k": 2}, "unknown key 'confirm.top-k'"),
    ],
)
def test_bad_confirm_sections_are_one_line_errors(
    tmp_path: Path, fmnist_tiny_paths: dict[str, str], confirm: dict[str, Any], message: str
) -> None:
    path = write_spec(tmp_path, fmnist_tiny_paths, name="bad", confirm=confirm)
    with pytest.raises(ConfigError) as e:
        load_sweep_spec(path)
    assert message in e.value.one_line() and "\n" not in e.value.one_line(), e.value.one_line()


def test_multi_objective_sweeps_have_no_single_winner_to_confirm(
    tmp_path: Path, fmnist_tiny_paths: dict[str, str]
) -> None:
    objectives = [{"metric": M.VAL_TOP1, "mode": "max"}, {"metric": M.PARAMS_M, "mode": "min"}]
    path = write_spec(tmp_path, fmnist_tiny_paths, name="pareto", search={"objectives": objectives}, confirm={})
    with pytest.raises(ConfigError, match="Pareto front, not one winner"):
        load_sweep_spec(path)


def test_confirm_defaults_and_does_not_change_what_a_resume_compares(
    tmp_path: Path, fmnist_tiny_paths: dict[str, str]
) -> None:
    plain = load_sweep_spec(write_spec(tmp_path, fmnist_tiny_paths, name="same"))
    confirmed = load_sweep_spec(write_spec(tmp_path, fmnist_tiny_paths, name="same", confirm={}))
    assert plain.confirm is None
    assert confirmed.confirm is not None and (confirmed.confirm.top_k, confirmed.confirm.seeds) == (3, 3)
    # Adding `confirm:` to a sweep's file later still resumes that sweep.
    assert spec_fingerprint(plain) == spec_fingerprint(confirmed)


# ---------------------------------------------------------------- a real sweep with a confirm stage


@pytest.fixture(scope="module")
def confirmed(tmp_path_factory: pytest.TempPathFactory, fmnist_tiny_paths: dict[str, str]) -> Iterator[dict[str, Any]]:
    """`cmx sweep` of 3 trials x 2 epochs with `confirm: {top_k: 2, seeds: 2}`, tracked in sqlite."""
    tmp = tmp_path_factory.mktemp("confirm")
    ray_tmp = private_ray_tmp()
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    path = write_spec(
        tmp,
        fmnist_tiny_paths,
        name=NAME,
        epochs=2,
        samples=3,
        scheduler={"name": "none"},
        tracking={"enabled": True, "uri": uri, "keep_best_checkpoints": 1},
        confirm={"top_k": 2, "seeds": 2},
    )
    env = {"CMX_RAY_TMP": ray_tmp}
    try:
        out = run_cmx("sweep", "--space", str(path), home=tmp / "home", env=env, timeout=900)
        yield {"out": out, "tmp": tmp, "uri": uri, "env": env, "sweep": tmp / "sweeps" / NAME}
    finally:
        kill_ray_started_with(ray_tmp)


def _expected(sweep: Path, top_k: int) -> list[tuple[str, float, int]]:
    """(trial id, best val/top1, its loop.seed) of the sweep's top-k trials, read from its trial folders."""
    trials = []
    for trial_dir in sweep.glob("trial_*"):
        rows = trial_rows(trial_dir)
        trials.append((trial_dir.name.removeprefix("trial_"), max(r[M.VAL_TOP1] for r in rows)))
    trials.sort(key=lambda t: -t[1])
    return [(tid, best, 0) for tid, best in trials[:top_k]]  # base.loop.seed 0, not searched


def _reruns(sweep: Path) -> dict[tuple[str, int], list[dict[str, Any]]]:
    """(trial confirmed, seed) -> the re-run's result rows, from its own trial folder."""
    out = {}
    for trial_dir in (sweep / "confirm").glob("trial_*"):
        point = json.loads((trial_dir / "params.json").read_text())["cmx_confirm"]
        out[(point["of"], point["seed"])] = trial_rows(trial_dir)
    return out


def _client(uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _runs(uri: str) -> tuple[Any, list[Any]]:
    """The sweep's parent run and every run of its experiment."""
    client = _client(uri)
    exp = client.get_experiment_by_name(NAME)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parent = next(r for r in runs if r.data.tags.get("cmx.role") == "sweep")
    return parent, runs


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sweep_with_confirm_retrains_top_k_with_new_seeds_and_picks_by_mean(confirmed: dict[str, Any]) -> None:
    out, sweep = confirmed["out"], confirmed["sweep"]
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    top = _expected(sweep, 2)
    # 4 re-runs: each of the top 2 configurations with seeds 1 and 2 (its search seed was 0), full budget.
    reruns = _reruns(sweep)
    assert set(reruns) == {(tid, s) for tid, _, _ in top for s in (1, 2)}, reruns.keys()
    for (tid, _), rows in reruns.items():
        assert [r[M.EPOCH] for r in rows] == [1, 2], (tid, rows)
        searched = json.loads((sweep / f"trial_{tid}" / "params.json").read_text())
        rerun_config = json.loads(next((sweep / "confirm").glob("trial_*/params.json")).read_text())
        assert set(rerun_config["cmx_confirm"]["config"]) == set(searched)
    # The summary's mean ± std comes from the re-runs' own reported values at their best epoch.
    summary = json.loads((sweep / "confirm-summary.json").read_text())
    assert summary["complete"] and summary["search_winner"] == top[0][0]
    means = {}
    for config in summary["configs"]:
        values = [max(r[M.VAL_TOP1] for r in reruns[(config["of"], s)]) for s in (1, 2)]
        stat = config["stats"][M.VAL_TOP1]
        assert stat["mean"] == pytest.approx(statistics.fmean(values))
        assert stat["std"] == pytest.approx(statistics.stdev(values))
        assert stat["n"] == 2 and config["completed"] == 2 and config["seeds"] == [1, 2]
        means[config["of"]] = stat["mean"]
    assert [c["of"] for c in summary["configs"]] == [tid for tid, _, _ in top]
    assert summary["winner"] == max(means, key=lambda k: means[k])
    assert f"confirmed winner: trial {summary['winner']}" in out.stdout
    assert "mean ± std" in out.stdout
    # The Markdown table beside it names the winner.
    assert f"Confirmed winner of sweep {NAME}: {summary['winner']}" in (sweep / "confirm-summary.md").read_text()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_reruns_are_nested_runs_tagged_with_what_they_confirm(confirmed: dict[str, Any]) -> None:
    assert confirmed["out"].returncode == 0
    parent, runs = _runs(confirmed["uri"])
    summary = json.loads((confirmed["sweep"] / "confirm-summary.json").read_text())
    children = [r for r in runs if r.data.tags.get("cmx.role") == "confirm"]
    assert len(children) == 4
    reruns = _reruns(confirmed["sweep"])
    client = _client(confirmed["uri"])
    for run in children:
        tags = run.data.tags
        assert tags["mlflow.parentRunId"] == parent.info.run_id
        key = (tags["cmx.confirm.of"], int(tags["cmx.confirm.seed"]))
        assert key in reruns and run.info.status == "FINISHED" and tags["cmx.status"] == "completed"
        assert run.data.params["loop.seed"] == str(key[1]) and run.data.params["loop.epochs"] == "2"
        history = client.get_metric_history(run.info.run_id, M.VAL_TOP1)
        assert [(m.step, m.value) for m in history] == [(r[M.EPOCH], r[M.VAL_TOP1]) for r in reruns[key]]
    # The winner and its mean ± std on the sweep's run, with the table and the JSON as artifacts.
    tags, values = parent.data.tags, parent.data.metrics
    assert tags["cmx.confirm.winner"] == summary["winner"] and tags["cmx.confirm.complete"] == "true"
    win = next(c for c in summary["configs"] if c["of"] == summary["winner"])
    assert values[f"confirm/{M.VAL_TOP1}/mean"] == pytest.approx(win["stats"][M.VAL_TOP1]["mean"])
    assert values[f"confirm/{M.VAL_TOP1}/std"] == pytest.approx(win["stats"][M.VAL_TOP1]["std"])
    names = {a.path for a in client.list_artifacts(parent.info.run_id, "confirm")}
    assert names == {"confirm/confirm-summary.json", "confirm/confirm-summary.md"}
    # The search's own trials stay what `cmx runs` ranks: the re-runs are not sweep trials.
    from cmx.tracking.query import sweep_trials

    _, trials = sweep_trials(confirmed["uri"], NAME)
    assert len(trials) == 3 and all(t.tags.get("cmx.role") == "trial" for t in trials)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_confirm_command_on_a_finished_sweep_continues_without_redoing(confirmed: dict[str, Any]) -> None:
    assert confirmed["out"].returncode == 0
    sweep, home, env = confirmed["sweep"], confirmed["tmp"] / "home", confirmed["env"]
    storage = str(sweep.parent)
    before = {p: p.read_text() for p in (sweep / "confirm").glob("trial_*/result.json")}
    # The same plan again: every re-run finished, nothing is trained again.
    again = run_cmx("sweep", "confirm", NAME, "--storage", storage, home=home, env=env, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "continuing the confirm stage" in again.stderr
    assert {p: p.read_text() for p in (sweep / "confirm").glob("trial_*/result.json")} == before
    _, runs = _runs(confirmed["uri"])
    assert len([r for r in runs if r.data.tags.get("cmx.role") == "confirm"]) == 4
    # Another plan on the same folder is refused in one line, before anything runs.
    other = run_cmx("sweep", "confirm", NAME, "--storage", storage, "--seeds", "3", home=home, env=env)
    assert other.returncode != 0
    assert "re-runs other configurations or seeds" in other.stderr and "--fresh" in other.stderr, other.stderr
    # --fresh with the command's own settings: the top configuration only, two new seeds.
    fresh = run_cmx(
        "sweep", "confirm", NAME, "--storage", storage, "--top-k", "1", "--seeds", "2", "--fresh",
        home=home, env=env, timeout=600,
    )  # fmt: skip
    assert fresh.returncode == 0, fresh.stdout[-3000:] + fresh.stderr[-3000:]
    top = _expected(sweep, 1)[0][0]
    assert set(_reruns(sweep)) == {(top, 1), (top, 2)}
    summary = yaml.safe_load((sweep / "confirm-summary.json").read_text())
    assert summary["top_k"] == 1 and summary["winner"] == top == summary["search_winner"]
    assert f"confirmed winner: trial {top}" in fresh.stdout and "the search's pick too" in fresh.stdout
