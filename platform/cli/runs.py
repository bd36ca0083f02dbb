"""`cmx runs`, `cmx ui`, `cmx server`: read runs back from MLflow and serve its UI.

Thin commands: mlflow is imported inside them (via `cmx.tracking`), so `cmx --help` stays instant.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from cmx.cli.options import tracking_uri_option
from cmx.core import metrics as M
from cmx.core.errors import ConfigError, TrackingError
from cmx.core.net import is_listening
from cmx.core.uris import is_uri


@click.group()
def runs() -> None:
    """MLflow runs of sweeps and training: list, best, compare, replay."""


def _console() -> Any:
    from rich.console import Console

    return Console()


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.4g}"


def _when(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M") if ms else "—"


@runs.command("list")
@click.option("--sweep", metavar="NAME", help="Show the trials of this sweep (its newest run).")
@tracking_uri_option()
def list_command(sweep: str | None, tracking_uri: str | None) -> None:
    """Sweeps and training runs, or one sweep's trials."""
    from rich.table import Table

    from cmx.tracking import query as Q
    from cmx.tracking.store import resolve_uri

    console = _console()
    if sweep is None:
        rows = Q.list_sweeps(tracking_uri)
        if not rows:
            click.echo(f"no runs in {resolve_uri(tracking_uri)} yet")
            return
        table = Table(title=f"runs in {resolve_uri(tracking_uri)}", title_justify="left")
        for col in ("kind", "name", "status", "best", "started", "run id"):
            table.add_column(col, overflow="fold")
        for r in rows:
            best = r.tags.get("cmx.best_value")
            if best is None:
                best = next((_fmt(v) for k, v in r.metrics.items() if k.startswith("best/")), "—")
            table.add_row(r.role, r.name, r.cmx_status, best, _when(r.start_time), r.run_id)
        console.print(table)
        return
    parent, trials = Q.sweep_trials(tracking_uri, sweep)
    metric, mode = Q.objective_of(parent)
    searched = [k.strip() for k in (trials[0].tags.get("cmx.searched", "") if trials else "").split(",") if k.strip()]
    table = Table(
        title=f"sweep {sweep} ({parent.cmx_status}, run {parent.run_id}): trials by best {metric} ({mode})",
        title_justify="left",
    )
    for col in (
        "trial",
        "status",
        "epochs",
        f"best {metric}",
        *[k.split(".")[-1] for k in searched],
        "run id",
    ):
        table.add_column(col, overflow="fold")
    sign = -1 if mode == "max" else 1
    key = f"best/{metric}"
    for t in sorted(trials, key=lambda r: (key not in r.metrics, sign * r.metrics.get(key, 0.0))):
        table.add_row(
            t.tags.get("cmx.trial_id", t.name),
            t.cmx_status,
            t.tags.get("cmx.epochs", "—"),
            _fmt(t.metrics.get(key)),
            *[t.params.get(k, "—") for k in searched],
            t.run_id,
        )
    console.print(table)


@runs.command("best")
@click.option("--sweep", metavar="NAME", help="Sweep name [default: the newest sweep].")
@click.option(
    "--download", "download", type=click.Path(path_type=Path), metavar="DIR",
    help="Also download the trial's checkpoint, config and model here.",
)  # fmt: skip
@tracking_uri_option()
def best_command(sweep: str | None, download: Path | None, tracking_uri: str | None) -> None:
    """The best trial of a sweep: its score, config and registered model."""
    from cmx.tracking import query as Q
    from cmx.tracking import store as T

    parent, trial = Q.best_trial(tracking_uri, sweep)
    metric, mode = Q.objective_of(parent)
    console = _console()
    console.print(
        f"[bold]sweep {parent.tags.get(T.TAG_SWEEP)}[/]: best trial {trial.tags.get(T.TAG_TRIAL, trial.name)} "
        f"with {metric} = {trial.metrics[f'best/{metric}']:.4f} ({mode}) at epoch {trial.tags.get('cmx.best_epoch', '?')}"
    )
    if M.TEST_TOP1 in trial.metrics:
        console.print(
            f"  held-out test: {M.TEST_TOP1} = {trial.metrics[M.TEST_TOP1]:.4f}, "
            f"{M.TEST_TOP5} = {trial.metrics.get(M.TEST_TOP5, float('nan')):.4f} "
            f"({trial.tags.get('cmx.test_samples', '?')} images of {trial.tags.get('cmx.data.test_path', '?')}; "
            "never seen by the search)"
        )
    else:
        console.print(f"  held-out test: not measured (the sweep had no data.test_path); {metric} is the val score")
    searched = [k.strip() for k in trial.tags.get("cmx.searched", "").split(",") if k.strip()]
    for k in searched:
        console.print(f"  {k} = {trial.params.get(k)}")
    console.print(f"  run id: {trial.run_id}")
    confirmed = parent.tags.get("cmx.confirm.winner")
    if confirmed:
        same = "the same trial" if confirmed == trial.tags.get(T.TAG_TRIAL) else "not the search's pick"
        console.print(
            f"  [bold]confirmed winner[/] (top configurations re-trained with new seeds, by the mean): trial "
            f"{confirmed}, {metric} {parent.tags.get(f'cmx.confirm.winner.{metric}', '?')} ({same}; "
            f"the table is the sweep run's artifact confirm/confirm-summary.md)"
        )
    model = trial.tags.get("cmx.registered_model")
    if model:
        console.print(f"  registered model: models:/{model}")
    show_sweep_links(tracking_uri, parent.tags.get(T.TAG_SWEEP))
    if download is not None:
        for path in Q.download_best(tracking_uri, trial, download):
            console.print(f"  downloaded {path}")
        console.print(f"  evaluate it with: cmx eval {download / 'checkpoint'} --data VAL_DATA")


@runs.command("compare")
@click.argument("run_refs", nargs=-1, required=True, metavar="RUN...")
@click.option("--all", "show_all", is_flag=True, help="Also show params that are the same in every run.")
@tracking_uri_option()
def compare_command(run_refs: tuple[str, ...], show_all: bool, tracking_uri: str | None) -> None:
    """Params and final metrics of runs (ids or names) side by side; differences highlighted."""
    from rich.table import Table

    from cmx.tracking.query import get_runs

    rows = get_runs(tracking_uri, list(run_refs))
    table = Table(title="runs compared (differences in yellow; best metric in green)", title_justify="left")
    table.add_column("")
    for r in rows:
        table.add_column(f"{r.name}\n{r.run_id[:8]}", overflow="fold")
    table.add_row("status", *[r.cmx_status for r in rows], end_section=True)
    keys = sorted(set().union(*(r.params for r in rows)))
    same = 0
    for k in keys:
        values = [r.params.get(k, "—") for r in rows]
        differs = len(set(values)) > 1
        if not differs:
            same += 1
            if not show_all:
                continue
        style = "bold yellow" if differs else "dim"
        table.add_row(f"[{style}]{k}[/]", *[f"[{style}]{v}[/]" for v in values])
    table.add_section()
    for k in sorted(set().union(*(r.metrics for r in rows))):
        scores = [r.metrics.get(k) for r in rows]
        known = [v for v in scores if v is not None]
        mode = M.MODES.get(k.removeprefix("best/").removeprefix("sweep/best/"))
        best = (max(known) if mode == "max" else min(known)) if known and mode and len(rows) > 1 else None
        cells = [("[bold green]" + _fmt(v) + "[/]") if v is not None and v == best else _fmt(v) for v in scores]
        table.add_row(k, *cells)
    console = _console()
    console.print(table)
    if same and not show_all:
        console.print(f"{same} params are the same in every run (--all shows them)")


@runs.command("replay")
@click.argument("directory", type=click.Path(path_type=Path, exists=True, file_okay=False), metavar="DIR")
@tracking_uri_option()
def replay_command(directory: Path, tracking_uri: str | None) -> None:
    """Deliver MLflow calls journaled while the server was unreachable (sweep or run directory)."""
    from cmx.tracking.tracker import replay

    done, left = replay(directory, tracking_uri)
    if left:
        raise TrackingError(f"delivered {done} call(s); {left} still pending in {directory}", "is the server up?")
    click.echo(f"delivered {done} journaled call(s); nothing pending in {directory}")


def sweep_links_lines(links: Any, serving: bool = False) -> list[str]:
    """A sweep's MLflow UI links (a `cmx.tracking.ui_links.SweepLinks`) as lines to print;
    `serving`: printed by `cmx ui` itself."""
    where = " (start the UI with: cmx ui)" if links.local and not serving else ""
    lines = [
        f"MLflow UI for sweep {links.sweep}{where}:",
        f"  trials (objective, searched params): {links.runs}",
        f"  charts (objective vs params):        {links.charts}",
    ]
    if links.best:
        lines.append(f"  best trial:                          {links.best}")
    return lines


def show_sweep_links(tracking_uri: str | None, sweep: str | None, local_ui: str | None = None) -> None:
    """Print a sweep's MLflow UI links; a store that cannot give them costs one dim line, never an error."""
    from cmx.tracking import ui_links
    from cmx.tracking.store import resolve_uri

    try:
        links = ui_links.sweep_links(resolve_uri(tracking_uri), sweep, local_ui)
    except (TrackingError, ConfigError) as e:
        click.secho(f"no MLflow UI links: {e.one_line()}", dim=True)
        return
    # click.echo, not rich: rich would wrap a long URL over several lines.
    for line in sweep_links_lines(links):
        click.echo(line)


def _serve(cmd: list[str], env: dict[str, str], url: str, what: str, then: list[str] | None = None) -> None:
    """Run an `mlflow server` child, print its URL once healthy (then `then`), stop it on Ctrl-C."""
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        if not wait_healthy(url, proc):
            raise TrackingError(f"{what} did not start (exit code {proc.poll()})", "see its output above")
        click.secho(f"{what}: {url}  (Ctrl-C stops it)", bold=True)
        for line in then or []:
            click.echo(line)
        proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


@click.command("ui")
@tracking_uri_option()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind.")
@click.option("--port", type=int, default=5000, show_default=True, envvar="CMX_UI_PORT")
@click.option("--sweep", metavar="NAME", help="Print links to this sweep's trials [default: the newest sweep].")
def ui(tracking_uri: str | None, host: str, port: int, sweep: str | None) -> None:
    """Start the MLflow UI on the configured store; print its URL and the sweep's links."""
    from cmx.tracking import store as T
    from cmx.tracking import ui_links

    uri = T.check_tracking_reachable(tracking_uri)
    url = f"http://{host}:{port}"
    links: list[str] = []
    try:  # before the server starts: writing the sweep's view to a local store needs no server
        links = sweep_links_lines(ui_links.sweep_links(uri, sweep, local_ui=url), serving=True)
    except TrackingError as e:
        if sweep:  # asked for by name: say why there are no links
            raise
        links = [f"no sweep to link to yet ({e.message})"]
    if T.is_server_uri(uri):
        click.echo(f"the store is a tracking server; its UI is at {uri}")
        for line in links:
            click.echo(line)
        return
    if is_listening(host, port):
        raise TrackingError(f"port {port} on {host} is in use", "pass --port N")
    cmd, env = ui_command(uri, host, port)
    click.echo(f"MLflow UI for {uri} (starting, ~10-30 s)...")
    _serve(cmd, env, url, "MLflow UI", then=links)


@click.command("server")
@click.option(
    "--backend-store-uri", envvar="CMX_MLFLOW_BACKEND_URI", metavar="URI",
    help="sqlite:///path.db or a database URI (postgresql://...) [default: sqlite under $CMX_HOME/mlflow].",
)  # fmt: skip
@click.option(
    "--artifact-root", envvar="CMX_MLFLOW_ARTIFACT_ROOT", metavar="DIR|URI",
    help="Where artifacts are stored; clients upload through the server [default: $CMX_HOME/mlflow/artifacts].",
)  # fmt: skip
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind (0.0.0.0: every one).")
@click.option("--port", type=int, default=5000, show_default=True)
@click.option("--workers", type=int, default=1, show_default=True, help="Server worker processes.")
@click.option("--allowed-hosts", metavar="LIST", help="Host headers to accept when binding beyond 127.0.0.1.")
def server(
    backend_store_uri: str | None,
    artifact_root: str | None,
    host: str,
    port: int,
    workers: int,
    allowed_hosts: str | None,
) -> None:
    """Start a real MLflow tracking server (for a team or a cluster head node)."""
    from cmx.tracking import store as T

    if host not in LOOPBACK and not allowed_hosts:
        # MLflow answers 403 to every Host header but localhost's unless told which to accept: the
        # URL printed below would not work, and binding everywhere needs a deliberate choice.
        raise ConfigError(
            f"--host {host} binds beyond this machine but no --allowed-hosts was given (MLflow would refuse "
            "every other Host with 403)",
            f"add --allowed-hosts {socket_name(host)}:{port},localhost:{port} (the names clients use), or drop --host",
        )
    # Not resolve_uri(): MLFLOW_TRACKING_URI may name this very server.
    backend = backend_store_uri or f"sqlite:///{T.local_store_dir() / 'mlflow.db'}"
    if backend.startswith("sqlite:///"):
        db = T.sqlite_path(backend)
        assert db is not None
        db.parent.mkdir(parents=True, exist_ok=True)
    root = artifact_root or str(T.local_store_dir() / "artifacts")
    if not is_uri(root):
        Path(root).expanduser().mkdir(parents=True, exist_ok=True)
    if is_listening("127.0.0.1" if host == "0.0.0.0" else host, port):
        raise TrackingError(f"port {port} is in use", "pass --port N")
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", backend,
        # Proxied artifacts: clients upload through the server (mlflow-artifacts:/), so nodes
        # need no access to the artifact store themselves.
        "--serve-artifacts", "--artifacts-destination", root,
        "--host", host, "--port", str(port), "--workers", str(workers),
    ]  # fmt: skip
    if allowed_hosts:
        cmd += ["--allowed-hosts", allowed_hosts]
    shown = "127.0.0.1" if host in ("127.0.0.1", "0.0.0.0") else host
    url = f"http://{shown}:{port}"
    click.echo(f"MLflow server: backend {backend}, artifacts {root} (starting, ~10-30 s)...")
    click.echo(f"point cmx at it with: export MLFLOW_TRACKING_URI=http://{socket_name(host)}:{port}")
    _serve(cmd, server_env(), url, "MLflow server")


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def socket_name(host: str) -> str:
    """The address other machines use for a server bound to `host`."""
    if host in ("0.0.0.0", "::"):
        return socket.gethostname()
    return host


# ---------------------------------------------------------------- `mlflow server` child processes


def ui_command(uri: str, host: str, port: int) -> tuple[list[str], dict[str, str]]:
    """The `mlflow server` command line (and environment) that serves a local store's UI."""
    from cmx.tracking.store import artifact_root, local_store_dir

    root = artifact_root(uri) or str(local_store_dir() / "artifacts")
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", uri,
        "--default-artifact-root", root,
        "--host", host,
        "--port", str(port),
        "--workers", "1",
    ]  # fmt: skip
    return cmd, server_env()


def server_env() -> dict[str, str]:
    """Environment for an `mlflow server` child: no job runner, no telemetry.

    `--workers 1` without the job runner is healthy in ~9 s at ~560 MB, against 18 s / 1.4 GB
    with the defaults (2-core machine; docs/architecture.md, MLflow).
    """
    return {
        **os.environ,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }


def wait_healthy(url: str, proc: Any, timeout: float = 180.0) -> bool:
    """Poll `url/health` until it answers or the process exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=2) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.3)
    return False
