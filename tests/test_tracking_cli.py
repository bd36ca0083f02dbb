"""`cmx train` as an MLflow run, an unreachable server caught up front, `cmx server` / `cmx ui`."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from support.cli import run_cmx, start_cmx
from support.sweeps import base_config, record_sweep, write_spec

from cmx.core import metrics as M
from cmx.core.net import free_port

pytestmark = pytest.mark.timeout(300)


def test_unreachable_server_is_one_clear_line_before_anything_starts(
    tmp_path: Path, fmnist_tiny_paths: dict[str, str]
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    spec = write_spec(tmp_path, fmnist_tiny_paths, name="nowhere", tracking={"enabled": True})
    started = time.monotonic()
    out = run_cmx("sweep", "--space", str(spec), "--tracking-uri", dead, home=tmp_path / "home")
    assert out.returncode == 1, out.stdout + out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: MLflow tracking server") and "unreachable" in lines[0], lines
    assert dead in lines[0] and "Traceback" not in out.stderr
    assert "starting sweep" not in out.stderr and not (tmp_path / "sweeps" / "nowhere").exists()  # Ray never ran
    assert time.monotonic() - started < 60
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(base_config(fmnist_tiny_paths, epochs=1, backend="torchvision")))
    out = run_cmx(
        "train",
        "--config",
        str(config),
        "--tracking-uri",
        dead,
        "--run-dir",
        str(tmp_path / "run"),
        home=tmp_path / "home",
    )
    assert out.returncode == 1 and "unreachable" in out.stderr, out.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing trained


def test_cmx_train_is_an_mlflow_run_of_its_own(tmp_path: Path, fmnist_tiny_paths: dict[str, str]) -> None:
    from mlflow import MlflowClient

    home = tmp_path / "home"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(base_config(fmnist_tiny_paths, epochs=2, backend="torchvision")))
    out = run_cmx("train", "--config", str(config), "--run-dir", str(tmp_path / "run"), "--no-progress", home=home)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    # The default store: sqlite under $CMX_HOME, artifacts beside it (not ./mlruns).
    db = home / "mlflow" / "mlflow.db"
    assert db.is_file() and not (Path.cwd() / "mlruns").exists()
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name("cmx-train")
    assert exp.artifact_location.startswith(str(home / "mlflow" / "artifacts"))
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["cmx.status"] == "completed"
    assert run.info.run_name == "run" and run.data.tags["cmx.role"] == "train"
    assert run.data.params["model.name"] == "convmixer_nano" and "model.num_params" in run.data.params
    assert run.data.tags["cmx.device"] == "cpu" and "cmx.git.commit" in run.data.tags
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, M.VAL_TOP1))
    assert steps == [1, 2]
    assert f"best/{M.VAL_TOP1}" in run.data.metrics
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"checkpoint", "config.yaml", "metrics.jsonl"} <= arts, arts
    listed = run_cmx("runs", "list", home=home, timeout=120)
    assert listed.returncode == 0 and "train" in listed.stdout and run.info.run_id in listed.stdout, listed.stdout


def _listening_on(port: int) -> list[str]:
    """Local addresses (hex, as in /proc/net/tcp{,6}) with a socket listening on `port`."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                    found.append(local.rsplit(":", 1)[0])
    return found


def _serve_and_stop(args: list[str], home: Path, until: str | None = None) -> str:
    """Run `cmx server|ui` until it prints its URL (and then a line with `until`); check it binds
    127.0.0.1 only; Ctrl-C it."""
    port = free_port()
    proc = start_cmx(*args, "--port", str(port), home=home, env={"PYTHONUNBUFFERED": "1"})
    output: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            output.append(line)
            if f"http://127.0.0.1:{port}  (Ctrl-C stops it)" in line:
                break
        else:
            pytest.fail("".join(output))
        for line in proc.stdout if until else []:
            output.append(line)
            if until in line:
                break
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as r:
            assert r.status == 200
        assert _listening_on(port) == ["0100007F"], _listening_on(port)  # 127.0.0.1, nothing else
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 30
    while _listening_on(port) and time.monotonic() < deadline:  # the mlflow child went with it
        time.sleep(0.3)
    assert not _listening_on(port)
    return "".join(output)


@pytest.mark.slow
def test_cmx_server_and_ui_bind_localhost_and_stop(tmp_path: Path) -> None:
    home = tmp_path / "home"
    out = _serve_and_stop(
        [
            "server",
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'team.db'}",
            "--artifact-root",
            str(tmp_path / "art"),
        ],
        home,
    )
    assert "export MLFLOW_TRACKING_URI=http://127.0.0.1:" in out
    assert (tmp_path / "team.db").is_file()
    # `cmx ui` on the default store prints the newest sweep's links, pointing at its own port.
    db = home.resolve() / "mlflow" / "mlflow.db"
    record_sweep(tmp_path / "sweep-state", f"sqlite:///{db}", "uisweep")
    out = _serve_and_stop(["ui"], home, until="best trial:")
    assert f"MLflow UI for sqlite:///{db}" in out
    port = re.search(r"MLflow UI: http://127\.0\.0\.1:(\d+)  \(Ctrl-C", out).group(1)  # type: ignore[union-attr]
    links = re.findall(r"^  (trials|charts|best trial)\b[^:]*:\s+(\S+)$", out, flags=re.M)
    assert [k for k, _ in links] == ["trials", "charts", "best trial"], out
    assert all(url.startswith(f"http://127.0.0.1:{port}/#/experiments/") for _, url in links), out
    assert "MLflow UI for sweep uisweep:" in out and "start the UI with" not in out  # it is started
