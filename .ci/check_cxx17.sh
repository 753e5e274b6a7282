#!/usr/bin/env bash
# Syntax check of the C++ sources of the CPU build (csrc/bindings.cpp, csrc/cpu/*.cpp) as C++17:
# torch 2.11's cpp_extension builds extensions as C++17 (2.13's as C++20), so a C++20-only feature
# would build here and fail on a machine with torch 2.11. Run from the repository root.
set -euo pipefail
CXX="${CXX:-g++}"
PYTHON="${PYTHON:-python}"
TORCH_INC_FLAGS=()
while IFS= read -r dir; do
  [[ -n "${dir}" ]] && TORCH_INC_FLAGS+=("-I${dir}")
done < <("${PYTHON}" -c "from torch.utils.cpp_extension import include_paths; print('\n'.join(include_paths()))")
PY_INC="$("${PYTHON}" -c "import sysconfig; print(sysconfig.get_paths()['include'])")"
status=0
for f in csrc/bindings.cpp csrc/cpu/*.cpp; do
  # torch 2.13's own headers use a C++20 extension that g++ accepts in C++17 with a warning
  if "${CXX}" -fsyntax-only -std=c++17 -Wno-c++20-extensions -fopenmp -Icsrc \
      "${TORCH_INC_FLAGS[@]}" "-I${PY_INC}" "${f}"; then
    echo "g++ -std=c++17 OK      ${f}"
  else
    echo "g++ -std=c++17 FAILED  ${f}" >&2
    status=1
  fi
done
exit "${status}"
