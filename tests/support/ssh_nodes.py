"""Machines for the real `ray up` test: "nodes" on this machine, each an SSH server in namespaces of
its own, and a "laptop" (the test process) that reaches them over a private bridge.

A node is `unshare --net --mount --pid --uts --fork --mount-proc --kill-child` around a small init
script (NODE_INIT), which, inside its namespaces:
- mounts the node's own home over the SSH user's home (root here: /root), a private /tmp (so its
  own /tmp/ray), /var/tmp and /dev/shm, and the test's shared directory at /mnt/cmx-shared (the
  NFS mount of cluster/local.yaml);
- brings up its end of a veth pair with a private 10.x address on the test's bridge;
- runs sshd on that address, key login only.

Its processes see only the node's PID namespace (`ray stop` on a node stops that node's Ray only);
SIGKILL of the namespace's init (the unshare child) ends every process in it, after which the
network namespace, its veth and its mounts are gone. Run as root (the CI container is).
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

SSHD = "/usr/sbin/sshd"
SHARED_MOUNT = Path("/mnt/cmx-shared")  # the NFS mount point cluster/local.yaml expects
TOOLS = ("unshare", "ip", "rsync", "ssh", "ssh-keygen", "sudo", SSHD)

NODE_INIT = r"""
set -euo pipefail
home=$1 shared=$2 ip=$3 iface=$4 name=$5 gateway=$6; shift 6
mount --make-rprivate /
# Directories of the real home the node must keep (the Python the venvs are built on).
for keep in "$@"; do
  mkdir -p "$home/${keep#"$HOME"/}"
  mount --bind "$keep" "$home/${keep#"$HOME"/}"
done
# Paths under /tmp the node must still see (a checkout and its venv under /tmp): bound into the
# node's home before its private /tmp hides them, then bound back at their own path.
IFS=: read -ra tmp_keep <<< "${CMX_NODE_TMP_KEEP:-}"
for i in "${!tmp_keep[@]}"; do
  mkdir -p "$home/.tmp-keep/$i"
  mount --bind "${tmp_keep[$i]}" "$home/.tmp-keep/$i"
done
mount --rbind "$home" "$HOME"
mount --bind "$shared" /mnt/cmx-shared
mount -t tmpfs -o mode=1777,size=2g tmpfs /tmp
for i in "${!tmp_keep[@]}"; do
  mkdir -p "${tmp_keep[$i]}"
  mount --bind "$HOME/.tmp-keep/$i" "${tmp_keep[$i]}"
done
mount -t tmpfs -o mode=1777,size=512m tmpfs /var/tmp
mount -t tmpfs -o mode=1777,size=1g tmpfs /dev/shm
hostname "$name"
ip link set lo up
# Sockets orphaned when the node is killed hold its network namespace until they time out: short.
sysctl -qw net.ipv4.tcp_orphan_retries=1 net.ipv4.tcp_fin_timeout=2 || true
for _ in $(seq 1 100); do ip link show "$iface" >/dev/null 2>&1 && break; sleep 0.1; done
ip link set "$iface" name eth0
ip addr add "$ip/24" dev eth0
ip link set eth0 up
# A default route, as a lab machine has: Ray finds its node address by the route to the internet
# (falling back to 127.0.0.1 without one, which the other nodes cannot reach).
ip route add default via "$gateway"
echo "node $name up at $ip"
/usr/sbin/sshd -D -e -f "$HOME/.sshd/sshd_config" &
wait
"""

SSHD_CONFIG = """\
Port 22
ListenAddress {ip}
HostKey {home}/.sshd/host_ed25519
AuthorizedKeysFile {home}/.ssh/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PidFile none
Subsystem sftp internal-sftp
"""


def missing_tools() -> list[str]:
    """What this machine lacks to run nodes (root, the Debian packages of .ci/bootstrap)."""
    missing = [t for t in TOOLS if not shutil.which(t)]
    if os.geteuid() != 0:
        missing.append("root")
    return missing


@dataclass
class Node:
    """One SSH machine: its address, its home as the test sees it, its namespaces' init process."""

    name: str
    ip: str
    root: Path
    proc: subprocess.Popen[bytes] | None = None
    init_pid: int | None = None  # host pid of the PID namespace's init (the unshare child)
    host_veth: str = ""

    @property
    def home(self) -> Path:
        """The node's $HOME, seen from outside the node."""
        return self.root / "home"

    @property
    def log(self) -> Path:
        return self.root / "init.log"

    def pids(self) -> list[int]:
        """Every process in the node (descendants of its init: daemons are re-parented to it)."""
        if self.init_pid is None:
            return []
        try:
            init = psutil.Process(self.init_pid)
            return [init.pid] + [p.pid for p in init.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def processes(self) -> list[str]:
        """Command lines of the node's processes other than its init and sshd."""
        out = []
        for pid in self.pids()[1:]:
            with contextlib.suppress(psutil.Error):
                cmd = " ".join(psutil.Process(pid).cmdline())
                if not cmd.startswith((SSHD, "sshd:")):
                    out.append(cmd)
        return out

    def ray_node_id(self) -> str | None:
        """The Ray node id of the node's raylet (from its command line), None when none runs."""
        for pid in self.pids():
            with contextlib.suppress(psutil.Error):
                cmd = psutil.Process(pid).cmdline()
                if cmd and cmd[0].endswith("/raylet"):
                    return next((a.split("=", 1)[1] for a in cmd if a.startswith("--node_id=")), None)
        return None

    def netns_run(self, *cmd: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Run a host program in the node's network namespace (e.g. `ss -ltn`)."""
        assert self.init_pid is not None
        return subprocess.run(["nsenter", "-t", str(self.init_pid), "-n", *cmd],
                              capture_output=True, text=True, timeout=timeout)  # fmt: skip

    def listening(self) -> list[tuple[str, int, str]]:
        """(address, port, program) of every TCP socket listening in the node."""
        out = self.netns_run("ss", "-Hltnp").stdout
        found = []
        for line in out.splitlines():
            parts = line.split()
            if len(parts) < 4:
                continue
            addr, _, port = parts[3].rpartition(":")
            prog = parts[5].split('"')[1] if len(parts) > 5 and '"' in parts[5] else "?"
            found.append((addr.strip("[]"), int(port), prog))
        return sorted(found)


@dataclass
class SshNodes:
    """A bridge on the host (the "LAN"), a laptop key, and SSH nodes on it; `close()` ends them all."""

    root: Path
    shared: Path
    names: tuple[str, ...] = ("head", "worker")
    nodes: list[Node] = field(default_factory=list)
    tag: str = field(default_factory=lambda: f"{random.randrange(16**4):04x}")
    created_mountpoint: bool = False

    def __post_init__(self) -> None:
        self.bridge = f"cmxb{self.tag}"
        # A random private /24, unlikely to collide with anything else on the machine.
        self.subnet = f"10.{random.randrange(100, 250)}.{random.randrange(1, 250)}"
        self.host_ip = f"{self.subnet}.1"
        self.laptop_home = self.root / "laptop"
        self.key = self.laptop_home / ".ssh" / "id_ed25519"

    # ------------------------------------------------------------------ start
    def start(self) -> None:
        if not SHARED_MOUNT.exists():
            SHARED_MOUNT.mkdir(parents=True)
            self.created_mountpoint = True
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege-separation dir
        self.key.parent.mkdir(parents=True, mode=0o700)
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "cmx-test-laptop", "-f", str(self.key))
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        _run("ip", "addr", "add", f"{self.host_ip}/24", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")
        for i, name in enumerate(self.names):
            self._start_node(name, f"{self.subnet}.{i + 2}", i)
        for node in self.nodes:
            self._wait_ssh(node)

    def _start_node(self, name: str, ip: str, index: int) -> Node:
        node = Node(name, ip, self.root / name, host_veth=f"cmxv{self.tag}{index}")
        self.nodes.append(node)  # before anything is started: close() stops what was
        home = node.home
        (home / ".ssh").mkdir(parents=True, mode=0o700)
        (home / ".sshd").mkdir(mode=0o700)
        for skel in (".bashrc", ".profile"):  # what a new account's home holds (Debian's /etc/skel)
            if Path("/etc/skel", skel).exists():
                shutil.copy(Path("/etc/skel", skel), home / skel)
        shutil.copy(self.key.with_suffix(".pub"), home / ".ssh" / "authorized_keys")
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(home / ".sshd" / "host_ed25519"))
        user_home = os.environ.get("HOME", "/root")
        (home / ".sshd" / "sshd_config").write_text(SSHD_CONFIG.format(ip=ip, home=user_home))
        keep = [p for p in _python_dirs() if p.startswith(user_home + "/")]
        peer = f"cmxn{self.tag}{index}"
        with open(node.log, "wb") as log:
            node.proc = subprocess.Popen(
            ["unshare", "--net", "--mount", "--pid", "--uts", "--fork", "--mount-proc", "--kill-child",
             "bash", "-c", NODE_INIT, "node-init", str(home), str(self.shared), ip, peer, f"cmx-{name}", self.host_ip, *keep],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "CMX_NODE_TMP_KEEP": ":".join(_checkout_dirs_in_tmp())},
        )  # fmt: skip
        node.init_pid = self._child_of(node.proc.pid)
        if node.proc.poll() is not None or not psutil.pid_exists(node.init_pid):
            raise RuntimeError(f"node {name} exited at start:\n{node.log.read_text()}")
        _run("ip", "link", "add", node.host_veth, "type", "veth", "peer", "name", peer)
        _run("ip", "link", "set", peer, "netns", str(node.init_pid))
        _run("ip", "link", "set", node.host_veth, "master", self.bridge)
        _run("ip", "link", "set", node.host_veth, "up")
        return node

    @staticmethod
    def _child_of(pid: int, timeout: float = 10) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            children = psutil.Process(pid).children()
            if children:
                return children[0].pid
            time.sleep(0.05)
        raise RuntimeError(f"unshare {pid} started no child")

    def ssh_command(self, node: Node, command: str) -> list[str]:
        return ["ssh", "-i", str(self.key), "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", "-o", "LogLevel=ERROR",
                f"root@{node.ip}", command]  # fmt: skip

    def _wait_ssh(self, node: Node, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            out = subprocess.run(self.ssh_command(node, "hostname"), capture_output=True, text=True, timeout=30)
            if out.returncode == 0 and out.stdout.strip() == f"cmx-{node.name}":
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"no SSH to {node.name} ({node.ip}): {out.stderr}\n{node.log.read_text()}")
            time.sleep(0.3)

    # ------------------------------------------------------------------ stop and check
    def close(self) -> None:
        """SIGKILL every node's namespaces (all their processes with them), then the bridge."""
        for node in self.nodes:
            for pid in (node.init_pid, node.proc.pid if node.proc else None):
                if pid is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            if node.proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    node.proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while any(n.pids() for n in self.nodes) and time.monotonic() < deadline:
            time.sleep(0.2)
        for link in (*(n.host_veth for n in self.nodes), self.bridge):
            subprocess.run(["ip", "link", "del", link], capture_output=True, timeout=30)
        if self.created_mountpoint:
            with contextlib.suppress(OSError):
                SHARED_MOUNT.rmdir()

    def leftovers(self) -> list[str]:
        """What of the nodes still exists on the host: processes, interfaces, namespaces."""
        found = [f"{n.name}: process {pid}" for n in self.nodes for pid in n.pids()]
        ours = (self.bridge, *(n.host_veth for n in self.nodes))
        deadline = time.monotonic() + 20  # the kernel removes a dead namespace's links asynchronously
        while True:
            links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, timeout=30).stdout
            present = [w for w in ours if re.search(rf"^\d+: {w}[@:]", links, re.M)]
            if not present or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        found += [f"interface {w}" for w in present]
        if self.created_mountpoint and SHARED_MOUNT.exists():
            found.append(f"directory {SHARED_MOUNT}")
        return found


def _python_dirs() -> list[str]:
    """Where the interpreter behind the test's venv lives (pyenv under $HOME here)."""
    return sorted({os.path.realpath(sys.base_prefix)})


def _checkout_dirs_in_tmp() -> list[str]:
    """The checkout and the test's venv when they live under /tmp, which each node replaces with
    its own: the nodes' venvs and the editable install point into them."""
    dirs = sorted({str(Path(__file__).resolve().parents[2]), os.path.realpath(sys.prefix)})
    under_tmp = [d for d in dirs if d.startswith("/tmp/")]
    return [d for d in under_tmp if not any(d.startswith(o + "/") for o in under_tmp)]


def _run(*cmd: str) -> None:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr.strip()}")
