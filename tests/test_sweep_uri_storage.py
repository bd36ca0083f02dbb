"""A sweep whose storage is a URI (here `file://`, through pyarrow.fs as s3:// goes): the spec is
saved there, `cmx sweep --resume NAME --storage URI` finds it and resumes without redoing trials."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.cli import run_cmx
from support.sweeps import trial_rows, write_spec

from cmx.cluster.runtime import RAY_TMP_ENV
from cmx.sweep.storage import SOURCE_FILE, SPEC_FILE, read_text, remove_dir, write_text

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_storage_files_on_a_uri(tmp_path: Path) -> None:
    folder = f"file://{tmp_path}/a/b"
    assert read_text(folder, "x.yaml") is None
    assert write_text(folder, "x.yaml", "k: 1\n") == f"{folder}/x.yaml"
    assert (tmp_path / "a" / "b" / "x.yaml").read_text() == "k: 1\n"
    assert read_text(folder, "x.yaml") == "k: 1\n"
    remove_dir(folder)
    assert not (tmp_path / "a" / "b").exists()


def test_resume_by_name_from_uri_storage(tmp_path: Path, fmnist_tiny_paths: dict[str, str], own_ray_tmp: str) -> None:
    name = "uri-store"
    path = write_spec(
        tmp_path, fmnist_tiny_paths, name=name, epochs=1, samples=2, backend="torchvision", scheduler={"name": "none"}
    )
    storage = f"file://{tmp_path}/remote"
    env = {RAY_TMP_ENV: own_ray_tmp}
    first = run_cmx("sweep", "--space", str(path), "--storage", storage, env=env, timeout=400)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    exp = tmp_path / "remote" / name
    assert (exp / SPEC_FILE).is_file() and (exp / SOURCE_FILE).read_text() == path.read_text()
    trials = sorted(exp.glob("trial_*"))
    assert len(trials) == 2 and all(len(trial_rows(t)) == 1 for t in trials)

    again = run_cmx("sweep", "--resume", name, "--storage", storage, env=env, timeout=400)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert f"resuming sweep {name}" in again.stderr
    assert sorted(exp.glob("trial_*")) == trials and all(len(trial_rows(t)) == 1 for t in trials)  # nothing redone

    missing = run_cmx("sweep", "--resume", "nope", "--storage", storage, env=env, timeout=60)
    assert missing.returncode == 2 and "no sweep named 'nope'" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
