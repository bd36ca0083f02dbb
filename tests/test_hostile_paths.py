"""Hostile paths, names, URIs and trust boundaries: each is refused with one line, before anything is
written or deleted, and nothing lands outside the test's own folder.

Families: `--fresh` deletes only a sweep's folder; names that become paths stay inside their parent;
storage/output folders that are files; tracking and storage URIs parsed once; an MLflow server bound
beyond localhost needs --allowed-hosts; SSH open to the internet fails `cluster check --strict`;
world-writable sweep storage is not resumed from.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.cli import run_cmx

from cmx.core.errors import ConfigError
from cmx.core.paths import check_dir_target, safe_child
from cmx.core.uris import check_storage_location, check_tracking_uri

REPO = Path(__file__).resolve().parents[1]
AWS = REPO / "cluster" / "config.yaml"
TIMEOUT = 120


def listing(root: Path) -> set[str]:
    """Every path under `root` (relative), to compare before and after a command."""
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def one_error_line(out: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    """Assert the refusal: exit `code`, exactly one non-empty stderr line starting `error:`."""
    assert "Traceback" not in out.stderr + out.stdout, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), out.stderr
    assert out.returncode == code, out.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def sweep_file(tmp_path: Path, name: str = "s", **sections: Any) -> Path:
    """A minimal valid sweep file (its data is never read: every command here stops before)."""
    spec: dict[str, Any] = {
        "name": name,
        "base": {"model": {"name": "convmixer_nano"},
                 "data": {"train_path": "s3://b/train.beton", "val_path": "s3://b/val.beton"}},
        "space": {"optim.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}},
        "search": {"num_samples": 1},
        "resources": {"cpus": 1},
        "tracking": {"enabled": False},
    }  # fmt: skip
    spec.update(sections)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.fixture
def place(tmp_path: Path) -> dict[str, Path]:
    """A home, a working directory and a sweep file, all under tmp_path."""
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    return {"root": tmp_path, "home": home, "work": work, "spec": sweep_file(tmp_path)}


def cmx(place: dict[str, Path], *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return run_cmx(*args, home=place["home"], cwd=place["work"], timeout=TIMEOUT, **kw)


# ------------------------------------------------------------------ --fresh deletes only a sweep


def test_fresh_refuses_a_users_folder_and_leaves_it_intact(place: dict[str, Path]) -> None:
    storage = place["root"] / "storage"
    precious = storage / "thesis"
    (precious / "chapter").mkdir(parents=True)
    (precious / "chapter" / "draft.tex").write_text("years of work")
    before = listing(place["root"])
    out = cmx(place, "sweep", "--space", str(place["spec"]), "--storage", str(storage), "--name", "thesis", "--fresh")
    one_error_line(out, 2, "--fresh", str(precious), "cmx-sweep.yaml")
    assert (precious / "chapter" / "draft.tex").read_text() == "years of work"
    assert listing(place["root"]) == before


def test_fresh_refuses_a_users_folder_on_file_uri_storage(place: dict[str, Path]) -> None:
    storage = place["root"] / "storage"
    (storage / "photos").mkdir(parents=True)
    (storage / "photos" / "a.jpg").write_bytes(b"\xff\xd8")
    before = listing(place["root"])
    out = cmx(place, "sweep", "--space", str(place["spec"]), "--storage", f"file://{storage}", "--name", "photos",
              "--fresh")  # fmt: skip
    one_error_line(out, 2, "--fresh", "photos")
    assert listing(place["root"]) == before


def test_fresh_refuses_a_symlink_and_a_file(place: dict[str, Path]) -> None:
    storage = place["root"] / "storage"
    target = place["root"] / "elsewhere"
    target.mkdir()
    (target / "keep").write_text("x")
    storage.mkdir()
    (storage / "link").symlink_to(target)
    (storage / "plain").write_text("not a folder")
    before = listing(place["root"])
    for name in ("link", "plain"):
        out = cmx(place, "sweep", "--space", str(place["spec"]), "--storage", str(storage), "--name", name, "--fresh")
        one_error_line(out, 2, "--fresh")
    assert listing(place["root"]) == before


def test_check_removable_accepts_a_sweep_folder_or_an_empty_one(tmp_path: Path) -> None:
    from cmx.sweep.storage import SPEC_FILE, check_removable

    (tmp_path / "empty").mkdir()
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / SPEC_FILE).write_text("name: sweep\n")
    check_removable(str(tmp_path / "empty"))
    check_removable(str(tmp_path / "sweep"))
    check_removable(str(tmp_path / "missing"))
    check_removable(f"file://{tmp_path / 'sweep'}")
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "x").write_text("x")
    with pytest.raises(ConfigError, match="holds no cmx sweep"):
        check_removable(f"file://{tmp_path / 'user'}")


# ------------------------------------------------------------------ names stay inside their parent


@pytest.mark.parametrize("name", ["../../escaped", "/abs/path", "..", "a/b"])
def test_run_name_cannot_leave_the_runs_folder(place: dict[str, Path], name: str) -> None:
    before = listing(place["root"])
    out = cmx(place, "train", "--preset", "cifar10", "--set", f"name={name}", "--no-tracking")
    one_error_line(out, 2, "run name", "`name`")
    assert listing(place["root"]) == before


@pytest.mark.parametrize("name", ["../../..", "/etc", ".."])
def test_sweep_names_cannot_walk_out(place: dict[str, Path], name: str) -> None:
    for args in (("sweep", "--resume", name), ("sweep", "status", name),
                 ("sweep", "--space", str(place["spec"]), "--name", name, "--dry-run")):  # fmt: skip
        out = cmx(place, *args)
        one_error_line(out, 2, "name")


def test_safe_child() -> None:
    assert safe_child("/r", "ok-1.2", "x") == Path("/r/ok-1.2")
    for bad in ("", ".", "..", "../x", "/abs", "a\\b", "a\0b"):
        with pytest.raises(ConfigError, match="not a plain name"):
            safe_child("/r", bad, "x")


def test_backup_pointer_cannot_leave_the_backup_folder(tmp_path: Path) -> None:
    from cmx.sweep.tune_state import BACKUP_DIR, CURRENT_FILE, current_backup

    outside = tmp_path / "outside"
    outside.mkdir()
    experiment = tmp_path / "sweep"
    (experiment / BACKUP_DIR).mkdir(parents=True)
    for pointer in ("../../outside", str(outside), ".."):
        (experiment / BACKUP_DIR / CURRENT_FILE).write_text(pointer)
        with pytest.raises(ValueError, match="not a plain name"):
            current_backup(experiment)


# ------------------------------------------------------------------ folders that are files


def test_storage_that_is_a_file_is_refused_in_dry_run(place: dict[str, Path]) -> None:
    afile = place["root"] / "afile"
    afile.write_text("x")
    for storage in (afile, afile / "below"):
        out = cmx(place, "sweep", "--space", str(place["spec"]), "--storage", str(storage), "--dry-run")
        one_error_line(out, 2, "--storage", str(afile))
    assert afile.read_text() == "x"


def test_output_dir_that_is_a_file_is_refused(place: dict[str, Path]) -> None:
    afile = place["root"] / "afile"
    afile.write_text("x")
    before = listing(place["root"])
    out = cmx(place, "train", "--preset", "cifar10", "--set", f"output_dir={afile}/runs", "--no-tracking")
    one_error_line(out, 2, "output_dir", str(afile))
    assert listing(place["root"]) == before


def test_convert_out_under_a_file_is_refused(place: dict[str, Path]) -> None:
    src = place["root"] / "src" / "cls"
    src.mkdir(parents=True)
    afile = place["root"] / "afile"
    afile.write_text("x")
    before = listing(place["root"])
    out = cmx(place, "data", "convert", str(src.parent), str(afile / "train.beton"))
    one_error_line(out, 2, "OUT", str(afile))
    assert listing(place["root"]) == before


def test_check_dir_target_creates_nothing(tmp_path: Path) -> None:
    check_dir_target(tmp_path / "a" / "b" / "c", "x")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ URIs parsed once


@pytest.mark.parametrize(
    ("uri", "says"),
    [("htp:/host", "unsupported scheme 'htp'"), ("ftp://host/x", "unsupported scheme 'ftp'"),
     ("http://[::1", "not a valid URI"), ("http://host:99999", "not a valid URI"), ("http://", "no host"),
     ("sqlite:/x.db", "must be followed by //")],
)  # fmt: skip
def test_bad_tracking_uri_is_one_line_and_creates_no_store(place: dict[str, Path], uri: str, says: str) -> None:
    for args in (("runs", "list", "--tracking-uri", uri),
                 ("sweep", "--space", str(place["spec"]), "--tracking-uri", uri, "--dry-run")):  # fmt: skip
        out = cmx(place, *args)
        one_error_line(out, 2, "--tracking-uri", says)
    assert listing(place["work"]) == set()


def test_bad_tracking_uri_from_the_environment_and_the_file(place: dict[str, Path]) -> None:
    out = cmx(place, "runs", "list", env={"MLFLOW_TRACKING_URI": "htp:/typo"})
    one_error_line(out, 2, "htp")
    spec = sweep_file(place["root"], name="t", tracking={"uri": "ftp://x"})
    out = cmx(place, "sweep", "--space", str(spec), "--dry-run")
    one_error_line(out, 2, "tracking.uri", "ftp")
    assert listing(place["work"]) == set()


def test_supported_uris_pass() -> None:
    for uri in ("http://localhost:5000", "https://mlflow.example.com", "sqlite:///tmp/m.db", "mlruns/m.db",
                "postgresql+psycopg2://u:p@db:5432/mlflow", "mysql://u@db/mlflow"):  # fmt: skip
        assert check_tracking_uri(uri, "x") == uri
    for loc in ("/tmp/sweeps", "rel/sweeps", "s3://bucket/cmx", "gs://b/c", "file:///tmp/x"):
        assert check_storage_location(loc, "x") == loc


@pytest.mark.parametrize("storage", ["ftp://host/sweeps", "s3:/bucket", "htp://x"])
def test_bad_storage_uri_is_one_line(place: dict[str, Path], storage: str) -> None:
    out = cmx(place, "sweep", "--space", str(place["spec"]), "--storage", storage, "--dry-run")
    one_error_line(out, 2, "storage.path", storage)
    assert listing(place["work"]) == set()


# ------------------------------------------------------------------ trust boundaries


def test_server_beyond_localhost_needs_allowed_hosts(place: dict[str, Path]) -> None:
    out = cmx(place, "server", "--host", "0.0.0.0", "--port", "1")
    one_error_line(out, 2, "--allowed-hosts")
    assert not (place["home"] / "mlflow").exists()


def test_world_writable_storage_is_not_resumed_from(place: dict[str, Path]) -> None:
    storage = place["root"] / "shared"
    storage.mkdir()
    os.chmod(storage, 0o777)
    out = cmx(place, "sweep", "--space", str(place["spec"]), "--storage", str(storage))
    one_error_line(out, 2, "world-writable", str(storage))
    os.chmod(storage, 0o755)
    (storage / "s").mkdir()
    os.chmod(storage / "s", 0o777)
    out = cmx(place, "sweep", "--space", str(place["spec"]), "--storage", str(storage))
    one_error_line(out, 2, "world-writable", str(storage / "s"))
    assert listing(storage) == {"s"}


def _aws_with(rule: dict[str, Any], tmp_path: Path) -> Path:
    data = yaml.safe_load(AWS.read_text())
    data["provider"]["security_group"]["IpPermissions"] = [rule]
    meta = data["metadata"]["cmx"]
    if meta.get("space"):  # relative to the shipped file
        meta["space"] = str((AWS.parent / meta["space"]).resolve())
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.mark.parametrize(
    "rule",
    [{"FromPort": 22, "ToPort": 22, "IpProtocol": "TCP", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]},
     {"FromPort": 0, "ToPort": 65535, "IpProtocol": "tcp", "Ipv6Ranges": [{"CidrIpv6": "::/0"}]},
     {"IpProtocol": "-1", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}],
)  # fmt: skip
def test_strict_cluster_check_rejects_ssh_open_to_the_internet(tmp_path: Path, rule: dict[str, Any]) -> None:
    path = _aws_with(rule, tmp_path)
    out = run_cmx("cluster", "check", str(path), "--strict", timeout=TIMEOUT)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    ssh = [line for line in out.stderr.splitlines() if "IpPermissions[0]" in line]
    assert len(ssh) == 1 and ssh[0].startswith("error:") and "port 22" in ssh[0], out.stderr
    relaxed = run_cmx("cluster", "check", str(path), timeout=TIMEOUT)
    assert relaxed.returncode == 0 and "warning:" in relaxed.stdout and "port 22" in relaxed.stdout


def test_ssh_from_one_office_passes(tmp_path: Path) -> None:
    rule = {"FromPort": 22, "ToPort": 22, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "203.0.113.0/24"}]}
    out = run_cmx("cluster", "check", str(_aws_with(rule, tmp_path)), "--strict", timeout=TIMEOUT)
    assert "IpPermissions" not in out.stderr
