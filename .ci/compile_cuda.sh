#!/usr/bin/env bash
# Compile check of the CUDA sources without a GPU: every csrc/cuda/*.cu is compiled with nvcc to an
# object file (sm_80 and sm_90) and every csrc/cuda/*.cpp is syntax-checked with g++ against torch's
# headers with DOE_KERNELS_WITH_CUDA defined. Run from the repository root; exits non-zero on failure.
set -euo pipefail

if [[ ! -d csrc/cuda ]]; then
  echo "compile_cuda.sh: run from the repository root (csrc/cuda not found)" >&2
  exit 2
fi

NVCC="${NVCC:-$(command -v nvcc || true)}"
if [[ -z "${NVCC}" && -x /usr/local/cuda/bin/nvcc ]]; then NVCC=/usr/local/cuda/bin/nvcc; fi
if [[ -z "${NVCC}" ]]; then
  echo "compile_cuda.sh: nvcc not found" >&2
  exit 2
fi
CXX="${CXX:-g++}"
PYTHON="${PYTHON:-python}"

# Directory holding cuda_runtime.h.
CUDA_INC=""
for cand in "$(dirname "$(readlink -f "${NVCC}")")/../include" "$(dirname "${NVCC}")/../include" \
            "${CUDA_HOME:-/nonexistent}/include" /usr/local/cuda/include; do
  if [[ -f "${cand}/cuda_runtime.h" ]]; then CUDA_INC="$(cd "${cand}" && pwd)"; break; fi
done
if [[ -z "${CUDA_INC}" ]]; then
  echo "compile_cuda.sh: cuda_runtime.h not found" >&2
  exit 2
fi

TORCH_INC_FLAGS=()
while IFS= read -r dir; do
  [[ -n "${dir}" ]] && TORCH_INC_FLAGS+=("-I${dir}")
done < <("${PYTHON}" -c "from torch.utils.cpp_extension import include_paths; print('\n'.join(include_paths()))")
PY_INC="$("${PYTHON}" -c "import sysconfig; print(sysconfig.get_paths()['include'])")"

TMP="$(mktemp -d)"
trap 'rm -rf "${TMP}"' EXIT

echo "nvcc: ${NVCC} ($("${NVCC}" --version | tail -n 1))"
echo "cuda include: ${CUDA_INC}"

shopt -s nullglob
cu_files=(csrc/cuda/*.cu)
cpp_files=(csrc/cuda/*.cpp)
if (( ${#cu_files[@]} + ${#cpp_files[@]} == 0 )); then
  echo "compile_cuda.sh: no sources in csrc/cuda" >&2
  exit 1
fi

# nvcc objects (the .cu files compile in parallel; each failure is reported and fails the script).
pids=()
for f in "${cu_files[@]}"; do
  obj="${TMP}/$(basename "${f%.cu}").o"
  (
    "${NVCC}" -std=c++17 -O3 -Icsrc \
      -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90,code=sm_90 \
      -c "${f}" -o "${obj}" >"${obj}.log" 2>&1
  ) &
  pids+=("$!")
done
status=0
for i in "${!cu_files[@]}"; do
  f="${cu_files[$i]}"
  obj="${TMP}/$(basename "${f%.cu}").o"
  if wait "${pids[$i]}"; then
    echo "nvcc OK     ${f} -> $(basename "${obj}") ($(stat -c %s "${obj}") bytes, sm_80 + sm_90)"
    if grep -qi "warning" "${obj}.log"; then cat "${obj}.log"; fi
  else
    echo "nvcc FAILED ${f}" >&2
    cat "${obj}.log" >&2
    status=1
  fi
done

# g++ syntax check of the torch bindings.
for f in "${cpp_files[@]}"; do
  if "${CXX}" -fsyntax-only -std=c++17 -DDOE_KERNELS_WITH_CUDA -Icsrc "${TORCH_INC_FLAGS[@]}" \
      "-I${CUDA_INC}" "-I${PY_INC}" "${f}"; then
    echo "g++ OK      ${f} (syntax only, DOE_KERNELS_WITH_CUDA)"
  else
    echo "g++ FAILED  ${f}" >&2
    status=1
  fi
done

if (( status != 0 )); then
  echo "compile_cuda.sh: FAILED" >&2
  exit 1
fi
echo "compile_cuda.sh: all CUDA sources compiled"
