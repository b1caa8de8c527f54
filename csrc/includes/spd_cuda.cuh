// Device-side helpers shared by the CUDA kernels: dtype conversions and 16-byte vectors.
//
// Kept free of torch headers (like the CPU kernels) so that every .cu compiles in seconds
// with nvcc alone; the torch bindings live in *_binding.cpp files.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "spd_codes.h"

// Kernel launches and spin waits go through these macros so that tests/csrc/cuda_emu (a
// CPU emulation of CUDA, found first on the include path in tests) can run the kernels.
#ifndef SPD_LAUNCH
#define SPD_LAUNCH(kernel, grid, threads, stream) kernel<<<(grid), (threads), 0, (stream)>>>
#endif
#ifndef SPD_SPIN_HINT
#define SPD_SPIN_HINT()
#endif

namespace spd {
namespace cuda {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x)
{
    return x;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x)
{
    return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x)
{
    return __float2bfloat16_rn(x);
}

// 16 bytes of T: what one vectorized (ld.global.v4) load moves. A union, so the vector and
// its elements are the same object (casting a T array to uint4 breaks strict aliasing).
template <typename T>
union alignas(16) Pack {
    static constexpr int kCount = 16 / sizeof(T);
    uint4 raw;
    T v[kCount];
};

template <typename T>
__device__ __forceinline__ Pack<T> load_pack(const T* p)
{
    Pack<T> out;
    out.raw = *reinterpret_cast<const uint4*>(p);
    return out;
}

template <typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T>& x)
{
    *reinterpret_cast<uint4*>(p) = x.raw;
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// dtype: a spd::DType code (spd_codes.h).
template <typename F>
void dispatch_cuda_dtype(int dtype, F&& f)
{
    if (dtype == int(DType::kBFloat16))
        f(static_cast<__nv_bfloat16*>(nullptr));
    else if (dtype == int(DType::kFloat16))
        f(static_cast<__half*>(nullptr));
    else
        f(static_cast<float*>(nullptr));
}

}  // namespace cuda
}  // namespace spd
