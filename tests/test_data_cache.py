"""`data.cache_dir`: data copied once per node, atomically, re-fetched when the source changes."""

from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path

import pytest

from cmx.core.config import DataConfig
from cmx.core.errors import DataError
from cmx.pipelines.data_cache import META_SUFFIX, cache_name, fetch_to_cache, local_data_path


def _fetch(args: tuple[str, str]) -> tuple[str, bool]:
    result = fetch_to_cache(*args)
    return str(result.path), result.copied


def test_copies_once_then_reuses(tmp_path: Path) -> None:
    shared = tmp_path / "nfs" / "train.beton"
    shared.parent.mkdir()
    shared.write_bytes(os.urandom(3_000_000))
    cache = tmp_path / "local-cache"
    first = fetch_to_cache(shared, cache)
    assert first.copied and first.path.read_bytes() == shared.read_bytes()
    assert first.path.parent == cache and first.path.name.endswith("-train.beton")
    inode = first.path.stat().st_ino
    second = fetch_to_cache(shared, cache)
    assert not second.copied and second.path == first.path and second.path.stat().st_ino == inode
    assert (cache / (first.path.name + META_SUFFIX)).exists()


def test_concurrent_trials_on_a_node_copy_once(tmp_path: Path) -> None:
    """Four processes ask at once (trials starting together): one copies, the others wait and reuse."""
    shared = tmp_path / "train.beton"
    shared.write_bytes(os.urandom(20_000_000))
    cache = tmp_path / "cache"
    with mp.get_context("spawn").Pool(4) as pool:
        results = pool.map(_fetch, [(str(shared), str(cache))] * 4)
    assert sum(copied for _, copied in results) == 1, results
    assert len({p for p, _ in results}) == 1
    assert Path(results[0][0]).read_bytes() == shared.read_bytes()
    assert sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) == sorted(
        [Path(results[0][0]).name, Path(results[0][0]).name + META_SUFFIX]
    )  # no temporary files left


def test_changed_source_is_fetched_again_and_leftovers_are_removed(tmp_path: Path) -> None:
    shared = tmp_path / "val.beton"
    shared.write_bytes(b"a" * 1000)
    cache = tmp_path / "cache"
    first = fetch_to_cache(shared, cache)
    # A copy killed half-way leaves a temporary file behind; it is never mistaken for the data.
    (cache / f"{first.path.name}.tmp-99999").write_bytes(b"partial")
    shared.write_bytes(b"b" * 2000)
    second = fetch_to_cache(shared, cache)
    assert second.copied and second.path.read_bytes() == b"b" * 2000
    assert not list(cache.glob("*.tmp-*"))


def test_same_file_name_from_two_datasets_does_not_collide(tmp_path: Path) -> None:
    a, b = tmp_path / "a" / "train.beton", tmp_path / "b" / "train.beton"
    for p, content in ((a, b"A"), (b, b"B")):
        p.parent.mkdir()
        p.write_bytes(content)
    pa, pb = fetch_to_cache(a, tmp_path / "c").path, fetch_to_cache(b, tmp_path / "c").path
    assert pa != pb and pa.read_bytes() == b"A" and pb.read_bytes() == b"B"
    assert cache_name("s3://x/a/train.beton") != cache_name("s3://x/b/train.beton")


def test_folder_source_and_errors(tmp_path: Path) -> None:
    folder = tmp_path / "imagefolder"
    (folder / "cat").mkdir(parents=True)
    (folder / "cat" / "1.jpg").write_bytes(b"x")
    result = fetch_to_cache(folder, tmp_path / "cache")
    assert result.copied and (result.path / "cat" / "1.jpg").read_bytes() == b"x"
    assert not fetch_to_cache(folder, tmp_path / "cache").copied
    with pytest.raises(DataError, match="not found"):
        fetch_to_cache(tmp_path / "missing.beton", tmp_path / "cache")
    with pytest.raises(DataError, match="loaders read local files only") as exc:
        local_data_path("s3://bucket/train.beton", None)
    assert "data.cache_dir" in (exc.value.hint or "")
    assert local_data_path(str(folder), None) == folder


def test_loader_reads_from_the_cache_when_cache_dir_is_set(tmp_path: Path, fmnist_tiny_paths: dict[str, str]) -> None:
    from cmx.pipelines.loaders import build_loader

    cache = tmp_path / "node-cache"
    cfg = DataConfig(backend="torchvision", train_path=fmnist_tiny_paths["val_dir"], val_path=fmnist_tiny_paths["val_dir"],
                     resolution=28, val_resolution=28, center_crop_ratio=1.0, batch_size=16, num_workers=0,
                     cache_dir=str(cache))  # fmt: skip
    loader = build_loader(cfg, "val")
    assert Path(loader.dataset.root).parent == cache  # the ImageFolder opened is the local copy
    images, labels = next(iter(loader))
    assert images.shape[1:] == (3, 28, 28) and len(labels) == 16
    assert len(list(cache.glob(f"*-{Path(fmnist_tiny_paths['val_dir']).name}"))) == 1
