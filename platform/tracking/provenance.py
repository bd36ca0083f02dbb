"""What a run records about where it came from: the flattened config, versions, git state, data
fingerprints and model cost. Never environment variables (they hold secrets)."""

from __future__ import annotations

import getpass
import json
import logging
import platform as _platform  # the standard library's (cmx's own package is `cmx`)
import socket
import subprocess
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cmx.core.config import TrainConfig
from cmx.core.files import data_fingerprint
from cmx.core.uris import is_uri
from cmx.models import count_flops, count_params, create_model

if TYPE_CHECKING:
    pass

log = logging.getLogger("cmx.tracking")


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """`{"a": {"b": 1}}` -> `{"a.b": "1"}`; lists as JSON; values cut to MLflow's 6000 chars."""
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name + "."))
        else:
            text = json.dumps(value) if isinstance(value, (list, tuple, Mapping)) else str(value)
            out[name] = text if len(text) <= 6000 else text[:5999] + "…"
    return out


def redact_uri(uri: str | None) -> str:
    """A URI without the user and password it may carry (`http://user:pw@host` -> `http://***@host`)."""
    if not uri or "@" not in uri or not is_uri(uri):
        return str(uri)
    scheme, rest = uri.split("://", 1)
    userinfo, _, host = rest.rpartition("@")
    return f"{scheme}://***@{host}" if "/" not in userinfo else uri


_GIT: dict[str, str] | None = None


def git_info() -> dict[str, str]:
    """Commit and dirty flag of the cmx source tree (empty when it is not a git checkout).

    The remote URL is not recorded: it can carry credentials.
    """
    global _GIT
    if _GIT is None:
        root = Path(__file__).resolve().parents[1]
        _GIT = {}
        try:
            commit = subprocess.run(
                ["git", "-C", str(root), "rev-parse", "HEAD"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            if commit.returncode == 0:
                dirty = subprocess.run(
                    ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                    capture_output=True,
                    text=True,
                    timeout=20,
                )
                _GIT = {
                    "commit": commit.stdout.strip(),
                    "dirty": str(bool(dirty.stdout.strip())).lower(),
                }
        except (OSError, subprocess.SubprocessError):
            pass
    return dict(_GIT)


def package_version(dist: str) -> str:
    """An installed distribution's version, or "not installed"."""
    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def environment_tags() -> dict[str, str]:
    """Versions, host and git state: what a run needs to be re-created. No environment variables."""
    git = git_info()
    tags = {
        "cmx.version": package_version("cmx"),
        "cmx.torch_version": package_version("torch"),
        "cmx.ray_version": package_version("ray"),
        "cmx.mlflow_version": package_version("mlflow"),
        "cmx.python_version": _platform.python_version(),
        "cmx.host": socket.gethostname(),
        "mlflow.user": _user(),
    }
    if git:
        tags.update(
            {
                "cmx.git.commit": git["commit"],
                "cmx.git.dirty": git["dirty"],
                "mlflow.source.git.commit": git["commit"],
            }
        )
    return tags


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def config_tags(config: TrainConfig) -> dict[str, str]:
    """Seed, device and data fingerprints of a training config."""
    data = config.data
    return {
        "cmx.seed": str(config.loop.seed),
        "cmx.data.train_path": str(data.train_path),
        "cmx.data.val_path": str(data.val_path),
        "cmx.data.train_fingerprint": data_fingerprint(data.train_path),
        "cmx.data.val_fingerprint": data_fingerprint(data.val_path),
        **({"cmx.data.test_path": str(data.test_path)} if data.test_path else {}),
        "cmx.model": config.model.name,
    }


def model_cost_params(config: TrainConfig) -> dict[str, str]:
    """Parameter count and forward FLOPs at the train resolution (meta device: no compute)."""
    try:
        import torch

        with torch.device("meta"):
            model = create_model(config.model.name, **config.model.overrides())
        res = config.data.resolution
        return {
            "model.num_params": str(count_params(model)),
            "model.flops": str(count_flops(model, (3, res, res))),
        }
    except Exception as e:  # an architecture the trainer will reject anyway; tracking goes on
        log.debug("model cost unavailable: %s", e)
        return {}
