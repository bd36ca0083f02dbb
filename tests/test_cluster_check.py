"""`cmx cluster check`: the shipped cluster files pass; each broken variant fails with its message."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.cli import run_cmx

from cmx.cli.main import main
from cmx.cluster.check import check_cluster_file, ray_validate
from cmx.core.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
AWS = REPO / "cluster" / "config.yaml"
LOCAL = REPO / "cluster" / "local.yaml"


def run_check(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """`cmx cluster check ARGS` in-process: exit code, stdout, stderr."""
    with pytest.raises(SystemExit) as exc:
        main(["cluster", "check", *args])
    out = capsys.readouterr()
    return int(exc.value.code or 0), out.out, out.err


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def sweep_file(tmp_path: Path, *, name: str = "s", **sections: Any) -> Path:
    """A minimal valid sweep file; `sections` replace whole top-level sections."""
    spec: dict[str, Any] = {
        "name": name,
        "base": {"model": {"name": "convmixer_nano"}, "data": {"train_path": "s3://b/train.beton",
                                                                "val_path": "s3://b/val.beton"}},
        "space": {"optim.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}},
        "resources": {"gpus": 1, "cpus": 4},
        "storage": {"path": "s3://bucket/cmx/sweeps"},
        "tracking": {"uri": "http://10.0.0.10:5000"},
    }  # fmt: skip
    spec.update(sections)
    return write_yaml(tmp_path / f"{name}.yaml", spec)


# ------------------------------------------------------------------ the shipped files


def test_shipped_files_pass_with_ray_schema_and_cmx_rules() -> None:
    """Both files pass as a user gets them (placeholders are noted, not errors), via the real CLI."""
    for path in (AWS, LOCAL):
        out = run_cmx("cluster", "check", str(path), timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "passes Ray's cluster schema" in out.stdout
        assert "placeholders still to fill" in out.stdout
    aws = check_cluster_file(AWS)
    # The AWS file is sized for the ImageNet example: its 8-GPU data-parallel trials fit.
    assert any("imagenet-search.yaml" in s and "8 workers" in s for s in aws.summary), aws.summary
    assert "<YOUR_S3_BUCKET>" in aws.placeholders


def test_shipped_files_use_only_marked_placeholders() -> None:
    """No half-filled example values: every user-set value is a <PLACEHOLDER>, listed by --strict."""
    aws = check_cluster_file(AWS).placeholders
    local = check_cluster_file(LOCAL).placeholders
    for name in ("<YOUR_AWS_REGION>", "<YOUR_DLAMI_ID>", "<YOUR_INSTANCE_PROFILE_ARN>", "<YOUR_OFFICE_CIDR>"):
        assert name in aws
    for name in ("<HEAD_IP>", "<WORKER_IP_1>", "<YOUR_SSH_USER>"):
        assert name in local


def test_strict_makes_placeholders_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run_check(capsys, str(AWS), "--strict")
    assert rc == 2
    assert "placeholders: still to fill: <YOUR_AWS_REGION>" in err


def test_filled_in_file_passes_strict(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = LOCAL.read_text()
    for ph, value in {"<HEAD_IP>": "10.0.0.10", "<WORKER_IP_1>": "10.0.0.11", "<WORKER_IP_2>": "10.0.0.12",
                      "<YOUR_SSH_USER>": "ml"}.items():  # fmt: skip
        text = text.replace(ph, value)
    path = tmp_path / "filled.yaml"
    path.write_text(text)
    rc, out, err = run_check(capsys, str(path), "--strict")
    assert rc == 0, err
    assert "placeholders" not in out


def test_ray_validate_is_rays_own_schema() -> None:
    """The wrapper fills Ray's defaults, so a minimal valid file comes back prepared."""
    prepared = ray_validate({"cluster_name": "x", "provider": {"type": "aws", "region": "us-west-2"}})
    assert prepared["head_node_type"] in prepared["available_node_types"]
    with pytest.raises(ConfigError, match="Ray schema: max_workers: 'many' is not of type 'integer'"):
        ray_validate({"cluster_name": "x", "provider": {"type": "aws", "region": "us-west-2"}, "max_workers": "many"})


# ------------------------------------------------------------------ the matrix of broken files

Mutation = Callable[[dict[str, Any]], None]


def _set(path: str, value: Any) -> Mutation:
    def apply(d: dict[str, Any]) -> None:
        keys = path.split(".")
        node = d
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value

    return apply


def _delete(path: str) -> Mutation:
    def apply(d: dict[str, Any]) -> None:
        keys = path.split(".")
        node = d
        for k in keys[:-1]:
            node = node[k]
        del node[keys[-1]]

    return apply


def _both(*mutations: Mutation) -> Mutation:
    def apply(d: dict[str, Any]) -> None:
        for m in mutations:
            m(d)

    return apply


def _no_gpu_types(d: dict[str, Any]) -> None:
    for name, node in d["available_node_types"].items():
        node["resources"].pop("GPU", None)
        d["available_node_types"][name] = node


def _only_1gpu_type(d: dict[str, Any]) -> None:
    del d["available_node_types"]["gpu-8x"]


def _8gpu_type_capped_at_zero(d: dict[str, Any]) -> None:
    d["available_node_types"]["gpu-8x"]["max_workers"] = 0
    d["available_node_types"]["gpu-1x"]["resources"]["CPU"] = 16
    d["available_node_types"]["gpu-1x"]["max_workers"] = 4


BROKEN_AWS: list[tuple[str, Mutation, str]] = [
    ("typo-top-level-key", _set("max_worker", 3), "Ray schema: (top level): Additional properties are not allowed"),
    ("node-type-without-resources", _delete("available_node_types.gpu-1x.resources"),
     "Ray schema: available_node_types.gpu-1x: 'resources' is a required property"),
    ("resources-not-integer", _set("available_node_types.gpu-1x.resources.GPU", "one"),
     "Ray schema: available_node_types.gpu-1x.resources.GPU: 'one' is not of type 'integer'"),
    ("head-type-missing", _set("head_node_type", "nope"), "Ray rejects the config"),
    ("storage-node-local", _set("metadata.cmx.storage", "/home/ubuntu/sweeps"),
     "metadata.cmx.storage: storage '/home/ubuntu/sweeps' is node-local"),
    ("storage-relative", _set("metadata.cmx.storage", "sweeps"),
     "metadata.cmx.storage: storage 'sweeps' is not an s3:// URI or an absolute shared path"),
    ("storage-missing", _both(_delete("metadata.cmx.storage"), _delete("metadata.cmx.space")), "metadata.cmx.storage: no shared storage declared"),
    ("tracking-sqlite", _set("metadata.cmx.tracking_uri", "sqlite:////home/ubuntu/mlflow.db"),
     "metadata.cmx.tracking_uri: tracking URI 'sqlite:////home/ubuntu/mlflow.db' is a store on one node's disk"),
    ("tracking-file", _set("metadata.cmx.tracking_uri", "/home/ubuntu/mlruns"), "is a store on one node's disk"),
    ("tracking-loopback", _set("metadata.cmx.tracking_uri", "http://127.0.0.1:5000"),
     "tracking URI 'http://127.0.0.1:5000' points at the loopback address"),
    ("tracking-localhost", _set("metadata.cmx.tracking_uri", "http://localhost:5000"), "points at the loopback"),
    ("tracking-missing", _both(_delete("metadata.cmx.tracking_uri"), _delete("metadata.cmx.space")), "metadata.cmx.tracking_uri: no tracking server declared"),
    ("no-gpu-worker-types", _no_gpu_types, "trials ask for 1 GPU(s) (resources.gpus_per_worker) but no node type "
                                           "declares GPUs"),
    ("gpu-type-too-small", _only_1gpu_type, "a trial worker needs 1 GPU and 12 CPU but the largest GPU type 'gpu-1x'"),
    ("too-few-gpu-workers", _8gpu_type_capped_at_zero, "a data-parallel trial needs 8 workers × 1 GPU but the "
                                                       "cluster can grow to only 4"),
    ("cmx-key-typo", _set("metadata.cmx.tracking", "http://x:5000"), "metadata.cmx: unknown key 'tracking'"),
    ("cache-dir-relative", _set("metadata.cmx.data_cache_dir", "cache"), "must be an absolute local path"),
    ("space-missing-file", _set("metadata.cmx.space", "nope.yaml"), "metadata.cmx.space: "),
]  # fmt: skip


@pytest.mark.parametrize(("mutate", "message"), [c[1:] for c in BROKEN_AWS], ids=[c[0] for c in BROKEN_AWS])
def test_broken_aws_file_fails_with_one_clear_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mutate: Mutation, message: str
) -> None:
    data = copy.deepcopy(yaml.safe_load(AWS.read_text()))
    mutate(data)
    # The sweep file is resolved relative to the cluster file.
    if data.get("metadata", {}).get("cmx", {}).get("space") == "../examples/imagenet-search.yaml":
        data["metadata"]["cmx"]["space"] = str(REPO / "examples" / "imagenet-search.yaml")
    path = write_yaml(tmp_path / "cluster.yaml", data)
    rc, out, err = run_check(capsys, str(path))
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert rc == 2, out + err
    assert len(errors) == 1, err
    assert errors[0].startswith(f"error: {path}: ")
    assert message in errors[0], errors[0]
    assert " — " in errors[0]  # every error says how to fix it


def test_local_file_rules(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """On-prem: storage must sit on a declared NFS mount; GPU trials need gpus_per_node."""
    base = yaml.safe_load(LOCAL.read_text())
    cases: list[tuple[Mutation, str]] = [
        (_set("metadata.cmx.storage", "/data/sweeps"), "storage '/data/sweeps' is node-local (shared mounts: "
                                                       "/mnt/cmx-shared)"),
        (_set("metadata.cmx.shared_mounts", []), "node-local (shared mounts: none declared)"),
        (_set("metadata.cmx.data_cache_dir", "/mnt/cmx-shared/cache"), "data_cache_dir: '/mnt/cmx-shared/cache' "
                                                                       "is on a shared mount"),
        (_delete("metadata.cmx.gpus_per_node"), "but no node type declares GPUs"),
        (_set("available_node_types", {"x": {"resources": {}, "node_config": {}}}),
         "Ray cannot prepare the config"),
    ]  # fmt: skip
    spec = sweep_file(tmp_path)
    for i, (mutate, message) in enumerate(cases):
        data = copy.deepcopy(base)
        mutate(data)
        path = write_yaml(tmp_path / f"local-{i}.yaml", data)
        rc, _, err = run_check(capsys, str(path), "--space", str(spec))
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert rc == 2 and len(errors) == 1, (message, err)
        assert message in errors[0], (message, errors[0])


def test_space_option_checks_the_sweeps_own_storage_and_tracking(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = sweep_file(tmp_path, name="good")
    rc, out, _ = run_check(capsys, str(LOCAL), "--space", str(good))
    assert rc == 0 and "good.yaml (4 CPU, 1 GPU per trial)" in out
    bad = sweep_file(tmp_path, name="bad", storage={"path": "/home/me/sweeps"},
                     tracking={"uri": "sqlite:///mlflow.db"})  # fmt: skip
    rc, _, err = run_check(capsys, str(LOCAL), "--space", str(bad))
    assert rc == 2
    assert f"{bad}: storage.path: storage '/home/me/sweeps' is node-local" in err
    assert f"{bad}: tracking.uri: tracking URI 'sqlite:///mlflow.db' is a store on one node's disk" in err
    cpu_only = sweep_file(tmp_path, name="cpu", resources={"cpus": 2})
    data = yaml.safe_load(LOCAL.read_text())
    del data["metadata"]["cmx"]["gpus_per_node"]
    path = write_yaml(tmp_path / "no-gpus.yaml", data)
    rc, _, err = run_check(capsys, str(path), "--space", str(cpu_only))
    assert rc == 0, err  # CPU trials need no GPU workers


def test_unreadable_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("cluster_name: [unclosed\n")
    rc, _, err = run_check(capsys, str(path))
    assert rc == 2
    assert err.strip().startswith("error: ") and "invalid YAML" in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------ the security model (docs/scaling.md)


def _edit_command(key: str, index: int, old: str, new: str) -> Mutation:
    def mutate(d: dict[str, Any]) -> None:
        assert old in d[key][index], (key, index, d[key][index])
        d[key][index] = d[key][index].replace(old, new)

    return mutate


def _head_start(d: dict[str, Any]) -> int:
    return next(i for i, c in enumerate(d["head_start_ray_commands"]) if "ray start" in c)


TOKEN_ENV = "RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$HOME/.cmx-cluster/ray_auth_token "
INSECURE: list[tuple[str, str, int, str, str, str]] = [
    # (id, key, index, old, new, expected one-line error)
    ("head-auth-implicit", "head_start_ray_commands", 2, TOKEN_ENV, "",
     "head_start_ray_commands[2]: `ray start` leaves Ray's auth mode implicit"),
    ("worker-auth-implicit", "worker_start_ray_commands", 1, TOKEN_ENV, "",
     "worker_start_ray_commands[1]: `ray start` leaves Ray's auth mode implicit"),
    ("auth-disabled", "worker_start_ray_commands", 1, "RAY_AUTH_MODE=token", "RAY_AUTH_MODE=disabled",
     "worker_start_ray_commands[1]: RAY_AUTH_MODE=disabled: anyone who reaches the cluster's ports can run code"),
    ("token-not-shipped", "head_start_ray_commands", 2, "$HOME/.cmx-cluster/ray_auth_token", "/etc/ray-token",
     "head_start_ray_commands[2]: token auth reads /etc/ray-token but file_mounts ships no token there"),
    ("dashboard-all-interfaces", "head_start_ray_commands", 2, "--dashboard-host=127.0.0.1",
     "--dashboard-host=0.0.0.0", "head_start_ray_commands[2]: `--dashboard-host=0.0.0.0` listens on every interface"),
    ("mlflow-all-interfaces", "head_start_ray_commands", 1, "CMX_MLFLOW_HOST=<HEAD_IP>", "CMX_MLFLOW_HOST=0.0.0.0",
     "head_start_ray_commands[1]: `CMX_MLFLOW_HOST=0.0.0.0` listens on every interface"),
    ("mlflow-host-missing", "head_start_ray_commands", 1, "CMX_MLFLOW_HOST=<HEAD_IP>", "",
     "head_start_ray_commands[1]: start-mlflow.sh without CMX_MLFLOW_HOST"),
    ("mlflow-auth-off", "head_start_ray_commands", 1, "bash ~/cmx", "CMX_MLFLOW_AUTH=none bash ~/cmx",
     "head_start_ray_commands[1]: CMX_MLFLOW_AUTH=none starts MLflow without authentication"),
    ("raw-mlflow-server", "head_start_ray_commands", 1, "bash ~/cmx/cluster/start-mlflow.sh",
     "mlflow server --host <HEAD_IP>", "head_start_ray_commands[1]: `mlflow server` without authentication"),
]  # fmt: skip


@pytest.mark.parametrize(("key", "index", "old", "new", "message"), [c[1:] for c in INSECURE],
                         ids=[c[0] for c in INSECURE])  # fmt: skip
def test_insecure_local_file_fails_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], key: str, index: int, old: str, new: str, message: str
) -> None:
    """Each rule of the security model fails the file on its own, naming the command and the fix."""
    data = yaml.safe_load(LOCAL.read_text())
    _edit_command(key, index, old, new)(data)
    path = write_yaml(tmp_path / "local.yaml", data)
    rc, out, err = run_check(capsys, str(path))
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert rc == 2, out + err
    assert errors == [errors[0]] and errors[0].startswith(f"error: {path}: {message}"), err
    assert " — " in errors[0]


def test_auth_rules_read_exports_home_paths_and_rays_defaults(tmp_path: Path) -> None:
    """An exported mode carries to later commands; /home/<user> and $HOME name the same token path; a
    file without start commands gets Ray's defaults, which leave the mode implicit."""
    aws = yaml.safe_load(AWS.read_text())
    aws["metadata"]["cmx"]["space"] = str(REPO / "examples" / "imagenet-search.yaml")
    assert aws["file_mounts"]["/home/ubuntu/.cmx-cluster/ray_auth_token"] == "~/.cmx/clusters/cmx/ray_auth_token"
    assert check_cluster_file(write_yaml(tmp_path / "aws.yaml", aws)).ok

    local = yaml.safe_load(LOCAL.read_text())
    i = _head_start(local)
    local["head_start_ray_commands"][i] = local["head_start_ray_commands"][i].replace(TOKEN_ENV, "")
    local["head_start_ray_commands"].insert(i, "export RAY_AUTH_MODE=token")
    report = check_cluster_file(write_yaml(tmp_path / "exported.yaml", local))
    assert [p.key for p in report.problems] == [f"head_start_ray_commands[{i + 1}]"]
    assert "reads ~/.ray/auth_token but file_mounts ships no token there" in report.problems[0].message
    assert "~/.ray/auth_token: ~/.cmx/clusters/cmx-onprem/ray_auth_token" in report.problems[0].hint

    del local["head_start_ray_commands"], local["worker_start_ray_commands"]
    report = check_cluster_file(write_yaml(tmp_path / "defaults.yaml", local))
    assert {p.key.split("[")[0] for p in report.problems} == {"head_start_ray_commands", "worker_start_ray_commands"}
    assert all("auth mode implicit" in p.message for p in report.problems)


def test_excluding_git_is_noted(tmp_path: Path) -> None:
    """Runs record the shipped commit only when .git travels; a file that drops it gets a note."""
    assert not any(".git" in n for n in check_cluster_file(LOCAL).notes)
    data = yaml.safe_load(LOCAL.read_text())
    data["rsync_exclude"].append(".git")
    report = check_cluster_file(write_yaml(tmp_path / "nogit.yaml", data))
    assert report.ok and any("drops .git: runs on the cluster will record no git commit" in n for n in report.notes)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"file_mounts": {"~/cmx": ".", "~/.cmx-cluster/ray_auth_token": "~/.ray/auth_token"}},
         "ships ~/.ray/auth_token as the Ray token, not this cluster's own token ~/.cmx/clusters/cmx-onprem/ray_auth_token"),
        ({"cluster_name": "lab-b"},
         "ships ~/.cmx/clusters/cmx-onprem/ray_auth_token as the Ray token, not this cluster's own token "
         "~/.cmx/clusters/lab-b/ray_auth_token"),
    ],
    ids=["laptop-wide-token", "renamed-cluster"],
)  # fmt: skip
def test_a_token_shared_with_other_clusters_fails(tmp_path: Path, edit: dict[str, Any], message: str) -> None:
    """One token per cluster: shipping the laptop-wide token, or another cluster's, is an error."""
    local = yaml.safe_load(LOCAL.read_text())
    local.update(edit)
    report = check_cluster_file(write_yaml(tmp_path / "local.yaml", local))
    assert [p.key for p in report.problems] == ["file_mounts[~/.cmx-cluster/ray_auth_token]"], report.problems
    assert report.problems[0].message == message
    assert "cmx cluster up" in report.problems[0].hint
