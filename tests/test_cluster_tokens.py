"""One Ray token per cluster on the launching laptop: `cmx cluster up` / `env` / `submit` before any
SSH (the two-node `ray up` test, tests/test_cluster_ray_up.py, runs them against real nodes)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import yaml
from support.cli import run_cmx

from cmx.cluster.tokens import cluster_token, ensure_cluster_token
from cmx.core.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
LOCAL = REPO / "cluster" / "local.yaml"


def cluster_file(tmp_path: Path, name: str) -> Path:
    data = yaml.safe_load(LOCAL.read_text())
    data["cluster_name"] = name
    data["file_mounts"]["~/.cmx-cluster/ray_auth_token"] = f"~/.cmx/clusters/{name}/ray_auth_token"
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_each_cluster_gets_its_own_private_token_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "laptop"))
    a, b = cluster_file(tmp_path, "lab-a"), cluster_file(tmp_path, "lab-b")
    ta = ensure_cluster_token(a)
    assert ta.path == tmp_path / "laptop/.cmx/clusters/lab-a/ray_auth_token"
    secret = ta.path.read_text()
    assert len(secret) == 64 and int(secret, 16) >= 0  # 256 bits, hex, as Ray's own generator
    assert stat.S_IMODE(ta.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(ta.path.parent.stat().st_mode) == 0o700
    assert ensure_cluster_token(a).path.read_text() == secret  # kept, not regenerated
    tb = ensure_cluster_token(b)
    assert tb.path.read_text() != secret
    assert ta.client_env() == {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(ta.path)}


@pytest.mark.parametrize("name", ["../escape", "a/b", "", "x" * 80, None])
def test_hostile_or_missing_cluster_names_are_refused(tmp_path: Path, name: object) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"cluster_name": name}))
    with pytest.raises(ConfigError, match="cluster_name .* is missing or not a plain name"):
        cluster_token(path)


def test_cli_up_env_and_submit_before_any_ssh(tmp_path: Path) -> None:
    """`up` refuses an unfilled file before making a token; `env` names the token file and never
    prints the token; `submit` without a token says how to get one."""
    laptop = {"HOME": str(tmp_path / "laptop")}
    path = cluster_file(tmp_path, "lab-c")
    up = run_cmx("cluster", "up", str(path), env=laptop)
    assert up.returncode == 2 and "placeholders: still to fill: <HEAD_IP>" in up.stderr, up.stderr
    assert not (tmp_path / "laptop/.cmx/clusters/lab-c").exists()

    submit = run_cmx("cluster", "submit", str(path), "--", "true", env=laptop)
    assert submit.returncode != 0
    assert f"no Ray token for cluster 'lab-c' at {tmp_path}/laptop/.cmx/clusters/lab-c/ray_auth_token" in submit.stderr
    assert f"cmx cluster up {path}" in submit.stderr and "Traceback" not in submit.stderr

    token = ensure_cluster_token_for(tmp_path / "laptop", path)
    env = run_cmx("cluster", "env", str(path), env=laptop)
    assert env.returncode == 0, env.stderr
    assert env.stdout.splitlines() == ["export RAY_AUTH_MODE=token", f"export RAY_AUTH_TOKEN_PATH={token}"]
    assert token.read_text() not in env.stdout + env.stderr


def ensure_cluster_token_for(home: Path, path: Path) -> Path:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(home))
        return ensure_cluster_token(path).path
