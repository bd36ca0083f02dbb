"""`cmx cluster`: check a Ray cluster-launcher file, start it with its own token, submit jobs to it."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import click

from cmx.cluster.check import ClusterReport, Problem, check_cluster_file
from cmx.cluster.tokens import ClusterToken, cluster_token, ensure_cluster_token
from cmx.core.errors import ConfigError
from cmx.core.net import free_port

CLUSTER_FILE = click.Path(path_type=Path, exists=True, dir_okay=False)


@click.group()
def cluster() -> None:
    """Ray cluster files (cluster/config.yaml for AWS, cluster/local.yaml on-prem)."""


def _exit_on_problems(file: Path, report: ClusterReport, *, placeholders: bool, security: bool) -> None:
    """Print one line per problem (unfilled placeholders and security rules when asked), exit 2 if any."""
    problems = list(report.problems)
    if placeholders and report.placeholders:
        problems.append(Problem("placeholders", f"still to fill: {', '.join(report.placeholders)}",
                                "replace every <PLACEHOLDER> with your value"))  # fmt: skip
    if security:
        problems.extend(report.security)
    for p in problems:
        click.secho(f"error: {p.line(str(file))}", err=True, fg="red")
    if problems:
        click.echo(f"{file}: {len(problems)} problem(s)", err=True)
        sys.exit(2)


@cluster.command("check")
@click.argument("file", type=click.Path(path_type=Path, exists=True, dir_okay=False), metavar="FILE")
@click.option(
    "--space",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    metavar="FILE",
    help="Sweep file whose resources, storage and tracking to check (default: metadata.cmx.space).",
)
@click.option("--strict", is_flag=True, help="Unfilled <PLACEHOLDERS> are errors (use before `ray up`).")
def check_command(file: Path, space: Path | None, strict: bool) -> None:
    """Validate FILE with Ray's cluster schema plus cmx's rules; one line per problem, exit 2 if any."""

    report = check_cluster_file(file, space)
    _exit_on_problems(file, report, placeholders=strict, security=strict)
    click.secho(f"ok: {file} passes Ray's cluster schema and cmx's rules", fg="green")
    for line in report.summary:
        click.echo(f"  {line}")
    for p in report.security:
        click.secho(f"  warning: {p.line(str(file))} (an error with --strict)", fg="yellow")
    for note in report.notes:
        click.echo(f"  note: {note}")
    if report.placeholders:
        click.echo(f"  note: placeholders still to fill: {', '.join(report.placeholders)}")


def _ray_cli() -> str:
    """The `ray` executable next to this Python (the venv's), else the one on PATH."""
    here = Path(sys.executable).parent / "ray"
    found = str(here) if here.exists() else shutil.which("ray")
    if not found:
        raise ConfigError("`ray` is not installed here", "activate cmx's venv (`source .venv/bin/activate`)")
    return found


def _existing_token(file: Path) -> ClusterToken:
    token = cluster_token(file)
    if not token.exists():
        raise ConfigError(
            f"{file}: no Ray token for cluster {token.cluster_name!r} at {token.path}",
            f"start the cluster with `cmx cluster up {file}` (it creates the token)",
        )
    return token


@cluster.command("up", context_settings={"ignore_unknown_options": True})
@click.argument("file", type=CLUSTER_FILE, metavar="FILE")
@click.argument("ray_up_args", nargs=-1, type=click.UNPROCESSED)
def up_command(file: Path, ray_up_args: tuple[str, ...]) -> None:
    """Check FILE, make its cluster's Ray token if missing, then `ray up FILE -y [RAY_UP_ARGS]`.

    The token (~/.cmx/clusters/<cluster_name>/ray_auth_token, mode 600) is this cluster's alone;
    FILE's file_mounts ship it to every node. It is never printed. Run from the repo root."""
    _exit_on_problems(file, check_cluster_file(file), placeholders=True, security=False)
    token = ensure_cluster_token(file)
    click.echo(f"cluster {token.cluster_name}: Ray token at {token.path} (mode 600)")
    sys.stdout.flush()
    os.execv(_ray_cli(), ["ray", "up", str(file), "-y", *ray_up_args])


@cluster.command("env")
@click.argument("file", type=CLUSTER_FILE, metavar="FILE")
def env_command(file: Path) -> None:
    """Print the shell exports that let Ray's clients on this laptop reach FILE's cluster:
    `eval "$(cmx cluster env FILE)"`. Names the token file; never prints the token."""
    for key, value in _existing_token(file).client_env().items():
        click.echo(f"export {key}={value}")


def _wait_for_http(url: str, tunnel: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if tunnel.poll() is not None:
            raise ConfigError(
                f"`ray dashboard` exited ({tunnel.returncode}) before the tunnel opened",
                "check that the head is up (`ray exec FILE 'ray status'`) and the local port is free",
            )
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return  # the dashboard answered (401 without a token): the tunnel works
        except OSError:
            time.sleep(0.5)
    raise ConfigError(f"no answer from the dashboard tunnel at {url} within {timeout_s:.0f} s",
                      "check the head's dashboard (`ray exec FILE 'ray status'`)")  # fmt: skip


def submit_job(file: Path, command: Sequence[str], port: int | None, job_args: Sequence[str], timeout_s: float) -> int:
    """`ray job submit` through a `ray dashboard` SSH tunnel, with the cluster's token; the exit status."""
    token = _existing_token(file)
    ray = _ray_cli()
    port = port or free_port()
    tunnel = subprocess.Popen(
        [ray, "dashboard", str(file), "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        address = f"http://127.0.0.1:{port}"
        _wait_for_http(address + "/api/version", tunnel, timeout_s)
        env = {**os.environ, **token.client_env()}
        return subprocess.call([ray, "job", "submit", "--address", address, *job_args, "--", *command], env=env)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(tunnel.pid, signal.SIGTERM)
        try:
            tunnel.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(tunnel.pid, signal.SIGKILL)
            tunnel.wait()


@cluster.command("submit", context_settings={"ignore_unknown_options": True})
@click.argument("file", type=CLUSTER_FILE, metavar="FILE")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("--port", type=int, default=None, help="Local end of the dashboard tunnel (default: a free port).")
@click.option("--job-arg", "job_args", multiple=True, metavar="ARG",
              help="Passed to `ray job submit` (repeat: --job-arg=--no-wait).")  # fmt: skip
@click.option("--timeout", "timeout_s", type=float, default=120.0, show_default=True,
              help="Seconds to wait for the tunnel.")  # fmt: skip
def submit_command(file: Path, command: tuple[str, ...], port: int | None, job_args: tuple[str, ...],
                   timeout_s: float) -> None:  # fmt: skip
    """Run COMMAND on FILE's cluster as a Ray job, from this laptop: `cmx cluster submit FILE -- cmx sweep
    --space s.yaml --address auto`. Opens `ray dashboard`'s SSH tunnel, authenticates with the cluster's
    token, streams the job's output, closes the tunnel; exits with the job's status."""
    sys.exit(submit_job(file, command, port, job_args, timeout_s))
