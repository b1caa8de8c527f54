#!/usr/bin/env bash
# Compiles every csrc/cuda/*.cu for sm_80 and sm_90 with nvcc: the CUDA build check CI
# can make without a GPU. Skips (successfully) when nvcc is absent.
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
  "$NVCC" -std=c++17 -O3 -Xcompiler -fPIC \
    -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
    -Icsrc/includes $torch_includes -c "$src" -o "$out/$(basename "$src").o"
done
echo "compile_cuda: ${#sources[@]} file(s) compiled"
