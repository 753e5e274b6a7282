#!/usr/bin/env bash
# Builds doe_kernels/_C with its CUDA kernels for a GPU machine on a machine without a GPU: GPU time
# is scarce, and the build there takes a minute or more of it. The GPU machine's image has
# Python 3.12 and torch 2.11.0 (CUDA 13.0, as PyPI's wheel); this makes a venv with those (once,
# about 3 GB), builds for sm_90 with the local nvcc against that torch, and leaves the module in
# .gpu_prebuilt/ (ignored by git). Copy .gpu_prebuilt/ with the tree to the GPU machine;
# benchmarks/run_gpu.sh uses the module when it loads there and builds otherwise.
# Usage, from the repository root: bash benchmarks/prebuild_gpu_ext.sh
# Knobs: GPU_PYTHON (python3.12), GPU_TORCH (2.11.0), VENV (/tmp/doe-gpu-venv), CUDA_HOME.
set -euo pipefail
repo="$PWD"
[[ -f setup.py && -d csrc ]] || { echo "run from the repository root" >&2; exit 2; }
venv="${VENV:-/tmp/doe-gpu-venv}"
if [[ ! -x "$venv/bin/python" ]]; then
  "${GPU_PYTHON:-python3.12}" -m venv "$venv"
  "$venv/bin/pip" install --quiet "torch==${GPU_TORCH:-2.11.0}" "setuptools>=77,<82" wheel ninja numpy
fi
# torch looks for CUDA next to `nvcc` on the PATH; a wrapper script there would point it at /usr/local.
export CUDA_HOME="${CUDA_HOME:-$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")}"
[[ -f "$CUDA_HOME/include/cuda_runtime.h" ]] || CUDA_HOME=/usr/local/cuda
build="$(mktemp -d)"
cp -r setup.py pyproject.toml README.md csrc doe_kernels "$build/"
rm -f "$build"/doe_kernels/_C*.so
(cd "$build" && DOE_KERNELS_CUDA_ARCHS=9.0 MAX_JOBS="${MAX_JOBS:-2}" "$venv/bin/python" setup.py build_ext --inplace >build.log 2>&1) \
  || { tail -n 30 "$build/build.log"; exit 1; }
mkdir -p "$repo/.gpu_prebuilt"
cp "$build"/doe_kernels/_C*.so "$repo/.gpu_prebuilt/"
# Debug sections make up most of the module (19.7 of 22.7 MB); keep the copied tree small.
command -v strip >/dev/null && strip --strip-debug "$repo"/.gpu_prebuilt/_C*.so
"$venv/bin/python" -c "import torch; print('built against torch', torch.__version__)"
ls -la "$repo/.gpu_prebuilt"
