#!/usr/bin/env bash
# How the JSON files in benchmarks/results/ were produced on one H100 (run from the repository root).
# Optional wheels (optimum-quanto, hqq, termcolor) are installed from ./.whl when present.
#   bash benchmarks/run_gpu.sh setup       # versions, wheels
#   bash benchmarks/run_gpu.sh tests       # GPU pytest of tests/runtime tests/kernels (compiled kernels)
#   bash benchmarks/run_gpu.sh check       # greedy kernel vs reference -> kernel_vs_reference_h100.json
#   bash benchmarks/run_gpu.sh kernel      # decode kernel table -> decode_kernel_h100*.json
#   bash benchmarks/run_gpu.sh e2e LENGTHS [METHODS]   # end to end -> e2e_h100.json (rows merge)
#   bash benchmarks/run_gpu.sh profile LENGTH BATCH METHODS
set -uo pipefail
OUTDIR=${OUT:-benchmarks/results}
RES=benchmarks/results
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
    python3 -m pytest -q -p no:cacheprovider --timeout 300 tests/runtime tests/kernels ;;
  check)
    python3 benchmarks/kernel_vs_reference.py --out "$OUTDIR/kernel_vs_reference_h100.json" ;;
  kernel)
    python3 benchmarks/bench_decode_kernel.py --batch 1 8 32 --ctx 4096 32768 131072 --out "$OUTDIR/decode_kernel_h100.json"
    python3 benchmarks/bench_decode_kernel.py --value-group 32 --batch 8 --ctx 32768 --out "$OUTDIR/decode_kernel_h100_vg32.json" ;;
  e2e)
    python3 benchmarks/bench_e2e.py --lengths "$1" ${2:+--methods "$2"} --out "$OUTDIR/e2e_h100.json" ;;
  profile)
    python3 benchmarks/bench_e2e.py --profile --lengths "$1" --batches "$2" --methods "$3" --out "$OUTDIR/e2e_h100.json" ;;
  *) echo "unknown stage $stage"; exit 2 ;;
esac
