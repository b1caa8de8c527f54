#!/usr/bin/env bash
# Compiles every csrc/cuda/*.cu for sm_80 and sm_90 with nvcc, and syntax-checks every
# csrc/cuda/*_binding.cpp against torch's headers and the CUDA toolkit's: the CUDA build
# check CI can make without a GPU. Skips (successfully) when nvcc is absent.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-nvcc}
PYTHON=${PYTHON:-python3}
if ! command -v "$NVCC" >/dev/null 2>&1; then
  echo "compile_cuda: $NVCC not found; skipping the CUDA compile check"
  exit 0
fi
shopt -s nullglob
sources=(csrc/cuda/*.cu)
if [ ${#sources[@]} -eq 0 ]; then
  echo "compile_cuda: no sources in csrc/cuda"
  exit 0
fi
torch_includes=$("$PYTHON" -c 'from torch.utils.cpp_extension import include_paths
print(" ".join("-I" + p for p in include_paths()))')
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for src in "${sources[@]}"; do
  echo "compile_cuda: $src (sm_80, sm_90)"
  # shellcheck disable=SC2086
  "$NVCC" -std=c++20 -O3 -Xcompiler -fPIC \
    -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
    -Icsrc/includes $torch_includes -c "$src" -o "$out/$(basename "$src").o"
done
echo "compile_cuda: ${#sources[@]} file(s) compiled"

# The bindings include c10/cuda headers. A CPU wheel ships them but not the one torch's
# CMake generates (c10/cuda/impl/cuda_cmake_macros.h): write what CMake writes.
mkdir -p "$out/generated/c10/cuda/impl"
printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' \
  > "$out/generated/c10/cuda/impl/cuda_cmake_macros.h"
cuda_includes=$("$NVCC" --dryrun -x cu -c /dev/null -o /dev/null 2>&1 |
  sed -n 's/^#\$ INCLUDES="\(.*\)" *$/\1/p' | tr -d '"')
python_include=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
CXX=${CXX:-g++}
bindings=(csrc/cuda/*_binding.cpp)
for src in "${bindings[@]}"; do
  echo "compile_cuda: $src (syntax against torch and CUDA headers)"
  # shellcheck disable=SC2086
  "$CXX" -std=c++20 -fsyntax-only -DTORCH_EXTENSION_NAME=spd_check -Icsrc/includes \
    $torch_includes -I"$out/generated" $cuda_includes -I"$python_include" "$src"
done
echo "compile_cuda: ${#bindings[@]} binding(s) checked"
