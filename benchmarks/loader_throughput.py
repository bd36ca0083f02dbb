"""Loader throughput: cmx's FFCV path vs torchvision on the same JPEG folder, in one run.

Same crop size, batch size and worker count for all; several rounds (full epochs) per contender,
each contender in a fresh process of its own (as a training process has one loader), one after
the other, medians.
Reports images/s (wall) and CPU-ms per image (all threads and worker processes), and separately
the one-time cost of the FFCV path (import + JIT compile of a new Loader). `--arms determinism`
runs only cmx's FFCV loader with and without `deterministic=True` (keyed crops and flips, issue 14)
and reports the cost of determinism per core. A benchmark, not a test:

    .venv/bin/python benchmarks/loader_throughput.py [--images 2048] [--rounds 5] [--json OUT]
    .venv/bin/python benchmarks/loader_throughput.py --arms determinism [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

REQUIRED_SPEEDUP = 4.0  # issue 3: FFCV >= 4x torchvision per core, normalization included


def make_jpeg_folder(root: Path, n: int, classes: int = 10, seed: int = 0, sides: tuple[int, int] = (300, 500)) -> Path:
    """JPEGs (q90, sides drawn from `sides`, smooth content with texture; the default is
    ImageNet-like); reused if present."""
    from PIL import Image

    marker = root / f".complete-{n}-{classes}-{seed}"
    if marker.exists():
        return root
    rng = np.random.default_rng(seed)
    for i in range(n):
        w, h = int(rng.integers(sides[0], sides[1] + 1)), int(rng.integers(sides[0], sides[1] + 1))
        coarse = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
        base = np.asarray(Image.fromarray(coarse, "RGB").resize((w, h), Image.Resampling.BICUBIC), np.int16)
        texture = rng.normal(0, 12, (h, w, 1)).astype(np.int16)
        img = np.clip(base + texture, 0, 255).astype(np.uint8)
        d = root / f"class_{i % classes:02d}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img, "RGB").save(d / f"{i:06d}.jpg", quality=90)
    marker.touch()
    return root


def cpu_seconds() -> float:
    """CPU time of this process (all threads) plus its finished, waited-for children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def run_rounds(make_epoch: Callable[[int], Iterable[Any]], n_images: int, rounds: int) -> dict[str, float]:
    """One warm-up epoch, then `rounds` timed epochs; medians of img/s and CPU-ms/img.

    Contenders run one after the other, each in its own call: loaders taken in turn within one
    process disturb each other (two FFCV loaders alive: the raw one's CPU per image doubles;
    forked DataLoader workers make the parent's pages copy-on-write)."""
    for _ in make_epoch(0):
        pass
    rates, cpu_ms = [], []
    for r in range(1, rounds + 1):
        seen = 0
        c0, t0 = cpu_seconds(), time.perf_counter()
        for images, _ in make_epoch(r):
            seen += images.shape[0]
        wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
        rates.append(seen / wall)
        cpu_ms.append(1000 * cpu / seen)
    return {
        "img_per_s": statistics.median(rates),
        "cpu_ms_per_img": statistics.median(cpu_ms),
        "img_per_s_rounds": [round(x, 1) for x in rates],
        "cpu_ms_rounds": [round(x, 3) for x in cpu_ms],
        "images_per_epoch": n_images,
    }


def every_epoch(loader: Any) -> Callable[[int], Iterable[Any]]:
    """epoch -> the same iterable (a plain DataLoader has no epoch to set)."""
    return lambda _epoch: loader


def epochs_of(loader: Any) -> Callable[[int], Iterable[Any]]:
    """epoch -> the loader set to that epoch."""

    def epoch(e: int) -> Iterable[Any]:
        loader.set_epoch(e)
        return loader

    return epoch


def cmx_loader(backend: str, path: Path, args: argparse.Namespace, deterministic: bool = False) -> Any:
    from cmx.core.config import DataConfig
    from cmx.pipelines.loaders import build_loader

    cfg = DataConfig(
        backend=backend,  # type: ignore[arg-type]
        train_path=str(path),
        batch_size=args.batch_size,
        num_workers=args.workers,
        resolution=args.resolution,
        drop_last=False,
    )
    return build_loader(cfg, "train", deterministic=deterministic)


def plain_torchvision(folder: Path, args: argparse.Namespace) -> Any:
    """The textbook baseline: ImageFolder + RandomResizedCrop + flip + ToTensor + Normalize."""
    import torch
    from torchvision import datasets
    from torchvision import transforms as T

    from cmx.core.config import IMAGENET_MEAN, IMAGENET_STD

    tf = T.Compose(
        [
            T.RandomResizedCrop(args.resolution),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    ds = datasets.ImageFolder(str(folder), transform=tf)
    return torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=True, num_workers=args.workers)


ONE_TIME = r"""
import sys, time, json
t0 = time.perf_counter()
import torch
from cmx.pipelines.ffcv_compat import ffcv_imported
with ffcv_imported():
    pass
t1 = time.perf_counter()
from cmx.core.config import DataConfig
from cmx.pipelines.loaders import build_loader
cfg = DataConfig(train_path=sys.argv[1], batch_size=int(sys.argv[2]), num_workers=int(sys.argv[3]),
                 resolution=int(sys.argv[4]))
loader = build_loader(cfg, "train")
t2 = time.perf_counter()
for x, y in loader:
    break
t3 = time.perf_counter()
for x, y in loader:
    break
t4 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "build_s": t2 - t1, "first_batch_s": t3 - t2, "second_epoch_first_batch_s": t4 - t3}))
"""


def one_time_cost(beton: Path, args: argparse.Namespace) -> dict[str, float]:
    """In a fresh process: import ffcv, build a Loader, first batch (JIT), first batch again."""
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            ONE_TIME,
            str(beton),
            str(args.batch_size),
            str(args.workers),
            str(args.resolution),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def in_fresh_process(name: str, argv: list[str] | None) -> dict[str, float]:
    """One contender's rounds in a new Python process: loaders that ran before in the same
    process (FFCV's thread pools, forked workers' copy-on-write pages) slowed later ones by
    10-80% here, and a training process has one loader."""
    args = sys.argv[1:] if argv is None else argv
    out = subprocess.run(
        [sys.executable, __file__, *_without_json(args), "--only", name],
        capture_output=True,
        text=True,
        timeout=3600,
    )
    if out.returncode != 0:
        raise SystemExit(f"{name}: failed\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _without_json(args: list[str]) -> list[str]:
    """The command line minus `--json PATH` (the child prints its result instead)."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == "--json":
            skip = True
        elif not a.startswith("--json="):
            out.append(a)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument(
        "--source-size",
        type=int,
        nargs=2,
        default=(300, 500),
        metavar=("MIN", "MAX"),
        help="side lengths of the generated JPEGs (default ImageNet-like 300-500 px)",
    )
    p.add_argument("--data-dir", type=Path, default=None, help="default: $CMX_HOME/bench/loader")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument(
        "--arms",
        choices=("all", "determinism"),
        default="all",
        help="determinism: only cmx ffcv with and without deterministic=True (the cost of determinism)",
    )
    p.add_argument("--only", default=None, help=argparse.SUPPRESS)  # one contender, in this process
    args = p.parse_args(argv)

    import torch

    from cmx.core.paths import cmx_home
    from cmx.pipelines.beton import convert_image_folder

    torch.set_num_threads(args.workers)
    root = args.data_dir or cmx_home() / "bench" / "loader"
    lo, hi = args.source_size
    stem = f"jpeg-{args.images}" + ("" if (lo, hi) == (300, 500) else f"-{lo}-{hi}px")
    folder = make_jpeg_folder(root / stem, args.images, sides=(lo, hi))
    # cmx's default .beton (ffcv-imagenet's settings: longest side 500, half the images stored raw,
    # the rest JPEG q90), an all-JPEG one, where FFCV decodes a JPEG per image as torchvision does,
    # and an all-raw one (no decode at all; several times the disk).
    beton = root / f"{stem}-default.beton"
    beton_jpg = root / f"{stem}.beton"
    beton_raw = root / f"{stem}-raw.beton"
    for path, mode in ((beton, "proportion"), (beton_jpg, "jpg"), (beton_raw, "raw")):
        if not path.exists():
            convert_image_folder(
                folder,
                path,
                write_mode=mode,
                compress_probability=0.5,
                jpeg_quality=90,
                max_resolution=500,
                workers=args.workers,
                progress=False,
            )

    contenders = {
        "cmx ffcv": lambda: epochs_of(cmx_loader("ffcv", beton, args)),
        "cmx ffcv (all JPEG)": lambda: epochs_of(cmx_loader("ffcv", beton_jpg, args)),
        "cmx ffcv (all raw)": lambda: epochs_of(cmx_loader("ffcv", beton_raw, args)),
        "cmx torchvision": lambda: epochs_of(cmx_loader("torchvision", folder, args)),
        "plain torchvision": lambda: every_epoch(plain_torchvision(folder, args)),
        "cmx ffcv (deterministic)": lambda: epochs_of(cmx_loader("ffcv", beton, args, deterministic=True)),
    }
    if args.only is not None:
        print(json.dumps(run_rounds(contenders[args.only](), args.images, args.rounds)))
        return {}
    if args.arms == "determinism":
        return determinism_cost(args, lambda name: in_fresh_process(name, argv))
    del contenders["cmx ffcv (deterministic)"]  # the main table is the issue-3 comparison
    load_before = os.getloadavg()[0]
    results = {name: in_fresh_process(name, argv) for name in contenders}
    once = one_time_cost(beton, args)

    f, j, t = results["cmx ffcv"], results["cmx ffcv (all JPEG)"], results["cmx torchvision"]
    raw = results["cmx ffcv (all raw)"]
    sizes_mib = {
        name: path.stat().st_size / 2**20
        for name, path in (("default", beton), ("all JPEG", beton_jpg), ("all raw", beton_raw))
    }
    sizes_mib["JPEG folder"] = sum(p.stat().st_size for p in folder.rglob("*.jpg")) / 2**20
    summary = {
        "speedup_wall": f["img_per_s"] / t["img_per_s"],
        "speedup_per_core": t["cpu_ms_per_img"] / f["cpu_ms_per_img"],
        "speedup_vs_plain_wall": f["img_per_s"] / results["plain torchvision"]["img_per_s"],
        "speedup_vs_plain_per_core": results["plain torchvision"]["cpu_ms_per_img"] / f["cpu_ms_per_img"],
        "all_jpeg_speedup_wall": j["img_per_s"] / t["img_per_s"],
        "all_jpeg_speedup_per_core": t["cpu_ms_per_img"] / j["cpu_ms_per_img"],
        "all_raw_speedup_wall": raw["img_per_s"] / t["img_per_s"],
        "all_raw_speedup_per_core": t["cpu_ms_per_img"] / raw["cpu_ms_per_img"],
        "size_mib": sizes_mib,
    }
    env = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
        "load_average_1m": os.getloadavg()[0],
        "load_average_1m_before": load_before,
        "versions": {k: version(k) for k in ("torch", "torchvision", "ffcv", "numba", "pillow", "numpy")},
        "setup": f"{args.images} JPEGs ({lo}-{hi} px, q90; .beton: cmx default = half raw, half JPEG q90), batch {args.batch_size}, {args.workers} workers, "
        f"{args.resolution} px RandomResizedCrop + flip + normalize, {args.rounds} rounds",
    }
    print(f"# loader throughput ({env['setup']})")
    print(f"# {env['machine']}; " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()))
    print(f"{'loader':<22} {'img/s':>8} {'CPU-ms/img':>11}   rounds (img/s)")
    for name, r in results.items():
        print(f"{name:<22} {r['img_per_s']:>8.0f} {r['cpu_ms_per_img']:>11.3f}   {r['img_per_s_rounds']}")
    print(
        f"FFCV / torchvision: {summary['speedup_wall']:.2f}x wall, {summary['speedup_per_core']:.2f}x per core "
        f"(vs plain torchvision: {summary['speedup_vs_plain_wall']:.2f}x wall, "
        f"{summary['speedup_vs_plain_per_core']:.2f}x per core); all-JPEG .beton: "
        f"{summary['all_jpeg_speedup_wall']:.2f}x wall, {summary['all_jpeg_speedup_per_core']:.2f}x per core; "
        f"all-raw .beton: {summary['all_raw_speedup_wall']:.2f}x wall, {summary['all_raw_speedup_per_core']:.2f}x per core"
    )
    print("sizes (MiB): " + ", ".join(f"{k} {v:.0f}" for k, v in sizes_mib.items()))
    print(
        f"FFCV one-time cost: import {once['import_s']:.1f} s, build {once['build_s']:.1f} s, first batch "
        f"(JIT) {once['first_batch_s']:.1f} s; next epoch's first batch {once['second_epoch_first_batch_s']:.2f} s"
    )
    ok = summary["speedup_per_core"] >= REQUIRED_SPEEDUP
    print(
        f"{'PASS' if ok else 'FAIL'}: per-core speedup {summary['speedup_per_core']:.2f}x (need >= {REQUIRED_SPEEDUP}x)"
    )
    out = {"results": results, "summary": summary, "one_time": once, "env": env}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return out


def determinism_cost(args: argparse.Namespace, run: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
    """cmx ffcv vs cmx ffcv (deterministic), each in a fresh process, in turn; ratios of the medians."""
    load_before = os.getloadavg()[0]
    results = {name: run(name) for name in ("cmx ffcv", "cmx ffcv (deterministic)")}
    base, det = results["cmx ffcv"], results["cmx ffcv (deterministic)"]
    summary = {
        "deterministic_cpu_per_img_ratio": det["cpu_ms_per_img"] / base["cpu_ms_per_img"],
        "deterministic_wall_ratio": base["img_per_s"] / det["img_per_s"],
        "deterministic_img_per_s_per_core": 1000 / det["cpu_ms_per_img"],
        "default_img_per_s_per_core": 1000 / base["cpu_ms_per_img"],
    }
    env = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
        "load_average_1m": os.getloadavg()[0],
        "load_average_1m_before": load_before,
        "versions": {k: version(k) for k in ("torch", "ffcv", "numba", "numpy")},
        "setup": f"{args.images} JPEGs, cmx default .beton (half raw, half JPEG q90), batch {args.batch_size}, "
        f"{args.workers} workers, {args.resolution} px RandomResizedCrop + flip + normalize, {args.rounds} rounds",
    }
    print(f"# determinism cost ({env['setup']})")
    print(f"{'loader':<26} {'img/s':>8} {'CPU-ms/img':>11} {'img/s/core':>11}   rounds (img/s)")
    for name, r in results.items():
        print(
            f"{name:<26} {r['img_per_s']:>8.0f} {r['cpu_ms_per_img']:>11.3f} {1000 / r['cpu_ms_per_img']:>11.0f}"
            f"   {r['img_per_s_rounds']}"
        )
    print(
        f"deterministic / default: {summary['deterministic_cpu_per_img_ratio']:.3f}x CPU per image, "
        f"{summary['deterministic_wall_ratio']:.3f}x wall time (load average {load_before:.1f} before)"
    )
    out = {"results": results, "summary": summary, "env": env}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
