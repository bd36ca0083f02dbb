"""`cmx train --from-run RUN_ID`: a tracked run re-created from MLflow alone, its data checked
against the fingerprints it logged, its per-epoch metrics reproduced exactly in deterministic mode."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.cli import run_cmx
from support.sweeps import base_config, write_spec

from cmx.core.config import TrainConfig, validate_config
from cmx.tracking.provenance import flatten
from cmx.tracking.reproduce import REPRODUCIBLE, params_to_config

pytestmark = pytest.mark.timeout(600)


def _client(uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _history(client: Any, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """Every reproducible metric of a run: (epoch, value) pairs in epoch order."""
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key)) for key in REPRODUCIBLE}


def _train_runs(client: Any) -> list[Any]:
    exp = client.get_experiment_by_name("cmx-train")
    return client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


def _ok(out: subprocess.CompletedProcess[str]) -> str:
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def _one_line_error(out: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert out.returncode != 0 and len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    return lines[0]


def _copy_data(data: dict[str, str], dest: Path, backend: str) -> dict[str, str]:
    """The two splits of the tiny export copied under `dest` (a .beton with its class-names sidecar)."""
    dest.mkdir(parents=True)
    out = {}
    for split in ("train", "val"):
        src = Path(data[f"{split}_beton" if backend == "ffcv" else f"{split}_dir"])
        if src.is_dir():
            shutil.copytree(src, dest / src.name)
        else:
            for f in (src, src.with_name(src.name + ".json")):
                if f.is_file():
                    shutil.copy2(f, dest / f.name)
        out[split] = str(dest / src.name)
    return out


def _run_deterministic_sweep(path: Path, **base: Any) -> Any:
    """Run the sweep file `path` with deterministic trials and the `base` sections given; the loop's
    thread count is left to the trial (it sets it from resources.cpus; its config.yaml must say so)."""
    from cmx.core.sweep_spec import load_sweep_spec
    from cmx.sweep.tuner import run_sweep

    spec = yaml.safe_load(path.read_text())
    spec["base"]["loop"]["deterministic"] = True
    del spec["base"]["loop"]["threads"]
    spec["base"].update(base)
    path.write_text(yaml.safe_dump(spec))
    return run_sweep(load_sweep_spec(path), source_text=path.read_text())


def _reproduction_of(client: Any, rid: str) -> Any:
    """The one `cmx train --from-run` run that re-created run `rid`."""
    (again,) = client.search_runs(
        [client.get_experiment_by_name("cmx-train").experiment_id], filter_string=f"tags.`cmx.reproduces` = '{rid}'"
    )
    return again


@pytest.mark.parametrize("backend", ["torchvision", "ffcv"])
def test_train_run_reproduced_from_mlflow_alone(
    tmp_path: Path, fmnist_tiny_paths: dict[str, str], backend: str
) -> None:
    home = tmp_path / "home"
    uri = f"sqlite:///{home / 'mlflow' / 'mlflow.db'}"
    data = _copy_data(fmnist_tiny_paths, tmp_path / "data", backend)
    config = base_config(fmnist_tiny_paths, epochs=2, backend=backend)
    config["data"].update(train_path=data["train"], val_path=data["val"])
    config["loop"]["deterministic"] = True
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    _ok(run_cmx("train", "-c", str(path), "--run-dir", str(tmp_path / "first"), "--no-progress", home=home))
    client = _client(uri)
    (original,) = _train_runs(client)
    rid = original.info.run_id

    # The data moved: the logged paths are gone, and a changed copy is refused by its fingerprint.
    (tmp_path / "data").rename(tmp_path / "moved")
    moved = {split: p.replace(str(tmp_path / "data"), str(tmp_path / "moved")) for split, p in data.items()}
    line = _one_line_error(run_cmx("train", "--from-run", rid, "--no-progress", home=home, timeout=120))
    assert f"data.train_path {data['train']}: missing" in line and "--set data.train_path=" in line, line
    changed = tmp_path / "changed"
    shutil.copytree(tmp_path / "moved", changed)
    val = Path(moved["val"].replace(str(tmp_path / "moved"), str(changed)))
    if val.is_dir():
        victim = next(p for p in sorted(val.rglob("*")) if p.is_file())
        victim.unlink()
    else:
        with open(val, "ab") as f:
            f.write(b"\0" * 1024)
    logged = original.data.tags["cmx.data.val_fingerprint"]
    line = _one_line_error(run_cmx(
        "train", "--from-run", rid, "--set", f"data.train_path={moved['train']}", "--set", f"data.val_path={val}",
        "--no-progress", home=home, timeout=120,
    ))  # fmt: skip
    assert f"data.val_path {val}: fingerprint " in line and logged in line and "--set data.val_path=" in line, line
    assert len(_train_runs(client)) == 1  # refused before a run was created

    out = _ok(run_cmx(
        "train", "--from-run", rid, "--set", f"data.train_path={moved['train']}", "--set", f"data.val_path={moved['val']}",
        "--run-dir", str(tmp_path / "second"), "--no-progress", home=home,
    ))  # fmt: skip
    assert f"reproduced exactly run {rid}: all 10 values" in out, out[-3000:]
    first, second = _train_runs(client)
    assert second.data.tags["cmx.reproduces"] == rid and second.data.tags["cmx.reproduction"].startswith("exact")
    want, got = _history(client, rid), _history(client, second.info.run_id)
    assert all(len(want[k]) == 2 for k in REPRODUCIBLE), want
    assert got == want  # every epoch of every metric, bit for bit
    params = {k: v for k, v in second.data.params.items() if not k.startswith("data.") or not k.endswith("_path")}
    assert params == {k: v for k, v in first.data.params.items() if k in params}
    assert second.data.params["data.val_path"] == moved["val"]


def test_sweep_trial_reproduced_from_its_run_id(
    tmp_path: Path, fmnist_tiny_paths: dict[str, str], ray_local: None
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    path = write_spec(tmp_path, fmnist_tiny_paths, name="repro", epochs=2, samples=1, backend="torchvision",
                      tracking={"enabled": True, "uri": uri})  # fmt: skip
    outcome = _run_deterministic_sweep(path)
    assert len(outcome.trials) == 1 and not outcome.interrupted
    client = _client(uri)
    (trial,) = client.search_runs(
        [client.get_experiment_by_name("repro").experiment_id], filter_string="tags.`cmx.role` = 'trial'"
    )
    rid = trial.info.run_id
    out = _ok(run_cmx("train", "--from-run", rid, "--tracking-uri", uri, "--run-dir", str(tmp_path / "again"),
                      "--no-progress", home=tmp_path / "home"))  # fmt: skip
    assert f"from run {rid} (trial " in out and "config.yaml artifact" in out, out[-3000:]
    assert f"reproduced exactly run {rid}" in out, out[-3000:]
    again = _reproduction_of(client, rid)
    want = _history(client, rid)
    assert all(len(v) == 2 for v in want.values()) and _history(client, again.info.run_id) == want
    # The trial's searched values and its thread count are in the re-created config.
    for key in ("optim.lr", "model.dim", "model.kernel_size", "loop.threads"):
        assert again.data.params[key] == trial.data.params[key], key
    assert again.data.params["loop.threads"] == "1"


def test_trial_stopped_by_asha_reproduced_where_it_stopped(
    tmp_path: Path, fmnist_tiny_paths: dict[str, str], ray_local: None
) -> None:
    """An FFCV trial that ASHA cut after epoch 1 of 3 is re-created up to epoch 1, its schedule
    still spanning 3 epochs, and matches exactly; --full-budget trains all 3."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    good = {"model.dim": 16, "optim.lr": 0.02, "model.kernel_size": 3}
    poor = {"model.dim": 8, "optim.lr": 1e-4, "model.kernel_size": 3}  # barely moves in one epoch
    path = write_spec(
        tmp_path, fmnist_tiny_paths, name="cut", epochs=3, samples=2, tracking={"enabled": True, "uri": uri},
        search={"points_to_evaluate": [good, poor], "max_concurrent": 1},  # poor meets good's rung-1 score
    )  # fmt: skip
    outcome = _run_deterministic_sweep(path, schedule={"name": "cosine"})  # epoch 1's lr depends on the span
    assert [t.status for t in outcome.trials] == ["completed", "stopped early"], outcome.trials
    client = _client(uri)
    (cut,) = client.search_runs(
        [client.get_experiment_by_name("cut").experiment_id], filter_string="tags.`cmx.status` = 'stopped_early'"
    )
    rid, home = cut.info.run_id, tmp_path / "home"
    out = _ok(run_cmx("train", "--from-run", rid, "--tracking-uri", uri, "--run-dir", str(tmp_path / "again"),
                      "--no-progress", home=home))  # fmt: skip
    assert "stopped by its sweep's scheduler after epoch 1 of 3" in out, out[-3000:]
    assert f"reproduced exactly run {rid}: all 5 values" in out and "stopped after epoch 1 of 3" in out, out[-3000:]
    again = _reproduction_of(client, rid)
    assert _history(client, again.info.run_id) == _history(client, rid)
    assert again.data.tags["cmx.status"] == "stopped_early" and again.data.params["loop.epochs"] == "3"
    full = _ok(run_cmx("train", "--from-run", rid, "--full-budget", "--no-tracking", "--tracking-uri", uri,
                       "--run-dir", str(tmp_path / "full"), "--no-progress", home=home))  # fmt: skip
    assert f"differs from run {rid}: all 5 values" in full and "only this run has epochs 2, 3" in full, full[-3000:]
    assert "completed 3 epochs" in full
    bad = run_cmx("train", "--full-budget", "--no-tracking", home=home, timeout=120)
    assert bad.returncode == 2 and "--full-budget goes with --from-run" in bad.stderr, bad.stderr


def test_unknown_run_and_wrong_role_are_one_line_errors(tmp_path: Path) -> None:
    from cmx.tracking.tracker import Tracker

    uri, home = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "home"
    t = Tracker(tmp_path / "state", uri, experiment="s")
    t.start_run("sweep", name="s", tags={"cmx.role": "sweep"})
    t.start_run("bare", name="b", parent="sweep", tags={"cmx.role": "confirm"})  # a re-run that logged no config
    t.flush(force=True)
    sweep_id, bare_id = t.run_id("sweep"), t.run_id("bare")
    line = _one_line_error(
        run_cmx("train", "--from-run", "0123456789abcdef", "--tracking-uri", uri, home=home, timeout=120)
    )
    assert "no run with id '0123456789abcdef'" in line and "cmx runs list" in line, line
    line = _one_line_error(run_cmx("train", "--from-run", str(sweep_id), "--tracking-uri", uri, home=home, timeout=120))
    assert f"run {sweep_id} is a sweep run" in line and "trials" in line, line
    line = _one_line_error(run_cmx("train", "--from-run", str(bare_id), "--tracking-uri", uri, home=home, timeout=120))
    assert f"run {bare_id} logged neither a config.yaml artifact nor its full config" in line, line
    out = run_cmx("train", "--from-run", str(sweep_id), "-c", "x.yaml", "--tracking-uri", uri, home=home, timeout=120)
    assert out.returncode == 2 and "--from-run uses the run's logged config" in out.stderr, out.stderr


def test_config_rebuilt_from_params_when_no_artifact() -> None:
    """Older runs without config.yaml: the flattened params invert to the same config."""
    config = validate_config(
        TrainConfig,
        {
            "name": "old",
            "data": {"backend": "torchvision", "train_path": "/d/train", "mean": [0.1, 0.2, 0.3], "limit": 7},
            "model": {"name": "convmixer_nano", "kernel_size": [3, [5, 7]], "drop_rate": 0.1},
            "schedule": {"milestones": [0.0, 0.5, 1.0], "values": [0.0, 1.0, 0.0]},
            "loop": {"deterministic": True, "ema_decay": 0.99},
        },
        "test",
    )
    params = {**flatten(config.model_dump(mode="json")), "model.num_params": "123", "model.flops": "456"}
    rebuilt = validate_config(TrainConfig, params_to_config(params), "params")
    assert rebuilt == config
    assert rebuilt.data.val_path is None and rebuilt.data.progressive is None
