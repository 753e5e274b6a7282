#!/usr/bin/env bash
# Builds doe_kernels/_C with its CUDA kernels for a GPU machine on a machine without a GPU: GPU time
# is scarce, and the build there takes a minute or more of it. The GPU machine's image has
# Python 3.12 and torch 2.11.0 (CUDA 13.0, as PyPI's wheel); this makes a venv with those (once,
# about 3 GB), builds for sm_90 with the local nvcc against that torch, and leaves the module in
# .gpu_prebuilt/ (ignored by git), with the hash of the sources it was built from
# (sources.sha256). Copy .gpu_prebuilt/ with the tree to the GPU machine; benchmarks/run_gpu.sh
# uses the module when the sources match and it loads there, and builds otherwise.
# Usage, from the repository root: bash benchmarks/prebuild_gpu_ext.sh
# Knobs: GPU_PYTHON (a Python 3.12: python3.12, else pyenv's newest 3.12), GPU_TORCH (2.11.0),
# VENV (/tmp/doe-gpu-venv), CUDA_HOME.
set -euo pipefail
repo="$PWD"
[[ -f setup.py && -d csrc ]] || { echo "run from the repository root" >&2; exit 2; }
torch_version="${GPU_TORCH:-2.11.0}"
# the first of GPU_PYTHON, python3.12 and pyenv's 3.12 versions that runs as Python 3.12 (a pyenv
# shim named python3.12 fails where pyenv selects another version)
gpu_python() {
  local candidate
  local pyenv="${PYENV_ROOT:-$HOME/.pyenv}"
  for candidate in "${GPU_PYTHON:-}" python3.12 \
      $(ls -d "$pyenv"/versions/3.12*/bin/python3.12 2>/dev/null | sort -rV); do
    if [[ -n "$candidate" ]] && "$candidate" -c \
        "import sys; sys.exit(sys.version_info[:2] != (3, 12))" 2>/dev/null; then
      echo "$candidate"; return
    fi
  done
  echo "no Python 3.12 (the GPU image's) found: set GPU_PYTHON" >&2
  return 1
}
venv="${VENV:-/tmp/doe-gpu-venv}"
# a venv whose torch is not the target's (a first install that broke off) is made again
if ! "$venv/bin/python" -c "import sys, torch
sys.exit(torch.__version__.split('+')[0] != '$torch_version')" 2>/dev/null; then
  rm -rf "$venv"
  "$(gpu_python)" -m venv "$venv"
  "$venv/bin/pip" install --quiet "torch==$torch_version" "setuptools>=77,<82" wheel ninja numpy
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
# the sources' hash, as run_gpu.sh's sources_hash computes it
find csrc setup.py -type f | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-64 \
  > "$repo/.gpu_prebuilt/sources.sha256"
# Debug sections make up most of the module (19.7 of 22.7 MB); keep the copied tree small.
command -v strip >/dev/null && strip --strip-debug "$repo"/.gpu_prebuilt/_C*.so
"$venv/bin/python" -c "import torch; print('built against torch', torch.__version__)"
ls -la "$repo/.gpu_prebuilt"
