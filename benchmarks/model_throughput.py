"""Training-step throughput of cmx's ConvMixer against timm's, same config and same weights.

One step = forward, cross-entropy, backward, AdamW step. On CPU every contender runs twice, in
two processes: with glibc's allocator as it comes ("default", what a plain timm script gets) and
with the setting cmx's training applies ("keep", `cmx.pipelines.cpu_allocator`). The steps are
interleaved across all of them (A, B, C, A, B, C, ...; one process computes at a time) and the
median step time is reported, so a neighbour's load on a shared machine hits every contender
alike. Before timing, the first forward/backward of cmx is compared with timm's on the same
batch (loss and every gradient) to show the math is the same.

    .venv/bin/python benchmarks/model_throughput.py                 # CPU: ConvMixer-256/8 at 32 px
    .venv/bin/python benchmarks/model_throughput.py --steps 5 --no-compile

On a CUDA machine it also runs ConvMixer-768/32 at 224 px in bf16 autocast.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from machine import machine_info  # noqa: E402

from cmx.core.files import atomic_write_text  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "results" / "model_throughput.json"


@dataclass
class Case:
    """One model/resolution/device setting that all contenders run."""

    model: str
    resolution: int
    batch: int
    device: str
    amp_bf16: bool = False
    threads: int | None = None  # torch CPU threads; None: torch's default


@dataclass
class Result:
    """One contender's timings within a case."""

    contender: str
    allocator: str  # "default": glibc as it comes; "keep": cmx's CPU setting (cpu_allocator.py)
    ms_per_step: float
    ms_min: float
    images_per_s: float
    speedup_vs_timm: float = 1.0
    compile_s: float | None = None
    step_times_ms: list[float] = field(default_factory=list)


def make_models(case: Case) -> tuple[nn.Module, nn.Module]:
    """timm's ConvMixer and cmx's, with cmx holding exactly timm's weights."""
    from timm.models.convmixer import ConvMixer as TimmConvMixer

    from cmx.models import create_model

    ours = create_model(case.model)
    arch = ours.arch_config
    if not isinstance(arch["kernel_size"], int):
        raise SystemExit(f"{case.model}: timm's ConvMixer supports only one kernel size")
    act = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}[arch["act_layer"]]
    ref = TimmConvMixer(
        dim=arch["dim"],
        depth=arch["depth"],
        kernel_size=arch["kernel_size"],
        patch_size=arch["patch_size"],
        in_chans=arch["in_chans"],
        num_classes=arch["num_classes"],
        act_layer=act,
    )
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref.to(case.device), ours.to(case.device)


def make_step(model: nn.Module, case: Case, x: torch.Tensor, y: torch.Tensor) -> Callable[[], float]:
    """A closure running one training step; returns its wall time in seconds."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    cuda = case.device == "cuda"

    def step() -> float:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(case.device, dtype=torch.bfloat16, enabled=case.amp_bf16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    return step


def check_same_math(ref: nn.Module, ours: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Max abs difference of loss and of all gradients after one train-mode forward/backward."""
    diffs: dict[str, float] = {}
    grads = []
    for m in (copy.deepcopy(ref), copy.deepcopy(ours)):
        m.train()
        loss = F.cross_entropy(m(x), y)
        loss.backward()
        grads.append((loss.detach(), {n: p.grad for n, p in m.named_parameters()}))
    (l_ref, g_ref), (l_ours, g_ours) = grads
    diffs["loss_abs_diff"] = (l_ref - l_ours).abs().item()
    diffs["grad_max_abs_diff"] = max((g_ref[n] - g_ours[n]).abs().max().item() for n in g_ref)
    diffs["grad_max_abs"] = max(g.abs().max().item() for g in g_ref.values())
    return diffs


def seeded_setup(case: Case) -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    """timm's and cmx's model with the same weights, and one batch: the same in every process."""
    torch.manual_seed(0)
    ref, ours = make_models(case)
    x = torch.randn(case.batch, 3, case.resolution, case.resolution, device=case.device)
    y = torch.randint(0, ours.num_classes, (case.batch,), device=case.device)
    return ref, ours, x, y


def _contenders(case: Case, compile_model: bool) -> dict[str, Callable[[], float]]:
    """Every contender's step closure, on the same weights (seed 0) and the same batch."""
    ref, ours, x, y = seeded_setup(case)
    models: dict[str, nn.Module] = {
        "timm (NCHW, eager)": ref,
        "timm + channels_last (eager)": copy.deepcopy(ref).to(memory_format=torch.channels_last),
        "cmx (eager)": ours,
    }
    if compile_model:
        models["cmx + torch.compile"] = torch.compile(copy.deepcopy(ours))
    return {name: make_step(m, case, x, y) for name, m in models.items()}


def _worker(conn: Connection, case: Case, allocator: str, compile_model: bool, warmup: int) -> None:
    """One process per allocator setting; runs the step the parent names, returns its seconds."""
    if allocator == "keep":
        from cmx.pipelines.cpu_allocator import keep_freed_memory

        setting = keep_freed_memory()
        if not setting.applied:
            raise SystemExit(f"allocator setting not applied: {setting.reason}")
    if case.threads:
        torch.set_num_threads(case.threads)
    steps = _contenders(case, compile_model)
    conn.send(list(steps))
    while (msg := conn.recv()) is not None:
        kind, name = msg
        if kind == "warmup":
            t0 = time.perf_counter()
            for _ in range(max(warmup, 1)):  # the first call compiles
                steps[name]()
            conn.send(time.perf_counter() - t0)
        else:
            conn.send(steps[name]())


def run_case(
    case: Case, steps: int, warmup: int, compile_model: bool, allocators: tuple[str, ...], log: Console
) -> dict[str, Any]:
    """Time every contender under every allocator setting, each setting in its own process.

    Only one process computes at a time (the parent waits for each step), and the steps are
    interleaved across all (allocator, contender) pairs, so load hits every pair alike.
    """
    ref, ours, x, y = seeded_setup(case)
    math = check_same_math(ref, ours, x, y) if not case.amp_bf16 else {}
    del ref, ours, x, y

    ctx = mp.get_context("spawn")
    workers: dict[str, tuple[Any, Connection]] = {}
    pairs: list[tuple[str, str]] = []
    warm_s: dict[tuple[str, str], float] = {}
    try:
        for allocator in allocators:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(child, case, allocator, compile_model, warmup), daemon=True)
            proc.start()
            workers[allocator] = (proc, parent)
            for name in parent.recv():
                parent.send(("warmup", name))
                warm_s[(allocator, name)] = parent.recv()
                log.print(f"  warm-up done: {name}, {allocator} allocator ({warm_s[(allocator, name)]:.1f} s)")
                pairs.append((allocator, name))

        times: dict[tuple[str, str], list[float]] = {pair: [] for pair in pairs}
        load_before = os.getloadavg()
        for i in range(steps):
            for allocator, name in pairs:
                conn = workers[allocator][1]
                conn.send(("step", name))
                times[(allocator, name)].append(conn.recv())
            log.print(
                f"  round {i + 1}/{steps}: "
                + ", ".join(f"{n} [{a}] {t[-1] * 1e3:.0f} ms" for (a, n), t in times.items())
            )
        load_after = os.getloadavg()
    finally:
        for proc, conn in workers.values():
            if proc.is_alive():
                conn.send(None)
            proc.join(timeout=30)

    results = []
    for (allocator, name), ts in times.items():
        med = statistics.median(ts)
        results.append(
            Result(
                contender=name,
                allocator=allocator,
                ms_per_step=med * 1e3,
                ms_min=min(ts) * 1e3,
                images_per_s=case.batch / med,
                compile_s=warm_s[(allocator, name)] if "compile" in name else None,
                step_times_ms=[round(t * 1e3, 1) for t in ts],
            )
        )
    base = results[0].images_per_s
    for r in results:
        r.speedup_vs_timm = r.images_per_s / base
    return {
        "case": asdict(case),
        "steps": steps,
        "warmup": warmup,
        "same_math": math,
        "loadavg_1min_before_after": [load_before[0], load_after[0]],
        "results": [asdict(r) for r in results],
    }


def print_table(report: dict[str, Any], console: Console) -> None:
    c = report["case"]
    title = f"{c['model']} @ {c['resolution']} px, batch {c['batch']}, {c['device']}" + (
        " bf16" if c["amp_bf16"] else " fp32"
    )
    table = Table(title=title)
    for col in ("contender", "allocator", "img/s", "ms/step (median)", "ms/step (min)", "vs timm", "compile s"):
        table.add_column(col, justify="left" if col in ("contender", "allocator") else "right")
    for r in report["results"]:
        table.add_row(
            r["contender"],
            r["allocator"],
            f"{r['images_per_s']:.1f}",
            f"{r['ms_per_step']:.0f}",
            f"{r['ms_min']:.0f}",
            f"{r['speedup_vs_timm']:.2f}x",
            f"{r['compile_s']:.0f}" if r["compile_s"] is not None else "",
        )
    console.print(table)
    if report["same_math"]:
        m = report["same_math"]
        console.print(
            f"same weights, same batch: |loss diff| {m['loss_abs_diff']:.1e}, max |grad diff| "
            f"{m['grad_max_abs_diff']:.1e} (max |grad| {m['grad_max_abs']:.1e})"
        )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the CPU case (and the GPU case when CUDA is present); write JSON; return the report."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="convmixer_256_8_ks5_p2", help="CPU case model (registry name)")
    p.add_argument("--resolution", type=int, default=32, help="CPU case input size, px")
    p.add_argument("--batch", type=int, default=128, help="CPU case batch size")
    p.add_argument("--steps", type=int, default=4, help="timed steps per contender")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per contender")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile contender")
    p.add_argument("--gpu-model", default="convmixer_768_32")
    p.add_argument("--gpu-resolution", type=int, default=224)
    p.add_argument("--gpu-batch", type=int, default=64)
    p.add_argument("--gpu-steps", type=int, default=20)
    p.add_argument("--skip-cpu", action="store_true", help="only the GPU case")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON report path")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    console = Console(width=140)
    report: dict[str, Any] = {
        "benchmark": "model_throughput",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine_info(),
        "cases": [],
    }
    cases = []
    if not args.skip_cpu:
        cases.append((Case(args.model, args.resolution, args.batch, "cpu", threads=args.threads), args.steps))
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
        cases.append((Case(args.gpu_model, args.gpu_resolution, args.gpu_batch, "cuda", amp_bf16=True), args.gpu_steps))
    for case, steps in cases:
        console.print(f"[bold]{case.model}[/] @ {case.resolution} px, batch {case.batch} on {case.device}")
        allocators = ("default", "keep") if case.device == "cpu" else ("default",)
        result = run_case(case, steps, args.warmup, args.compile, allocators, console)
        report["cases"].append(result)
        print_table(result, console)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
    console.print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
