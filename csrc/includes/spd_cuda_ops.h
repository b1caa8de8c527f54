// Host-side entry points of the CUDA kernels (csrc/cuda/*.cu), called by the bindings.
// Plain C++ with CUDA runtime types only: no torch, no device code.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace spd {
namespace cuda {

constexpr int kMaxInputs = 32;

// Input pointers passed by value in the kernel's parameter space (no device array).
struct InputPtrs {
    const void* p[kMaxInputs];
};

// out = sum_j weights[j] * in[j] over n elements; weights: k floats in device memory.
cudaError_t weighted_reduce(int dtype, void* out, const InputPtrs& in, const float* weights,
                            int k, int64_t n, cudaStream_t stream);

// int8 values and one fp32 absmax scale per block; flags[0] is set to 1 if a block held
// NaN or inf (flags: one int in device memory, zeroed by the caller).
cudaError_t quantize(int dtype, const void* x, int64_t n, int64_t block, int8_t* values,
                     float* scales, int* flags, cudaStream_t stream);
cudaError_t dequantize(int dtype, const int8_t* values, const float* scales, int64_t n,
                       int64_t block, void* out, cudaStream_t stream);

}  // namespace cuda
}  // namespace spd
