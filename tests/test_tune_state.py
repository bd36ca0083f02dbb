"""Tune's saved sweep state cut off by a killed driver is put back from cmx's complete copy."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
from support.cli import run_cmx
from support.sweeps import trial_rows, write_spec

from cmx.sweep.tune_state import (
    BACKUP_DIR,
    current_backup,
    is_whole,
    newest_state_files,
    repair_torn_state,
    save_backup,
)


def _state_files(d: Path, session: str, payload: int = 0) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / f"experiment_state-{session}.json").write_text(json.dumps({"trial_data": [payload] * 50}))
    (d / f"search_gen_state-{session}.json").write_bytes(pickle.dumps({"counter": payload, "pad": "x" * 500}))
    (d / f"searcher-state-{session}.pkl").write_bytes(pickle.dumps(list(range(200 + payload))))
    (d / "tuner.pkl").write_bytes(pickle.dumps({"tuner": payload}))


def _cut(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_whole_and_cut_files_told_apart(tmp_path: Path) -> None:
    _state_files(tmp_path, "2026-01-01_00-00-00")
    files = newest_state_files(tmp_path)
    assert [f.name.split("-")[0] for f in files] == ["experiment_state", "search_gen_state", "searcher", "tuner.pkl"]
    assert all(map(is_whole, files))
    for f in files:
        _cut(f)
        assert not is_whole(f), f
    empty = tmp_path / "experiment_state-2026-01-02_00-00-00.json"
    empty.write_bytes(b"")
    assert newest_state_files(tmp_path)[0] == empty and not is_whole(empty)  # the newest session is read


def test_repair_puts_back_the_complete_copy(tmp_path: Path) -> None:
    staging, exp = tmp_path / "staging", tmp_path / "sweep"
    _state_files(staging, "s1", payload=1)
    backed_up = [f.name for f in newest_state_files(staging)]
    _state_files(exp, "s1", payload=1)  # what Tune's copy put there
    assert save_backup(staging, exp) is not None
    assert repair_torn_state(exp) == []  # nothing cut off: nothing touched
    _cut(exp / "search_gen_state-s1.json", 0.0)  # the kill landed mid-copy
    _cut(exp / "experiment_state-s1.json", 0.3)
    restored = repair_torn_state(exp)
    assert sorted(restored) == sorted(backed_up)
    assert all(map(is_whole, newest_state_files(exp)))
    assert pickle.loads((exp / "search_gen_state-s1.json").read_bytes())["counter"] == 1


def test_backup_sets_switch_atomically_and_old_ones_go(tmp_path: Path) -> None:
    staging, exp = tmp_path / "staging", tmp_path / "sweep"
    _state_files(staging, "s1", payload=1)
    first = save_backup(staging, exp)
    _state_files(staging, "s1", payload=2)
    second = save_backup(staging, exp)
    assert first is not None and second is not None and first != second
    assert current_backup(exp) == second and not first.exists()
    assert [p.name for p in (exp / BACKUP_DIR).iterdir() if p.is_dir()] == [second.name]
    _cut(staging / "searcher-state-s1.pkl")  # Tune mid-write in staging: no backup of a partial set
    assert save_backup(staging, exp) is None and current_backup(exp) == second


def test_no_complete_copy_is_a_clear_error(tmp_path: Path) -> None:
    _state_files(tmp_path, "s1")
    _cut(tmp_path / "experiment_state-s1.json")
    with pytest.raises(ValueError, match=r"experiment_state-s1.json cut off and no complete copy"):
        repair_torn_state(tmp_path)


def test_a_newer_cut_file_is_set_aside(tmp_path: Path) -> None:
    staging, exp = tmp_path / "staging", tmp_path / "sweep"
    _state_files(staging, "s1")
    _state_files(exp, "s1")
    save_backup(staging, exp)
    (exp / "experiment_state-s2.json").write_text('{"trial_data": [')  # a later session, cut off
    repair_torn_state(exp)
    assert newest_state_files(exp)[0].name == "experiment_state-s1.json"
    assert (exp / BACKUP_DIR / "experiment_state-s2.json.torn").is_file()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_resume_after_state_cut_off_redoes_no_trial(tmp_path: Path, fmnist_tiny_paths: dict[str, str]) -> None:
    """A real sweep finishes; its saved state is then cut off as a kill mid-copy leaves it; running
    the command again restores the complete copy and re-runs nothing."""
    path = write_spec(tmp_path, fmnist_tiny_paths, name="torn", epochs=2, samples=2, backend="torchvision",
                      scheduler={"name": "none"}, search={"max_concurrent": 1})  # fmt: skip
    env = {"TUNE_GLOBAL_CHECKPOINT_S": "1"}
    first = run_cmx("sweep", "--space", str(path), env=env, timeout=400)
    assert first.returncode == 0, first.stderr[-3000:]
    exp = tmp_path / "sweeps" / "torn"
    assert current_backup(exp) is not None, "no backup of the state was kept"
    rows = {d.name: trial_rows(d) for d in exp.glob("trial_*")}
    assert len(rows) == 2
    newest = {f.name.split("-")[0]: f for f in newest_state_files(exp)}
    _cut(newest["search_gen_state"], 0.0)
    _cut(newest["experiment_state"], 0.4)
    again = run_cmx("sweep", "--space", str(path), env=env, timeout=400)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "restored the last complete copy" in again.stderr
    assert "Failed to restore" not in again.stderr
    assert {d.name: trial_rows(d) for d in exp.glob("trial_*")} == rows  # nothing re-run, no trial added
