"""Sweep efficiency on Fashion-MNIST: ASHA + TPE against random search without early stopping.

Both searches run the same number of trials over the same space in one invocation; we report the
best val top-1 each reached and the epochs each spent. A second part measures per-trial overhead
(trial start to first result, minus the epoch itself) with Ray actors reused or not.

    .venv/bin/python benchmarks/sweep_efficiency.py [--trials 8] [--epochs 4] [--per-class 300]
Writes benchmarks/results/sweep_efficiency.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform as stdlib_platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def space_file(
    tmp: Path,
    data: Any,
    *,
    name: str,
    algorithm: str,
    scheduler: str,
    trials: int,
    epochs: int,
    seed: int,
    reuse: bool = True,
    space: dict | None = None,
    grace_period: int = 1,
    reduction_factor: int = 2,
) -> Path:
    """One sweep definition; only algorithm/scheduler differ between the compared runs."""
    spec = {
        "name": name,
        "base": {
            "data": {
                "backend": "ffcv",
                "train_path": str(data.train_beton),
                "val_path": str(data.val_beton),
                "resolution": 28,
                "val_resolution": 28,
                "center_crop_ratio": 1.0,
                "batch_size": 128,
                "num_workers": 1,
                "mean": [0.286] * 3,
                "std": [0.353] * 3,
                "augment": {"scale": [0.7, 1.0]},
            },
            "model": {"name": "convmixer_tiny"},
            "optim": {"name": "adamw", "lr": 0.005, "weight_decay": 0.01},
            "schedule": {"name": "onecycle"},
            "loop": {"epochs": epochs},
        },
        "space": space
        or {
            "model.dim": {"type": "choice", "values": [32, 64]},
            "model.depth": {"type": "int", "low": 2, "high": 6},
            "model.kernel_size": {"type": "choice", "values": [3, 5, 7, 9]},
            "optim.lr": {"type": "loguniform", "low": 1e-4, "high": 3e-2},
            "schedule.name": {"type": "choice", "values": ["onecycle", "cosine"]},
        },
        "search": {"algorithm": algorithm, "seed": seed, "num_samples": trials},
        "scheduler": {"name": scheduler, "grace_period": grace_period, "reduction_factor": reduction_factor},
        "resources": {"cpus": 1, "reuse_actors": reuse},
        "storage": {"path": str(tmp / "sweeps")},
        "tracking": {"enabled": False},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def run(path: Path) -> dict[str, Any]:
    """Run one sweep; return best metric, epochs spent, wall time and per-trial overheads."""
    import ray

    from cmx.sweep import run_sweep
    from cmx.sweep_config import load_sweep_spec

    spec = load_sweep_spec(path)
    t0 = time.perf_counter()
    outcome = run_sweep(spec, source_text=path.read_text(), fresh=True)
    wall = time.perf_counter() - t0
    ray.shutdown()
    overheads = []
    for t in outcome.trials:
        rows = [json.loads(x) for x in (Path(t["path"]) / "result.json").read_text().splitlines()]
        if rows and "time/epoch_seconds" in rows[0]:
            overheads.append(rows[0]["time_total_s"] - rows[0]["time/epoch_seconds"])
    return {
        "best_top1": max((t["best"] or 0.0) for t in outcome.trials),
        "epochs": sum(t["epochs"] for t in outcome.trials),
        "trials": len(outcome.trials),
        "stopped_early": sum(t["status"] == "stopped early" for t in outcome.trials),
        "wall_s": wall,
        "overhead_s_median": statistics.median(overheads) if overheads else None,
        "overhead_s_all": overheads,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--per-class", type=int, default=300, help="Fashion-MNIST images per class")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--grace-period", type=int, default=1, help="ASHA: epochs before a trial can be stopped")
    ap.add_argument("--reduction-factor", type=int, default=2, help="ASHA: keep the top 1/N at each rung")
    ap.add_argument(
        "--scheduler", default="asha", choices=["asha", "hyperband"], help="early stopping of the TPE search"
    )
    ap.add_argument("--skip-search", action="store_true", help="only the overhead part")
    ap.add_argument("--skip-overhead", action="store_true", help="only the search comparison")
    ap.add_argument("--out", type=Path, default=None, help="JSON path [default: results/sweep_efficiency.json]")
    args = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from cmx.pipelines.fashion_mnist import export_fashion_mnist

    data = export_fashion_mnist(
        REPO / ".cmx-home" / "bench-data" / f"fmnist-{args.per_class}", limit_per_class=args.per_class, progress=False
    )
    tmp = Path(tempfile.mkdtemp(prefix="cmx-sweep-bench-"))
    console = Console()
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": {
            "cpu": stdlib_platform.processor() or stdlib_platform.machine(),
            "cores": os.cpu_count(),
            "python": sys.version.split()[0],
        },
        "args": vars(args),
    }
    if not args.skip_search:
        common = {"trials": args.trials, "epochs": args.epochs, "seed": args.seed}
        asha = {"grace_period": args.grace_period, "reduction_factor": args.reduction_factor}
        results["asha_tpe"] = run(
            space_file(tmp, data, name="asha-tpe", algorithm="optuna-tpe", scheduler=args.scheduler, **common, **asha)
        )
        results["random_full"] = run(
            space_file(tmp, data, name="random-full", algorithm="random", scheduler="none", **common)
        )
        a, r = results["asha_tpe"], results["random_full"]
        searched = {"asha": "ASHA + TPE", "hyperband": "HyperBand + TPE"}[args.scheduler]
        table = Table(title=f"{searched} vs random (no early stop), {args.trials} trials × ≤{args.epochs} epochs")
        for col in ("search", "best val/top1 %", "epochs spent", "stopped early", "wall s"):
            table.add_column(col)
        for label, x in ((searched, a), ("random, full budget", r)):
            table.add_row(
                label, f"{x['best_top1']:.2f}", str(x["epochs"]), str(x["stopped_early"]), f"{x['wall_s']:.0f}"
            )
        console.print(table)
        results["gap_points"] = r["best_top1"] - a["best_top1"]
        results["epoch_ratio"] = a["epochs"] / r["epochs"]
        console.print(
            f"gap to full-budget best: {results['gap_points']:+.2f} points at "
            f"{100 * results['epoch_ratio']:.0f}% of its epochs (goal: ≤ 0.5 at ≤ 35%)"
        )
    # Overhead: 1-epoch trials so that setup dominates; reuse of actors off vs on.
    if not args.skip_overhead:
        over = {}
        for reuse in (False, True):
            label = "reuse" if reuse else "fresh"
            path = space_file(
                tmp,
                data,
                name=f"overhead-{label}",
                algorithm="random",
                scheduler="none",
                trials=4,
                epochs=1,
                seed=args.seed,
                reuse=reuse,
                space={"optim.lr": {"type": "loguniform", "low": 1e-3, "high": 1e-2}},
            )
            over[label] = run(path)
        results["overhead"] = over
        table = Table(title="per-trial overhead (4 one-epoch trials, 2 at a time)")
        for col in ("actors", "setup before first epoch, median s", "sweep wall s"):
            table.add_column(col)
        for label, x in over.items():
            table.add_row(label, f"{x['overhead_s_median']:.1f}", f"{x['wall_s']:.1f}")
        console.print(table)
    out = args.out or RESULTS / "sweep_efficiency.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
