"""build_loader on real `.beton` files and ImageFolders: pixels, agreement, schedule, side effects.

Each new FFCV Loader JIT-compiles for seconds, so loaders are module-scoped and shared.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from support.data import CLASSES, make_clean_folder, make_square_folder

from cmx.core.config import AugmentConfig, DataConfig, ProgressiveResize, validate_config
from cmx.core.errors import ConfigError, DataError
from cmx.pipelines.beton import convert_image_folder, sidecar_path
from cmx.pipelines.ffcv_compat import check_pipeline_order, ffcv_imported
from cmx.pipelines.images import load_rgb_array, scan_image_folder
from cmx.pipelines.loaders import Loader, build_loader

pytestmark = pytest.mark.timeout(300)
UNIT = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}  # outputs are pixel / 255


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loaders")
    square = make_square_folder(root / "square", size=24, per_class=3)
    clean = make_clean_folder(root / "clean")
    paths = {
        "square": square,
        "clean": clean,
        "square_raw": root / "square_raw.beton",
        "clean_jpg": root / "clean_jpg.beton",
    }
    convert_image_folder(
        square,
        paths["square_raw"],
        write_mode="raw",
        max_resolution=None,
        workers=1,
        progress=False,
    )
    convert_image_folder(
        clean,
        paths["clean_jpg"],
        write_mode="jpg",
        jpeg_quality=95,
        max_resolution=None,
        workers=1,
        progress=False,
    )
    return paths


def _all(loader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*[(x.clone(), y.clone()) for x, y in loader], strict=True)
    return torch.cat(xs), torch.cat(ys)


def test_raw_beton_decodes_to_pil_pixels(data) -> None:
    cfg = DataConfig(
        val_path=str(data["square_raw"]),
        val_resolution=24,
        center_crop_ratio=1.0,
        val_batch_size=4,
        **UNIT,
    )
    loader = build_loader(cfg, "val")
    assert isinstance(loader, Loader)
    assert (loader.num_samples, loader.num_classes, loader.class_names, len(loader)) == (
        9,
        3,
        list(CLASSES),
        3,
    )
    images, labels = _all(loader)
    assert images.shape == (9, 3, 24, 24) and images.dtype == torch.float32
    files = scan_image_folder(data["square"]).samples
    assert labels.tolist() == [y for _, y in files] and labels.dtype == torch.int64
    expected = np.stack([load_rgb_array(p) for p, _ in files])
    got = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(got, expected)


@pytest.fixture(scope="module")
def val_pair(data) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The same mixed-size folder through both backends: 20 px crops of 224/256 of the short side."""
    common = {"val_resolution": 20, "val_batch_size": 5, "num_workers": 1}
    ffcv = build_loader(DataConfig(val_path=str(data["clean_jpg"]), **common), "val")
    tv = build_loader(DataConfig(backend="torchvision", val_path=str(data["clean"]), **common), "val")
    return _all(ffcv), _all(tv)


def test_ffcv_and_torchvision_validation_batches_agree(val_pair) -> None:
    (fx, fy), (tx, ty) = val_pair
    assert fx.shape == tx.shape == (12, 3, 20, 20)
    assert fy.tolist() == ty.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    for x in (fx, tx):
        assert x.is_contiguous(memory_format=torch.channels_last)
    std = torch.tensor(DataConfig().std).view(1, 3, 1, 1)
    diff = ((fx - tx) * std * 255).abs()  # back to 0..255 pixel units
    # JPEG q95 re-encoding + turbo's fast DCT vs PIL: a few grey levels at most on smooth images.
    assert diff.mean() < 2.0, diff.mean()
    assert diff.max() < 16, diff.max()


@pytest.fixture(scope="module")
def progressive_loader(data):
    cfg = DataConfig(
        train_path=str(data["clean_jpg"]),
        batch_size=4,
        num_workers=1,
        drop_last=False,
        progressive=ProgressiveResize(start_res=16, end_res=32, start_epoch=1, end_epoch=3, step=8),
        augment=AugmentConfig(random_erasing=0.5),
    )
    return build_loader(cfg, "train", seed=3)


def test_progressive_resizing_follows_the_schedule(progressive_loader) -> None:
    loader = progressive_loader
    assert [loader.resolution(e) for e in range(5)] == [16, 16, 24, 32, 32]
    seen = {}
    for epoch in (0, 2, 4):
        loader.set_epoch(epoch)
        shapes = {tuple(x.shape[1:]) for x, _ in loader}
        seen[epoch] = shapes
    assert seen == {0: {(3, 16, 16)}, 2: {(3, 24, 24)}, 4: {(3, 32, 32)}}


def test_training_epoch_covers_all_labels_and_shuffles(progressive_loader) -> None:
    loader = progressive_loader
    loader.set_epoch(0)
    _, y0 = _all(loader)
    loader.set_epoch(1)
    _, y1 = _all(loader)
    assert sorted(y0.tolist()) == sorted(y1.tolist()) == [0] * 4 + [1] * 4 + [2] * 4
    loader.set_epoch(0)
    _, again = _all(loader)
    assert again.tolist() == y0.tolist()  # order is a function of (seed, epoch)


def test_torch_threads_restored_and_early_break_stops_the_thread(progressive_loader) -> None:
    torch.set_num_threads(2)
    before = {t.ident for t in threading.enumerate()}
    for _ in progressive_loader:
        assert torch.get_num_threads() == 2
        break
    leftover = [t for t in threading.enumerate() if t.ident not in before and "Epoch" in type(t).__name__]
    assert not leftover
    assert torch.get_num_threads() == 2


def test_clone_keeps_batches_valid(data) -> None:
    cfg = DataConfig(
        val_path=str(data["square_raw"]),
        val_resolution=24,
        center_crop_ratio=1.0,
        val_batch_size=1,
        batches_ahead=1,
        **UNIT,
    )
    kept = [x for x, _ in build_loader(cfg, "val", clone=True)]
    expected = np.stack([load_rgb_array(p) for p, _ in scan_image_folder(data["square"]).samples])
    got = (torch.cat(kept) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(got, expected)


@pytest.mark.timeout(60)
def test_pipeline_order_check_rejects_the_spinning_order(data) -> None:
    """NormalizeImage after ToTorchImage on CPU makes FFCV 1.0.2's Loader() loop forever."""
    with ffcv_imported():
        from ffcv.fields.basics import IntDecoder
        from ffcv.fields.rgb_image import CenterCropRGBImageDecoder
        from ffcv.transforms import NormalizeImage, ToTensor, ToTorchImage

        bad = [
            CenterCropRGBImageDecoder((8, 8), 1.0),
            ToTensor(),
            ToTorchImage(),
            NormalizeImage(np.zeros(3), np.ones(3), np.float32),
        ]
        good = [
            CenterCropRGBImageDecoder((8, 8), 1.0),
            NormalizeImage(np.zeros(3), np.ones(3), np.float32),
            ToTensor(),
            ToTorchImage(),
        ]
        labels = [IntDecoder(), ToTensor()]
        check_pipeline_order(data["square_raw"], {"image": good, "label": labels})
        with pytest.raises(ConfigError, match="NormalizeImage after plain ToTensor"):
            check_pipeline_order(data["square_raw"], {"image": bad, "label": [IntDecoder(), ToTensor()]})


def test_torchvision_train_with_strong_augmentation(data) -> None:
    cfg = DataConfig(
        backend="torchvision",
        train_path=str(data["clean"]),
        batch_size=5,
        num_workers=1,
        resolution=16,
        augment=AugmentConfig(randaugment=True, color_jitter=0.4, random_erasing=1.0),
    )
    loader = build_loader(cfg, "train")
    assert len(loader) == 2  # 12 samples, drop_last
    for x, y in loader:
        assert x.shape == (5, 3, 16, 16) and x.is_contiguous(memory_format=torch.channels_last)
        assert y.dtype == torch.int64 and x.dtype == torch.float32
        assert (x == 0).any()  # random erasing (p=1) paints a box with the mean colour


def test_grayscale_is_three_channels_and_limit_spans_classes(data) -> None:
    cfg = DataConfig(backend="torchvision", val_path=str(data["clean"]), val_resolution=8, limit=3, num_workers=0)
    loader = build_loader(cfg, "val")
    x, y = _all(loader)
    assert x.shape == (3, 3, 8, 8) and sorted(y.tolist()) == [0, 1, 2]


def test_bad_loader_inputs(data, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="randaugment needs backend torchvision"):
        validate_config(DataConfig, {"augment": {"randaugment": True}}, "test.yaml")
    with pytest.raises(ConfigError, match="val_path is not set"):
        build_loader(DataConfig(), "val")
    with pytest.raises(ConfigError, match="no process group"):
        build_loader(DataConfig(val_path=str(data["square_raw"])), "val", distributed=True)
    with pytest.raises(DataError, match="is a folder, FFCV reads .beton"):
        build_loader(DataConfig(val_path=str(data["square"])), "val")
    with pytest.raises(DataError, match="not a directory"):
        build_loader(DataConfig(backend="torchvision", val_path=str(data["square_raw"])), "val")
    bad = tmp_path / "bad.beton"
    bad.write_bytes(data["square_raw"].read_bytes()[:5000])
    with pytest.raises(DataError, match="truncated"):
        build_loader(DataConfig(val_path=str(bad)), "val")


@pytest.fixture(scope="module")
def fashion(tmp_path_factory: pytest.TempPathFactory):
    from cmx.pipelines.fashion_mnist import export_fashion_mnist, source_dir

    if not (source_dir() / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("dataset-fashion-mnist is not installed")
    out = tmp_path_factory.mktemp("fm")
    return export_fashion_mnist(out, limit_per_class=2, progress=False, workers=1)


def test_fashion_mnist_at_28px_both_backends(fashion) -> None:
    """The trainer's quick path: 28x28 grayscale stored as RGB, crop ratio 1.0, both backends agree exactly."""
    common = {"val_resolution": 28, "center_crop_ratio": 1.0, "val_batch_size": 8, "num_workers": 1, **UNIT}
    ffcv = build_loader(DataConfig(val_path=str(fashion.val_beton), **common), "val")
    tv = build_loader(DataConfig(backend="torchvision", val_path=str(fashion.val_dir), **common), "val")
    (fx, fy), (tx, ty) = _all(ffcv), _all(tv)
    assert fx.shape == tx.shape == (20, 3, 28, 28) and ffcv.num_classes == tv.num_classes == 10
    assert fy.tolist() == ty.tolist() == [c for c in range(10) for _ in range(2)]
    # raw .beton written from the exported JPEGs: the very pixels PIL decodes, grey in all 3 channels
    torch.testing.assert_close(fx, tx, atol=1e-6, rtol=0)
    assert torch.equal(fx[:, 0], fx[:, 1]) and torch.equal(fx[:, 1], fx[:, 2])


def test_a_second_loader_of_the_same_pipeline_reuses_the_first(
    data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reused actor's next trial gets the kept FFCV loader (same batches); any change builds a new one."""
    beton = tmp_path / "copy.beton"
    beton.write_bytes(data["clean_jpg"].read_bytes())
    shutil.copy(sidecar_path(data["clean_jpg"]), sidecar_path(beton))  # the class names
    cfg = DataConfig(val_path=str(beton), val_resolution=20, val_batch_size=5, num_workers=1)
    first = build_loader(cfg, "val")
    second = build_loader(cfg, "val")
    assert second._ffcv is first._ffcv and second.decoder is first.decoder
    a, b = _all(first), _all(second)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    other = build_loader(cfg.model_copy(update={"val_resolution": 16}), "val")
    assert other._ffcv is not first._ffcv
    assert _all(other)[0].shape == (12, 3, 16, 16)
    beton.write_bytes(beton.read_bytes())  # same bytes, a newer file: never trusted to be the same
    os.utime(beton, ns=(beton.stat().st_atime_ns, beton.stat().st_mtime_ns + 10**9))
    assert build_loader(cfg, "val")._ffcv is not first._ffcv
    monkeypatch.setenv("CMX_LOADER_REUSE", "0")
    off1, off2 = build_loader(cfg, "val"), build_loader(cfg, "val")
    assert off1._ffcv is not off2._ffcv


JIT_PROBE = """
import hashlib, sys
from cmx.pipelines.ffcv_compat import ffcv_imported
from cmx.pipelines.loaders import build_loader
from cmx.core.config import DataConfig
with ffcv_imported():
    import numba.typed.typeddict as td
cfg = DataConfig(train_path=sys.argv[1], val_path=sys.argv[1], resolution=16, val_resolution=20, batch_size=5,
                 val_batch_size=5, num_workers=1)
digests = []
for split in sys.argv[2].split(","):
    digest = hashlib.sha256()
    for images, labels in build_loader(cfg, split, deterministic=True, seed=3):
        digest.update(images.numpy().tobytes() + labels.numpy().tobytes())
    digests.append(digest.hexdigest())
print(sum(td._setitem.stats.cache_hits.values()), *digests)
"""


def _jit_probe(beton: Path, cache: Path, splits: str = "train,val", **env: str) -> list[str]:
    return subprocess.run(
        [sys.executable, "-c", JIT_PROBE, str(beton), splits],
        env={**os.environ, "NUMBA_CACHE_DIR": str(cache), **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout.split()


def test_what_ffcv_compiles_is_kept_in_numbas_disk_cache(data, tmp_path: Path) -> None:
    """A fresh process loads what an earlier one compiled, from `NUMBA_CACHE_DIR`: the typed dict
    FFCV fills at import and every op of the pipeline, the JPEG decoders included (their C calls
    bound by name). It saves nothing new, and its batches are FFCV's own, bit for bit."""
    cache = tmp_path / "numba"
    first = _jit_probe(data["clean_jpg"], cache)
    saved = sorted(cache.rglob("*.nbc"))
    second = _jit_probe(data["clean_jpg"], cache)
    assert first[0] == "0" and int(second[0]) >= 1  # the first compiles and saves, the second loads
    assert sorted(cache.rglob("*.nbc")) == saved  # every key matched: nothing compiled again
    names = {p.name.split("-")[0] for p in saved}
    decoders = {"rgb_image.ResizedCropRGBImageDecoder.generate_code.locals.decode",
                "ffcv_compat.keyed_crop_decoder_class.locals.KeyedRandomResizedCropDecoder.generate_code.locals.decode",
                "ffcv_jit_cache._by_name.locals.imdecode", "ffcv_jit_cache._by_name.locals.resize_crop"}  # fmt: skip
    assert decoders <= names, names
    assert first[1:] == second[1:]  # train (cmx's keyed crop decoder), val (FFCV's center crop)
    ffcv_alone = _jit_probe(data["clean_jpg"], tmp_path / "off", "val", CMX_JIT_CACHE="0")  # ctypes calls
    assert first[2] == ffcv_alone[1]


def test_libffcv_is_bound_only_to_the_c_signatures_it_was_written_for(monkeypatch) -> None:  # noqa: ANN001
    """Another FFCV's C arguments leave its own (uncached) functions in place."""
    from cmx.pipelines.ffcv_jit_cache import bind_libffcv

    with ffcv_imported():
        import ffcv.libffcv as libffcv
    bound = bind_libffcv()
    assert set(bound) == {libffcv.imdecode, libffcv.resize_crop, libffcv.memcpy}
    monkeypatch.setattr(libffcv.lib.resize, "argtypes", 12 * [ctypes.c_int64])
    assert bind_libffcv() == {}


def test_ffcvs_own_functions_run_when_its_compiler_is_off(monkeypatch) -> None:  # noqa: ANN001
    """FFCV's debug mode (compiler off) runs its Python functions: ours only work compiled."""
    with ffcv_imported():
        import ffcv.libffcv as libffcv
        from ffcv.pipeline.compiler import Compiler
    assert Compiler.compile(libffcv.imdecode).py_func is not libffcv.imdecode  # by name, compiled
    monkeypatch.setattr(Compiler, "is_enabled", False)
    assert Compiler.compile(libffcv.imdecode) is libffcv.imdecode
