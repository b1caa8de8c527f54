// 8-bit block quantization on CUDA, with the same float32 operations as the CPU kernel
// and the PyTorch fallback (s = absmax / 127, q = round_half_even(x * (1 / s))), so all
// three agree bitwise (IEEE division and rounding; no fast-math).
#include "spd_cuda.cuh"
#include "spd_cuda_ops.h"

namespace spd {
namespace cuda {

constexpr int kThreads = 256;

__device__ __forceinline__ float block_max(float v, float* shared)
{
    for (int offset = 16; offset > 0; offset >>= 1)
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    v = threadIdx.x < blockDim.x / 32 ? shared[threadIdx.x] : 0.0f;
    if (warp == 0)
        for (int offset = 16; offset > 0; offset >>= 1)
            v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    if (threadIdx.x == 0) shared[0] = v;
    __syncthreads();
    return shared[0];
}

// One thread block per quantization block.
template <typename T>
__global__ void quantize_kernel(const T* __restrict__ x, int64_t n, int64_t block,
                                int8_t* __restrict__ values, float* __restrict__ scales,
                                int* __restrict__ flags)
{
    __shared__ float shared[kThreads / 32];
    const int64_t lo = blockIdx.x * block;
    const int64_t len = n - lo < block ? n - lo : block;
    float m = 0.0f;
    int bad = 0;
    for (int64_t i = threadIdx.x; i < len; i += blockDim.x) {
        const float v = to_float(x[lo + i]);
        bad |= !isfinite(v);
        m = fmaxf(m, fabsf(v));
    }
    if (__syncthreads_or(bad)) {
        if (threadIdx.x == 0) atomicExch(flags, 1);
        return;
    }
    const float absmax = block_max(m, shared);
    const float scale = absmax / 127.0f;
    const float inv = scale > 0.0f ? 1.0f / scale : 0.0f;
    if (threadIdx.x == 0) scales[blockIdx.x] = scale;
    for (int64_t i = threadIdx.x; i < len; i += blockDim.x) {
        const int q = __float2int_rn(to_float(x[lo + i]) * inv);
        values[lo + i] = static_cast<int8_t>(q > 127 ? 127 : (q < -127 ? -127 : q));
    }
}

template <typename T>
__global__ void dequantize_kernel(const int8_t* __restrict__ values,
                                  const float* __restrict__ scales, int64_t n, int64_t block,
                                  T* __restrict__ out)
{
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
         i += int64_t(gridDim.x) * blockDim.x)
        out[i] = from_float<T>(float(values[i]) * __ldg(scales + i / block));
}

cudaError_t quantize(int dtype, const void* x, int64_t n, int64_t block, int8_t* values,
                     float* scales, int* flags, cudaStream_t stream)
{
    if (block < 1 || n < 0) return cudaErrorInvalidValue;
    const int64_t blocks = (n + block - 1) / block;
    if (blocks == 0) return cudaSuccess;
    if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
    dispatch_cuda_dtype(dtype, [&](auto* tag) {
        using T = std::remove_pointer_t<decltype(tag)>;
        SPD_LAUNCH(quantize_kernel<T>, unsigned(blocks), kThreads, stream)(
            static_cast<const T*>(x), n, block, values, scales, flags);
    });
    return cudaGetLastError();
}

cudaError_t dequantize(int dtype, const int8_t* values, const float* scales, int64_t n,
                       int64_t block, void* out, cudaStream_t stream)
{
    if (block < 1 || n < 0) return cudaErrorInvalidValue;
    if (n == 0) return cudaSuccess;
    const int64_t grid = (n + kThreads - 1) / kThreads;
    dispatch_cuda_dtype(dtype, [&](auto* tag) {
        using T = std::remove_pointer_t<decltype(tag)>;
        SPD_LAUNCH(dequantize_kernel<T>, unsigned(grid < 65535 * 8 ? grid : 65535 * 8),
                   kThreads, stream)(values, scales, n, block, static_cast<T*>(out));
    });
    return cudaGetLastError();
}

}  // namespace cuda
}  // namespace spd
