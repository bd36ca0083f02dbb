"""Hostile data, checkpoints and interruptions: each fails as one `error:` line, never hangs, never
leaves a partial file or a process behind.

Families: symlinked and odd ImageFolders (loops, a single class, train/val classes that differ),
damaged data files (a sidecar with wrong types, a checkpoint with a string format version or
another model's weights, a `.beton` with an extra field), and interrupted work (SIGTERM to
`cmx data convert` and `cmx server`, a damaged tracking journal for `cmx runs replay`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import psutil
import pytest
import yaml
from PIL import Image
from support.cli import run_cmx, start_cmx
from support.data import BASE_COLOURS, smooth_image
from support.training import train_config

from cmx.core.net import free_port, is_listening


def one_error_line(out: subprocess.CompletedProcess[str], *needles: str, code: int = 1) -> str:
    """Exit `code`, exactly one non-empty stderr line starting `error:` that holds every needle."""
    assert "Traceback" not in out.stderr, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), out.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert out.returncode == code, (out.returncode, out.stderr)
    return lines[0]


def listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def image_folder(root: Path, classes: tuple[str, ...] = ("cat", "dog"), per_class: int = 3, size: int = 32) -> Path:
    colours = list(BASE_COLOURS.values())
    for ci, name in enumerate(classes):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            arr = smooth_image(size, size, colours[ci % len(colours)], seed=10 * ci + k)
            Image.fromarray(arr, "RGB").save(d / f"{k}.png" if k % 2 else d / f"{k}.jpg")
    return root


@pytest.fixture(scope="module")
def small_beton(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 classes x 3 images at 32 px, written by `cmx data convert`."""
    root = tmp_path_factory.mktemp("beton")
    src = image_folder(root / "src")
    out = root / "small.beton"
    res = run_cmx("data", "convert", str(src), str(out), "--workers", "1", home=root / "home", timeout=120)
    assert res.returncode == 0, res.stderr
    return out


def beton_copy(small_beton: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy.beton"
    dst.write_bytes(small_beton.read_bytes())
    (tmp_path / "copy.beton.json").write_text((small_beton.parent / "small.beton.json").read_text())
    return dst


# ------------------------------------------------------------------ symlinks and odd folders


def test_symlink_loops_are_followed_once_and_counted(tmp_path: Path) -> None:
    src = image_folder(tmp_path / "src")
    os.symlink(".", src / "cat" / "self")  # cat/self/self/... for ever
    os.symlink("..", src / "dog" / "up")  # back to ROOT: every class again
    os.symlink(src / "cat", src / "dog" / "cats")  # another class's folder
    out = tmp_path / "out" / "x.beton"
    res = run_cmx("data", "convert", str(src), str(out), "--workers", "1", home=tmp_path / "home", timeout=60)
    assert res.returncode == 0, res.stderr
    assert "(6 images, 2 classes" in res.stdout, res.stdout
    assert "skipped 3 linked folder(s)" in res.stdout, res.stdout
    side = json.loads((tmp_path / "out" / "x.beton.json").read_text())
    assert side["num_samples"] == 6 and len(side["skipped_links"]) == 3
    assert listing(tmp_path / "out") == {"x.beton", "x.beton.json"}


def test_class_folder_linked_to_another_class_is_one_error(tmp_path: Path) -> None:
    src = image_folder(tmp_path / "src")
    os.symlink(src / "cat", src / "emu")
    before = listing(tmp_path)
    res = run_cmx("data", "convert", str(src), str(tmp_path / "x.beton"), home=tmp_path / "home", timeout=60)
    one_error_line(res, str(src / "emu"), "already scanned")
    assert listing(tmp_path) - before <= {"home"} | {p for p in listing(tmp_path) if p.startswith("home")}


def test_single_class_folder_is_one_error(tmp_path: Path) -> None:
    src = image_folder(tmp_path / "src", classes=("cat",))
    res = run_cmx("data", "convert", str(src), str(tmp_path / "x.beton"), home=tmp_path / "home", timeout=60)
    one_error_line(res, str(src), "only one class")
    assert not (tmp_path / "x.beton").exists() and not list(tmp_path.glob(".x.beton*"))


def _train_yaml(tmp_path: Path, train_dir: Path, val_dir: Path) -> Path:
    export = SimpleNamespace(train_dir=train_dir, val_dir=val_dir)
    cfg = train_config(export, loop={"epochs": 1}).model_dump(mode="json")
    cfg["data"]["batch_size"] = 2
    cfg["loop"]["threads"] = 1
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize(
    ("val_classes", "needle"),
    [
        (("cat", "emu"), "only in val: emu"),
        (("cat", "dog", "emu"), "only in val: emu"),
        (("cat",), "only in train: dog"),
    ],
)
def test_val_classes_differing_from_train_is_one_error(
    tmp_path: Path, val_classes: tuple[str, ...], needle: str
) -> None:
    train = image_folder(tmp_path / "train")
    val = image_folder(tmp_path / "val", classes=val_classes) if len(val_classes) > 1 else None
    if val is None:  # one val class: the single-class check names the val folder
        val = image_folder(tmp_path / "val", classes=val_classes)
    config = _train_yaml(tmp_path, train, val)
    run_dir = tmp_path / "run"
    res = run_cmx(
        "train",
        "--config",
        str(config),
        "--run-dir",
        str(run_dir),
        "--no-progress",
        "--no-tracking",
        home=tmp_path / "home",
    )
    if len(val_classes) == 1:
        one_error_line(res, str(val), "only one class")
    else:
        one_error_line(res, str(train), str(val), needle)
    assert not run_dir.exists()


# ------------------------------------------------------------------ damaged data files


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("num_samples", "6"),
        ("num_samples", 6.5),
        ("num_samples", None),
        ("class_names", [1, 2]),
        ("class_names", ["cat", "cat"]),
        ("grayscale", "no"),
        ("source_width", "wide"),
        ("class_counts", [3, 3]),
        ("skipped", {"a": 1}),
    ],
)
def test_sidecar_with_wrong_types_is_one_line(small_beton: Path, tmp_path: Path, key: str, value: object) -> None:
    beton = beton_copy(small_beton, tmp_path)
    side_file = tmp_path / "copy.beton.json"
    side = json.loads(side_file.read_text())
    side[key] = value
    side_file.write_text(json.dumps(side))
    before = listing(tmp_path)
    for command in ("inspect", "verify"):
        res = run_cmx("data", command, str(beton), home=tmp_path / "home", timeout=60)
        one_error_line(res, str(side_file), key)
    assert {p for p in listing(tmp_path) - before if not p.startswith("home")} == set()


def test_beton_with_an_extra_field_inspects_and_verifies(tmp_path: Path) -> None:
    """A valid file FFCV wrote with a third field: cmx reads its image and label, lists the extra."""
    from ffcv.fields import FloatField, IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    class Samples:
        def __len__(self) -> int:
            return 4

        def __getitem__(self, i: int) -> tuple[np.ndarray, int, float]:
            return smooth_image(16, 16, (200, 60, 40), seed=i), i % 2, 0.5 * i

    out = tmp_path / "extra.beton"
    fields = {"image": RGBImageField(write_mode="raw"), "label": IntField(), "weight": FloatField()}
    DatasetWriter(str(out), fields, num_workers=1).from_indexed_dataset(Samples())
    inspect = run_cmx("data", "inspect", str(out), home=tmp_path / "home", timeout=60)
    assert inspect.returncode == 0 and "Traceback" not in inspect.stderr, inspect.stderr
    assert "weight (float)" in inspect.stdout and "4 samples" in inspect.stdout
    verify = run_cmx("data", "verify", str(out), home=tmp_path / "home", timeout=60)
    assert verify.returncode == 0 and "ok: 4 of 4" in verify.stdout, verify.stderr


def _checkpoint(folder: Path, train_dir: Path, **changes: object) -> Path:
    """A cmx checkpoint of a tiny model (no training), with `changes` applied to its dict."""
    import torch

    from cmx.core.config import TrainConfig
    from cmx.pipelines.checkpoint import save_checkpoint
    from cmx.pipelines.trainer import build_model

    config = train_config(SimpleNamespace(train_dir=train_dir, val_dir=train_dir))
    model = build_model(config, 2)
    state: dict[str, object] = {
        "model": model.state_dict(),
        "config": config.model_dump(mode="json"),
        "epoch": 1,
        "step": 3,
        "num_classes": 2,
        "class_names": ["cat", "dog"],
    }
    if changes.pop("other_size", False):
        bigger = TrainConfig.model_validate({**state["config"], "model": {**config.model.model_dump(), "dim": 24}})  # type: ignore[dict-item]
        state["model"] = build_model(bigger, 2).state_dict()
    path = folder / "checkpoint.pt"
    save_checkpoint(state, path)
    if changes:
        raw = torch.load(path, weights_only=True)
        raw.update(changes)
        torch.save(raw, path)
    return path


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"format_version": "1"}, "format_version is str"),
        ({"epoch": "one"}, "epoch is str"),
        ({"num_classes": 2.0}, "num_classes is float"),
        ({"model": [1, 2]}, "model is list"),
        ({"other_size": True}, "weights do not fit the model"),
    ],
)
def test_damaged_checkpoint_is_one_line_for_eval(tmp_path: Path, changes: dict[str, object], needle: str) -> None:
    data = image_folder(tmp_path / "data")
    ckpt = _checkpoint(tmp_path / "ckpt", data, **changes)
    before = listing(tmp_path)
    res = run_cmx("eval", str(ckpt), "--data", str(data), "--device", "cpu", home=tmp_path / "home", timeout=120)
    one_error_line(res, str(ckpt), needle)
    assert {p for p in listing(tmp_path) - before if not p.startswith("home")} == set()


def test_string_format_version_is_one_line_for_resume(tmp_path: Path) -> None:
    data = image_folder(tmp_path / "data")
    run_dir = tmp_path / "run"
    ckpt = _checkpoint(run_dir / "checkpoints" / "last", data, format_version="1")
    config = train_config(SimpleNamespace(train_dir=data, val_dir=data)).model_dump(mode="json")
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    before = listing(tmp_path)
    res = run_cmx(
        "train", "--resume", str(run_dir), "--no-progress", "--no-tracking", home=tmp_path / "home", timeout=120
    )
    one_error_line(res, str(ckpt), "format_version")
    assert {p for p in listing(tmp_path) - before if not p.startswith("home")} == set()


# ------------------------------------------------------------------ interrupted work


def _alive(pids: set[int]) -> set[int]:
    out = set()
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.add(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def test_sigterm_during_convert_leaves_no_partial_file_or_process(tmp_path: Path) -> None:
    src = image_folder(tmp_path / "src", per_class=60, size=256)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "big.beton"
    proc = start_cmx(
        "data", "convert", str(src), str(out), "--workers", "2", "--write-mode", "jpg", home=tmp_path / "home"
    )
    try:
        deadline, children = time.monotonic() + 60, set()
        while time.monotonic() < deadline and proc.poll() is None:
            if list(out_dir.glob(".big.beton.tmp-*")):  # the writer has started
                children = {c.pid for c in psutil.Process(proc.pid).children(recursive=True)}
                if children:  # and forked its workers
                    break
            time.sleep(0.01)
        assert proc.poll() is None, "conversion finished before it could be interrupted: make the folder bigger"
        assert children, "no writer processes seen"
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stdout.read() if proc.stdout else ""
    assert os.listdir(out_dir) == []
    time.sleep(0.5)
    assert _alive(children) == set()


HANGING_CLEANUP = """
import multiprocessing, sys, threading, time
from cmx.cli.signals import install_sigterm, set_cleanup_grace
install_sigterm()
set_cleanup_grace(1.0)
child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(600,), daemon=True)
child.start()
print(child.pid, flush=True)
held = threading.Lock()
held.acquire()
try:
    time.sleep(600)
finally:
    held.acquire()  # a cleanup that never ends (as a lock left held by an interrupted `with`)
"""


def test_sigterm_watchdog_ends_a_cleanup_that_hangs(tmp_path: Path) -> None:
    """A command with a cleanup grace exits 143 within it, with every thread's stack and no children."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HANGING_CLEANUP], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        child = int(proc.stdout.readline())
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM
    assert "cleanup after SIGTERM took over 1 s" in err
    assert 'File "<string>", line 14' in err  # the stack names the line that hung: `held.acquire()`
    time.sleep(0.3)
    assert _alive({child}) == set()


@pytest.mark.slow
def test_sigterm_stops_cmx_server_and_its_mlflow(tmp_path: Path) -> None:
    port = free_port()
    proc = start_cmx(
        "server", "--port", str(port), "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
        "--artifact-root", str(tmp_path / "artifacts"), home=tmp_path / "home",
    )  # fmt: skip
    try:
        deadline, healthy = time.monotonic() + 120, False
        while time.monotonic() < deadline and proc.poll() is None and not healthy:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    healthy = r.status == 200
            except OSError:
                time.sleep(0.3)
        assert healthy, proc.stdout.read() if proc.poll() is not None and proc.stdout else "no /health"
        children = {c.pid for c in psutil.Process(proc.pid).children(recursive=True)}
        assert children
        proc.send_signal(signal.SIGTERM)  # to cmx alone, as a service manager does
        proc.wait(timeout=30)
        time.sleep(0.5)
        assert not is_listening("127.0.0.1", port)
        assert _alive(children) == set()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def _tracking_dir(tmp_path: Path, journal: str | None, state: object = None) -> Path:
    d = tmp_path / "sweep"
    d.mkdir()
    if state is None:
        state = {
            "version": 1,
            "uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
            "session": "abc123",
            "experiment": "x",
            "experiment_id": None,
            "runs": {},
            "meta": {},
        }
    (d / "cmx-mlflow.json").write_text(state if isinstance(state, str) else json.dumps(state))
    if journal is not None:
        (d / "cmx-mlflow-journal.jsonl").write_text(journal)
    return d


GOOD_OP = json.dumps({"op": "start", "key": "t1", "name": "t1", "parent": None, "tags": {}, "ts": 1})


@pytest.mark.parametrize(
    ("journal", "needle"),
    [
        ("not json at all\n" + GOOD_OP + "\n", ":1: not JSON"),
        (GOOD_OP + "\n[1, 2]\n", ":2: a JSON list"),
        ('{"op": "explode", "key": "t1"}\n', ":1: unknown op"),
        ('{"op": "log", "key": "t1", "metrics": "x", "params": {}, "tags": {}}\n', "metrics is"),
        ('{"op": "log", "key": "t1", "metrics": [["a", "b"]], "params": {}, "tags": {}}\n', "metric row"),
        ('{"op": "end", "key": 7, "status": "FINISHED", "tags": {}, "ts": 1}\n', "key is 7"),
    ],
)
def test_replay_of_a_damaged_journal_is_one_line(tmp_path: Path, journal: str, needle: str) -> None:
    d = _tracking_dir(tmp_path, journal)
    before = (d / "cmx-mlflow-journal.jsonl").read_text()
    res = run_cmx("runs", "replay", str(d), home=tmp_path / "home", timeout=60)
    one_error_line(res, "cmx-mlflow-journal.jsonl", needle)
    assert (d / "cmx-mlflow-journal.jsonl").read_text() == before  # nothing dropped
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize(
    ("state", "needle"),
    [("{truncated", "unreadable"), ("[]", "not a cmx tracking state"), ({"uri": 5, "runs": {}}, "uri is 5")],
)
def test_replay_with_a_damaged_state_file_is_one_line(tmp_path: Path, state: object, needle: str) -> None:
    d = _tracking_dir(tmp_path, None, state)
    res = run_cmx("runs", "replay", str(d), home=tmp_path / "home", timeout=60)
    one_error_line(res, "cmx-mlflow.json", needle)


def test_replay_of_a_truncated_journal_drops_only_the_torn_line(tmp_path: Path) -> None:
    d = _tracking_dir(tmp_path, GOOD_OP[:25])  # a writer killed mid-line: no complete call
    res = run_cmx("runs", "replay", str(d), home=tmp_path / "home", timeout=120)
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    assert "delivered 0 journaled call(s)" in res.stdout
    assert not (d / "cmx-mlflow-journal.jsonl").exists()


def test_binary_sidecar_is_one_line(small_beton: Path, tmp_path: Path) -> None:
    beton = beton_copy(small_beton, tmp_path)
    side_file = tmp_path / "copy.beton.json"
    side_file.write_bytes(b"\xff\xfe\x00binary" * 10)
    for command in ("inspect", "verify"):
        res = run_cmx("data", command, str(beton), home=tmp_path / "home", timeout=60)
        one_error_line(res, str(side_file), "unreadable sidecar")


def test_binary_tracking_state_is_one_line(tmp_path: Path) -> None:
    d = _tracking_dir(tmp_path, None, {"runs": {}})
    (d / "cmx-mlflow.json").write_bytes(b"\xff\xfe\x00 not json")
    res = run_cmx("runs", "replay", str(d), home=tmp_path / "home", timeout=60)
    one_error_line(res, "cmx-mlflow.json", "unreadable tracking state")
