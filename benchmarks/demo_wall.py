"""The demo sweep's wall time (`make demo`: examples/search.yaml), before and after warm trial starts.

"before" runs it as FFCV alone would: compiling in every process, every loader built anew
(CMX_JIT_CACHE=0, CMX_LOADER_REUSE=0); "after" with cmx's defaults and numba's cache already
filled (as on a user's second sweep; the first trial of a first sweep fills it). Each arm runs
the real `cmx sweep` command with its own CMX_HOME, one after the other.

    .venv/bin/python benchmarks/demo_wall.py        # ~10 min on 2 cores
Writes benchmarks/results/demo_wall.json and prints a table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from machine import machine_info  # noqa: E402

ARMS = {
    "before": {"CMX_JIT_CACHE": "0", "CMX_LOADER_REUSE": "0"},
    "after": {"CMX_JIT_CACHE": "1", "CMX_LOADER_REUSE": "1"},
}


def sweep_summary(home: Path) -> dict[str, float]:
    """Epochs trained, seconds spent in epochs and in setup (time/setup_seconds), summed over trials."""
    rows = [
        json.loads(line)
        for result in sorted((home / "sweeps" / "fashion-mnist-demo").glob("trial_*/result.json"))
        for line in result.read_text().splitlines()
        if line.strip()
    ]
    return {
        "trials": len({r["trial_id"] for r in rows}),
        "epochs": len(rows),
        "epoch_s_sum": sum(r["time/epoch_seconds"] for r in rows),
        "setup_s_sum": sum(r.get("time/setup_seconds", 0.0) for r in rows),
    }


def main() -> None:
    data = REPO / "data" / "fashion-mnist-1k"
    cmx = str(REPO / ".venv" / "bin" / "cmx")
    if not (data / "train.beton").is_file():
        subprocess.run([cmx, "data", "builtin", "fashion-mnist", str(data), "--limit-per-class", "1000"], check=True)
    tmp = Path(tempfile.mkdtemp(prefix="cmx-demo-wall-"))
    results: dict = {"date": time.strftime("%Y-%m-%d"), "machine": machine_info(), "arms": {}}
    for arm, env in ARMS.items():
        full_env = {**os.environ, **env, "CMX_HOME": str(tmp / arm), "NUMBA_CACHE_DIR": str(tmp / f"numba-{arm}")}
        if arm == "after":  # fill the cache as a first sweep's first trial does
            subprocess.run(
                [cmx, "sweep", "--space", "examples/search.yaml", "--name", "warm", "--samples", "1",
                 "--set", "base.loop.epochs=1", "--set", "tracking.enabled=false"],
                cwd=REPO, env=full_env, check=False, capture_output=True,
            )  # fmt: skip
        start = time.perf_counter()
        proc = subprocess.run(
            [cmx, "sweep", "--space", "examples/search.yaml"], cwd=REPO, env=full_env, capture_output=True, text=True
        )
        wall = time.perf_counter() - start
        results["arms"][arm] = {
            "wall_s": wall,
            "exit_code": proc.returncode,
            **sweep_summary(tmp / arm),
            "tail": proc.stdout[-2000:],
        }
    table = Table(title="demo sweep (examples/search.yaml: 8 trials, ASHA, 2 at a time) wall time")
    for col in ("arm", "wall s", "epochs", "epoch s (sum)", "setup s (sum)", "exit"):
        table.add_column(col)
    for arm, r in results["arms"].items():
        table.add_row(
            arm, f"{r['wall_s']:.1f}", str(r["epochs"]), f"{r['epoch_s_sum']:.0f}", f"{r['setup_s_sum']:.1f}",
            str(r["exit_code"]),
        )  # fmt: skip
    before, after = results["arms"]["before"]["wall_s"], results["arms"]["after"]["wall_s"]
    results["wall_after_over_before"] = after / before
    Console().print(table)
    Console().print(
        f"wall: after/before {after / before:.2f}; TPE's path differs between runs (results are not "
        "deterministic), so compare the setup sums and the epochs trained, not only the wall time"
    )
    out = REPO / "benchmarks" / "results" / "demo_wall.json"
    out.write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
