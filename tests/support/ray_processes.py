"""The Ray processes tests start, and stopping exactly those, never anyone else's (no `ray stop`).

Two kinds:
- an embedded Ray that a test's `cmx` subprocess starts gets a private temp dir through
  CMX_RAY_TMP (`private_ray_tmp`); every Ray process (GCS, raylet, dashboard, workers) inherits
  the driver's environment, so `kill_ray_started_with` finds them by that variable;
- `LocalRayCluster`: real, separate Ray processes on loopback, a head and worker nodes started with
  `ray start`. Other Ray instances may run on the same machine, so every port is picked free.
  Nodes are stopped by their process ids: a node's raylet and everything it spawned (core
  workers, agents), found through psutil, plus every process that inherited the cluster's tag.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import psutil

from cmx.cluster.runtime import RAY_TMP_ENV
from cmx.core.net import free_port, port_is_free

# ---------------------------------------------------------------- an embedded Ray, by env


def private_ray_tmp() -> str:
    """A fresh, short temp dir for one embedded Ray (Unix socket paths must stay < 107 bytes)."""
    return f"/tmp/cmxt-{uuid.uuid4().hex[:8]}"


def pids_with_env(key: str, value: str) -> list[int]:
    """Processes of this user whose environment holds key=value."""
    needle = f"{key}={value}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if needle in (proc / "environ").read_bytes().split(b"\0"):
                found.append(int(proc.name))
        except OSError:  # gone, or not ours
            continue
    return found


def kill_ray_started_with(tmp: str, timeout: float = 30.0) -> None:
    """SIGKILL every process that inherited CMX_RAY_TMP=tmp, and wait until they are gone."""
    deadline = time.monotonic() + timeout
    while pids := pids_with_env(RAY_TMP_ENV, tmp):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise TimeoutError(f"Ray processes {pids} survived SIGKILL")
        time.sleep(0.2)


# ---------------------------------------------------------------- a multi-node cluster

RAY = str(Path(sys.executable).parent / "ray")
HEAD_IP = "127.0.0.2"  # loopback, but not rewritten by Ray (see LocalRayCluster._start)
# Each node would otherwise claim ~30% of RAM for its object store (docs/architecture.md, Ray core).
OBJECT_STORE_BYTES = 256 * 1024**2


WORKER_PORTS = 200  # per node; enough for the few workers a test node ever runs
# Above Ray's default worker ports (10002-19999, used by any `ray.init()` on this machine).
FIRST_WORKER_PORT = 20_000
NAMED_PORT_FLAGS = (
    "--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port",
)  # fmt: skip


def ephemeral_port_range() -> tuple[int, int]:
    """The kernel's range for ports it picks itself (bind to port 0, outgoing connections)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


TAG_ENV = "CMX_TEST_CLUSTER"  # every process of one LocalRayCluster inherits TAG_ENV=<its temp dir>


def node_env(token_path: Path) -> dict[str, str]:
    """Environment for `ray start` and its clients: quiet, token auth with our own token file,
    and a lost node declared dead in ~3 s instead of ~30 s.

    Ray 2.60 turns token auth on for a head when ~/.ray/auth_token exists, but a node joining
    with `ray start --address` does not: every process gets the mode and the token file explicitly.
    """
    return {
        **os.environ,
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_path),
        TAG_ENV: str(token_path.parent),
        "RAY_health_check_period_ms": "1000",
        "RAY_health_check_timeout_ms": "1000",
        "RAY_health_check_failure_threshold": "3",
    }


@dataclass
class RayNode:
    """One `ray start` node: its ports and, once up, its raylet pid and node id."""

    name: str
    node_manager_port: int
    raylet_pid: int | None = None
    node_id: str | None = None
    resources: dict[str, float] = field(default_factory=dict)

    def pids(self) -> list[int]:
        """The raylet and all its descendants (core workers, agents)."""
        if self.raylet_pid is None:
            return []
        try:
            raylet = psutil.Process(self.raylet_pid)
            return [raylet.pid] + [c.pid for c in raylet.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []


class LocalRayCluster:
    """A Ray head plus worker nodes as separate processes, all on 127.0.0.1, stopped by pid."""

    _worker_bases: ClassVar[set[int]] = set()  # worker-port blocks handed out in this process

    def __init__(self) -> None:
        # Unix socket paths must stay under 107 bytes: a short temp dir of our own.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="cmxc-", dir="/tmp"))
        self.port = free_port()
        self.dashboard_port = free_port()
        self.client_port = free_port()
        self.nodes: list[RayNode] = []
        self.log = self.temp_dir / "ray-start.log"
        self.token_path = self.temp_dir / "auth_token"
        self.token_path.write_text(secrets.token_hex(32))
        self.token_path.chmod(0o600)

    def env(self) -> dict[str, str]:
        """Environment for a process that joins this cluster (driver, `ray job submit`)."""
        return node_env(self.token_path)

    @property
    def address(self) -> str:
        return f"{HEAD_IP}:{self.port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _node_ports(self) -> list[str]:
        named = {flag: free_port() for flag in NAMED_PORT_FLAGS}
        base = self._worker_port_base(set(named.values()))
        return [
            *[str(x) for flag, port in named.items() for x in (flag, port)],
            "--min-worker-port", str(base), "--max-worker-port", str(base + WORKER_PORTS - 1),
            "--object-store-memory", str(OBJECT_STORE_BYTES),
            "--disable-usage-stats",
        ]  # fmt: skip

    def _worker_port_base(self, taken: set[int]) -> int:
        """Start of a private block of WORKER_PORTS worker ports for one node.

        The block lies between Ray's default worker ports and the kernel's ephemeral range
        (free_port() and outgoing connections take ports from that range, so nothing else lands
        in the block later), never overlaps another node's block (of any cluster in this process)
        or this node's named ports, and is free right now.
        """
        low, _ = ephemeral_port_range()
        top = low if low - FIRST_WORKER_PORT >= 20 * WORKER_PORTS else 65_000
        candidates = list(range(FIRST_WORKER_PORT, top - WORKER_PORTS, WORKER_PORTS))
        random.shuffle(candidates)
        for base in candidates:
            block = range(base, base + WORKER_PORTS)
            if base in self._worker_bases or any(p in taken for p in block):
                continue
            if all(port_is_free(p) for p in block):
                self._worker_bases.add(base)
                return base
        raise RuntimeError(f"no free block of {WORKER_PORTS} worker ports in {FIRST_WORKER_PORT}-{top}")

    def _start(self, name: str, args: list[str], resources: dict[str, float]) -> RayNode:
        ports = self._node_ports()
        node = RayNode(name, int(ports[ports.index("--node-manager-port") + 1]), resources=resources)
        env = self.env()
        if "--head" in args:
            # `ray start` swaps the literal 127.0.0.1 (and "localhost") for the machine's routable IP,
            # and GCS binds to the node IP, so the head uses another loopback address. Joining nodes
            # get no --node-ip-address: Ray takes it from their route to the head, 127.0.0.1.
            args = [*args, "--node-ip-address", HEAD_IP]
        cmd = [RAY, "start", *args, *ports, "--num-cpus", str(int(resources.get("CPU", 0)))]
        custom = {k: v for k, v in resources.items() if k not in ("CPU", "GPU")}
        if custom:
            cmd += ["--resources", json.dumps(custom)]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
        with open(self.log, "a") as log:
            log.write(f"$ {' '.join(cmd)}\n{out.stdout}{out.stderr}\n")
        if out.returncode != 0:
            raise RuntimeError(
                f"`ray start` for {name} failed ({out.returncode}):\n{(out.stdout + out.stderr)[-3000:]}"
            )
        node.raylet_pid, node.node_id = self._find_raylet(node.node_manager_port)
        self.nodes.append(node)
        return node

    def start_head(self, resources: dict[str, float] | None = None) -> RayNode:
        """`ray start --head` with no CPUs (trials never land on it), dashboard on 127.0.0.1."""
        return self._start(
            "head",
            [
                "--head", "--port", str(self.port), "--temp-dir", str(self.temp_dir),
                "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                "--dashboard-port", str(self.dashboard_port),
                "--ray-client-server-port", str(self.client_port),
            ],
            resources or {"CPU": 0},
        )  # fmt: skip

    def add_worker(self, name: str, resources: dict[str, float]) -> RayNode:
        """`ray start --address HEAD` with its own CPUs and custom resources."""
        return self._start(name, ["--address", self.address], resources)

    def _find_raylet(self, node_manager_port: int, timeout: float = 30.0) -> tuple[int, str]:
        """(pid, Ray node id) of the raylet listening on `node_manager_port`."""
        flag = f"--node_manager_port={node_manager_port}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for p in psutil.process_iter(["pid", "name", "cmdline"]):
                cmd = p.info["cmdline"] or []
                if cmd and cmd[0].endswith("raylet") and flag in cmd:
                    node_id = next(a.split("=", 1)[1] for a in cmd if a.startswith("--node_id="))
                    return int(p.info["pid"]), node_id
            time.sleep(0.2)
        raise RuntimeError(f"no raylet with {flag}; see {self.log}:\n{self.log.read_text()[-3000:]}")

    def kill_node(self, node: RayNode) -> list[int]:
        """SIGKILL a node's raylet and all its descendants, as if the machine died."""
        pids = node.pids()
        _kill(pids)
        return pids

    def own_pids(self) -> list[int]:
        """Every process of this cluster: the nodes' process trees plus anything that inherited our
        tag (core workers rename themselves `ray::...`, but keep their environment)."""
        pids = {pid for n in self.nodes for pid in n.pids()}
        pids.update(pids_with_env(TAG_ENV, str(self.temp_dir)))
        pids.discard(os.getpid())
        return sorted(pids)

    def shutdown(self) -> None:
        """Stop every process of this cluster by pid (never `ray stop`: it is machine-wide)."""
        for _ in range(3):
            pids = self.own_pids()
            if not pids:
                break
            _kill(pids)
            time.sleep(0.5)
        with contextlib.suppress(OSError):
            subprocess.run(["rm", "-rf", str(self.temp_dir)], check=False, timeout=180)


def _kill(pids: list[int]) -> None:
    procs = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            procs.append(psutil.Process(pid))
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(procs, timeout=10)
