"""The floor of a fresh trial process: what torch costs before any cmx or FFCV work.

Each run is a new Python process that times, one after the other, `import torch`, then
`torch._dynamo` (which every torch.optim optimizer imports, in `add_param_group` and `step`), then
cmx's trial module, then `import ffcv` through `ffcv_imported()` (numba's cache on). The baseline,
in the same run, is a bare interpreter start (`python -c pass`, timed from outside).

    .venv/bin/python benchmarks/import_floor.py --runs 3       # ~1 min on 2 cores
Writes benchmarks/results/import_floor.json and prints a table (seconds, per run).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from machine import machine_info  # noqa: E402

STEPS = ("torch", "torch._dynamo", "cmx.sweep.trial", "ffcv_imported")
CHILD = """
import json, time
t = time.perf_counter(); out = {}
import torch
out["torch"] = time.perf_counter() - t; t = time.perf_counter()
import torch._dynamo
out["torch._dynamo"] = time.perf_counter() - t; t = time.perf_counter()
import cmx.sweep.trial
out["cmx.sweep.trial"] = time.perf_counter() - t; t = time.perf_counter()
from cmx.pipelines.ffcv_compat import ffcv_imported
with ffcv_imported():
    pass
out["ffcv_imported"] = time.perf_counter() - t
print(json.dumps(out))
"""


def one_run() -> dict[str, float]:
    """One fresh process: the bare start from outside, then each step from inside."""
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    bare = time.perf_counter() - t
    out = subprocess.run([sys.executable, "-c", CHILD], check=True, capture_output=True, text=True).stdout
    return {"python -c pass": bare, **json.loads(out.strip().splitlines()[-1])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "import_floor.json")
    args = ap.parse_args()
    runs = [one_run() for _ in range(args.runs)]
    cols = ["python -c pass", *STEPS]
    table = Table(title="a fresh process, step by step (s)")
    for c in ["run", *cols, "torch + _dynamo"]:
        table.add_column(c, justify="right")
    for i, r in enumerate(runs, 1):
        table.add_row(str(i), *(f"{r[c]:.2f}" for c in cols), f"{r['torch'] + r['torch._dynamo']:.2f}")
    med = {c: statistics.median(r[c] for r in runs) for c in cols}
    table.add_row("median", *(f"{med[c]:.2f}" for c in cols), f"{med['torch'] + med['torch._dynamo']:.2f}")
    Console().print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine_info(), "runs": runs, "median": med}, indent=2
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
