"""`cmx cluster check`: a Ray cluster-launcher file, validated by Ray's own schema plus cmx's rules.

cmx's settings live in the file under `metadata.cmx` (Ray stores `metadata` and never reads it),
so the same file works for `ray up` and for this check:

    metadata:
      cmx:
        storage: s3://<YOUR_S3_BUCKET>/cmx/sweeps   # Tune storage_path: s3:// or a shared mount
        tracking_uri: http://$RAY_HEAD_IP:5000       # the MLflow server every node reaches
        shared_mounts: [/mnt/cmx]                    # NFS mounts present on every node
        data_cache_dir: /var/tmp/cmx-cache           # node-local beton cache (data.cache_dir)
        gpus_per_node: 1                             # provider local only: GPUs of each worker
        space: ../examples/imagenet-search.yaml      # the sweep this cluster is for

A sweep file given with `--space` replaces `space:`; its `storage.path` and `tracking.uri`, when
set, are checked too (they are what the sweep will use).

The file's commands are checked for the security model of docs/scaling.md: every `ray start` sets
RAY_AUTH_MODE explicitly (token, with the token file shipped by file_mounts), no service binds to
all interfaces, and an MLflow server the head starts requires authentication.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pydantic import Field

from cmx.cluster.ray_compat import prepare_cluster_config, validate_cluster_config
from cmx.cluster.tokens import LAPTOP_TOKEN_TEMPLATE, laptop_token_source
from cmx.core.config import StrictModel, load_yaml, validate_config
from cmx.core.errors import ConfigError
from cmx.core.sweep_spec import load_sweep_spec
from cmx.core.uris import is_uri

PLACEHOLDER = re.compile(r"<[A-Z][A-Z0-9_]*>")
SHARED_SCHEMES = ("s3", "gs", "gcs", "abfs", "az", "hdfs")
SERVER_SCHEMES = ("http", "https", "databricks")
LOOPBACK_HOSTS = ("localhost", "0.0.0.0", "::1", "")


class CmxClusterSettings(StrictModel):
    """The `metadata.cmx` block of a cluster file."""

    storage: str | None = Field(None, description="Tune storage_path: s3://... or a path under shared_mounts")
    tracking_uri: str | None = Field(None, description="MLflow server reachable from every node")
    shared_mounts: list[str] = Field(default_factory=list, description="NFS mount points on every node")
    data_cache_dir: str | None = Field(None, description="node-local directory for cached betons")
    gpus_per_node: float | None = Field(None, ge=0, description="provider local: GPUs of each worker machine")
    space: str | None = Field(None, description="sweep file (relative to the cluster file)")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a cluster file: where, what, and how to fix it."""

    key: str
    message: str
    hint: str

    def line(self, source: str) -> str:
        """`FILE: key: message — hint`, the one line the CLI prints."""
        where = f"{source}: {self.key}" if self.key else source
        return f"{where}: {self.message} — {self.hint}"


@dataclass
class ClusterReport:
    """What `check_cluster_file` found."""

    path: Path
    problems: list[Problem] = field(default_factory=list)
    placeholders: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    summary: list[str] = field(default_factory=list)
    security: list[Problem] = field(default_factory=list)  # exposures: errors under --strict, notes otherwise

    @property
    def ok(self) -> bool:
        """True when no rule failed."""
        return not self.problems


# ------------------------------------------------------------------ Ray's own schema


def ray_validate(config: dict[str, Any]) -> dict[str, Any]:
    """Fill in Ray's defaults and validate against Ray's cluster schema; the prepared config.

    Uses Ray's private `prepare_config` + `validate_config` through `ray_compat` (what `ray up` runs, minus the cloud
    calls); validating before preparing rejects valid files. Raises ConfigError with one line.
    """
    import logging

    # Ray logs every default it fills in (max workers per type) at INFO.
    logging.getLogger("ray.autoscaler").setLevel(logging.WARNING)
    try:
        prepared = prepare_cluster_config(copy.deepcopy(config))
    except Exception as e:  # Ray aborts with assorted exception types (click, KeyError, ValueError)
        raise ConfigError(f"Ray cannot prepare the config: {_first_line(e)}", "fix the key Ray names") from None
    try:
        validate_cluster_config(prepared)
    except Exception as e:
        import jsonschema

        if isinstance(e, jsonschema.ValidationError):
            where = ".".join(str(p) for p in e.absolute_path) or "(top level)"
            raise ConfigError(f"Ray schema: {where}: {e.message}", "see Ray's cluster YAML reference") from None
        raise ConfigError(f"Ray rejects the config: {_first_line(e)}", "fix the key Ray names") from None
    return prepared


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


# ------------------------------------------------------------------ cmx rules


def storage_problem(uri: str, shared_mounts: list[str], key: str) -> Problem | None:
    """None when `uri` is storage every node sees: a cloud bucket or a path under a shared mount."""
    parsed = urlparse(uri)
    if parsed.scheme in SHARED_SCHEMES:
        return None
    path = parsed.path if parsed.scheme == "file" else uri
    if parsed.scheme not in ("", "file") or not path.startswith("/"):
        return Problem(key, f"storage {uri!r} is not an s3:// URI or an absolute shared path",
                       "use s3://<YOUR_S3_BUCKET>/cmx/sweeps or a path under an NFS mount")  # fmt: skip
    if any(_under(path, m) for m in shared_mounts):
        return None
    mounts = ", ".join(shared_mounts) or "none declared"
    return Problem(
        key,
        f"storage {uri!r} is node-local (shared mounts: {mounts}); Ray refuses it on a multi-node cluster",
        "use s3://... or list the NFS mount it lives on in metadata.cmx.shared_mounts",
    )


def _under(path: str, mount: str) -> bool:
    mount = mount.rstrip("/") or "/"
    return path == mount or path.startswith(mount + "/")


def tracking_problem(uri: str, key: str) -> Problem | None:
    """None when `uri` is an MLflow server other nodes can reach (not a file on one node's disk)."""
    parsed = urlparse(uri)
    if parsed.scheme not in SERVER_SCHEMES:
        return Problem(
            key,
            f"tracking URI {uri!r} is a store on one node's disk, which workers cannot reach",
            "run the MLflow server on the head (cluster/start-mlflow.sh) and use http://$RAY_HEAD_IP:5000",
        )
    host = _host(parsed.netloc)
    if parsed.scheme != "databricks" and (host in LOOPBACK_HOSTS or host.startswith("127.")):
        return Problem(
            key,
            f"tracking URI {uri!r} points at the loopback address: only that node can reach it",
            "use the head's private address, e.g. http://$RAY_HEAD_IP:5000",
        )
    return None


def _host(netloc: str) -> str:
    host = netloc.rsplit("@", 1)[-1]
    if host.startswith("["):
        return host[1 : host.find("]")]
    return host.split(":", 1)[0].lower()


@dataclass(frozen=True)
class WorkerType:
    """A node type trials can run on: its resources and how many may exist."""

    name: str
    cpus: float | None
    gpus: float
    max_workers: int


def worker_types(prepared: dict[str, Any], settings: CmxClusterSettings) -> list[WorkerType]:
    """Node types as cmx sees them; local clusters take GPUs from metadata.cmx.gpus_per_node."""
    provider = prepared.get("provider", {}).get("type")
    if provider == "local":
        n = len(prepared["provider"].get("worker_ips", []))
        return [WorkerType("local.worker", None, float(settings.gpus_per_node or 0), n)]
    head = prepared.get("head_node_type")
    out = []
    for name, node in prepared.get("available_node_types", {}).items():
        res = node.get("resources", {})
        count = 1 if name == head else int(node.get("max_workers", 0))
        cpus = res.get("CPU")
        out.append(WorkerType(name, None if cpus is None else float(cpus), float(res.get("GPU", 0)), count))
    return out


def gpu_problems(spec: Any, types: list[WorkerType], key: str) -> list[Problem]:
    """Trials that ask for GPUs need worker types with GPUs, enough of them for data-parallel trials."""
    r = spec.resources
    workers = r.workers
    need_gpu = r.gpus if workers == 1 else r.gpus_per_worker
    need_cpu = r.cpus if workers == 1 else r.cpus_per_worker
    field_ = "resources.gpus" if workers == 1 else "resources.gpus_per_worker"
    if need_gpu <= 0:
        return []
    gpu_types = [t for t in types if t.gpus > 0 and t.max_workers > 0]
    if not gpu_types:
        return [Problem(key, f"trials ask for {need_gpu:g} GPU(s) ({field_}) but no node type declares GPUs",
                        "add a worker type with resources: {GPU: n} (see cluster/config.yaml), or set "
                        "metadata.cmx.gpus_per_node for provider local")]  # fmt: skip
    fitting = [t for t in gpu_types if t.gpus >= need_gpu and (t.cpus is None or t.cpus >= need_cpu)]
    if not fitting:
        largest = max(gpu_types, key=lambda t: t.gpus)
        return [Problem(key, f"a trial worker needs {need_gpu:g} GPU and {need_cpu:g} CPU but the largest GPU "
                             f"type {largest.name!r} has {largest.gpus:g} GPU / {largest.cpus or 0:g} CPU",
                        "lower the per-worker request or add a bigger instance type")]  # fmt: skip
    slots = 0
    for t in fitting:
        per_node = math.floor(t.gpus / need_gpu + 1e-9)
        if t.cpus is not None:
            per_node = min(per_node, math.floor(t.cpus / need_cpu + 1e-9))
        slots += per_node * t.max_workers
    if slots < workers:
        return [Problem(key, f"a data-parallel trial needs {workers} workers × {need_gpu:g} GPU but the cluster "
                             f"can grow to only {slots} such workers",
                        "raise max_workers of a GPU type or lower resources.workers")]  # fmt: skip
    return []


def cache_dir_problems(settings: CmxClusterSettings) -> list[Problem]:
    """The beton cache must be a local absolute path, not on a shared mount (that defeats it)."""
    d = settings.data_cache_dir
    key = "metadata.cmx.data_cache_dir"
    if not d:
        return []
    if not d.startswith("/") or is_uri(d):
        return [
            Problem(key, f"{d!r} must be an absolute local path", "e.g. /var/tmp/cmx-cache on each node's local disk")
        ]
    if any(_under(d, m) for m in settings.shared_mounts):
        return [
            Problem(
                key, f"{d!r} is on a shared mount", "the cache exists to read betons from local disk; use a local path"
            )
        ]
    return []


def placeholders(data: Any) -> list[str]:
    """Every `<PLACEHOLDER>` still present in the file's values, in order of appearance."""
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(k)
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
        elif isinstance(node, str):
            for m in PLACEHOLDER.findall(node):
                if m not in found:
                    found.append(m)

    walk(data)
    return found


OPEN_CIDRS = ("0.0.0.0/0", "::/0")
SSH_PORT = 22


def open_ssh_problems(raw: dict[str, Any]) -> list[Problem]:
    """Rules of `provider.security_group` that open SSH (port 22) to the whole internet."""
    provider = raw.get("provider")
    group = provider.get("security_group") if isinstance(provider, dict) else None
    rules = group.get("IpPermissions") if isinstance(group, dict) else None
    found: list[Problem] = []
    for i, rule in enumerate(rules if isinstance(rules, list) else []):
        if not isinstance(rule, dict):
            continue
        protocol = str(rule.get("IpProtocol", "")).lower()
        try:
            ports = [int(p) for p in (rule.get("FromPort"), rule.get("ToPort")) if p is not None]
            covers_ssh = protocol == "-1" or not ports or min(ports) <= SSH_PORT <= max(ports)
        except (TypeError, ValueError):
            covers_ssh = True  # unreadable ports: assume the worst
        if protocol not in ("tcp", "6", "-1") or not covers_ssh:
            continue
        cidrs = [r.get("CidrIp") for r in rule.get("IpRanges") or [] if isinstance(r, dict)]
        cidrs += [r.get("CidrIpv6") for r in rule.get("Ipv6Ranges") or [] if isinstance(r, dict)]
        for cidr in cidrs:
            if cidr in OPEN_CIDRS:
                found.append(Problem(f"provider.security_group.IpPermissions[{i}]",
                                     f"opens SSH (port 22) to {cidr}, the whole internet",
                                     "limit the rule to your own address range (e.g. 203.0.113.7/32)"))  # fmt: skip
    return found


COMMAND_KEYS = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands")  # fmt: skip
START_KEYS = ("head_start_ray_commands", "worker_start_ray_commands")
RAY_START = re.compile(r"\bray\s+start\b")
AUTH_MODE = re.compile(r"\bRAY_AUTH_MODE=[\"']?([\w-]+)")
EXPORTED_AUTH_MODE = re.compile(r"\bexport\s+(?:\w+=\S*\s+)*RAY_AUTH_MODE=[\"']?([\w-]+)")
TOKEN_PATH = re.compile(r"\bRAY_AUTH_TOKEN_PATH=[\"']?([^\s\"';]+)")
DEFAULT_TOKEN_PATH = "~/.ray/auth_token"
# `--dashboard-host=0.0.0.0`, `--host ::`, `CMX_MLFLOW_HOST=0.0.0.0`: a service on every interface.
ALL_INTERFACES = re.compile(r"(--[\w-]*host[=\s]+|\b\w*HOST=)[\"']?(0\.0\.0\.0|::|\[::\])(?=[\"'\s;]|$)")
START_MLFLOW = re.compile(r"\bstart-mlflow\.sh\b")
MLFLOW_SERVER = re.compile(r"\bmlflow\s+server\b")
TOKEN_FIX = (
    "prefix it with RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$HOME/.cmx-cluster/ray_auth_token and ship the "
    "cluster's token with file_mounts (`~/.cmx-cluster/ray_auth_token: ~/.cmx/clusters/<cluster_name>/"
    "ray_auth_token`), as cluster/local.yaml does"
)


def _commands(config: dict[str, Any], key: str) -> list[str]:
    cmds = config.get(key)
    return [c for c in cmds if isinstance(c, str)] if isinstance(cmds, list) else []


def _home_path(path: str, ssh_user: str | None) -> str:
    """`$HOME/x`, `${HOME}/x`, `/home/<ssh_user>/x` (or `/root/x` for root) as `~/x`."""
    for prefix in ("$HOME", "${HOME}", "~"):
        if path == prefix or path.startswith(prefix + "/"):
            return "~" + path[len(prefix) :]
    if ssh_user:
        home = "/root" if ssh_user == "root" else f"/home/{ssh_user}"
        if path == home or path.startswith(home + "/"):
            return "~" + path[len(home) :]
    return path


def auth_mode_problems(config: dict[str, Any]) -> list[Problem]:
    """Every `ray start` must set RAY_AUTH_MODE itself: Ray 2.60 otherwise turns token auth on for a
    head only when ~/.ray/auth_token happens to exist there, and never for a joining node. With token
    mode, the token file it reads must be one that file_mounts ships to every node."""
    auth = config.get("auth")
    ssh_user = auth.get("ssh_user") if isinstance(auth, dict) else None
    mounts = config.get("file_mounts")
    shipped = {_home_path(str(d), ssh_user): str(s) for d, s in mounts.items()} if isinstance(mounts, dict) else {}
    name = config.get("cluster_name")
    own = laptop_token_source(name) if isinstance(name, str) else None
    found: list[Problem] = []
    token_paths: set[str] = set()
    for key in START_KEYS:
        exported: str | None = None
        for i, cmd in enumerate(_commands(config, key)):
            here = AUTH_MODE.search(cmd)
            mode = here.group(1) if here else exported
            if RAY_START.search(cmd):
                where = f"{key}[{i}]"
                if mode is None:
                    found.append(Problem(where, "`ray start` leaves Ray's auth mode implicit (token auth then depends on "
                                                "whether ~/.ray/auth_token happens to exist on the node)", TOKEN_FIX))  # fmt: skip
                elif mode.lower() != "token":
                    found.append(Problem(where, f"RAY_AUTH_MODE={mode}: anyone who reaches the cluster's ports can run "
                                                "code on every node", TOKEN_FIX))  # fmt: skip
                else:
                    path_match = TOKEN_PATH.search(cmd)
                    path = _home_path(path_match.group(1), ssh_user) if path_match else DEFAULT_TOKEN_PATH
                    if path not in shipped:
                        found.append(Problem(where, f"token auth reads {path} but file_mounts ships no token there",
                                             f"add `{path}: {own or LAPTOP_TOKEN_TEMPLATE}` to file_mounts (one token "
                                             "per cluster, for every node and your laptop)"))  # fmt: skip
                    else:
                        token_paths.add(path)
            exported_here = EXPORTED_AUTH_MODE.search(cmd)
            if exported_here:
                exported = exported_here.group(1)
    for path in sorted(token_paths):
        if own and Path(shipped[path]).expanduser() != Path(own).expanduser():
            found.append(Problem(f"file_mounts[{path}]", f"ships {shipped[path]} as the Ray token, not this cluster's "
                                 f"own token {own}", f"set `{path}: {own}` (`cmx cluster up` creates it; a shared token "
                                 "lets one cluster's users into another)"))  # fmt: skip
    return found


def exposure_problems(config: dict[str, Any]) -> list[Problem]:
    """Commands that bind a service (MLflow, the dashboard, ...) to every interface."""
    found: list[Problem] = []
    for key in COMMAND_KEYS:
        for i, cmd in enumerate(_commands(config, key)):
            m = ALL_INTERFACES.search(cmd)
            if m:
                found.append(Problem(f"{key}[{i}]", f"`{m.group(0).strip()}` listens on every interface",
                                     "bind MLflow to the head's private address (CMX_MLFLOW_HOST=<HEAD_IP>) and the "
                                     "dashboard to 127.0.0.1 (--dashboard-host=127.0.0.1; reach it with `ray dashboard`)"))  # fmt: skip
    return found


def mlflow_auth_problems(config: dict[str, Any]) -> list[Problem]:
    """An MLflow server the file starts must require authentication and name its bind address."""
    found: list[Problem] = []
    for key in COMMAND_KEYS:
        for i, cmd in enumerate(_commands(config, key)):
            where = f"{key}[{i}]"
            if START_MLFLOW.search(cmd):
                if re.search(r"\bCMX_MLFLOW_AUTH=[\"']?none\b", cmd):
                    found.append(Problem(where, "CMX_MLFLOW_AUTH=none starts MLflow without authentication",
                                         "drop it: start-mlflow.sh uses MLflow's basic-auth app by default"))  # fmt: skip
                if "CMX_MLFLOW_HOST=" not in cmd:
                    found.append(Problem(where, "start-mlflow.sh without CMX_MLFLOW_HOST (it refuses to guess)",
                                         "set CMX_MLFLOW_HOST=<HEAD_IP>, the head's private address"))  # fmt: skip
            elif MLFLOW_SERVER.search(cmd) and not re.search(r"--app-name[=\s]+basic-auth\b", cmd):
                found.append(Problem(where, "`mlflow server` without authentication: anyone on the network can read "
                                            "and delete runs", "start it with bash ~/cmx/cluster/start-mlflow.sh "
                                            "(basic auth), or add --app-name basic-auth"))  # fmt: skip
    return found


# ------------------------------------------------------------------ the whole check


def check_cluster_file(path: str | Path, space: str | Path | None = None) -> ClusterReport:
    """Run Ray's validation and cmx's rules; problems are collected, not raised (all shown at once).

    Raises ConfigError only when the file cannot be read as YAML at all.
    """
    path = Path(path)
    report = ClusterReport(path)
    raw = load_yaml(path)
    report.placeholders = placeholders(raw)
    report.security = open_ssh_problems(raw)
    meta = (raw.get("metadata") or {}).get("cmx") if isinstance(raw.get("metadata"), dict) else None
    try:
        prepared: dict[str, Any] | None = ray_validate(raw)
    except ConfigError as e:
        report.problems.append(Problem("", e.message, e.hint or ""))
        prepared = None
    commands = prepared if prepared is not None else raw  # Ray's default commands count when the file has none
    report.problems.extend(auth_mode_problems(commands))
    report.problems.extend(exposure_problems(commands))
    report.problems.extend(mlflow_auth_problems(commands))
    excluded = raw.get("rsync_exclude")
    if isinstance(excluded, list) and any(str(e).strip("/") in (".git", "**/.git") for e in excluded):
        report.notes.append("rsync_exclude drops .git: runs on the cluster will record no git commit "
                            "(ship it, as cluster/local.yaml does with rsync_filter: [.gitignore])")  # fmt: skip
    try:
        settings = validate_config(CmxClusterSettings, meta or {}, f"{path}: metadata.cmx")
    except ConfigError as e:
        # The rules below would only repeat this problem as missing settings.
        report.problems.append(Problem("metadata.cmx", e.message.split(": metadata.cmx: ", 1)[-1],
                                       e.hint or "fix the value"))  # fmt: skip
        return report

    spec, spec_source = _load_spec(path, settings, space, report)
    _check_storage(settings, spec, spec_source, report)
    _check_tracking(settings, spec, spec_source, report)
    report.problems.extend(cache_dir_problems(settings))
    if prepared is not None:
        types = worker_types(prepared, settings)
        report.summary.append(
            "node types: " + ", ".join(f"{t.name} ({t.gpus:g} GPU, up to {t.max_workers})" for t in types)
        )
        if spec is not None:
            report.summary.append(f"sweep: {spec_source} ({spec.resources.describe()} per trial)")
            report.problems.extend(gpu_problems(spec, types, f"{spec_source}: resources"))
    if spec is None:
        report.notes.append("no sweep file (--space or metadata.cmx.space): the GPU check was skipped")
    return report


def _load_spec(path: Path, settings: CmxClusterSettings, space: str | Path | None,
               report: ClusterReport) -> tuple[Any, str]:  # fmt: skip

    if space is not None:
        spec_path = Path(space)
    elif settings.space:
        spec_path = (path.parent / settings.space).resolve()
    else:
        return None, ""
    try:
        return load_sweep_spec(spec_path), str(spec_path)
    except ConfigError as e:
        report.problems.append(Problem("metadata.cmx.space" if space is None else "--space",
                                       e.message, e.hint or "fix the sweep file"))  # fmt: skip
        return None, str(spec_path)


def _check_storage(settings: CmxClusterSettings, spec: Any, spec_source: str, report: ClusterReport) -> None:
    checked = False
    if spec is not None and spec.storage.path:
        problem = storage_problem(spec.storage.path, settings.shared_mounts, f"{spec_source}: storage.path")
        report.problems.extend([problem] if problem else [])
        checked = True
    if settings.storage:
        problem = storage_problem(settings.storage, settings.shared_mounts, "metadata.cmx.storage")
        report.problems.extend([problem] if problem else [])
        report.summary.append(f"storage: {settings.storage}")
        checked = True
    if not checked:
        report.problems.append(Problem("metadata.cmx.storage", "no shared storage declared",
                                       "set it to s3://<YOUR_S3_BUCKET>/cmx/sweeps or an NFS path"))  # fmt: skip


def _check_tracking(settings: CmxClusterSettings, spec: Any, spec_source: str, report: ClusterReport) -> None:
    if spec is not None and not spec.tracking.enabled:
        report.notes.append("tracking is disabled in the sweep file")
        return
    checked = False
    if spec is not None and spec.tracking.uri:
        problem = tracking_problem(spec.tracking.uri, f"{spec_source}: tracking.uri")
        report.problems.extend([problem] if problem else [])
        checked = True
    if settings.tracking_uri:
        problem = tracking_problem(settings.tracking_uri, "metadata.cmx.tracking_uri")
        report.problems.extend([problem] if problem else [])
        report.summary.append(f"tracking: {settings.tracking_uri}")
        checked = True
    if not checked:
        report.problems.append(Problem("metadata.cmx.tracking_uri",
                                       "no tracking server declared (the default is sqlite on one node's disk)",
                                       "set it to the head's MLflow server, e.g. http://$RAY_HEAD_IP:5000"))  # fmt: skip
