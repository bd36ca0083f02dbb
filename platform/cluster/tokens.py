"""One Ray authentication token per cluster, kept on the laptop that launches it.

`cmx cluster up FILE` makes `~/.cmx/clusters/<cluster_name>/ray_auth_token` (mode 600, 256 random
bits, as Ray's own generator) unless it exists; the cluster file's file_mounts ship it to every node
as `~/.cmx-cluster/ray_auth_token`, which its `ray start` commands read. Laptop-side clients (`ray
job submit` through `cmx cluster submit`, or any command run with `cmx cluster env`'s exports) get
`RAY_AUTH_MODE=token` and that file as `RAY_AUTH_TOKEN_PATH`. The token is never printed or logged.
"""

from __future__ import annotations

import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

import yaml

from cmx.core.errors import ConfigError

NODE_TOKEN_PATH = "~/.cmx-cluster/ray_auth_token"  # where every node reads it (file_mounts target)
LAPTOP_TOKEN_TEMPLATE = "~/.cmx/clusters/{name}/ray_auth_token"  # the file_mounts source
CLUSTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


def laptop_token_source(cluster_name: str) -> str:
    """The file_mounts source a cluster file must name for its token (with `~`, as written in YAML)."""
    return LAPTOP_TOKEN_TEMPLATE.format(name=cluster_name)


@dataclass(frozen=True)
class ClusterToken:
    """A cluster's name and the laptop file holding its Ray token."""

    cluster_name: str
    path: Path

    def client_env(self) -> dict[str, str]:
        """What a Ray client on the laptop needs to talk to this cluster (the path, not the secret)."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.path)}

    def exists(self) -> bool:
        return self.path.is_file() and self.path.stat().st_size > 0


def cluster_name_of(file: str | Path) -> str:
    """`cluster_name` of a cluster file, checked to be a safe directory name."""
    try:
        data = yaml.safe_load(Path(file).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{file}: cannot read the cluster file ({type(e).__name__})", "fix the YAML") from e
    name = data.get("cluster_name") if isinstance(data, dict) else None
    if not isinstance(name, str) or not CLUSTER_NAME.fullmatch(name):
        raise ConfigError(
            f"{file}: cluster_name {name!r} is missing or not a plain name",
            "set cluster_name to letters, digits, '.', '_' or '-' (e.g. cmx-onprem)",
        )
    return name


def cluster_token(file: str | Path) -> ClusterToken:
    """The token of the cluster a file describes (it may not exist yet)."""
    name = cluster_name_of(file)
    return ClusterToken(name, Path(laptop_token_source(name)).expanduser())


def ensure_cluster_token(file: str | Path) -> ClusterToken:
    """The cluster's token, created (directory 700, file 600) if missing; an existing one is kept."""
    token = cluster_token(file)
    if token.exists():
        token.path.chmod(0o600)
        return token
    token.path.unlink(missing_ok=True)  # an empty file left by an interrupted write
    token.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    token.path.parent.chmod(0o700)
    fd = os.open(token.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return token
