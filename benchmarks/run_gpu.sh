#!/usr/bin/env bash
# One run on a GPU machine under a wall-clock limit: the compiled extension, the GPU tests and the
# GPU benchmarks, with the logs, result files and plots packed into one file, $OUT/gpu_run.tgz
# (easy to copy back from a remote machine). Usage, from the repository root:
#   DOE_BENCH_COMMIT=<commit> bash benchmarks/run_gpu.sh [PLAN] [pytest args for the benchmarks]
# (the copied tree has no .git: DOE_BENCH_COMMIT puts the commit into the result files).
# PLAN:
#   budget (default)  fits one run of 10 minutes (run it under a 560 s limit, with .gpu_prebuilt
#                     and .gpu_assets copied beside the tree):
#                     every stage is cut to what is left of BUDGET seconds (default 530): the GPU
#                     tests (`-m gpu`, one xdist worker per core; first the files whose tests no GPU
#                     has run yet, FIRST_GPU_TESTS below), the FFN ops' host time per call
#                     (python/host_overhead.py), the segmented FFN on
#                     LLaMA-7B's shape at 5 x 1 and 5 x 3 rows (the cuda backend's segmented
#                     kernels) and a SmolLM2-shaped model serving five experts in one batch
#                     (mixed-task batches, prefill and decode), the router benchmark on MiniLM
#                     and SmolLM2 (when .gpu_assets/ is carried), BERT-base and LLaMA-7B end to end
#                     (a LLaMA-7B token as a CUDA graph too), expert swap on a LLaMA-7B-sized
#                     model, attention, then the FFN op sweep on the target shapes (last: its
#                     --time-budget trims its tail to what is left).
#   tests             the whole test suite (CPU and GPU tests), then the CUDA kernels under
#                     compute-sanitizer; no benchmarks.
#   quick / full      the whole test suite, then `pytest benchmarks/` (or `--full`), uncut.
#   bench-quick / bench-full   the sweep alone; extra arguments go to it (e.g. `-k ffn`).
# The extension: a prebuilt doe_kernels/_C for this Python, carried in .gpu_prebuilt/ (made here by
# `bash benchmarks/prebuild_gpu_ext.sh`, which needs no GPU), is used when it was built from these
# sources (.gpu_prebuilt/sources.sha256), it loads and one CUDA op computes right with it;
# otherwise it is built (`setup.py build_ext --inplace`, sm_90). A module already in place is used
# only when doe_kernels/_C.sources.sha256 (written here beside what was copied or built) matches.
# A stage cut by its time limit gets SIGINT, so pytest still writes what it measured; the archive
# is rewritten (atomically) after every stage, so a call cut off by the tool's limit still returns
# what finished. Afterwards, here: `tar xzf gpu_run.tgz -C benchmarks/results/gpu_<device>` puts
# the result files (gpu-<device>_<mode>[_<dtype>][_<stage>].json/.csv) and plots (plots/gpu-*/)
# into a results folder (docs/benchmarks.md, "The GPU plan"); commit them.
# Exit status: 0 when no stage failed (a stage cut by its time limit counts as run, unless its
# pytest log counts failed tests or errors before the cut; one skipped,
# its budget spent or .gpu_assets missing, is listed at the end as skipped), 1 when the
# extension, a test run, a benchmark run or the packing failed (the archive is written first),
# 2 for an unknown plan.
set -uo pipefail
plan="${1:-budget}"
shift || true
case "$plan" in
  budget|tests|quick|full|bench-quick|bench-full) ;;
  *) echo "run_gpu.sh: unknown plan '$plan' (budget, tests, quick, full, bench-quick, bench-full)" >&2
     exit 2 ;;
esac
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT" || exit 1
BUDGET="${BUDGET:-530}"
export PYTHONUNBUFFERED=1 MAX_JOBS="${MAX_JOBS:-16}" DOE_KERNELS_CUDA_ARCHS="${DOE_KERNELS_CUDA_ARCHS:-9.0}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
start=$(date +%s)
# The archive's tree is a results folder: result files and plots at its top, as a benchmark run
# writes them into benchmarks/results/, and the logs in local/gpu_logs/ (ignored by git there).
packed="$(mktemp -d)"
logs="$packed/local/gpu_logs"
mkdir -p "$logs"
failed=()  # the stages that failed
skipped=()  # the stages not started (budget spent, no assets)
pack() {
  tar czf "$OUT/.gpu_run.tmp" -C "$packed" . && mv -f "$OUT/.gpu_run.tmp" "$OUT/gpu_run.tgz" \
    || failed+=(packing)
}
# ran NAME STATUS [LOG]: note a failed stage; 124 and 137 (cut by its time limit: interrupted,
# or killed 20 s later) and pytest's 5 (nothing selected) count as run, unless LOG (a pytest
# run's) counts failed tests or errors before the cut.
ran() {
  local summary=""
  if [[ "$2" =~ ^(124|137)$ && -n "${3:-}" ]]; then  # pytest's last summary line ("3 failed, ...")
    summary="$(grep -E '^(=+ )?[0-9]+ [a-z]+.* in [0-9.]+s' "$3" | tail -n 1)"
  fi
  if [[ "$summary" =~ [0-9]+\ (failed|errors?) ]]; then
    failed+=("$1 (cut by its time limit: $summary)")
    return
  fi
  [[ "$2" =~ ^(0|124|137|5)$ ]] || failed+=("$1 (exit $2)")
}
listed() { local IFS=';'; echo "$*" | sed 's/;/; /g'; }  # listed A B: "A; B"
# finish: pack and exit, 1 if a stage failed.
finish() {
  pack
  if (( ${#skipped[@]} )); then echo "== skipped: $(listed "${skipped[@]}")"; fi
  if (( ${#failed[@]} )); then echo "== failed: $(listed "${failed[@]}")"; exit 1; fi
  exit 0
}
# cap N: seconds a stage may take: N, or what is left of the budget less 30 s (the stop signal's
# grace and packing); at least 1, since `timeout 0` would mean no limit.
cap() {
  local left=$(( BUDGET - ($(date +%s) - start) - 30 ))
  (( left < $1 )) && echo $(( left > 1 ? left : 1 )) || echo "$1"
}
elapsed() { echo "[$(( $(date +%s) - start )) s]"; }
# limited SECONDS CMD...: CMD, interrupted (SIGINT, then SIGKILL 20 s later) after SECONDS.
limited() { timeout -s INT -k 20 "$@"; }
PYTEST=(python3 -m pytest -q -p no:cacheprovider)
BENCH=("${PYTEST[@]}" --benchmark-disable-gc --results-dir "$packed")

# ---- environment and extension -----------------------------------------------------------------
# The versions and backends, then one CUDA op through the extension, against torch: exit 0 when
# the cuda backend works and has the segmented kernels (a module prebuilt before them is rebuilt).
CHECK_EXT='
import sys, torch, triton, transformers as t, doe_kernels as dk
from doe_kernels.backends import cuda
print("python", sys.version.split()[0], "| torch", torch.__version__, "| triton",
      triton.__version__, "| transformers", t.__version__)
print("backends: cuda", dk.available_backends("cuda"), "| cpu", dk.available_backends("cpu"))
if "cuda" not in dk.available_backends("cuda") or not hasattr(cuda, "segmented_ffn"):
    sys.exit(1)
x, w = torch.randn(3, 64, device="cuda"), torch.randn(32, 64, device="cuda")
rows = torch.tensor([1, 5, 30], device="cuda")
out = dk.gather_rows_linear(x, w, None, rows, backend="cuda")
sys.exit(0 if torch.allclose(out, x @ w[rows].T, atol=1e-3, rtol=1e-3) else 2)'
# sources_hash: what .gpu_prebuilt/sources.sha256 records (prebuild_gpu_ext.sh writes it)
sources_hash() {
  find csrc setup.py -type f | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-64
}
ext_ok="$logs/extension_works"  # written when the extension works (the block below is a subshell)
stamp="doe_kernels/_C.sources.sha256"  # the sources_hash of the module in place
{
  echo "== $(date -u +%FT%TZ) plan=$plan budget=${BUDGET}s commit=${DOE_BENCH_COMMIT:-unknown}"
  if [[ -z "${DOE_BENCH_COMMIT:-}" && ! -d .git ]]; then
    echo "== WARNING: DOE_BENCH_COMMIT is not set and this tree has no .git: the result files" \
      "will say commit=unknown"
  fi
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  suffix="$(python3 -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")"
  sources="$(sources_hash)"
  # a module left in place (a machine kept warm between calls, or a build of one's own) is used
  # only when the stamp beside it says it was built from these sources
  if [[ -f "doe_kernels/_C$suffix" && "$(cat "$stamp" 2>/dev/null)" != "$sources" ]]; then
    echo "== extension: the one in place was built from other sources (or unstamped); removed"
    rm -f "doe_kernels/_C$suffix" "$stamp"
  fi
  if [[ ! -f "doe_kernels/_C$suffix" && -f ".gpu_prebuilt/_C$suffix" ]]; then
    if [[ "$(cat .gpu_prebuilt/sources.sha256 2>/dev/null)" != "$sources" ]]; then
      echo "== extension: the prebuilt one was built from other sources; building"
    else
      cp ".gpu_prebuilt/_C$suffix" doe_kernels/
      if python3 -c "$CHECK_EXT" 2>&1; then
        echo "$sources" > "$stamp"
        touch "$ext_ok" && echo "== extension: the prebuilt one works $(elapsed)"
      else
        echo "== extension: the prebuilt one does not work here; building"
        rm -f "doe_kernels/_C$suffix"
      fi
    fi
  elif [[ -f "doe_kernels/_C$suffix" ]] && python3 -c "$CHECK_EXT" 2>&1; then
    touch "$ext_ok" && echo "== extension: the one built in place from these sources works $(elapsed)"
  fi
  if [[ ! -f "$ext_ok" ]]; then
    echo "== build $(elapsed)"
    limited "$(cap 300)" python3 setup.py build_ext --inplace > "$logs/build_ext.log" 2>&1
    tail -n 20 "$logs/build_ext.log"
    if python3 -c "$CHECK_EXT"; then
      echo "$sources" > "$stamp"
      touch "$ext_ok" && echo "== extension: built, the cuda op works"
    else
      echo "== extension: the cuda backend does not work (exit $?)"
    fi
  fi
  echo "== extension ready $(elapsed)"
} 2>&1 | tee "$logs/build.log"
[[ -f "$ext_ok" ]] || failed+=("extension")
pack

# ---- tests -------------------------------------------------------------------------------------
parallel=()
python3 -c "import xdist" 2>/dev/null && parallel=(-n "$(nproc)")
# The budget plan's GPU tests cannot all run in its time: the files holding tests no GPU has run
# yet go first, then the others.
FIRST_GPU_TESTS=(tests/test_segmented_ops.py tests/test_mixed.py tests/test_patch.py
                 tests/test_cuda_graph.py)
if [[ "$plan" == "budget" ]]; then
  echo "== GPU tests (-m gpu) first in ${FIRST_GPU_TESTS[*]} $(elapsed)"
  limited "$(cap 60)" "${PYTEST[@]}" "${FIRST_GPU_TESTS[@]}" -m gpu -rfEs "${parallel[@]}" \
    > "$logs/tests_first.log" 2>&1
  ran "GPU tests (first files)" $? "$logs/tests_first.log"
  tail -n 20 "$logs/tests_first.log"
  echo "== GPU tests (-m gpu), the other files $(elapsed)"
  limited "$(cap 60)" "${PYTEST[@]}" tests/ -m gpu -rfEs "${parallel[@]}" \
    "${FIRST_GPU_TESTS[@]/#/--ignore=}" > "$logs/tests.log" 2>&1
  ran "GPU tests" $? "$logs/tests.log"
  tail -n 30 "$logs/tests.log"
elif [[ "$plan" != bench-* ]]; then
  echo "== tests $(elapsed)"
  "${PYTEST[@]}" tests/ -rfEs "${parallel[@]}" > "$logs/tests.log" 2>&1
  ran tests $? "$logs/tests.log"
  tail -n 40 "$logs/tests.log"
fi
pack
if [[ "$plan" == "tests" ]]; then
  if command -v compute-sanitizer >/dev/null 2>&1; then
    echo "== compute-sanitizer memcheck on the CUDA kernels (small shapes) $(elapsed)"
    compute-sanitizer --tool memcheck --error-exitcode 9 "${PYTEST[@]}" tests/test_ffn_ops.py \
      tests/test_segmented_ops.py \
      -k "(cuda-cuda and (40x37 or 123x37)) or (test_cuda_runs_every_segment and float32)" \
      > "$logs/memcheck.log" 2>&1
    ran memcheck $?
    tail -n 15 "$logs/memcheck.log"
  fi
  finish
fi

# ---- benchmarks --------------------------------------------------------------------------------
# bench NAME CAP ARGS...: one pytest run of the benchmarks, its files named with NAME; it stops
# starting benchmarks 20 s before its cap, and is interrupted at the cap (it still writes then).
bench() {
  local name="$1" seconds
  seconds="$(cap "$2")"
  shift 2
  if (( seconds < 40 )); then
    echo "== bench $name: skipped, budget spent"; skipped+=("bench $name"); return
  fi
  echo "== bench $name (at most ${seconds} s) $(elapsed)"
  limited "$seconds" "${BENCH[@]}" --results-suffix "$name" --time-budget $(( seconds - 20 )) \
    "$@" > "$logs/bench_$name.log" 2>&1
  ran "bench $name" $? "$logs/bench_$name.log"
  sed -n '/speed-up summary/,/^results in /p' "$logs/bench_$name.log" | head -n 170
  tail -n 2 "$logs/bench_$name.log"
  pack
}

# router MODEL CAP: python/router_benchmark.py on the GPU (bfloat16), the model built from the
# config in .gpu_assets/ with random weights (carried: `python python/router_benchmark.py
# --export-assets .gpu_assets` makes it, no weights), writing router_<model>.json and its plot.
router() {
  local model="$1" seconds
  seconds="$(cap "$2")"
  if [[ ! -f .gpu_assets/texts.json ]]; then
    echo "== router $model: skipped, no .gpu_assets"; skipped+=("router $model"); return
  fi
  if (( seconds < 40 )); then
    echo "== router $model: skipped, budget spent"; skipped+=("router $model"); return
  fi
  echo "== router $model (at most ${seconds} s) $(elapsed)"
  limited "$seconds" python3 python/router_benchmark.py --model "$model" --assets .gpu_assets \
    --device cuda --dtype bfloat16 --warmup 3 --out "$packed" > "$logs/router_$model.log" 2>&1
  ran "router $model" $?
  tail -n 4 "$logs/router_$model.log"
  pack
}

# host MAX: python/host_overhead.py (the FFN ops' host time per call against the GPU's; a profile
# of the slowest), writing host_overhead.json and host_overhead_profile.txt.
host() {
  local seconds
  seconds="$(cap "$1")"
  if (( seconds < 20 )); then
    echo "== host overhead: skipped, budget spent"; skipped+=("host overhead"); return
  fi
  echo "== host overhead (at most ${seconds} s) $(elapsed)"
  limited "$seconds" python3 python/host_overhead.py --out "$packed" > "$logs/host_overhead.log" 2>&1
  ran "host overhead" $?
  tail -n 14 "$logs/host_overhead.log"
  pack
}

if [[ "$plan" == "budget" ]]; then
  host 45
  bench segmented 40 benchmarks/test_segmented_bench.py --shapes llama-7b --rows 1,3 "$@"
  bench mixed 40 benchmarks/test_mixed_bench.py "$@"
  router minilm 50
  router smollm2 60
  bench model 120 benchmarks/test_model_bench.py --full --rates 0.35,0.65 \
    -k "not ffn and not attn and not smollm2" "$@"
  bench swap 45 benchmarks/test_swap_bench.py --full "$@"
  bench attention 60 benchmarks/test_attention_bench.py::test_attention \
    --shapes bert-base,llama3-8b --rates 0.35,0.65 --rows 1,512,2048 "$@"
  bench ffn 150 benchmarks/test_ffn_bench.py --shapes llama-7b,bert-base,llama3-8b \
    --rates 0.35,0.65,0.9 --rows 1,16,2048 "$@"
else
  mode="${plan#bench-}"
  extra=()
  [[ "$mode" == "full" ]] && extra+=(--full)
  targets=("$@")
  [[ ${#targets[@]} -eq 0 || "${targets[0]}" == -* ]] && targets=(benchmarks/ "${targets[@]}")
  echo "== benchmarks ($mode) $(elapsed)"
  "${BENCH[@]}" "${targets[@]}" "${extra[@]}" > "$logs/bench.log" 2>&1
  ran benchmarks $?
  sed -n '/speed-up summary/,/^results in /p' "$logs/bench.log" | head -n 400
  tail -n 2 "$logs/bench.log"
fi

pack
echo "== done $(elapsed): packed $(tar tzf "$OUT/gpu_run.tgz" | wc -l) files into $OUT/gpu_run.tgz"
finish
