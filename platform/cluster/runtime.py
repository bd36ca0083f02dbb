"""Starting or joining Ray, and checking what its nodes can hold. Ray core calls live here."""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cmx.core.errors import ClusterError
from cmx.core.files import file_lock
from cmx.core.net import free_port

# Unix socket paths must stay under 107 bytes, so Ray's temp dir is kept short. CMX_RAY_TMP
# moves it (tests give each embedded Ray its own, so they can stop exactly that one).
RAY_TMP_ENV = "CMX_RAY_TMP"


def ray_tmp() -> Path:
    """Temp dir of the embedded local Ray."""
    return Path(os.environ.get(RAY_TMP_ENV) or Path(tempfile.gettempdir()) / f"cmxray-{os.getuid()}")


DASHBOARD_PORT = 8265  # Ray's default; another local Ray on this machine may hold it
# Each local Ray node would otherwise claim ~30% of RAM for its object store; trials pass only
# small results and checkpoints through it (measured: < 50 MB per sweep here).
OBJECT_STORE_BYTES = 512 * 1024**2


@dataclass(frozen=True)
class NodeCapacity:
    """Resources of one alive Ray node."""

    node_id: str
    address: str
    cpus: float
    gpus: float


def quiet_ray_env() -> None:
    """Environment every Ray process of ours gets: no usage stats, deduplicated logs off."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    # Ray Train gives a worker group 60 s to start; importing torch in N fresh workers on a busy
    # node takes longer, and the trial would fail for nothing.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")
    # The legacy output engine honours RunConfig(verbose=0); cmx prints its own progress line.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Tune warns on every snapshot when trials checkpoint each epoch (a few seconds apart here).
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")


def init_ray(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    dashboard: bool = True,
    log_to_driver: bool = False,
) -> None:
    """Start an embedded local Ray (address None) or join a running cluster (`auto`, `HOST:PORT`).

    The dashboard (on by default) serves Ray's state API and job submission; a sweep runs without
    it (`WorkerGroupRelease` frees stopped data-parallel trials' workers; docs/architecture.md, Ray Train).
    """
    import ray

    quiet_ray_env()
    if ray.is_initialized():
        return
    # Trial stdout stays in each trial's log files; errors still reach the driver's summary.
    kwargs: dict = {"log_to_driver": log_to_driver, "logging_level": "ERROR"}
    if address is None:
        tmp = ray_tmp()
        tmp.mkdir(parents=True, exist_ok=True)
        kwargs.update(
            address="local",
            num_cpus=num_cpus or os.cpu_count() or 1,
            object_store_memory=OBJECT_STORE_BYTES,
            include_dashboard=dashboard,
            dashboard_host="127.0.0.1",
            _temp_dir=str(tmp),
        )
    else:
        kwargs["address"] = address
    try:
        with local_start_lock() if address is None else contextlib.nullcontext():
            if address is None:
                kwargs["dashboard_port"] = dashboard_port() if dashboard else None
            ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ClusterError(
            f"cannot reach a Ray cluster at {address!r}: {first}",
            "start one with `ray up cluster/config.yaml` (or `ray start --head`), or drop --address to run locally",
        ) from None


def local_start_lock() -> contextlib.AbstractContextManager[None]:
    """One local Ray start at a time on this machine: between `dashboard_port` finding the dashboard
    port free and Ray binding it, another cmx starting at the same moment would take it too."""

    return file_lock(Path(tempfile.gettempdir()) / f"cmx-ray-start-{os.getuid()}.lock")


def dashboard_port(host: str = "127.0.0.1") -> int:
    """Ray's default dashboard port if nothing holds it, else a free port the OS picks.

    Ray gives up on its dashboard when the port is taken (a second local sweep on one machine),
    and with it on Ray's state API and job submission.
    """
    try:
        return free_port(host, preferred=DASHBOARD_PORT)
    except OSError:
        raise ClusterError(f"no free TCP port on {host} for the Ray dashboard") from None


def shutdown_ray() -> None:
    """Disconnect (and stop the embedded instance, if we started one)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


def alive_nodes() -> list[NodeCapacity]:
    """Capacity of every alive node in the connected cluster."""
    import ray

    nodes = []
    for n in ray.nodes():
        if not n.get("Alive"):
            continue
        res = n.get("Resources", {})
        nodes.append(
            NodeCapacity(
                node_id=n["NodeID"],
                address=n.get("NodeManagerAddress", "?"),
                cpus=float(res.get("CPU", 0)),
                gpus=float(res.get("GPU", 0)),
            )
        )
    return nodes


def local_capacity() -> NodeCapacity:
    """This machine, as an embedded Ray would see it (no Ray start)."""
    gpus = 0.0
    try:
        import torch

        gpus = float(torch.cuda.device_count())
    except Exception:  # torch without CUDA support
        gpus = 0.0
    return NodeCapacity("local", "127.0.0.1", float(os.cpu_count() or 1), gpus)
