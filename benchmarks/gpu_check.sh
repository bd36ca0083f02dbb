#!/usr/bin/env bash
# One command for the day a GPU is lent: every CUDA path cmx has, measured against its baseline,
# in at most ~9 minutes on one GPU. Writes every JSON under benchmarks/results/gpu/ (or --out) and
# prints a short table at the end.
#
#   benchmarks/gpu_check.sh              # run everything (needs CUDA)
#   benchmarks/gpu_check.sh --dry-run    # print the plan and check the set-up; runs nothing
#
# Steps (each under its own time limit, so one hang cannot eat the whole budget):
#   1. model   model_throughput.py GPU case: cmx vs timm ConvMixer-768/32 at 224 px, bf16
#   2. train   train_throughput.py --device cuda: cmx (FFCV ToDevice pipeline) vs plain PyTorch
#              (torchvision DataLoader, pinned memory), bf16, on synthetic ImageNet-like JPEGs
#   3. cli     `cmx train` for 2 epochs on the GPU with the FFCV backend (Fashion-MNIST)
#   4. sweep   a 2-trial `cmx sweep` with resources.gpus: 1
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=benchmarks/results/gpu
DRY_RUN=0
BUDGET_S=540 # 9 minutes for the four steps together
PY=.venv/bin/python
CMX=.venv/bin/cmx

usage() {
  sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'
  echo "Options: --out DIR (default $OUT), --budget-s N (default $BUDGET_S), --dry-run, -h/--help"
}

die() { # one line on stderr, exit code 2 for usage errors, 1 otherwise
  echo "gpu_check: error: $1" >&2
  exit "${2:-1}"
}

while (($#)); do
  case $1 in
    --out) [[ $# -ge 2 && -n $2 ]] || die "--out needs a folder" 2; OUT=$2; shift 2 ;;
    --budget-s)
      [[ $# -ge 2 && $2 =~ ^[0-9]+$ && $2 -ge 60 ]] || die "--budget-s needs a whole number of seconds >= 60" 2
      BUDGET_S=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" 2 ;;
  esac
done

[[ -x $PY && -x $CMX ]] || die ".venv is missing: run \`make setup\` first"
[[ -e $OUT && ! -d $OUT ]] && die "--out $OUT exists and is not a folder" 2

# Shares of the budget per step, in seconds (the model case compiles nothing; the sweep starts Ray).
MODEL_S=$((BUDGET_S * 20 / 100))
TRAIN_S=$((BUDGET_S * 35 / 100))
CLI_S=$((BUDGET_S * 20 / 100))
SWEEP_S=$((BUDGET_S * 25 / 100))
DATA=data/fashion-mnist-gpu-check

plan() {
  cat <<EOF
gpu_check plan (budget ${BUDGET_S} s, results in $OUT):
  1. model  ≤ ${MODEL_S} s  $PY benchmarks/model_throughput.py --skip-cpu --out $OUT/model_throughput.json
  2. train  ≤ ${TRAIN_S} s  $PY benchmarks/train_throughput.py --device cuda --precision bf16 --jpeg --no-fmnist ... --out $OUT/train_throughput.json
  3. cli    ≤ ${CLI_S} s  $CMX train --config examples/fashion-mnist.yaml (2 epochs, loop.device=cuda, bf16, FFCV)
  4. sweep  ≤ ${SWEEP_S} s  $CMX sweep --space examples/search.yaml --samples 2 (resources.gpus=1, 2 epochs)
EOF
}

gpu_name() {
  "$PY" - <<'EOF'
import torch
print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF
}

plan
DEVICE=$(gpu_name 2>/dev/null || true)
if ((DRY_RUN)); then
  # The CPU-side checks: both benchmark scripts import and parse their options.
  for script in model_throughput train_throughput; do
    "$PY" "benchmarks/$script.py" --help >/dev/null || die "benchmarks/$script.py --help failed"
  done
  echo "device: ${DEVICE:-none (this machine has no CUDA device; a real run would stop here)}"
  exit 0
fi
[[ -n $DEVICE ]] || die "no CUDA device visible to torch: gpu_check.sh needs a GPU (--dry-run shows the plan)"
mkdir -p "$OUT"
export CMX_HOME=${CMX_HOME:-$PWD/.cmx-home} RAY_USAGE_STATS_ENABLED=0 MLFLOW_DISABLE_TELEMETRY=true

declare -A STATUS SECONDS_TAKEN
run_step() { # name, limit, command...: never stops the script; records status and time
  local name=$1 limit=$2
  shift 2
  echo "== $name (≤ ${limit} s): $*"
  local start=$SECONDS rc=0
  timeout --kill-after=15 "$limit" "$@" >"$OUT/$name.log" 2>&1 || rc=$?
  SECONDS_TAKEN[$name]=$((SECONDS - start))
  case $rc in
    0) STATUS[$name]=ok ;;
    124 | 137) STATUS[$name]="timed out" ;;
    *) STATUS[$name]="failed ($rc)" ;;
  esac
  echo "   ${STATUS[$name]} in ${SECONDS_TAKEN[$name]} s (log: $OUT/$name.log)"
  tail -n 25 "$OUT/$name.log"
}

run_step model "$MODEL_S" "$PY" benchmarks/model_throughput.py --skip-cpu --out "$OUT/model_throughput.json"

run_step train "$TRAIN_S" "$PY" benchmarks/train_throughput.py --device cuda --precision bf16 --jpeg --no-fmnist \
  --jpeg-images 4096 --jpeg-resolution 160 --jpeg-patch-size 8 --dim 512 --depth 12 --kernel-size 9 \
  --workers "$(nproc)" --threads "$(nproc)" --steps 30 --rounds 3 --loader-rounds 3 --out "$OUT/train_throughput.json"

if [[ ! -f $DATA/train.beton || ! -f $DATA/val.beton ]]; then
  "$CMX" data builtin fashion-mnist "$DATA" --limit-per-class 500 >"$OUT/data.log" 2>&1 ||
    die "exporting Fashion-MNIST failed (see $OUT/data.log)"
fi
run_step cli "$CLI_S" "$CMX" train --config examples/fashion-mnist.yaml --run-dir "$OUT/train-run" --no-tracking \
  --no-progress --set loop.epochs=2 --set loop.device=cuda --set loop.precision=bf16 \
  --set data.train_path="$PWD/$DATA/train.beton" --set data.val_path="$PWD/$DATA/val.beton"
[[ -f $OUT/train-run/metrics.jsonl ]] && cp "$OUT/train-run/metrics.jsonl" "$OUT/cmx_train_metrics.jsonl"

run_step sweep "$SWEEP_S" "$CMX" sweep --space examples/search.yaml --name gpu-check --fresh --samples 2 \
  --storage "$PWD/$OUT/sweeps" --set resources.gpus=1 --set base.loop.epochs=2 --set base.loop.precision=bf16 \
  --set base.data.train_path="$PWD/$DATA/train.beton" --set base.data.val_path="$PWD/$DATA/val.beton"

# The summary: one row per step, plus the headline ratio of each benchmark JSON it can read.
STEPS_JSON=$(for s in model train cli sweep; do
  printf '{"step": "%s", "status": "%s", "seconds": %s}\n' "$s" "${STATUS[$s]:-skipped}" "${SECONDS_TAKEN[$s]:-0}"
done)
"$PY" - "$OUT" "$DEVICE" <<EOF
import json, sys
from pathlib import Path
out, device = Path(sys.argv[1]), sys.argv[2]
steps = [json.loads(line) for line in """$STEPS_JSON""".splitlines() if line.strip()]
summary = {"device": device, "steps": steps, "files": sorted(p.name for p in out.glob("*.json"))}
(out / "summary.json").write_text(json.dumps(summary, indent=2))
print(f"\ngpu_check on {device}")
print(f"{'step':8} {'status':12} {'seconds':>8}")
for s in steps:
    print(f"{s['step']:8} {s['status']:12} {s['seconds']:>8}")
print(f"JSON: {', '.join(summary['files'])} in {out}")
EOF
for s in model train cli sweep; do [[ ${STATUS[$s]} == ok ]] || exit 1; done
