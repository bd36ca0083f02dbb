"""The confirm stage: `confirm:` in the search file, and `cmx sweep confirm NAME`, on real Ray Tune
re-runs of tiny FFCV trials, tracked in a real MLflow sqlite store."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.cli import run_cmx, start_cmx
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


def test_confirm_needs_a_sweep_folder_on_disk(tmp_path: Path, fmnist_tiny_paths: dict[str, str]) -> None:
    path = write_spec(tmp_path, fmnist_tiny_paths, name="s3", storage={"path": "s3://bucket/sweeps"}, confirm={})
    with pytest.raises(ConfigError, match="storage.path s3://bucket/sweeps is a URI"):
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


def test_summary_uses_completed_reruns_only_and_picks_the_best_mean(
    tmp_path: Path, fmnist_tiny_paths: dict[str, str]
) -> None:
    from cmx.confirm.plan import Candidate, RerunResult, summarise, table_text

    spec = load_sweep_spec(write_spec(tmp_path, fmnist_tiny_paths, name="sum", confirm={"top_k": 2, "seeds": 2}))
    assert spec.confirm is not None
    found = [Candidate("a", 81.0, {}, {"model.dim": 8}, 0), Candidate("b", 79.0, {}, {"model.dim": 16}, 0)]

    def rerun(of: str, seed: int, status: M.TrialStatus, top1: float | None) -> RerunResult:
        values = {} if top1 is None else {M.VAL_TOP1: top1}
        return RerunResult(trial_id=f"{of}{seed}", of=of, seed=seed, status=status.tag, epochs=3, values=values)

    done = M.TrialStatus.COMPLETED
    reruns = [rerun("a", 1, done, 70.0), rerun("a", 2, M.TrialStatus.FAILED, None), rerun("b", 1, done, 75.0)]
    partial = summarise(spec, spec.confirm, found, reruns)
    assert not partial.complete  # b's second seed has not run
    a, b = partial.configs
    assert (a.completed, a.stats[M.VAL_TOP1].mean, a.stats[M.VAL_TOP1].std) == (1, 70.0, None)
    assert a.seeds == [1, 2] and b.rank == 2
    full = summarise(spec, spec.confirm, found, [*reruns, rerun("b", 2, done, 78.0)])
    assert full.complete and full.winner == "b" and full.search_winner == "a"  # the search's pick lost
    assert full.configs[1].stats[M.VAL_TOP1].mean == 76.5
    assert full.configs[1].stats[M.VAL_TOP1].std == pytest.approx(statistics.stdev([75.0, 78.0]))
    assert "| 2 | b (winner) | 79.0000 | 2/2 | 76.5000 ± 2.1213 |" in table_text(full)


def test_confirm_command_refuses_a_sweep_still_to_finish(tmp_path: Path, fmnist_tiny_paths: dict[str, str]) -> None:
    spec = load_sweep_spec(write_spec(tmp_path, fmnist_tiny_paths, name="early", samples=3))
    folder = tmp_path / "sweeps" / "early"  # saved as a sweep leaves it before its first trial
    folder.mkdir(parents=True)
    (folder / "cmx-sweep.yaml").write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    out = run_cmx("sweep", "confirm", "early", "--storage", str(tmp_path / "sweeps"), home=tmp_path / "home")
    assert out.returncode != 0 and out.stderr.count("\n") == 1, out.stderr
    assert "sweep early is not finished (0 of 3 trials ended)" in out.stderr
    assert "cmx sweep --resume early" in out.stderr


def test_a_tied_best_epoch_is_read_where_its_checkpoint_was_kept(
    tmp_path: Path, fmnist_tiny_paths: dict[str, str]
) -> None:
    """A model stuck at chance scores 10.0 at every epoch; retention keeps the latest of the tie."""
    from cmx.confirm.plan import read_reruns

    spec = load_sweep_spec(write_spec(tmp_path, fmnist_tiny_paths, name="tie", epochs=3))
    trial = tmp_path / "confirm" / "trial_x_00000"
    (trial / "checkpoint_000002").mkdir(parents=True)  # epochs 1 and 2 were superseded and deleted
    point = {"cmx_confirm": {"of": "abc", "seed": 1, "config": {}}}
    (trial / "params.json").write_text(json.dumps(point))
    rows = [
        {M.EPOCH: e, "checkpoint_dir_name": f"checkpoint_{e - 1:06d}", M.VAL_TOP1: v}
        for e, v in ((1, 10.0), (2, 12.5), (3, 12.5))
    ]
    (trial / "result.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (rerun,) = read_reruns(spec, tmp_path / "confirm")
    assert (rerun.of, rerun.seed, rerun.status, rerun.best_epoch) == ("abc", 1, "completed", 3)
    assert rerun.values == {M.VAL_TOP1: 12.5} and rerun.checkpoint == str(trial / "checkpoint_000002")


# ---------------------------------------------------------------- a real sweep with a confirm stage


@pytest.fixture(scope="module")
def confirmed(tmp_path_factory: pytest.TempPathFactory, fmnist_tiny_paths: dict[str, str]) -> Iterator[dict[str, Any]]:
    """`cmx sweep` of 3 trials x 2 epochs with `confirm: {top_k: 2, seeds: 2}` and a test split,
    tracked in sqlite."""
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
        test=True,
    )
    env = {"CMX_RAY_TMP": ray_tmp}
    try:
        out = run_cmx("sweep", "--space", str(path), home=tmp / "home", env=env, timeout=900)
        yield {"out": out, "tmp": tmp, "uri": uri, "env": env, "sweep": tmp / "sweeps" / NAME, "space": path}
    finally:
        kill_ray_started_with(ray_tmp)


def _expected(sweep: Path, top_k: int) -> list[tuple[str, float, int]]:
    """(trial id, best val/top1, its loop.seed) of the sweep's top-k trials, read from its trial folders."""
    trials = []
    for trial_dir in sorted(sweep.glob("trial_*")):  # ties keep this order, as the stage's ranking does
        rows = trial_rows(trial_dir)
        trials.append((trial_dir.name.removeprefix("trial_"), max(r[M.VAL_TOP1] for r in rows)))
    trials.sort(key=lambda t: -t[1])
    return [(tid, best, 0) for tid, best in trials[:top_k]]  # base.loop.seed 0, not searched


def _saved_as_terminated(experiment: Path) -> set[str]:
    """Trial ids that Tune's saved experiment state (the newest file) records as finished."""
    for state in sorted(experiment.glob("experiment_state-*.json"), reverse=True)[:1]:
        try:
            trials = [json.loads(t[0]) for t in json.loads(state.read_text())["trial_data"]]
        except (OSError, ValueError, KeyError):  # being written
            return set()
        return {t["trial_id"] for t in trials if t.get("status") == "TERMINATED"}
    return set()


def _rerun_dirs(sweep: Path) -> dict[tuple[str, int], Path]:
    """(trial confirmed, seed) -> the re-run's trial folder (trial_<Tune trial id>)."""
    out = {}
    for trial_dir in (sweep / "confirm").glob("trial_*"):
        point = json.loads((trial_dir / "params.json").read_text())["cmx_confirm"]
        out[(point["of"], point["seed"])] = trial_dir
    return out


def _reruns(sweep: Path) -> dict[tuple[str, int], list[dict[str, Any]]]:
    """(trial confirmed, seed) -> the re-run's result rows, from its own trial folder."""
    return {key: trial_rows(d) for key, d in _rerun_dirs(sweep).items()}


def _test_scores(sweep: Path) -> dict[tuple[str, int], dict[str, Any]]:
    """(trial confirmed, seed) -> the re-run's score on the test split, as the stage kept it."""
    return {key: json.loads((d / "cmx-test.json").read_text()) for key, d in _rerun_dirs(sweep).items()}


def _files(sweep: Path) -> dict[Path, Any]:
    """Each re-run's reported rows (content) and test score (written when: never rewritten)."""
    rows = {p: p.read_text() for p in (sweep / "confirm").glob("trial_*/result.json")}
    return {**rows, **{p: p.stat().st_mtime_ns for p in (sweep / "confirm").glob("trial_*/cmx-test.json")}}


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
    # Test top-1: each re-run's best checkpoint (the epoch its val/top1 peaked) measured on the test split.
    tests = _test_scores(sweep)
    for config in summary["configs"]:
        values = [tests[(config["of"], s)][M.TEST_TOP1] for s in (1, 2)]
        assert config["stats"][M.TEST_TOP1]["mean"] == pytest.approx(statistics.fmean(values))
        assert config["stats"][M.TEST_TOP1]["std"] == pytest.approx(statistics.stdev(values))
    for key, score in tests.items():
        rows = reruns[key]
        (row,) = [r for r in rows if r["checkpoint_dir_name"] == Path(score["checkpoint"]).name]
        assert row[M.VAL_TOP1] == max(r[M.VAL_TOP1] for r in rows), (key, score, rows)
        assert score["num_samples"] == 400 and 0 <= score[M.TEST_TOP1] <= 100
    from cmx.tracking.heldout import evaluate_trials_on_test

    key, score = next(iter(tests.items()))
    again = evaluate_trials_on_test({"x": score["checkpoint"]}, score["test_path"], threads=1)["x"]
    assert again.top1 == pytest.approx(score[M.TEST_TOP1]) and again.top5 == pytest.approx(score[M.TEST_TOP5])
    assert M.TEST_TOP1 in out.stdout  # a column of the table
    assert [c["of"] for c in summary["configs"]] == [tid for tid, _, _ in top]
    assert summary["winner"] == max(means, key=lambda k: means[k])
    assert f"confirmed winner: trial {summary['winner']}" in out.stdout
    assert "mean ± std" in out.stdout
    # `cmx sweep status` names it too, read from the sweep folder.
    status = run_cmx("sweep", "status", NAME, "--storage", str(sweep.parent), home=confirmed["tmp"] / "home")
    assert status.returncode == 0, status.stderr
    assert f"confirmed winner: trial {summary['winner']}, {M.VAL_TOP1} " in status.stdout, status.stdout
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
    reruns, tests = _reruns(confirmed["sweep"]), _test_scores(confirmed["sweep"])
    client = _client(confirmed["uri"])
    for run in children:
        tags = run.data.tags
        assert tags["mlflow.parentRunId"] == parent.info.run_id
        key = (tags["cmx.confirm.of"], int(tags["cmx.confirm.seed"]))
        assert key in reruns and run.info.status == "FINISHED" and tags["cmx.status"] == "completed"
        assert run.data.params["loop.seed"] == str(key[1]) and run.data.params["loop.epochs"] == "2"
        history = client.get_metric_history(run.info.run_id, M.VAL_TOP1)
        assert [(m.step, m.value) for m in history] == [(r[M.EPOCH], r[M.VAL_TOP1]) for r in reruns[key]]
        assert run.data.metrics[M.TEST_TOP1] == pytest.approx(tests[key][M.TEST_TOP1])
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
    # `cmx runs best` names the search's best trial, and the confirmed winner with its mean ± std.
    best = run_cmx("runs", "best", "--sweep", NAME, "--tracking-uri", confirmed["uri"], home=confirmed["tmp"] / "home")
    assert best.returncode == 0, best.stderr
    line = next(ln for ln in best.stdout.splitlines() if "confirmed winner" in ln)
    assert f"trial {summary['winner']}, {M.VAL_TOP1} {tags[f'cmx.confirm.winner.{M.VAL_TOP1}']}" in line, line
    assert "best trial" in best.stdout


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_confirm_command_on_a_finished_sweep_continues_without_redoing(confirmed: dict[str, Any]) -> None:
    assert confirmed["out"].returncode == 0
    sweep, home, env = confirmed["sweep"], confirmed["tmp"] / "home", confirmed["env"]
    storage = str(sweep.parent)
    before = _files(sweep)
    # The same plan again: every re-run finished, nothing is trained again.
    again = run_cmx("sweep", "confirm", NAME, "--storage", storage, home=home, env=env, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "continuing the confirm stage" in again.stderr
    # Nothing trained or measured on test again: every re-run's files are as they were.
    assert _files(sweep) == before
    # The whole sweep run again: the search's best is not measured on test again either.
    kept = {p: p.stat().st_mtime_ns for p in sweep.glob("trial_*/" + M.TEST_SCORE_FILE)}
    assert len(kept) == 1
    rerun = run_cmx("sweep", "--space", str(confirmed["space"]), home=home, env=env, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in sweep.glob("trial_*/" + M.TEST_SCORE_FILE)} == kept
    assert _files(sweep) == before
    _, runs = _runs(confirmed["uri"])
    best_run = next(r for r in runs if M.TEST_TOP1 in r.data.metrics and r.data.tags.get("cmx.role") == "trial")
    assert len(_client(confirmed["uri"]).get_metric_history(best_run.info.run_id, M.TEST_TOP1)) == 1
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


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_killed_confirm_stage_continues_without_redoing_finished_reruns(confirmed: dict[str, Any]) -> None:
    assert confirmed["out"].returncode == 0
    sweep, home = confirmed["sweep"], confirmed["tmp"] / "home"
    ray_tmp = private_ray_tmp()
    env = {"CMX_RAY_TMP": ray_tmp, "TUNE_GLOBAL_CHECKPOINT_S": "1"}  # Tune saves its state every second
    # 8 re-runs, two at a time on 2 cores: the kill comes while most are still to run.
    args = ("sweep", "confirm", NAME, "--storage", str(sweep.parent), "--top-k", "2", "--seeds", "4")
    earlier = {d.name for d in (sweep / "confirm").glob("trial_*")}  # the last test's stage, until --fresh
    proc = start_cmx(*args, "--fresh", home=home, env=env)
    try:
        # Kill as soon as Tune's saved state holds a finished re-run of this stage: re-runs take
        # under a second each with warm actors, so a fixed wait could outlast the whole stage.
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline:
            new = {d.name.removeprefix("trial_") for d in (sweep / "confirm").glob("trial_*") if d.name not in earlier}
            if new & _saved_as_terminated(sweep / "confirm"):
                break
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            time.sleep(0.1)
        else:
            pytest.fail("no re-run finished in time")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
        proc.wait()
        kill_ray_started_with(ray_tmp)
    # What the resume starts from: re-runs Tune saved as finished are never trained again; one
    # that finished after that save, like any still running, goes on from its last saved state.
    saved = _saved_as_terminated(sweep / "confirm")
    finished = {k: trial_rows(d) for k, d in _rerun_dirs(sweep).items() if d.name.removeprefix("trial_") in saved}
    assert finished and len(finished) < 8, finished.keys()
    out = run_cmx(*args, home=home, env=env, timeout=600)
    kill_ray_started_with(ray_tmp)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "continuing the confirm stage" in out.stderr
    after = _reruns(sweep)
    epochs = {key: [row["epoch"] for row in rows] for key, rows in after.items()}
    assert len(after) == 8 and all(sorted(set(e)) == [1, 2] and e[-1] == 2 for e in epochs.values()), epochs
    for key, rows in finished.items():
        assert after[key] == rows, f"{key} was trained again"  # its two rows, as at the kill
    summary = json.loads((sweep / "confirm-summary.json").read_text())
    assert summary["complete"] and all(c["completed"] == 4 for c in summary["configs"])
    # MLflow: the 8 re-runs of this stage, each ended once; the earlier stages' runs are deleted.
    _, runs = _runs(confirmed["uri"])
    reruns = [r for r in runs if r.data.tags.get("cmx.role") == "confirm"]
    assert len(reruns) == 8 and all(r.info.status == "FINISHED" for r in reruns)
    assert {(r.data.tags["cmx.confirm.of"], int(r.data.tags["cmx.confirm.seed"])) for r in reruns} == set(after)
