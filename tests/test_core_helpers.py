"""The shared helpers in cmx.core: atomic writes, free ports, URI checks, tested versions."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from cmx.core.errors import DataError
from cmx.core.files import atomic_path, atomic_write_text, leftover_temps, temp_path
from cmx.core.net import free_port, is_listening, port_is_free
from cmx.core.uris import is_uri
from cmx.core.versions import checked_version


def test_atomic_write_replaces_whole_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text("old")
    atomic_write_text(path, "new", fsync=True)
    assert path.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_failed_write_keeps_the_old_file_and_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"), atomic_path(path) as tmp:
        tmp.write_text("half")
        assert path.read_text() == "old"  # nothing visible before the block ends
        raise RuntimeError("disk full")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_failed_first_write_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "new.bin"):
        raise RuntimeError("writer died before writing")
    assert list(tmp_path.iterdir()) == []


def test_temp_is_hidden_beside_the_target_and_found_when_left(tmp_path: Path) -> None:
    path = tmp_path / "meta.json"
    tmp = temp_path(path)
    assert tmp.parent == tmp_path and tmp.name.startswith(".meta.json.tmp-")
    tmp.write_text("left by a killed writer")
    assert leftover_temps(path) == [tmp]


def test_free_port_is_bindable() -> None:
    port = free_port()
    assert 0 < port < 65536 and port_is_free(port)
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_taken_ports_are_told_apart() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        assert not port_is_free(taken)
        assert is_listening("127.0.0.1", taken)
        assert free_port(preferred=taken) != taken  # falls back to one the kernel picks
    assert not is_listening("127.0.0.1", taken)


def test_free_port_keeps_a_free_preferred_port() -> None:
    port = free_port()
    assert free_port(preferred=port) == port


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        ("s3://bucket/sweeps", True),
        ("gs://b/k", True),
        ("file:///tmp/x", True),
        ("http://127.0.0.1:5000", True),
        ("sqlite:////abs/mlflow.db", True),
        ("/var/tmp/cmx-cache", False),
        ("relative/dir", False),
        ("~/data/train.beton", False),
        ("C:\\data", False),
        ("", False),
        (Path("/tmp/a"), False),
    ],
)
def test_is_uri(location: str | Path, expected: bool) -> None:
    assert is_uri(location) is expected


def test_checked_version_range() -> None:
    found = checked_version("pytest", "pytest", ((0,), (10**6,)), DataError, missing_hint="-", install_hint="-")
    assert found[0].isdigit()
    with pytest.raises(
        DataError, match=r"pytest .* is outside the range cmx was tested with \(1\.0 <= pytest < 1\.1\)"
    ):
        checked_version("pytest", "pytest", ((1, 0), (1, 1)), DataError, missing_hint="-", install_hint="pin it")
    with pytest.raises(DataError, match="Nope is not installed") as e:
        checked_version(
            "cmx-no-such-dist", "Nope", ((0,), (1,)), DataError, missing_hint="install it", install_hint="-"
        )
    assert e.value.hint == "install it"


def test_read_json_names_the_file_for_every_kind_of_damage(tmp_path: Path) -> None:
    from cmx.core.errors import DataError
    from cmx.core.files import read_json

    good = tmp_path / "good.json"
    good.write_text('{"a": 1}')
    assert read_json(good, what="sidecar", error=DataError, hint="fix it") == {"a": 1}
    cases = {
        "binary.json": (b"\xff\xfe\x00", "unreadable sidecar"),
        "broken.json": (b'{"a": ', "unreadable sidecar"),
        "big.json": (b"[" + b"0," * 600 + b"0]", "over the 1,000-byte limit"),
    }
    for name, (content, needle) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(DataError) as e:
            read_json(path, what="sidecar", error=DataError, hint="fix it", limit=1000)
        assert str(path) in e.value.message and needle in e.value.message and e.value.hint == "fix it"
    with pytest.raises(DataError, match="unreadable sidecar"):
        read_json(tmp_path / "missing.json", what="sidecar", error=DataError, hint="fix it")


def test_run_logs_that_are_damaged_are_one_data_error(tmp_path: Path) -> None:
    from cmx.core.errors import DataError
    from cmx.pipelines.trainer import read_metrics, read_result

    (tmp_path / "metrics.jsonl").write_bytes(b'{"epoch": 1}\n\xff\xfe binary\n')
    with pytest.raises(DataError, match="unreadable metrics log"):
        read_metrics(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n{"epoch": \n')
    with pytest.raises(DataError, match=r"metrics.jsonl:2: not JSON"):
        read_metrics(tmp_path)
    (tmp_path / "result.json").write_bytes(b"\x00\xff")
    with pytest.raises(DataError, match="unreadable run result"):
        read_result(tmp_path)
