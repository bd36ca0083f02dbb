"""Deep links into MLflow's UI for a sweep in a local sqlite store (no server): `cmx runs best`
prints the links `cmx ui` will serve, and the experiment carries the shared view they name.

The links opened in headless Chromium against a real sweep: tests/test_tracking_sweep.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

from click.testing import CliRunner
from support.sweeps import SEARCHED, record_sweep

from cmx.tracking.store import make_client
from cmx.tracking.tracker import Tracker
from cmx.tracking.ui_links import EXPERIMENT_KIND_TAG, MODEL_TRAINING, SHARED_VIEW_TAG, view_key


def test_runs_best_prints_cmx_ui_links_and_writes_the_sweep_view(tmp_path: Path) -> None:
    from cmx.cli.main import cli

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    record_sweep(tmp_path / "state", uri, "lnk")
    client = make_client(uri)
    exp = client.get_experiment_by_name("lnk")
    assert exp.tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING  # set when the Tracker created it
    runner = CliRunner(env={"COLUMNS": "100", "CMX_UI_PORT": "5077"})
    out = runner.invoke(cli, ["runs", "best", "--sweep", "lnk", "--tracking-uri", uri])
    assert out.exit_code == 0, out.output
    assert "best trial t1" in out.output and "(start the UI with: cmx ui)" in out.output, out.output
    parent = client.search_runs([exp.experiment_id], "tags.`cmx.role` = 'sweep'")[0]
    best = client.search_runs([exp.experiment_id], "attributes.run_name = 'trial_1'")[0]
    base = f"http://127.0.0.1:5077/#/experiments/{exp.experiment_id}"
    key = view_key(parent.info.run_id)
    links = re.findall(r"https?://\S+", out.output)  # one URL per line, unwrapped in a 100-column terminal
    assert links == [
        f"{base}/runs?workflowType=machine_learning&viewStateShareKey={key}",
        f"{base}/runs?workflowType=machine_learning&viewStateShareKey={key}&compareRunsMode=CHART",
        f"{base}/runs/{best.info.run_id}?workflowType=machine_learning",
    ], out.output
    view = json.loads(client.get_experiment(exp.experiment_id).tags[SHARED_VIEW_TAG + key])
    assert view["searchFilter"] == f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    assert view["orderByKey"] == "metrics.`best/val/loss`" and view["orderByAsc"] is True  # min: best first
    assert view["selectedColumns"][:2] == ["metrics.`best/val/loss`", "metrics.`val/loss`"]
    assert [c for c in view["selectedColumns"] if c.startswith("params.")] == [f"params.`{p}`" for p in SEARCHED]
    (parallel,) = [c for c in view["compareRunCharts"] if c["type"] == "PARALLEL"]
    assert parallel["selectedParams"] == list(SEARCHED) and parallel["selectedMetrics"] == ["best/val/loss"]


def test_an_experiment_kind_chosen_by_the_user_stays(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = make_client(uri)
    mine = client.create_experiment("mine", artifact_location=str(tmp_path / "a1"))
    client.set_experiment_tag(mine, EXPERIMENT_KIND_TAG, "genai_development")
    bare = client.create_experiment("bare", artifact_location=str(tmp_path / "a2"))
    for name in ("mine", "bare"):
        Tracker(tmp_path / name, uri, experiment=name).experiment_id  # noqa: B018 (finds the experiment)
    assert client.get_experiment(mine).tags[EXPERIMENT_KIND_TAG] == "genai_development"
    assert client.get_experiment(bare).tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING
