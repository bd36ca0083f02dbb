"""End-to-end training throughput: cmx's training path against a plain torchvision + timm loop.

cmx: the trainer's own parts (`setup_runtime`, `create_train_loader`, `build_parts`,
`train_loop`: what `cmx train` runs every epoch, minus validation and checkpoints), i.e. the FFCV
loader, cmx's ConvMixer (channels_last) and its AdamW; fp32 unless `--precision bf16` (both sides).
Baseline: the textbook loop, torchvision `ImageFolder` + `DataLoader` (RandomResizedCrop, flip,
ToTensor, Normalize) feeding timm's ConvMixer (NCHW, eager) and `torch.optim.AdamW`. Same model
dims and initial weights, batch, resolution, crop scale, worker count, lr and images.

Each round is one short epoch (`--steps` batches over the same evenly spaced subset) per
contender, interleaved A, B, A, B, ... so that a neighbour's load hits both alike; medians are
reported. Loader-only rounds (the same two loaders, no model) show whether training is loader-bound.

    .venv/bin/python benchmarks/train_throughput.py            # Fashion-MNIST, 28 px: ~1 min idle, ~6 loaded
    .venv/bin/python benchmarks/train_throughput.py --quick    # smoke run
    .venv/bin/python benchmarks/train_throughput.py --jpeg     # + ImageNet-like JPEGs at 64 px
    .venv/bin/python benchmarks/train_throughput.py --jpeg --no-fmnist --out benchmarks/results/train_throughput_jpeg.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "train_throughput.json"
sys.path[:0] = [str(REPO / "benchmarks"), str(REPO / "tests")]  # loader_throughput, support.training
from machine import machine_info  # noqa: E402

from cmx.core.config import FASHION_MNIST_MEAN, FASHION_MNIST_STD, IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from cmx.core.files import atomic_write_text  # noqa: E402

FMNIST_MEAN, FMNIST_STD = FASHION_MNIST_MEAN, FASHION_MNIST_STD


@dataclass
class Case:
    """One dataset/model setting that both contenders train on."""

    name: str
    train_dir: Path  # ImageFolder of JPEGs (baseline)
    train_beton: Path  # the same images as a .beton (cmx)
    resolution: int
    dim: int
    depth: int
    kernel_size: int
    patch_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    scale: tuple[float, float] = (0.35, 1.0)


@dataclass
class Timing:
    """Medians over rounds for one contender."""

    contender: str
    images_per_s: float
    images_per_round: int
    round_img_per_s: list[float] = field(default_factory=list)


# ----------------------------------------------------------------------------- machine


# ----------------------------------------------------------------------------- data


def fmnist_case(per_class: int, args: argparse.Namespace) -> Case:
    """The cached Fashion-MNIST export (JPEG folders + raw-mode .beton of the same pixels), 28 px."""
    from support.training import export_cached

    export = export_cached(per_class)
    return Case(
        name=f"Fashion-MNIST ({per_class}/class), 28 px",
        train_dir=Path(export.train_dir),
        train_beton=Path(export.train_beton),
        resolution=28,
        dim=args.dim,
        depth=args.depth,
        kernel_size=args.kernel_size,
        patch_size=args.patch_size,
        mean=FMNIST_MEAN,
        std=FMNIST_STD,
    )


def jpeg_case(images: int, resolution: int, args: argparse.Namespace) -> Case:
    """loader_throughput's synthetic ImageNet-like JPEGs (300-500 px) as a folder and a JPEG-mode .beton."""
    from loader_throughput import make_jpeg_folder

    from cmx.core.paths import cmx_home
    from cmx.pipelines.beton import convert_image_folder

    root = cmx_home() / "bench" / "loader"
    folder = make_jpeg_folder(root / f"jpeg-{images}", images)
    beton = root / f"jpeg-{images}.beton"
    if not beton.exists():  # same settings as loader_throughput, so both benchmarks share it
        convert_image_folder(
            folder, beton, write_mode="jpg", jpeg_quality=90, max_resolution=500, workers=2, progress=False
        )
    return Case(
        name=f"ImageNet-like JPEGs ({images}), {resolution} px",
        train_dir=folder,
        train_beton=beton,
        resolution=resolution,
        dim=args.dim,
        depth=args.depth,
        kernel_size=args.kernel_size,
        patch_size=args.jpeg_patch_size,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        scale=(0.08, 1.0),
    )


# ----------------------------------------------------------------------------- contenders


class CmxPath:
    """cmx's training path, built by the trainer's own functions from one TrainConfig."""

    def __init__(self, case: Case, args: argparse.Namespace, limit: int) -> None:
        from cmx.core.config import TrainConfig
        from cmx.pipelines import trainer

        self.trainer = trainer
        self.config = TrainConfig.model_validate(
            {
                "name": "bench",
                "data": {
                    "backend": "ffcv",
                    "train_path": str(case.train_beton),
                    "resolution": case.resolution,
                    "batch_size": args.batch,
                    "num_workers": args.workers,
                    "mean": case.mean,
                    "std": case.std,
                    "augment": {"scale": case.scale},
                    "limit": limit,
                },
                "model": {
                    "name": "convmixer_tiny",  # the dims below override it
                    "dim": case.dim,
                    "depth": case.depth,
                    "kernel_size": case.kernel_size,
                    "patch_size": case.patch_size,
                },
                "optim": {"name": "adamw", "lr": args.lr, "weight_decay": args.weight_decay},
                "schedule": {"name": "constant"},
                "loop": {
                    "epochs": 1000,
                    "threads": args.threads,
                    "precision": args.precision,
                    "compile": args.compile,
                    "device": args.device,
                },
            }
        )
        self.rt = trainer.setup_runtime(self.config)
        trainer.seed_everything(0)
        self.loader = trainer.create_train_loader(self.config, self.rt)
        torch.set_num_threads(self.rt.threads)  # FFCV's Loader() changes it (docs/architecture.md, FFCV)
        self.parts = trainer.build_parts(self.config, self.rt, self.loader.num_classes, len(self.loader))
        self.epoch = 0

    def train_round(self) -> tuple[int, float]:
        """One epoch of the trainer's own `train_loop`; (images, seconds)."""
        torch.set_num_threads(self.rt.threads)
        t0 = time.perf_counter()
        stats = self.trainer.train_loop(self.epoch, self.parts, self.loader, self.config, self.rt)
        seconds = time.perf_counter() - t0
        self.epoch += 1
        if stats.diverged:
            raise SystemExit(f"cmx training diverged (loss {stats.bad_loss}); lower --lr")
        return stats.samples, seconds

    def loader_round(self) -> tuple[int, float]:
        """One epoch of the same loader, no model: images the trainer would receive per second."""
        torch.set_num_threads(self.rt.threads)
        self.loader.set_epoch(self.epoch)
        self.epoch += 1
        n = 0
        t0 = time.perf_counter()
        for images, _ in self.trainer._batches(self.loader, self.rt):
            n += images.shape[0]
        _sync(self.rt.device)
        return n, time.perf_counter() - t0


class PlainPath:
    """The textbook loop: ImageFolder + DataLoader + timm ConvMixer (NCHW, eager) + AdamW."""

    def __init__(self, case: Case, args: argparse.Namespace, limit: int, init: nn.Module) -> None:
        from timm.models.convmixer import ConvMixer as TimmConvMixer
        from torch.utils.data import DataLoader, Subset
        from torchvision import datasets
        from torchvision import transforms as T

        from cmx.pipelines.loaders import subset_indices

        tf = T.Compose(
            [
                T.RandomResizedCrop(case.resolution, scale=case.scale),
                T.RandomHorizontalFlip(),
                T.ToTensor(),
                T.Normalize(case.mean, case.std),
            ]
        )
        ds = datasets.ImageFolder(str(case.train_dir), transform=tf)
        # The same evenly spaced images as cmx's `data.limit` (both sort files by class, then name).
        subset = Subset(ds, subset_indices(len(ds), limit).tolist())
        # persistent_workers: a stronger baseline than the textbook default; with rounds of a few
        # batches, re-spawning workers every epoch would dominate its time.
        self.loader = DataLoader(
            subset,
            batch_size=args.batch,
            shuffle=True,
            num_workers=args.workers,
            drop_last=True,
            persistent_workers=args.workers > 0,
            pin_memory=args.device == "cuda",
        )
        self.model = TimmConvMixer(
            dim=case.dim,
            depth=case.depth,
            kernel_size=case.kernel_size,
            patch_size=case.patch_size,
            num_classes=len(ds.classes),
        )
        # Same initial weights as cmx's model (timm-compatible keys); NCHW as timm builds it.
        self.model.load_state_dict(init.state_dict(), strict=True)
        self.device = torch.device(args.device)
        self.model.to(self.device, memory_format=torch.contiguous_format)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
        self.threads = args.threads
        amp = {"fp32": None, "bf16": torch.bfloat16}[args.precision]
        self.autocast = torch.autocast(self.device.type, dtype=amp or torch.float32, enabled=amp is not None)

    def train_round(self) -> tuple[int, float]:
        """One epoch of forward, cross-entropy, backward, AdamW step; (images, seconds)."""
        torch.set_num_threads(self.threads)
        self.model.train()
        n, loss_sum = 0, torch.zeros((), device=self.device)
        t0 = time.perf_counter()
        for images, labels in self.loader:
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            self.opt.zero_grad(set_to_none=True)
            with self.autocast:
                logits = self.model(images)
            loss = F.cross_entropy(logits.float(), labels)
            loss.backward()
            self.opt.step()
            loss_sum += loss.detach()
            n += labels.shape[0]
        _sync(self.device)
        seconds = time.perf_counter() - t0
        if not torch.isfinite(loss_sum):  # checked once per round: no per-step GPU sync
            raise SystemExit(f"plain training diverged (loss {loss_sum.item()}); lower --lr")
        return n, seconds

    def loader_round(self) -> tuple[int, float]:
        """One epoch of the DataLoader alone."""
        torch.set_num_threads(self.threads)
        n = 0
        t0 = time.perf_counter()
        for images, _ in self.loader:
            images = images.to(self.device, non_blocking=True)
            n += images.shape[0]
        _sync(self.device)
        return n, time.perf_counter() - t0


# ----------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that a round's wall time includes it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleave(
    fns: dict[str, Callable[[], tuple[int, float]]], rounds: int, what: str, log: Console
) -> tuple[list[Timing], list[float]]:
    """One untimed warm-up round, then `rounds` rounds of A, B, A, B; medians and 1-min loads."""
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        log.print(f"  {what} warm-up: {name} ({time.perf_counter() - t0:.1f} s)")
    rates: dict[str, list[float]] = {n: [] for n in fns}
    images: dict[str, int] = {}
    loads: list[float] = []
    for r in range(rounds):
        for name, fn in fns.items():
            n, s = fn()
            rates[name].append(n / s)
            images[name] = n
        loads.append(os.getloadavg()[0])
        log.print(
            f"  {what} round {r + 1}/{rounds}: "
            + ", ".join(f"{n} {v[-1]:.0f} img/s" for n, v in rates.items())
            + f"  (load {loads[-1]:.1f})"
        )
    out = [Timing(n, statistics.median(v), images[n], [round(x, 1) for x in v]) for n, v in rates.items()]
    return out, loads


def run_case(case: Case, args: argparse.Namespace, log: Console) -> dict[str, Any]:
    """Build both paths on one case; time training, then loaders alone; ratios and loader share."""
    limit = args.steps * args.batch
    log.print(
        f"[bold]{case.name}[/]: ConvMixer-{case.dim}/{case.depth} k{case.kernel_size} p{case.patch_size}, "
        f"batch {args.batch}, {args.steps} steps/round, {args.workers} loader workers"
    )
    t0 = time.perf_counter()
    cmx = CmxPath(case, args, limit)
    setup_cmx = time.perf_counter() - t0
    plain = PlainPath(case, args, limit, cmx.parts.model)
    load_before = os.getloadavg()
    plain_name = "plain: torchvision + timm (NCHW, eager)"
    cmx_name = "cmx train: FFCV + cmx ConvMixer" + (" + compile" if args.compile else "")
    train, train_loads = interleave(
        {plain_name: plain.train_round, cmx_name: cmx.train_round}, args.rounds, "train", log
    )
    loaders, loader_loads = interleave(
        {"plain: torchvision DataLoader": plain.loader_round, "cmx: FFCV loader": cmx.loader_round},
        args.loader_rounds,
        "loader",
        log,
    )
    load_after = os.getloadavg()
    base_train, base_loader = train[0].images_per_s, loaders[0].images_per_s
    rows = []
    for t, ld in zip(train, loaders, strict=True):
        rows.append(
            {
                **asdict(t),
                "speedup_vs_plain": t.images_per_s / base_train,
                # Median of round-by-round ratios: each pair ran back to back under similar load.
                "paired_speedup_vs_plain": statistics.median(
                    a / b for a, b in zip(t.round_img_per_s, train[0].round_img_per_s, strict=True)
                ),
                "loader_only_img_per_s": ld.images_per_s,
                "loader_speedup_vs_plain": ld.images_per_s / base_loader,
                "loader_round_img_per_s": ld.round_img_per_s,
                # Share of the loader's capacity that training uses: near 1 = loader-bound.
                "loader_utilisation": t.images_per_s / ld.images_per_s,
            }
        )
    return {
        "case": {**asdict(case), "train_dir": str(case.train_dir), "train_beton": str(case.train_beton)},
        "batch": args.batch,
        "steps_per_round": args.steps,
        "images_per_round": limit,
        "rounds": args.rounds,
        "loader_rounds": args.loader_rounds,
        "workers": args.workers,
        "threads": args.threads,
        "precision": args.precision,
        "device": args.device,
        "compile": args.compile,
        "cmx_setup_s": setup_cmx,
        "loadavg_before": list(load_before),
        "loadavg_after": list(load_after),
        "loadavg_1min_per_round": {"train": train_loads, "loader": loader_loads},
        "results": rows,
    }


def print_table(report: dict[str, Any], console: Console) -> None:
    """The case's rich table: end-to-end and loader-only img/s, ratios, loader utilisation."""
    c = report["case"]
    table = Table(
        title=f"{c['name']}: ConvMixer-{c['dim']}/{c['depth']} k{c['kernel_size']} p{c['patch_size']}, "
        f"batch {report['batch']}, {report['workers']} workers, {report['threads']} threads"
    )
    cols = ("contender", "train img/s", "vs plain", "paired", "loader-only img/s", "vs plain", "train / loader")
    for col in cols:
        table.add_column(col, justify="left" if col == "contender" else "right")
    for r in report["results"]:
        table.add_row(
            r["contender"],
            f"{r['images_per_s']:.1f}",
            f"{r['speedup_vs_plain']:.2f}x",
            f"{r['paired_speedup_vs_plain']:.2f}x",
            f"{r['loader_only_img_per_s']:.0f}",
            f"{r['loader_speedup_vs_plain']:.2f}x",
            f"{100 * r['loader_utilisation']:.0f}%",
        )
    console.print(table)
    lb, la = report["loadavg_before"][0], report["loadavg_after"][0]
    console.print(
        f"load average (1 min) {lb:.1f} -> {la:.1f} on {os.cpu_count()} CPUs; "
        "paired = median of per-round ratios; train / loader near 100% means loader-bound"
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the Fashion-MNIST case (and the JPEG case with --jpeg); write JSON; return the report."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--per-class", type=int, default=1000, help="Fashion-MNIST images per class (cached export)")
    p.add_argument("--dim", type=int, default=64, help="ConvMixer width")
    p.add_argument("--depth", type=int, default=4, help="ConvMixer blocks")
    p.add_argument("--kernel-size", type=int, default=5, help="depthwise kernel")
    p.add_argument("--patch-size", type=int, default=2, help="patch size at 28 px")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=6, help="training steps (batches) per round")
    p.add_argument("--rounds", type=int, default=5, help="timed training rounds per contender")
    p.add_argument("--loader-rounds", type=int, default=5, help="timed loader-only rounds per contender")
    p.add_argument("--workers", type=int, default=2, help="loader workers, both sides")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads, both sides")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="autocast dtype, both sides")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where both sides train")
    p.add_argument("--compile", action="store_true", help="cmx side: loop.compile=true (torch.compile)")
    p.add_argument("--jpeg", action="store_true", help="also the synthetic ImageNet-like JPEG case")
    p.add_argument("--no-fmnist", dest="fmnist", action="store_false", help="skip the Fashion-MNIST case")
    p.add_argument("--jpeg-images", type=int, default=2048)
    p.add_argument("--jpeg-resolution", type=int, default=64)
    p.add_argument("--jpeg-patch-size", type=int, default=4, help="patch size at --jpeg-resolution")
    p.add_argument("--quick", action="store_true", help="smoke run: 200/class, 3 steps, 2 rounds")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON report path")
    args = p.parse_args(argv)
    if args.quick:
        args.per_class, args.steps, args.rounds, args.loader_rounds = 200, 3, 2, 2
        args.jpeg_images = min(args.jpeg_images, 512)

    console = Console()
    report: dict[str, Any] = {
        "benchmark": "train_throughput",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine_info(),
        "cases": [],
    }
    started = time.perf_counter()
    cases: list[Callable[[], Case]] = []
    if args.fmnist:
        cases.append(lambda: fmnist_case(args.per_class, args))
    if args.jpeg:
        cases.append(lambda: jpeg_case(args.jpeg_images, args.jpeg_resolution, args))
    for make in cases:
        result = run_case(make(), args, console)
        report["cases"].append(result)
        print_table(result, console)
    report["wall_s"] = time.perf_counter() - started

    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
    console.print(f"wrote {args.out} ({report['wall_s']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
