// weighted_reduce on CUDA: out = sum_j w_j x_j with fp32 accumulation.
//
// Weights are read from device memory, so a training loop can change them every step
// without a host sync. Inputs travel by value (up to kMaxInputs pointers) in the kernel's
// parameter space. When every pointer is 16-byte aligned, each thread moves 16-byte
// packs; the tail that does not fill a pack (and any misaligned call) takes the scalar
// path, so any size works.
#include "spd_cuda.cuh"
#include "spd_cuda_ops.h"

namespace spd {
namespace cuda {

template <typename T>
__global__ void weighted_reduce_packs(T* __restrict__ out, InputPtrs in,
                                      const float* __restrict__ w, int k, int64_t packs)
{
    constexpr int P = Pack<T>::kCount;
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < packs;
         i += int64_t(gridDim.x) * blockDim.x) {
        float acc[P];
        const Pack<T> first = load_pack(static_cast<const T*>(in.p[0]) + i * P);
        const float w0 = __ldg(w);
#pragma unroll
        for (int v = 0; v < P; ++v) acc[v] = to_float(first.v[v]) * w0;
        for (int j = 1; j < k; ++j) {
            const Pack<T> x = load_pack(static_cast<const T*>(in.p[j]) + i * P);
            const float wj = __ldg(w + j);
#pragma unroll
            for (int v = 0; v < P; ++v) acc[v] = fmaf(to_float(x.v[v]), wj, acc[v]);
        }
        Pack<T> o;
#pragma unroll
        for (int v = 0; v < P; ++v) o.v[v] = from_float<T>(acc[v]);
        store_pack(out + i * P, o);
    }
}

template <typename T>
__global__ void weighted_reduce_scalar(T* __restrict__ out, InputPtrs in,
                                       const float* __restrict__ w, int k, int64_t begin,
                                       int64_t n)
{
    for (int64_t i = begin + blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
         i += int64_t(gridDim.x) * blockDim.x) {
        float acc = to_float(static_cast<const T*>(in.p[0])[i]) * __ldg(w);
        for (int j = 1; j < k; ++j)
            acc = fmaf(to_float(static_cast<const T*>(in.p[j])[i]), __ldg(w + j), acc);
        out[i] = from_float<T>(acc);
    }
}

int grid_for(int64_t work, int threads)
{
    const int64_t blocks = (work + threads - 1) / threads;
    return int(blocks < 1 ? 1 : (blocks > 65535 ? 65535 : blocks));
}

cudaError_t weighted_reduce(int dtype, void* out, const InputPtrs& in, const float* weights,
                            int k, int64_t n, cudaStream_t stream)
{
    if (k < 1 || k > kMaxInputs) return cudaErrorInvalidValue;
    constexpr int kThreads = 256;
    bool aligned = aligned16(out);
    for (int j = 0; j < k; ++j) aligned = aligned && aligned16(in.p[j]);
    dispatch_cuda_dtype(dtype, [&](auto* tag) {
        using T = std::remove_pointer_t<decltype(tag)>;
        const int64_t packs = aligned ? n / Pack<T>::kCount : 0;
        if (packs > 0)
            SPD_LAUNCH(weighted_reduce_packs<T>, grid_for(packs, kThreads), kThreads, stream)(
                static_cast<T*>(out), in, weights, k, packs);
        const int64_t begin = packs * Pack<T>::kCount;
        if (begin < n)
            SPD_LAUNCH(weighted_reduce_scalar<T>, grid_for(n - begin, kThreads), kThreads,
                       stream)(
                static_cast<T*>(out), in, weights, k, begin, n);
    });
    return cudaGetLastError();
}

}  // namespace cuda
}  // namespace spd
