"""Sweep efficiency on Fashion-MNIST: ASHA + TPE against random search without early stopping.

Both searches run the same number of trials over the same space in one invocation, with
deterministic trials (`loop.deterministic`), selecting on val (carved from the official train
split); each search's best trial is then scored once on the held-out test split (the official
test set). We report, per search seed and as mean ± std over seeds, the best val top-1, that
trial's test top-1 and the epochs each spent. A second part measures per-trial setup with Ray
actors reused or not.

    .venv/bin/python benchmarks/sweep_efficiency.py [--trials 8] [--epochs 4] [--per-class 300] [--seeds 0,1,2,3,4]
Writes benchmarks/results/sweep_efficiency.json and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from machine import machine_info  # noqa: E402

from cmx.core.metrics import (  # noqa: E402
    MODES,
    SETUP_PHASES,
    SETUP_PREFIX,
    SETUP_SECONDS,
    TRAIN_LOSS,
    VAL_TOP1,
    TrialStatus,
)

RESULTS = REPO / "benchmarks" / "results"
EARLY_METRICS = {m: 1.0 if MODES[m] == "max" else -1.0 for m in (VAL_TOP1, TRAIN_LOSS)}  # sign: higher is better


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
    scheduler_metric: str | None = None,
    warm_start: list[str] | None = None,
) -> Path:
    """One sweep definition; only algorithm/scheduler differ between the compared runs.

    `warm_start` names earlier sweeps under the same `tmp / "sweeps"` whose trials seed this one's
    sampler (`search.warm_start`)."""
    spec = {
        "name": name,
        "base": {
            "data": {
                "backend": "ffcv",
                "train_path": str(data.train_beton),
                "val_path": str(data.val_beton),
                "test_path": str(data.test_beton),
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
            "loop": {"epochs": epochs, "deterministic": True},
        },
        "space": space
        or {
            "model.dim": {"type": "choice", "values": [32, 64]},
            "model.depth": {"type": "int", "low": 2, "high": 6},
            "model.kernel_size": {"type": "choice", "values": [3, 5, 7, 9]},
            "optim.lr": {"type": "loguniform", "low": 1e-4, "high": 3e-2},
            "schedule.name": {"type": "choice", "values": ["onecycle", "cosine"]},
        },
        "search": {
            "algorithm": algorithm,
            "seed": seed,
            "num_samples": trials,
            **({"warm_start": warm_start} if warm_start else {}),
        },
        "scheduler": {
            "name": scheduler,
            "grace_period": grace_period,
            "reduction_factor": reduction_factor,
            **({"metric": scheduler_metric} if scheduler_metric else {}),
        },
        "resources": {"cpus": 1, "reuse_actors": reuse},
        "storage": {"path": str(tmp / "sweeps")},
        "tracking": {"enabled": False},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def trial_results(trial_dir: Path) -> list[dict[str, Any]]:
    """The rows a Tune trial reported, one per epoch (its result.json)."""
    return [json.loads(x) for x in (trial_dir / "result.json").read_text().splitlines() if x.strip()]


def metric_curves(trial_dir: Path) -> dict[str, list[float]]:
    """A trial's early-stopping candidates after each epoch: val top-1 and train loss."""
    rows = trial_results(trial_dir)
    return {m: [row[m] for row in rows if m in row] for m in EARLY_METRICS}


def results_in_order(trial_dirs: list[Path]) -> list[float]:
    """Every epoch's val top-1 over all trials, in the order the epochs finished."""
    rows = [r for d in trial_dirs for r in trial_results(d) if VAL_TOP1 in r]
    return [float(r[VAL_TOP1]) for r in sorted(rows, key=lambda r: (r["timestamp"], r.get("time_total_s", 0.0)))]


def epochs_to_reach(values: list[float], target: float) -> int | None:
    """How many epochs (in the order they finished) a sweep spent before one reached `target`."""
    return next((i + 1 for i, v in enumerate(values) if v >= target), None)


def warm_start_comparison(tmp: Path, data: Any, args: argparse.Namespace, console: Console) -> dict[str, Any]:
    """TPE cold against TPE warm-started from an earlier sweep of the same space (another seed):
    does the warm one reach the cold one's best in fewer epochs?"""
    common = {
        "algorithm": "optuna-tpe", "scheduler": args.scheduler, "trials": args.trials, "epochs": args.epochs,
        "grace_period": args.grace_period, "reduction_factor": args.reduction_factor,
        "scheduler_metric": args.scheduler_metric,
    }  # fmt: skip
    out = {"earlier": run(space_file(tmp, data, name="earlier", seed=args.seed + 100, **common))}
    out["cold"] = run(space_file(tmp, data, name="cold", seed=args.seed, **common))
    out["warm"] = run(space_file(tmp, data, name="warm", seed=args.seed, warm_start=["earlier"], **common))
    target = out["cold"]["best_top1"]
    table = Table(title=f"warm start: epochs until the cold sweep's best ({target:.2f}%) is reached")
    for col in ("sweep", "best val top-1 %", "epochs spent", "epochs to reach the cold best"):
        table.add_column(col)
    for label in ("earlier", "cold", "warm"):
        x = out[label]
        x["epochs_to_cold_best"] = epochs_to_reach(x["val_top1_in_order"], target)
        reach = x["epochs_to_cold_best"]
        table.add_row(label, f"{x['best_top1']:.2f}", str(x["epochs"]), "never" if reach is None else str(reach))
    console.print(table)
    return out


def search_comparison(tmp: Path, data: Any, args: argparse.Namespace, seed: int, console: Console) -> dict[str, Any]:
    """ASHA + TPE against random search at full budget, both with search seed `seed`."""
    common = {"trials": args.trials, "epochs": args.epochs, "seed": seed}
    asha = {
        "grace_period": args.grace_period,
        "reduction_factor": args.reduction_factor,
        "scheduler_metric": args.scheduler_metric,
    }
    results: dict[str, Any] = {"seed": seed}
    results["asha_tpe"] = run(
        space_file(
            tmp, data, name=f"asha-tpe-s{seed}", algorithm="optuna-tpe", scheduler=args.scheduler, **common, **asha
        )  # fmt: skip
    )
    results["random_full"] = run(
        space_file(tmp, data, name=f"random-full-s{seed}", algorithm="random", scheduler="none", **common)
    )
    early = {"asha": "ASHA", "asha-promotion": "ASHA (promotion)", "hyperband": "HyperBand"}[args.scheduler]
    if args.scheduler_metric:
        early += f" on {args.scheduler_metric}"
    rows = [(f"{early} + TPE", results["asha_tpe"])]
    if args.asha_random:
        results["asha_random"] = run(
            space_file(
                tmp, data, name=f"asha-random-s{seed}", algorithm="random", scheduler=args.scheduler, **common, **asha
            )  # fmt: skip
        )
        rows.append((f"{early} + random (same configs)", results["asha_random"]))
    a, r = results["asha_tpe"], results["random_full"]
    rows.append(("random, full budget", r))
    title = f"seed {seed}: {early} + TPE vs random (no early stop), {args.trials} trials × ≤{args.epochs} epochs"
    table = Table(title=title)
    for col in ("search", "best val/top1 %", "its test/top1 %", "val gap", "test gap", "epochs spent",
                "stopped early", "wall s"):  # fmt: skip
        table.add_column(col)
    for label, x in rows:
        table.add_row(
            label,
            f"{x['best_top1']:.2f}",
            _pct(x["best_trial_test_top1"]),
            f"{r['best_top1'] - x['best_top1']:+.2f}",
            _gap(r["best_trial_test_top1"], x["best_trial_test_top1"]),
            f"{x['epochs']} ({100 * x['epochs'] / r['epochs']:.0f}%)",
            str(x["stopped_early"]),
            f"{x['wall_s']:.0f}",
        )
    console.print(table)
    results["gap_points"] = r["best_top1"] - a["best_top1"]
    results["test_gap_points"] = _diff(r["best_trial_test_top1"], a["best_trial_test_top1"])
    results["epoch_ratio"] = a["epochs"] / r["epochs"]
    results["early_rank_agreement"] = early_rank_agreement(r["curves"])
    if args.rank_table:
        print_rank_agreement(console, results["early_rank_agreement"], len(r["curves"]))
    return results


def _diff(full: float | None, early: float | None) -> float | None:
    return None if full is None or early is None else full - early


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _gap(full: float | None, early: float | None) -> str:
    d = _diff(full, early)
    return "-" if d is None else f"{d:+.2f}"


def mean_std(values: list[float | None]) -> dict[str, float | int | None]:
    """Mean and sample standard deviation of the values that exist, and how many there were."""
    xs = [float(v) for v in values if v is not None]
    return {
        "mean": statistics.fmean(xs) if xs else None,
        "std": statistics.stdev(xs) if len(xs) > 1 else None,
        "n": len(xs),
    }


SUMMARY_KEYS: dict[str, Any] = {
    "asha_tpe best val top-1": lambda s: s["asha_tpe"]["best_top1"],
    "asha_tpe best trial's test top-1": lambda s: s["asha_tpe"]["best_trial_test_top1"],
    "random_full best val top-1": lambda s: s["random_full"]["best_top1"],
    "random_full best trial's test top-1": lambda s: s["random_full"]["best_trial_test_top1"],
    "val gap, points": lambda s: s["gap_points"],
    "test gap, points": lambda s: s["test_gap_points"],
    "epoch ratio": lambda s: s["epoch_ratio"],
    "asha_tpe wall s": lambda s: s["asha_tpe"]["wall_s"],
    "random_full wall s": lambda s: s["random_full"]["wall_s"],
}


def summarise_seeds(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean ± std over search seeds of each figure in SUMMARY_KEYS, plus whether the goal holds."""
    out: dict[str, Any] = {k: mean_std([get(s) for s in per_seed]) for k, get in SUMMARY_KEYS.items()}
    val_gap, test_gap, ratio = out["val gap, points"], out["test gap, points"], out["epoch ratio"]
    out["goal"] = "gap <= 0.5 points at <= 35% of the epochs (means over seeds)"
    out["goal_on_val"] = val_gap["mean"] is not None and val_gap["mean"] <= 0.5 and ratio["mean"] <= 0.35
    out["goal_on_test"] = test_gap["mean"] is not None and test_gap["mean"] <= 0.5 and ratio["mean"] <= 0.35
    out["seeds"] = [s["seed"] for s in per_seed]
    return out


def print_seed_summary(console: Console, summary: dict[str, Any], args: argparse.Namespace) -> None:
    """The over-seeds table: mean ± std of each figure."""
    n = len(summary["seeds"])
    table = Table(title=f"over {n} search seeds {summary['seeds']}: mean ± std ({args.trials} trials × ≤{args.epochs} "
                        f"epochs, {args.per_class} images per class)")  # fmt: skip
    table.add_column("figure")
    table.add_column("mean ± std")
    for key in SUMMARY_KEYS:
        m = summary[key]
        std = "" if m["std"] is None else f" ± {m['std']:.2f}"
        table.add_row(key, "-" if m["mean"] is None else f"{m['mean']:.2f}{std}")
    console.print(table)
    console.print(f"goal ({summary['goal']}): on val {'met' if summary['goal_on_val'] else 'NOT met'}, "
                  f"on test {'met' if summary['goal_on_test'] else 'NOT met'}")  # fmt: skip


def setup_breakdown(row: dict[str, Any]) -> dict[str, float]:
    """Where one start or resume spent its seconds before the first batch (the trial's time/setup/*)."""
    out = {k[len(SETUP_PREFIX) : -2]: float(v) for k, v in row.items() if k.startswith(SETUP_PREFIX)}
    return {**out, "total": float(row[SETUP_SECONDS])}


def median_breakdown(setups: list[dict[str, float]]) -> dict[str, float]:
    """The median of each phase over `setups`."""
    keys = sorted({k for s in setups for k in s})
    return {k: statistics.median(s.get(k, 0.0) for s in setups) for k in keys}


@contextlib.contextmanager
def environment(**values: str) -> Iterator[None]:
    """Set environment variables (inherited by the Ray workers a sweep starts), then restore them."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run(path: Path) -> dict[str, Any]:
    """Run one sweep; return best metric, epochs spent, wall time and per-trial overheads."""
    import ray

    from cmx.core.sweep_spec import load_sweep_spec
    from cmx.sweep.tuner import run_sweep

    spec = load_sweep_spec(path)
    t0 = time.perf_counter()
    outcome = run_sweep(spec, source_text=path.read_text(), fresh=True)
    wall = time.perf_counter() - t0
    ray.shutdown()
    overheads, setups, resumes = [], [], []
    for t in outcome.trials:
        rows = trial_results(Path(t.path))
        if rows and "time/epoch_seconds" in rows[0]:
            overheads.append(rows[0]["time_total_s"] - rows[0]["time/epoch_seconds"])
        starts = [r for r in rows if SETUP_SECONDS in r]  # the trial's start, then each resume
        setups += [setup_breakdown(r) for r in starts[:1]]
        resumes += [setup_breakdown(r) for r in starts[1:]]
    scores = list(outcome.test.values())
    return {
        "best_trial": outcome.best.trial_id if outcome.best else None,
        "best_trial_test_top1": scores[0].top1 if scores else None,
        "best_trial_test_top5": scores[0].top5 if scores else None,
        "setup_s_median": statistics.median(s["total"] for s in setups) if setups else None,
        "setup_breakdown_median": median_breakdown(setups),
        "setups": setups,
        "resume_setup_s_median": statistics.median(s["total"] for s in resumes) if resumes else None,
        "resumes": resumes,
        "best_top1": max((t.best or 0.0) for t in outcome.trials),
        "epochs": sum(t.epochs for t in outcome.trials),
        "epochs_per_trial": [t.epochs for t in outcome.trials],
        "trials": len(outcome.trials),
        "stopped_early": sum(t.status == TrialStatus.SCHEDULER_STOPPED for t in outcome.trials),
        "wall_s": wall,
        "overhead_s_median": statistics.median(overheads) if overheads else None,
        "overhead_s_all": overheads,
        "curves": [metric_curves(Path(t.path)) for t in outcome.trials],
        "val_top1_in_order": results_in_order([Path(t.path) for t in outcome.trials]),
    }


def average_ranks(values: list[float]) -> np.ndarray:
    """Ranks 0..n-1 of `values`, ties sharing their mean rank (as Spearman's rho needs)."""
    x = np.asarray(values, dtype=float)
    ranks = np.empty(len(x))
    ranks[np.argsort(x, kind="stable")] = np.arange(len(x))
    for v in np.unique(x):
        tied = x == v
        ranks[tied] = ranks[tied].mean()
    return ranks


def early_rank_agreement(curves: list[dict[str, list[float]]]) -> dict[str, list[dict[str, float]]]:
    """Per early-stopping metric (EARLY_METRICS): how well its value at epoch k ranks full-budget
    trials by their final val top-1 (Spearman's rho), and where the finally best trial stood at
    epoch k: what a grace period of k epochs on that metric can rely on."""
    epochs = max(len(c[VAL_TOP1]) for c in curves)
    full = [c for c in curves if len(c[VAL_TOP1]) == epochs]
    final = [c[VAL_TOP1][-1] for c in full]
    best = int(np.argmax(final))
    agreement = {}
    for metric, sign in EARLY_METRICS.items():
        rows = []
        for k in range(1, epochs + 1):  # the last row: how the final value itself ranks them
            at_k = [sign * c[metric][k - 1] for c in full]
            rho = float(np.corrcoef(average_ranks(at_k), average_ranks(final))[0, 1])
            rows.append({"epoch": k, "spearman_rho": rho, "final_best_rank": 1 + sum(v > at_k[best] for v in at_k)})
        agreement[metric] = rows
    return agreement


def print_rank_agreement(console: Console, agreement: dict[str, list[dict[str, float]]], trials: int) -> None:
    """Table of early_rank_agreement's rows, one column pair per metric."""
    table = Table(title=f"{trials} full-budget trials: does epoch k rank them as their final val top-1 does?")
    table.add_column("epoch k")
    for metric in agreement:
        table.add_column(f"{metric}: Spearman rho")
        table.add_column(f"{metric}: rank of the final best")
    for i, row in enumerate(next(iter(agreement.values()))):
        cells = [str(row["epoch"])]
        for rows in agreement.values():
            cells += [f"{rows[i]['spearman_rho']:.2f}", f"{rows[i]['final_best_rank']} of {trials}"]
        table.add_row(*cells)
    console.print(table)


STARTUP_ARMS = {
    "before": {"CMX_JIT_CACHE": "0", "CMX_LOADER_REUSE": "0"},
    "after": {"CMX_JIT_CACHE": "1", "CMX_LOADER_REUSE": "1"},
    # Ray's raylet imports these in every Python worker it starts, before any task or actor arrives
    # (an experiment: Ray workers that are already warm when a fresh trial's actor lands on them).
    "preload": {
        "CMX_JIT_CACHE": "1",
        "CMX_LOADER_REUSE": "1",
        "RAY_preload_python_modules": "torch,torch._dynamo,cmx.pipelines.trainer,cmx.sweep.trial",
    },
}


def overhead(tmp: Path, data: Any, seed: int, console: Console, arms: list[str]) -> dict[str, Any]:
    """Setup before the first batch, per trial, for each arm: fresh actors, reused ones, resumes."""
    one_lr = {"optim.lr": {"type": "loguniform", "low": 1e-3, "high": 1e-2}}
    common = {"algorithm": "random", "seed": seed, "space": one_lr}
    over: dict[str, Any] = {}
    for arm in arms:
        env = STARTUP_ARMS[arm]
        with environment(**env, NUMBA_CACHE_DIR=str(tmp / f"numba-{arm}")):
            if arm != "before":
                warm = space_file(tmp, data, name="warm-cache", scheduler="none", trials=1, epochs=1, **common)
                over[f"{arm}/cold-cache-first-trial"] = run(warm)
            for reuse in (False, True):
                label = f"{arm}/{'reused' if reuse else 'fresh'} actors"
                path = space_file(
                    tmp, data, name=f"overhead-{arm}-{reuse}", scheduler="none", trials=4, epochs=1, reuse=reuse,
                    **common,
                )  # fmt: skip
                over[label] = run(path)
            path = space_file(
                tmp, data, name=f"promotion-{arm}", scheduler="asha-promotion", trials=4, epochs=3, reuse=True,
                grace_period=1, reduction_factor=2, **common,
            )  # fmt: skip
            over[f"{arm}/asha-promotion resumes"] = run(path)
    table = Table(title="trial setup before the first batch (s, median; 1-epoch trials of convmixer_tiny, 2 at a time)")
    phases = list(SETUP_PHASES)
    for col in ("arm", "starts", "setup", *phases, "resumes: setup", "sweep wall s"):
        table.add_column(col)
    for label, x in over.items():
        b = x["setup_breakdown_median"]
        resume = x["resume_setup_s_median"]
        table.add_row(
            label,
            str(len(x["setups"])),
            f"{x['setup_s_median']:.2f}" if x["setup_s_median"] is not None else "-",
            *(f"{b.get(p, 0.0):.2f}" for p in phases),
            f"{resume:.2f} ({len(x['resumes'])})" if resume is not None else "-",
            f"{x['wall_s']:.1f}",
        )
    console.print(table)
    return over


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--per-class", type=int, default=300, help="Fashion-MNIST images per class")
    ap.add_argument("--seed", type=int, default=0, help="search seed of the warm-start and overhead parts")
    ap.add_argument(
        "--seeds",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[0],
        help="search seeds of the ASHA-vs-random comparison, comma-separated (mean ± std over them)",
    )
    ap.add_argument("--rank-table", action="store_true", help="print each seed's early-rank agreement table")
    ap.add_argument("--grace-period", type=int, default=1, help="ASHA: epochs before a trial can be stopped")
    ap.add_argument("--reduction-factor", type=int, default=2, help="ASHA: keep the top 1/N at each rung")
    ap.add_argument(
        "--scheduler",
        default="asha",
        choices=["asha", "asha-promotion", "hyperband"],
        help="early stopping of the TPE search",
    )
    ap.add_argument(
        "--scheduler-metric",
        default=None,
        help="what early stopping ranks trials on (scheduler.metric), e.g. train/loss [default: val/top1]",
    )
    ap.add_argument(
        "--asha-random",
        action="store_true",
        help="also run ASHA on random search: the same configs as the full-budget random run, so its gap is "
        "what early stopping alone costs",
    )
    ap.add_argument(
        "--rank-agreement",
        type=Path,
        metavar="EXPERIMENT_DIR",
        help="only read a finished sweep without early stopping (its trial folders) and print how well each "
        "epoch ranks its trials; helps pick a grace period",
    )
    ap.add_argument("--skip-search", action="store_true", help="only the overhead part")
    ap.add_argument(
        "--startup-arms",
        type=lambda v: v.split(","),
        default=["before", "after"],
        help=f"arms of the overhead part, comma-separated, from {', '.join(STARTUP_ARMS)}",
    )
    ap.add_argument("--skip-overhead", action="store_true", help="only the search comparison")
    ap.add_argument(
        "--warm-start",
        action="store_true",
        help="also compare TPE cold with TPE warm-started from an earlier sweep (search.warm_start)",
    )
    ap.add_argument("--out", type=Path, default=None, help="JSON path [default: results/sweep_efficiency.json]")
    args = ap.parse_args()
    console = Console()
    if args.rank_agreement:
        curves = [metric_curves(d.parent) for d in sorted(args.rank_agreement.glob("*/result.json"))]
        if len(curves) < 3:
            sys.exit(
                f"{args.rank_agreement}: needs the trial folders (*/result.json) of a finished sweep; found {len(curves)}"
            )
        agreement = early_rank_agreement(curves)
        print_rank_agreement(console, agreement, len(curves))
        if args.out:
            args.out.write_text(json.dumps({"experiment": str(args.rank_agreement), "curves": curves,
                                            "early_rank_agreement": agreement}, indent=2))  # fmt: skip
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from cmx.pipelines.fashion_mnist import export_fashion_mnist

    data = export_fashion_mnist(
        REPO / ".cmx-home" / "bench-data" / f"fmnist-{args.per_class}", limit_per_class=args.per_class, progress=False
    )
    tmp = Path(tempfile.mkdtemp(prefix="cmx-sweep-bench-"))
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine_info(),
        "args": vars(args),
    }
    if not args.skip_search:
        per_seed = [search_comparison(tmp, data, args, seed, console) for seed in args.seeds]
        results["per_seed"] = per_seed
        results["summary"] = summarise_seeds(per_seed)
        print_seed_summary(console, results["summary"], args)
    # Overhead: 1-epoch trials so that setup dominates; reuse of actors off vs on; and a paused
    # asha-promotion trial's resume. "before" is FFCV compiling in every process and every loader
    # built anew (CMX_JIT_CACHE=0, CMX_LOADER_REUSE=0); "after" starts from an empty numba cache,
    # filled by one untimed trial first (as the first trial of any sweep on a node fills it).
    if args.warm_start:
        results["warm_start"] = warm_start_comparison(tmp, data, args, console)
    if not args.skip_overhead:
        results["overhead"] = overhead(tmp, data, args.seed, console, args.startup_arms)
    out = args.out or RESULTS / "sweep_efficiency.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
