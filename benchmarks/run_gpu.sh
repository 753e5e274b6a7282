#!/usr/bin/env bash
# One call on a lent GPU machine (the `device` tool): build the extension with its CUDA kernels,
# run the whole test suite (GPU tests included), then the GPU benchmark sweep, and pack the logs,
# result files and plots into $OUT/gpu_run.tgz (the device tool returns at most 8 files).
# Usage, from the repository root:  bash benchmarks/run_gpu.sh [quick|full]
# Afterwards, here: untar into benchmarks/results/ and commit the result files and plots.
set -uo pipefail
mode="${1:-full}"
OUT="${OUT:-$(mktemp -d)}"
export PYTHONUNBUFFERED=1 MAX_JOBS="${MAX_JOBS:-16}" DOE_KERNELS_CUDA_ARCHS="${DOE_KERNELS_CUDA_ARCHS:-9.0}"
stage="$(mktemp -d)"
mkdir -p "$stage/results"

{
  echo "== $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader)"
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  echo "== build"
  python3 setup.py build_ext --inplace 2>&1 | tail -n 20
} 2>&1 | tee "$stage/build.log"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

echo "== compute-sanitizer memcheck on the CUDA kernels (small shapes)"
if command -v compute-sanitizer >/dev/null 2>&1; then
  compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m pytest tests/test_ffn_ops.py -q \
    -p no:cacheprovider -k "cuda-cuda and (40x37 or 123x37)" 2>&1 | tee "$stage/memcheck.log" | tail -n 15
fi

echo "== tests"
python3 -m pytest tests/ -q -rs -p no:cacheprovider 2>&1 | tee "$stage/tests.log" | tail -n 40

echo "== benchmarks ($mode)"
extra=()
[[ "$mode" == "full" ]] && extra+=(--full)
python3 -m pytest benchmarks/ -q -p no:cacheprovider --benchmark-disable-gc \
  --results-dir "$stage/results" "${extra[@]}" 2>&1 | tee "$stage/bench.log" \
  | sed -n '/speed-up summary/,$p' | head -n 400

tar czf "$OUT/gpu_run.tgz" -C "$stage" .
echo "packed $(tar tzf "$OUT/gpu_run.tgz" | wc -l) files into $OUT/gpu_run.tgz"
