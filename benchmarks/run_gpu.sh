#!/usr/bin/env bash
# One call on a lent GPU machine (the `device` tool): the compiled extension, the GPU tests and the
# GPU benchmarks, with the logs, result files and plots packed into $OUT/gpu_run.tgz (the device
# tool returns at most 8 files). Usage, from the repository root:
#   bash benchmarks/run_gpu.sh [PLAN] [pytest args for the benchmarks]
# PLAN:
#   budget (default)  fits one device call: every stage is cut to what is left of BUDGET seconds
#                     (default 450; the tool's call limit is 600), in this order: the GPU tests
#                     (`-m gpu`), the FFN op sweep on the target shapes, BERT-base and LLaMA-7B end
#                     to end, expert swap on a LLaMA-7B-sized model, attention, then the CUDA
#                     kernels under compute-sanitizer if time is left.
#   tests             the whole test suite (CPU and GPU tests), no benchmarks.
#   quick / full      the whole test suite, then `pytest benchmarks/` (or `--full`), uncut.
#   bench-quick / bench-full   the sweep alone; extra arguments go to it (e.g. `-k ffn`).
# The extension: a prebuilt doe_kernels/_C for this Python, carried in .gpu_prebuilt/ (made here by
# `bash benchmarks/prebuild_gpu_ext.sh`, which needs no GPU), is used when it loads with its CUDA
# kernels; otherwise it is built (`setup.py build_ext --inplace`, sm_90).
# The archive is rewritten after every stage, so a call cut off by the tool's limit still returns
# what finished. Afterwards, here: untar into benchmarks/results/ and commit.
set -uo pipefail
plan="${1:-budget}"
shift || true
OUT="${OUT:-$(mktemp -d)}"
BUDGET="${BUDGET:-450}"
export PYTHONUNBUFFERED=1 MAX_JOBS="${MAX_JOBS:-16}" DOE_KERNELS_CUDA_ARCHS="${DOE_KERNELS_CUDA_ARCHS:-9.0}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
start=$(date +%s)
stage="$(mktemp -d)"
mkdir -p "$stage/results"
pack() { tar czf "$OUT/gpu_run.tgz" -C "$stage" . ; }
# cap N: seconds a stage may take: N, or what is left of the budget less 15 s for packing (at
# least 1: `timeout 0` would mean no limit).
cap() {
  local left=$(( BUDGET - ($(date +%s) - start) - 15 ))
  (( left < $1 )) && echo $(( left > 1 ? left : 1 )) || echo "$1"
}
elapsed() { echo "[$(( $(date +%s) - start )) s]"; }
PYTEST=(python3 -m pytest -q -p no:cacheprovider)
BENCH=("${PYTEST[@]}" --benchmark-disable-gc --results-dir "$stage/results")

# ---- environment and extension -----------------------------------------------------------------
{
  echo "== $(date -u +%FT%TZ) plan=$plan budget=${BUDGET}s"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import sys, torch, triton, transformers as t; print('python', sys.version.split()[0],
    '| torch', torch.__version__, '| triton', triton.__version__, '| transformers', t.__version__)"
  suffix="$(python3 -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")"
  has_cuda_kernels() {
    python3 -c "import doe_kernels as dk, sys; sys.exit('cuda' not in dk.available_backends('cuda'))" \
      2>/dev/null
  }
  if [[ ! -f "doe_kernels/_C$suffix" && -f ".gpu_prebuilt/_C$suffix" ]]; then
    cp ".gpu_prebuilt/_C$suffix" doe_kernels/
    if has_cuda_kernels; then echo "== extension: the prebuilt one loads, with its CUDA kernels"
    else
      echo "== extension: the prebuilt one does not load here; building"
      rm -f "doe_kernels/_C$suffix"
    fi
  fi
  if ! has_cuda_kernels; then
    echo "== build $(elapsed)"
    timeout "$(cap 300)" python3 setup.py build_ext --inplace 2>&1 | tail -n 20
  fi
  python3 -c "import doe_kernels as dk; print('backends: cuda', dk.available_backends('cuda'),
    '| cpu', dk.available_backends('cpu'))"
  echo "== extension ready $(elapsed)"
} 2>&1 | tee "$stage/build.log"
pack

# ---- tests -------------------------------------------------------------------------------------
parallel=()
python3 -c "import xdist" 2>/dev/null && parallel=(-n 8)
if [[ "$plan" == "budget" ]]; then
  echo "== GPU tests (-m gpu) $(elapsed)"
  timeout -k 5 "$(cap 180)" "${PYTEST[@]}" tests/ -m gpu -rs "${parallel[@]}" 2>&1 \
    | tee "$stage/tests.log" | tail -n 30
elif [[ "$plan" != bench-* ]]; then
  echo "== tests $(elapsed)"
  "${PYTEST[@]}" tests/ -rs "${parallel[@]}" 2>&1 | tee "$stage/tests.log" | tail -n 40
fi
pack
[[ "$plan" == "tests" ]] && exit 0

# ---- benchmarks --------------------------------------------------------------------------------
# bench NAME CAP ARGS...: one pytest run of the benchmarks, its files named with NAME; it stops
# starting benchmarks 20 s before its cap, so it still writes what it measured.
bench() {
  local name="$1" seconds
  seconds="$(cap "$2")"
  shift 2
  if (( seconds < 40 )); then echo "== bench $name: skipped, budget spent"; return; fi
  echo "== bench $name (at most ${seconds} s) $(elapsed)"
  timeout -k 5 "$seconds" "${BENCH[@]}" --results-suffix "$name" --time-budget $(( seconds - 20 )) \
    "$@" 2>&1 | tee "$stage/bench_$name.log" | sed -n '/speed-up summary/,$p' | head -n 150
  pack
}

if [[ "$plan" == "budget" ]]; then
  bench ffn 150 benchmarks/test_ffn_bench.py --shapes llama-7b,bert-base,llama3-8b \
    --rates 0,0.35,0.65,0.9 --rows 1,8,512,2048 "$@"
  bench model 110 benchmarks/test_model_bench.py --full --rates 0.35,0.65 \
    -k "not ffn and not attn and not smollm2" "$@"
  bench swap 45 benchmarks/test_swap_bench.py --full "$@"
  bench attention 60 benchmarks/test_attention_bench.py --shapes bert-base,llama3-8b \
    --rates 0.35,0.65 --rows 1,512,2048 -k "test_attention" "$@"
  if command -v compute-sanitizer >/dev/null 2>&1 && (( $(cap 60) >= 40 )); then
    echo "== compute-sanitizer memcheck on the CUDA kernels (small shapes) $(elapsed)"
    timeout -k 5 "$(cap 60)" compute-sanitizer --tool memcheck --error-exitcode 9 \
      "${PYTEST[@]}" tests/test_ffn_ops.py -k "cuda-cuda and (40x37 or 123x37)" 2>&1 \
      | tee "$stage/memcheck.log" | tail -n 15
  fi
else
  mode="${plan#bench-}"
  extra=()
  [[ "$mode" == "full" ]] && extra+=(--full)
  targets=("$@")
  [[ ${#targets[@]} -eq 0 || "${targets[0]}" == -* ]] && targets=(benchmarks/ "${targets[@]}")
  echo "== benchmarks ($mode) $(elapsed)"
  "${BENCH[@]}" "${targets[@]}" "${extra[@]}" 2>&1 | tee "$stage/bench.log" \
    | sed -n '/speed-up summary/,$p' | head -n 400
fi

pack
echo "== done $(elapsed): packed $(tar tzf "$OUT/gpu_run.tgz" | wc -l) files into $OUT/gpu_run.tgz"
