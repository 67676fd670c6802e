#!/usr/bin/env bash
# How the JSON files in benchmarks/results/ were produced on one GPU (run from the repository root).
# Output names end in _$DEV (default: h200; the earlier files of 2026-11 end in _h100).
# Optional wheels (optimum-quanto, hqq, termcolor) are installed from ./.whl when present.
#   bash benchmarks/run_gpu.sh setup       # versions, wheels
#   bash benchmarks/run_gpu.sh tests       # GPU pytest of tests/runtime tests/kernels (compiled kernels)
#   bash benchmarks/run_gpu.sh check       # greedy kernel vs reference -> kernel_vs_reference_$DEV.json
#   bash benchmarks/run_gpu.sh sweep       # launch-config sweep, B=8 32k 2-bit -> decode_kernel_${DEV}_sweep.json
#   bash benchmarks/run_gpu.sh kernel      # decode kernel table -> decode_kernel_$DEV.json
#   bash benchmarks/run_gpu.sh e2e LENGTHS [METHODS]   # end to end -> e2e_$DEV.json (rows merge)
#   bash benchmarks/run_gpu.sh profile LENGTH BATCH METHODS
#   bash benchmarks/run_gpu.sh kernel-fast  # split kernel vs SDPA, Llama-3-8B + SmolLM2 -> decode_kernel_fast_$DEV.json
#   bash benchmarks/run_gpu.sh graphs SHAPE LENGTHS BATCHES  # eager vs CUDA-graph steps -> e2e_graphs_SHAPE_$DEV.json
#   bash benchmarks/run_gpu.sh maxbatch SHAPE LENGTH  # largest static batch, fp16 vs kvtune -> same file
#   bash benchmarks/run_gpu.sh rows        # every plan format at 16 vs 8 query rows, with and without the register
#                                          # cap, Llama-3-8B B=8 32k -> kernel_formats_rows_$DEV.json (~3 min)
#   bash benchmarks/run_gpu.sh steps       # static graph steps + kernel list, Llama-3-8B B=8 32k
#                                          # -> e2e_graphs_llama3-8b_launches_$DEV.json (~6 min)
set -uo pipefail
OUTDIR=${OUT:-benchmarks/results}
DEV=${DEV:-h200}
export PYTHONUNBUFFERED=1
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  [ -d /tmp/site ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
stage=${1:-setup}; shift || true
case "$stage" in
  setup)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__)"
    python3 -c "import optimum.quanto, hqq; print('quanto + hqq import')" ;;
  tests)
    python3 -m pytest -q -p no:cacheprovider -rfEs --timeout 300 -m "not slow" tests/runtime tests/kernels ;;  # no embedded model there
  check)
    python3 benchmarks/kernel_vs_reference.py --out "$OUTDIR/kernel_vs_reference_$DEV.json" ;;
  sweep)
    python3 benchmarks/bench_decode_kernel.py --sweep --key-group 128 --out "$OUTDIR/decode_kernel_${DEV}_sweep.json" ;;
  kernel)
    python3 benchmarks/bench_decode_kernel.py --batch 1 8 32 --ctx 4096 32768 131072 --key-group 128 --host \
      --out "$OUTDIR/decode_kernel_$DEV.json" ;;
  e2e)
    python3 benchmarks/bench_e2e.py --lengths "$1" ${2:+--methods "$2"} ${3:+--batches "$3"} --out "$OUTDIR/e2e_$DEV.json" ;;
  profile)
    python3 benchmarks/bench_e2e.py --profile --lengths "$1" --batches "$2" --methods "$3" --out "$OUTDIR/e2e_$DEV.json" ;;
  kernel-fast)
    python3 benchmarks/bench_decode_kernel.py --shapes llama3-8b smollm2-135m --batch 1 8 --ctx 8192 32768 \
      --key-group 128 --out "$OUTDIR/decode_kernel_fast_$DEV.json" ;;
  graphs)
    python3 benchmarks/bench_e2e.py --shape "$1" --lengths "$2" --batches "$3" --new-tokens 128 --warmup 130 \
      --prefill-chunk "$2" --methods hf-dynamic-flash,fp16-static-graph,kv2-g128,kv2-g128-static-graph \
      --out "$OUTDIR/e2e_graphs_$1_$DEV.json" ;;
  maxbatch)
    python3 benchmarks/bench_e2e.py --shape "$1" --lengths "$2" --max-batch --new-tokens 64 --warmup 130 \
      --methods fp16-static-graph,kv2-g128-static-graph --out "$OUTDIR/e2e_graphs_$1_$DEV.json" ;;
  rows)
    python3 benchmarks/bench_kernel_formats.py --shape llama3-8b --batch 8 --ctx 32768 --rows 16 8 --caps 0 168 \
      --out "$OUTDIR/kernel_formats_rows_$DEV.json" ;;
  steps)
    python3 benchmarks/bench_e2e.py --shape llama3-8b --lengths 32768 --batches 8 --compile-pointwise \
      --methods hf-dynamic-flash,normq2-static-graph,kv2-g128-static-graph --top-kernels 40 \
      --out "$OUTDIR/e2e_graphs_llama3-8b_launches_$DEV.json" ;;
  *) echo "unknown stage $stage"; exit 2 ;;
esac
