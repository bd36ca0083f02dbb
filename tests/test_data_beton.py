"""`.beton` conversion (real FFCV writer), reading, inspection, verification and bad inputs."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from support.data import CLASSES, make_clean_folder, make_dirty_folder

from cmx.core.errors import ConfigError, DataError
from cmx.pipelines.beton import (
    convert_image_folder,
    dataset_info,
    inspect_beton,
    read_beton,
    sidecar_path,
    verify_beton,
    write_beton,
)
from cmx.pipelines.images import scan_image_folder

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def dirty(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    return make_dirty_folder(tmp_path_factory.mktemp("dirty") / "src")


@pytest.fixture(scope="module")
def converted(dirty, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("out") / "set.beton"
    report = convert_image_folder(dirty[0], out, write_mode="raw", max_resolution=None, workers=2, progress=False)
    return report


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_conversion_result(converted, dirty) -> None:
    src, bad = dirty
    assert converted.num_samples == 12
    assert sorted(Path(p).name for p, _ in converted.skipped) == sorted(bad)
    assert [Path(p).name for p in converted.ignored] == ["notes.txt"]
    assert converted.class_names == list(CLASSES)
    assert converted.class_counts == {"cat": 4, "dog": 4, "emu": 4}
    side = json.loads(sidecar_path(converted.out).read_text())
    assert side["class_to_idx"] == {"cat": 0, "dog": 1, "emu": 2}
    assert side["num_samples"] == 12 and len(side["skipped"]) == 2
    assert _leftovers(converted.out.parent) == ["set.beton", "set.beton.json"]  # no temporaries


def test_labels_equal_folder_classes_and_raw_pixels_equal_pil(converted, dirty) -> None:
    """Sample i of the file is the i-th readable file of the folder, label and pixels alike."""
    from cmx.pipelines.images import check_image, load_rgb_array

    readable = [(p, y) for p, y in scan_image_folder(dirty[0]).samples if check_image(p).ok]
    bf = read_beton(converted.out)
    assert bf.field_values("label").tolist() == [y for _, y in readable]
    mm = np.memmap(converted.out, dtype=np.uint8, mode="r")
    sizes = dict(zip(bf.alloc_table["ptr"].tolist(), bf.alloc_table["size"].tolist(), strict=True))
    for i, (path, _) in enumerate(readable):
        rec = bf.field_values("image")[i]
        ptr = int(rec["data_ptr"])
        stored = np.asarray(mm[ptr : ptr + sizes[ptr]]).reshape(int(rec["height"]), int(rec["width"]), 3)
        np.testing.assert_array_equal(stored, load_rgb_array(path), err_msg=str(path))


def test_reader_agrees_with_ffcv(converted) -> None:
    from cmx.pipelines.ffcv_compat import ffcv_imported

    with ffcv_imported():
        from ffcv.reader import Reader

        theirs = Reader(str(converted.out))
    ours = read_beton(converted.out)
    assert ours.num_samples == theirs.num_samples and ours.page_size == theirs.page_size
    assert list(ours.fields) == theirs.field_names
    np.testing.assert_array_equal(ours.alloc_table, theirs.alloc_table)
    for k, name in enumerate(ours.fields):
        np.testing.assert_array_equal(ours.field_values(name), theirs.metadata[f"f{k}"])


def test_inspect_verify_and_info(converted) -> None:
    info = inspect_beton(converted.out)
    assert info["num_samples"] == 12 and info["fields"] == {"image": "rgb_image", "label": "int"}
    assert info["class_counts"] == {"cat": 4, "dog": 4, "emu": 4}
    assert info["stored_width"]["min"] == 16 and info["stored_width"]["max"] == 48
    assert info["jpeg_fraction"] == 0.0 and info["file_bytes"] == converted.file_bytes
    report = verify_beton(converted.out, progress=False)
    assert report.ok and report.decoded == 12
    di = dataset_info(converted.out)
    assert (di.num_samples, di.num_classes, di.class_names) == (12, 3, list(CLASSES))
    folder = dataset_info(Path(json.loads(sidecar_path(converted.out).read_text())["source"]))
    assert folder.kind == "folder" and folder.num_samples == 14  # the 2 bad files are still listed


def test_jpeg_mode_limit_and_resize(dirty, tmp_path: Path) -> None:
    out = tmp_path / "small.beton"
    rep = convert_image_folder(dirty[0], out, write_mode="jpg", max_resolution=24, limit=6, workers=1, progress=False)
    assert rep.num_samples <= 6 and len(rep.class_names) == 3
    assert all(c > 0 for c in rep.class_counts.values())  # the subset spans every class
    info = inspect_beton(out)
    assert info["jpeg_fraction"] == 1.0 and max(info["stored_width"]["max"], info["stored_height"]["max"]) <= 24
    assert verify_beton(out, progress=False).ok


def test_strict_fails_and_leaves_nothing(dirty, tmp_path: Path) -> None:
    out = tmp_path / "o" / "x.beton"
    with pytest.raises(DataError, match=r"truncated\.jpg|garbage\.jpg"):
        convert_image_folder(dirty[0], out, strict=True, progress=False)
    assert not out.exists() and not sidecar_path(out).exists()


def test_existing_output_needs_overwrite(converted, dirty) -> None:
    with pytest.raises(DataError, match="already exists"):
        convert_image_folder(dirty[0], converted.out, progress=False)


def test_bad_options_are_config_errors(dirty, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="jpeg-quality"):
        convert_image_folder(dirty[0], tmp_path / "a.beton", jpeg_quality=0, progress=False)
    with pytest.raises(ConfigError, match="write mode"):
        write_beton(
            tmp_path / "b.beton",
            [(np.zeros((4, 4, 3), np.uint8), 0)],
            write_mode="png",
            progress=False,
        )  # type: ignore[arg-type]


class _Samples:
    """A real dataset whose sample 3 is what docs/architecture.md (FFCV) says hangs FFCV's writer."""

    def __init__(self, bad: str) -> None:
        self.bad = bad

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int):
        img = np.full((8, 8, 3), 10 * i, np.uint8)
        if i == 3 and self.bad == "float":
            img = img.astype(np.float32)  # FFCV: ValueError in a worker, main loop waits forever
        if i == 3 and self.bad == "gray":
            img = img[..., 0:1]
        if i == 3 and self.bad == "missing":
            raise DataError("/data/x.jpg: unreadable image (deleted after the check)")
        return img, i % 2


@pytest.mark.parametrize(("bad", "message"), [("float", "uint8"), ("gray", "shape"), ("missing", "deleted")])
def test_writer_failure_is_an_error_within_seconds(tmp_path: Path, bad: str, message: str) -> None:
    out = tmp_path / "w.beton"
    start = time.monotonic()
    with pytest.raises(DataError, match=f"FFCV writer failed: .*{message}"):
        write_beton(out, _Samples(bad), workers=2, write_mode="raw", progress=False)
    assert time.monotonic() - start < 20


class _ForkTrap:
    """The first child forked while armed blocks in C on a mutex its parent held at the fork: the
    real failure of forking a threaded process (a child stuck on a copied native lock), made certain.
    Stuck in C, the child runs no Python signal handler: a SIGTERM handler it inherited (Ray's
    driver installs one) makes it deaf to SIGTERM, which is how a forked pool's shutdown hung in CI."""

    def __init__(self) -> None:
        self.libc = ctypes.CDLL(None)
        self.mutex = ctypes.create_string_buffer(64)  # all zeros: PTHREAD_MUTEX_INITIALIZER (glibc)
        self.armed = False
        os.register_at_fork(after_in_child=self._in_child, after_in_parent=self._in_parent)

    def _in_child(self) -> None:
        if self.armed:
            self.libc.pthread_mutex_lock(self.mutex)  # held by the parent's thread: blocks for ever

    def _in_parent(self) -> None:
        self.armed = False  # one stuck child per arming

    @contextlib.contextmanager
    def armed_once(self) -> Iterator[None]:
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(1))  # as Ray's driver
        self.libc.pthread_mutex_lock(self.mutex)
        self.armed = True
        try:
            yield
        finally:
            self.armed = False
            self.libc.pthread_mutex_unlock(self.mutex)
            signal.signal(signal.SIGTERM, previous)


_FORK_TRAP = _ForkTrap()


def test_image_check_does_not_fork(tmp_path: Path) -> None:
    """The check pool spawns its workers: a stuck fork would hang the pool's shutdown for ever."""
    from PIL import Image

    from cmx.pipelines.beton import _check_all

    paths = []
    for i in range(80):
        paths.append(tmp_path / f"{i}.jpg")
        Image.new("RGB", (8, 8), (i, 0, 0)).save(paths[-1])
    start = time.monotonic()
    with _FORK_TRAP.armed_once():
        checks = _check_all(paths, 2, progress=False)
    assert [c.ok for c in checks] == [True] * 80
    assert time.monotonic() - start < 30


def test_a_writer_process_stuck_at_the_fork_is_replaced(tmp_path: Path) -> None:
    out = tmp_path / "w.beton"
    start = time.monotonic()
    with _FORK_TRAP.armed_once():
        write_beton(out, _Samples("none"), workers=2, write_mode="raw", start_timeout=2, progress=False)
    assert time.monotonic() - start < 30
    bf = read_beton(out)
    assert bf.field_values("label").tolist() == [i % 2 for i in range(8)]
    mm = np.memmap(out, dtype=np.uint8, mode="r")
    firsts = [int(mm[int(rec["data_ptr"])]) for rec in bf.field_values("image")]
    assert firsts == [10 * i for i in range(8)]  # every sample written once, by the worker that started


def test_convert_writer_failure_leaves_no_partial_file(tmp_path: Path) -> None:
    """A file that changes between the check and the write: clear error, no output, no temporaries."""
    from cmx.pipelines import beton

    src = make_clean_folder(tmp_path / "src")
    victim = src / "dog" / "dog_0_rgb.jpg"
    real_check = beton._check_all

    def check_then_corrupt(paths, workers, progress):
        results = real_check(paths, workers, progress)
        victim.write_bytes(b"corrupted after the check")
        return results

    beton._check_all = check_then_corrupt
    try:
        with pytest.raises(DataError, match="dog_0_rgb.jpg"):
            convert_image_folder(src, tmp_path / "out" / "x.beton", workers=2, progress=False)
    finally:
        beton._check_all = real_check
    assert _leftovers(tmp_path / "out") == []


def _corruptions(good: bytes) -> dict[str, bytes]:
    return {
        "empty": b"",
        "text": b"hello, not a beton\n" * 10,
        "truncated_tail": good[: len(good) - 7],
        "truncated_half": good[: len(good) // 2],
        "header_only": good[:24],
    }


@pytest.mark.parametrize("kind", ["empty", "text", "truncated_tail", "truncated_half", "header_only", "missing"])
def test_bad_beton_is_one_clear_error(converted, tmp_path: Path, kind: str) -> None:
    path = tmp_path / f"{kind}.beton"
    if kind != "missing":
        path.write_bytes(_corruptions(converted.out.read_bytes())[kind])
    with pytest.raises(DataError) as e:
        inspect_beton(path)
    assert str(path) in e.value.one_line() and "\n" not in e.value.one_line()
    with pytest.raises(DataError):
        verify_beton(path, progress=False)


def test_corrupt_image_bytes_are_reported_by_verify(tmp_path: Path, dirty) -> None:
    out = tmp_path / "j.beton"
    convert_image_folder(dirty[0], out, write_mode="jpg", workers=1, progress=False)
    bf = read_beton(out)
    rec = bf.field_values("image")[5]
    data = bytearray(out.read_bytes())
    ptr = int(rec["data_ptr"])
    data[ptr : ptr + 64] = bytes(64)  # wipe the JPEG header of sample 5
    out.write_bytes(bytes(data))
    report = verify_beton(out, progress=False)
    assert [i for i, _ in report.errors] == [5]
