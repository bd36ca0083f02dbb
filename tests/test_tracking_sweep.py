"""A real sweep logged over HTTP to a real `mlflow server`, read back with MlflowClient, the
`cmx runs` commands and the MLflow UI in headless Chromium."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from support.browser import rendered_text
from support.mlflow_server import MlflowServer
from support.sweeps import trial_rows, write_spec

from cmx.core import metrics as M

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]  # the module fixture runs a real sweep (~80-110 s)
SECRET = "shh-cmx-7f3a9c"  # set as AWS_SECRET_ACCESS_KEY while the sweep runs; must be logged nowhere
NAME = "trk"
PER_EPOCH = (M.TRAIN_LOSS, M.VAL_LOSS, M.VAL_TOP1, M.VAL_TOP5, M.LR, M.IMAGES_PER_SEC, M.EPOCH_SECONDS)


@pytest.fixture(scope="module")
def sweep(
    mlflow_server: MlflowServer,
    fmnist_tiny_paths: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, Any]]:
    """3 trials x 2 epochs of convmixer_nano, logged to the server, the best scored on the held-out
    test split at the end; Ray is shut down afterwards."""
    import ray

    from cmx.core.sweep_spec import load_sweep_spec
    from cmx.sweep.tuner import run_sweep

    tmp = tmp_path_factory.mktemp("sweep")
    path = write_spec(tmp, fmnist_tiny_paths, name=NAME, epochs=2, samples=3, backend="torchvision", test=True,
                      tracking={"enabled": True, "uri": mlflow_server.uri, "keep_best_checkpoints": 2})  # fmt: skip
    old = os.environ.get("AWS_SECRET_ACCESS_KEY")
    os.environ["AWS_SECRET_ACCESS_KEY"] = SECRET
    try:
        outcome = run_sweep(load_sweep_spec(path), source_text=path.read_text())
    finally:
        ray.shutdown()
        if old is None:
            os.environ.pop("AWS_SECRET_ACCESS_KEY", None)
        else:
            os.environ["AWS_SECRET_ACCESS_KEY"] = old
    assert len(outcome.trials) == 3 and not outcome.interrupted, outcome.trials
    yield {"outcome": outcome, "uri": mlflow_server.uri, "server": mlflow_server, "tmp": tmp, "spec_path": path}


def _client(uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _runs(uri: str) -> tuple[Any, Any, list[Any]]:
    client = _client(uri)
    exp = client.get_experiment_by_name(NAME)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    return client, exp, runs


def test_one_parent_and_one_child_per_trial_with_full_histories(sweep: dict[str, Any]) -> None:
    client, _, runs = _runs(sweep["uri"])
    parents = [r for r in runs if r.data.tags.get("cmx.role") == "sweep"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.tags["cmx.status"] == "completed"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == len(runs) - 1 == 3
    by_trial = {c.data.tags["cmx.trial_id"]: c for c in children}
    assert set(by_trial) == {t.trial_id for t in sweep["outcome"].trials}
    for trial in sweep["outcome"].trials:
        run = by_trial[trial.trial_id]
        expected_status = {"completed": "FINISHED", "stopped early": "KILLED"}[trial.status]
        assert run.info.status == expected_status, (trial, run.data.tags)
        assert run.data.tags["cmx.status"] == trial.status.replace(" ", "_")
        # Every epoch of every per-epoch metric, at step=epoch, with the values the trial reported.
        rows = trial_rows(Path(trial.path))
        assert [int(r[M.EPOCH]) for r in rows] == list(range(1, trial.epochs + 1))
        for key in PER_EPOCH:
            history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
            assert history == [(int(r[M.EPOCH]), pytest.approx(r[key])) for r in rows], key
        assert run.data.metrics[f"best/{M.VAL_TOP1}"] == pytest.approx(trial.best)
    # The parent carries the best-so-far curve of the sweep, one point per epoch trained.
    curve = sorted((m.step, m.value) for m in client.get_metric_history(parent.info.run_id, f"sweep/best/{M.VAL_TOP1}"))
    assert len(curve) == sum(t.epochs for t in sweep["outcome"].trials)
    assert all(b >= a for (_, a), (_, b) in zip(curve, curve[1:], strict=False))
    assert curve[-1][1] == pytest.approx(sweep["outcome"].best.best)


def test_params_tags_and_no_secrets(sweep: dict[str, Any]) -> None:
    client, _, runs = _runs(sweep["uri"])
    children = [r for r in runs if r.data.tags.get("cmx.role") == "trial"]
    outcome = {t.trial_id: t for t in sweep["outcome"].trials}
    for run in children:
        p, tags = run.data.params, run.data.tags
        trial = outcome[tags["cmx.trial_id"]]
        # The full resolved config, flattened, not only the searched keys.
        for key in ("data.batch_size", "data.backend", "model.name", "optim.name", "schedule.name", "loop.epochs",
                    "loop.seed", "checkpoint.every_epoch"):  # fmt: skip
            assert key in p, key
        assert p["model.dim"] == str(trial.params["model.dim"])
        assert float(p["optim.lr"]) == pytest.approx(trial.params["optim.lr"])
        assert int(p["model.num_params"]) > 100 and int(p["model.flops"]) > 10_000
        assert re.fullmatch(r"[0-9a-f]{40}", tags["cmx.git.commit"]) and tags["cmx.git.dirty"] in ("true", "false")
        for key in ("cmx.version", "cmx.torch_version", "cmx.ray_version", "cmx.host", "cmx.device", "cmx.seed",
                    "cmx.search_seed", "cmx.data.train_fingerprint", "cmx.data.val_fingerprint"):  # fmt: skip
            assert tags.get(key) not in (None, "", "missing", "not installed"), key
        assert tags["cmx.sweep"] == NAME and tags["cmx.device"] == "cpu"
        assert tags["cmx.data.train_fingerprint"].startswith("folder files=400 ")
    for run in runs:
        values = [*run.data.params.values(), *run.data.tags.values()]
        assert not [v for v in values if SECRET in v], run.info.run_name
        assert "AWS_SECRET_ACCESS_KEY" not in json.dumps(run.data.tags)
    # Text artifacts too (configs, the search space).
    parent = next(r for r in runs if r.data.tags.get("cmx.role") == "sweep")
    for run in [parent, *children]:
        for art in client.list_artifacts(run.info.run_id):
            if art.path.endswith((".yaml", ".json")):
                text = Path(client.download_artifacts(run.info.run_id, art.path, str(sweep["tmp"]))).read_text()
                assert SECRET not in text, art.path


def test_artifacts_plots_search_space_and_bounded_checkpoints(sweep: dict[str, Any]) -> None:
    client, _, runs = _runs(sweep["uri"])
    parent = next(r for r in runs if r.data.tags.get("cmx.role") == "sweep")
    top = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"search-space.yaml", "sweep-resolved.yaml", "plots"} <= top
    space = Path(client.download_artifacts(parent.info.run_id, "search-space.yaml", str(sweep["tmp"]))).read_text()
    assert "model.kernel_size" in space and "loguniform" in space
    plots = {Path(a.path).name for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {"learning_curves.png", "parallel_coordinates.png", "accuracy_vs_cost.png"} <= plots, plots
    local = Path(client.download_artifacts(parent.info.run_id, "plots", str(sweep["tmp"] / "plots")))
    for png in local.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000, png
    # Only the best k=2 trials keep a checkpoint; the best trial is among them.
    children = [r for r in runs if r.data.tags.get("cmx.role") == "trial"]
    kept = [r for r in children if any(a.path == "checkpoint" for a in client.list_artifacts(r.info.run_id))]
    assert 1 <= len(kept) <= 2, [r.data.tags.get("cmx.checkpoint") for r in children]
    best_id = sweep["outcome"].best.trial_id
    assert best_id in {r.data.tags["cmx.trial_id"] for r in kept}
    assert all(r.data.tags.get("cmx.checkpoint") == "kept" for r in kept)
    for r in children:
        assert "config.yaml" in {a.path for a in client.list_artifacts(r.info.run_id)}


def test_registered_model_loads_and_reproduces_val_accuracy(
    sweep: dict[str, Any], fmnist_tiny_paths: dict[str, str]
) -> None:
    import torch

    from cmx.pipelines.trainer import evaluate

    client, _, runs = _runs(sweep["uri"])
    versions = client.search_model_versions("name='cmx-convmixer'")
    ours = [v for v in versions if v.tags.get("cmx.sweep") == NAME]
    assert len(ours) == 1, versions
    version = ours[0]
    best = sweep["outcome"].best
    trial_run = next(r for r in runs if r.data.tags.get("cmx.trial_id") == best.trial_id)
    assert version.run_id == trial_run.info.run_id
    assert trial_run.data.tags["cmx.registered_model"] == f"cmx-convmixer/{version.version}"
    dest = sweep["tmp"] / "registered"
    model_dir = Path(client.download_artifacts(version.run_id, "model", str(dest)))
    assert (model_dir / "MLmodel").is_file()
    mlmodel = (model_dir / "MLmodel").read_text()
    assert "signature" in mlmodel and "class_names" in mlmodel
    ckpts = list(model_dir.rglob("*.pt"))
    assert len(ckpts) == 1, list(model_dir.rglob("*"))
    state = torch.load(ckpts[0], map_location="cpu", weights_only=True)
    assert state["config"]["model"]["dim"] == best.params["model.dim"]
    # The checkpoint reproduces the reported best val top-1 on the val data.
    got = evaluate(ckpts[0], fmnist_tiny_paths["val_dir"], threads=1)
    assert got[M.VAL_TOP1] == pytest.approx(best.best, abs=0.26)  # at most one of 400 images
    assert float(version.tags["cmx.value"]) == pytest.approx(best.best, rel=1e-5)
    # And the pyfunc model gives the same logits as the checkpoint's model.
    import mlflow.pyfunc
    import numpy as np

    model = mlflow.pyfunc.load_model(str(model_dir))
    x = np.random.default_rng(0).standard_normal((4, 3, 28, 28)).astype(np.float32)
    logits = model.predict(x)
    assert logits.shape == (4, 10) and np.isfinite(logits).all()


def test_cmx_runs_list_best_compare(sweep: dict[str, Any]) -> None:
    from cmx.cli.main import cli

    runner = CliRunner(env={"COLUMNS": "250"})
    uri = ["--tracking-uri", sweep["uri"]]
    out = runner.invoke(cli, ["runs", "list", *uri])
    assert out.exit_code == 0, out.output
    assert NAME in out.output and "sweep" in out.output and "completed" in out.output
    out = runner.invoke(cli, ["runs", "list", "--sweep", NAME, *uri])
    assert out.exit_code == 0, out.output
    for t in sweep["outcome"].trials:
        assert t.trial_id in out.output
    best = sweep["outcome"].best
    out = runner.invoke(cli, ["runs", "best", "--sweep", NAME, "--download", str(sweep["tmp"] / "best"), *uri])
    assert out.exit_code == 0, out.output
    assert f"best trial {best.trial_id}" in out.output and f"{best.best:.4f}" in out.output
    assert "registered model: models:/cmx-convmixer/" in out.output
    assert list((sweep["tmp"] / "best" / "checkpoint").rglob("*.pt"))
    _, _, runs = _runs(sweep["uri"])
    trial_runs = [r for r in runs if r.data.tags.get("cmx.role") == "trial"][:2]
    out = runner.invoke(cli, ["runs", "compare", *[r.info.run_id for r in trial_runs], *uri])
    assert out.exit_code == 0, out.output
    assert "val/top1" in out.output and "params are the same in every run" in out.output
    differing = [k for k in ("model.dim", "optim.lr", "model.kernel_size")
                 if trial_runs[0].data.params[k] != trial_runs[1].data.params[k]]  # fmt: skip
    assert differing and all(k in out.output for k in differing)
    assert "data.batch_size" not in out.output  # the same in both: hidden without --all


def test_the_best_trial_is_scored_on_test_after_the_search(
    sweep: dict[str, Any],
    fmnist_tiny_paths: dict[str, str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from cmx.cli.main import cli
    from cmx.cli.sweep import show_outcome
    from cmx.core.sweep_spec import load_sweep_spec

    outcome = sweep["outcome"]
    best = outcome.best
    assert set(outcome.test) == {best.trial_id}
    score = outcome.test[best.trial_id]
    assert score.num_samples == 400 and 0.0 <= score.top1 <= score.top5 <= 100.0
    # Logged once, after the sweep, to the best trial's run only; no trial ever reported a test metric.
    _, _, runs = _runs(sweep["uri"])
    trial_runs = {r.data.tags["cmx.trial_id"]: r for r in runs if r.data.tags.get("cmx.role") == "trial"}
    best_run = trial_runs[best.trial_id]
    assert score.run_id == best_run.info.run_id
    assert best_run.data.metrics[M.TEST_TOP1] == pytest.approx(score.top1)
    assert best_run.data.metrics[M.TEST_TOP5] == pytest.approx(score.top5)
    assert best_run.data.tags["cmx.data.test_path"] == fmnist_tiny_paths["test_dir"]
    for tid, run in trial_runs.items():
        assert tid == best.trial_id or not any(k.startswith("test/") for k in run.data.metrics)
    for trial in outcome.trials:
        rows = trial_rows(Path(trial.path))
        assert rows and not any(k.startswith("test/") for row in rows for k in row), trial.trial_id
    # The summary table: test columns apart from the val objective, and the held-out line.
    monkeypatch.setenv("COLUMNS", "250")  # Rich wraps nothing
    show_outcome(outcome, load_sweep_spec(sweep["spec_path"]))
    printed = capsys.readouterr().out
    header = next(line for line in printed.splitlines() if "epochs" in line and M.VAL_TOP1 in line)
    assert header.index(M.VAL_TOP1) < header.index(M.TEST_TOP1) < header.index(M.TEST_TOP5)
    assert f"{score.top1:.4f}" in printed and f"trial {best.trial_id}: {M.TEST_TOP1} {score.top1:.2f}" in printed
    # `cmx runs best` shows both scores, named apart.
    out = CliRunner(env={"COLUMNS": "250"}).invoke(
        cli, ["runs", "best", "--sweep", NAME, "--tracking-uri", sweep["uri"]]
    )
    assert out.exit_code == 0, out.output
    assert f"{M.VAL_TOP1} = {best.best:.4f}" in out.output
    assert (
        f"held-out test: {M.TEST_TOP1} = {score.top1:.4f}, {M.TEST_TOP5} = {score.top5:.4f} (400 images" in out.output
    )


@pytest.mark.browser
def test_mlflow_ui_shows_trials_and_metrics_in_chromium(sweep: dict[str, Any]) -> None:
    _, exp, runs = _runs(sweep["uri"])
    profile = sweep["tmp"] / "chromium-profile"
    base = f"{sweep['uri']}/#/experiments/{exp.experiment_id}"
    # The experiment page lists the sweep; its trials are nested under it (collapsed by default).
    wanted = [NAME, f"{len(runs)} matching runs"]
    text = rendered_text(f"{base}/runs", profile, wanted)
    assert all(w in text for w in wanted), text[-1500:]
    # Each trial's page: its name, its parent sweep and the metric names.
    for run in [r for r in runs if r.data.tags.get("cmx.role") == "trial"]:
        wanted = [run.info.run_name, f"Parent run {NAME}", M.VAL_TOP1, M.TRAIN_LOSS, M.VAL_LOSS]
        text = rendered_text(f"{base}/runs/{run.info.run_id}", profile, wanted)
        assert all(w in text for w in wanted), ([w for w in wanted if w not in text], text[-1500:])


@pytest.mark.browser
def test_printed_links_open_on_the_sweep_not_on_genai_pages(sweep: dict[str, Any]) -> None:
    """A new user (fresh browser profile) opening the links `cmx runs best` prints lands on the
    sweep's trials with the objective and the searched parameters, not on MLflow's GenAI overview."""
    from cmx.cli.main import cli

    out = CliRunner(env={"COLUMNS": "250"}).invoke(
        cli, ["runs", "best", "--sweep", NAME, "--tracking-uri", sweep["uri"]]
    )
    assert out.exit_code == 0, out.output
    links = dict(re.findall(r"^  (trials|charts|best trial)\b[^:]*:\s+(http\S+)$", out.output, flags=re.M))
    assert set(links) == {"trials", "charts", "best trial"}, out.output
    _, exp, runs = _runs(sweep["uri"])
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    trials = [r for r in runs if r.data.tags.get("cmx.role") == "trial"]
    names = [r.info.run_name for r in trials]
    searched = [k.strip() for k in trials[0].data.tags["cmx.searched"].split(",")]
    genai = ["Token Usage", "Detect Issues", "Judges"]  # MLflow's GenAI overview and sidebar
    # The table: every trial as a row (none hidden under a collapsed parent), objective and params as columns.
    wanted = [*names, f"best/{M.VAL_TOP1}", *searched, f"{len(trials)} matching runs"]  # the parent is not a row
    laptop = "1280,900"  # the table renders the columns that fit: all of them on a laptop's screen
    text = rendered_text(links["trials"], sweep["tmp"] / "fresh-profile-1", wanted, window=laptop)
    assert all(w in text for w in wanted), ([w for w in wanted if w not in text], text[-2000:])
    assert not [g for g in genai if g in text], text[:1500]
    # The chart view: the objective per trial and a parallel-coordinates chart of the searched params.
    wanted = [*names, "Sweep", "Parallel Coordinates", *searched]
    text = rendered_text(links["charts"], sweep["tmp"] / "fresh-profile-2", wanted, window=laptop)
    assert all(w in text for w in wanted), ([w for w in wanted if w not in text], text[-2000:])
    assert not [g for g in genai if g in text], text[:1500]
    # The best trial's own page, in the training side of the UI.
    best = next(r for r in trials if r.data.tags.get("cmx.trial_id") == sweep["outcome"].best.trial_id)
    wanted = [best.info.run_name, f"Parent run {NAME}", M.VAL_TOP1, *searched]
    text = rendered_text(links["best trial"], sweep["tmp"] / "fresh-profile-3", wanted, window=laptop)
    assert all(w in text for w in wanted), ([w for w in wanted if w not in text], text[-2000:])
    assert not [g for g in genai if g in text], text[:1500]
