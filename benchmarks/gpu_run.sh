#!/usr/bin/env bash
# The prepared run for a lent NVIDIA GPU (issue 15; the int8 section: issue 27): at most 8 minutes on one H200, each
# section under its own time guard, so a rerun fits a 15-minute lease. Writes $OUT/gpu_run.json (every section) and
# prints a README table.
#
#   benchmarks/gpu_run.sh                         # on the GPU machine, from the repository root
#   benchmarks/gpu_run.sh --device cpu --tiny     # dry run on a CPU: tiny model, 8x8 grid, no device tests
#
# The GPU machine has no network, Python 3.12 and torch 2.11: the package goes in with `pip install --no-deps
# --no-build-isolation -e .` against that torch. Pure-Python wheels it may lack (tqdm, filelock, pyyaml's pure
# build is not needed: it ships yaml) are installed from $DIMOO_WHEELS (default shared/wheels) when that folder exists;
# diffusers is not needed (nothing here decodes images), transformers only by the text tokenizer (not used here).
set -u
DEVICE=cuda
TINY=""
OUT=${OUT:-/tmp/gpu_run_out}  # the device runner sets $OUT to the folder it brings back
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --tiny) TINY=--tiny; shift ;;
    --out) OUT=$2; shift 2 ;;
    *) echo "unknown argument $1 (use --device cuda|cpu, --tiny, --out DIR)"; exit 2 ;;
  esac
done
mkdir -p "$OUT"
: > "$OUT/sections.jsonl"
PY=${PYTHON:-python}

WHEELS=${DIMOO_WHEELS:-shared/wheels}
if [ -d "$WHEELS" ] && ls "$WHEELS"/*.whl > /dev/null 2>&1; then
  $PY -m pip install --quiet --no-index --no-deps "$WHEELS"/*.whl
fi
if ! $PY -c "import dimoo_npu" 2> /dev/null; then
  $PY -m pip install --quiet --no-deps --no-build-isolation -e . || exit 1
fi

SCALE=${GUARD_SCALE:-1}  # a CPU dry run on a busy machine may scale every time guard, e.g. GUARD_SCALE=5

section() {  # name, time limit in seconds (times $SCALE), command...
  local name=$1 limit=$(( $2 * SCALE ))
  shift 2
  local start=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local took=$(( $(date +%s) - start ))
  echo "{\"section\": \"$name\", \"rc\": $rc, \"seconds\": $took, \"limit_s\": $limit}" >> "$OUT/sections.jsonl"
  echo "$name: rc $rc in ${took}s (limit ${limit}s; 124 = ran past it), log $OUT/$name.log"
}

if [ "$DEVICE" = cuda ]; then
  section device_tests 45 $PY -m pytest tests/device/cuda -q -x -p no:cacheprovider
else
  echo "device_tests: skipped on $DEVICE (they need CUDA)"
fi
section goldens 60 $PY benchmarks/gpu_bench.py goldens --device "$DEVICE" --out "$OUT/goldens.json"
section sampling 200 $PY benchmarks/gpu_bench.py sampling --device "$DEVICE" --out "$OUT/sampling.json" $TINY
section naive 45 $PY benchmarks/gpu_bench.py naive --device "$DEVICE" --out "$OUT/naive.json" $TINY
section int8 120 $PY benchmarks/gpu_bench.py int8 --device "$DEVICE" --out "$OUT/int8.json" --steps 4 $TINY

$PY - "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
merged = {"sections": [json.loads(line) for line in (out / "sections.jsonl").read_text().splitlines() if line]}
for name in ("goldens", "sampling", "naive", "int8"):
    path = out / f"{name}.json"
    merged[name] = json.loads(path.read_text()) if path.exists() else None
(out / "gpu_run.json").write_text(json.dumps(merged, indent=1))
print(f"\nwrote {out / 'gpu_run.json'}\n")
goldens = merged["goldens"]
if goldens:
    cases = goldens["cases"]
    checked = any(c["steps_sync_free_checked"] for c in cases.values())
    print(f"goldens on {goldens['device']} ({len(cases)} case x dtype runs, complete {goldens['complete']}): fp32 tokens "
          f"exact {all(c['tokens_equal'] for k, c in cases.items() if k.endswith('float32'))}, steps checked free of "
          f"syncs {checked and not any(c['error'] for c in cases.values())}" + ("" if checked else " (not on CUDA)"))
sampling, naive = merged["sampling"], merged["naive"]
if sampling:
    model = sampling["model"]
    if not sampling["complete"]:
        print("\nsampling: cut by its time guard; the rows below are the configurations it finished")
    print(f"\nd{model['d_model']} x {model['layers']} (MLP {model['mlp']}, vocab {model['vocab']}), random bf16, "
          f"{sampling['grid']}x{sampling['grid']} codes, CFG 4, temperature {sampling['temperature']}, "
          f"64-step schedule ({sampling['schedule']['full']} full + {sampling['schedule']['cached']} cached with "
          f"ML-Cache), extrapolated from timed steps; bf16 matmul {sampling['matmul_tflops']:.0f} TFLOP/s\n")
    print("| batch | ML-Cache | forward | full step s | cached step s | 64 steps s | images/s | TFLOP/s (MFU) | peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in sampling["results"]:
        cached = f"{r['cached_step_s']:.3f}" if r["cached_step_s"] else "-"
        memory = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] else "-"
        print(f"| {r['batch']} | {'on' if r['ml_cache'] else 'off'} | {r['forward']} | {r['full_step_s']:.3f} | "
              f"{cached} | {r['extrapolated_64_steps_s']:.1f} | {r['images_per_s']:.3f} | "
              f"{r['full_step_tflops']:.0f} ({r['full_step_mfu']:.0%}) | {memory} |")
if naive:
    print(f"| 1 | naive (public structure) | eager | {naive['step_s']:.3f} | - | "
          f"{naive['extrapolated_64_steps_s']:.1f} | {1 / naive['extrapolated_64_steps_s']:.3f} | - | - |")
int8 = merged["int8"]
if int8:
    print(f"\nint8 on {int8['device']} (torch._int_mm): op parity failures {len(int8['op_parity_failures'])}, integer "
          f"product exact {int8['int8_product_exact']}" + ("" if int8["complete"] else " (cut by its time guard)"))
    print("\n| weights | full step s (batch 1, ML-Cache off) | weights GiB | peak GiB |\n|---|---|---|---|")
    for r in int8["results"]:
        memory = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] else "-"
        print(f"| {r['weights']} | {r['full_step_s']:.3f} | {r['weights_gib']:.2f} | {memory} |")
PYEOF
