// 8-bit block quantization: absmax per block, int8 values, one fp32 scale per block.
//
//   s = absmax(block) / 127,  q = round_half_even(x * (1 / s)),  x_hat = q * s
//
// Written with the same float32 operations, in the same order, as the PyTorch fallback
// (spd_ext/ops/quantize.py), so both produce bitwise-identical values and scales.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>

#include "spd_reduce.h"

namespace spd {

// Largest |x| of n elements, or NaN if any is NaN or inf. (Vector max instructions
// drop NaNs, so non-finite values are tracked apart: x * 0 is NaN exactly for them.)
template <typename T>
float block_absmax(const T* x, int64_t n)
{
    constexpr int W = Vec::kWidth;
    const Vec zero = vset1(0.0f);
    Vec m = zero, poison = zero;
    int64_t i = 0;
    for (; i + W <= n; i += W) {
        const Vec v = vload(x + i);
        m = vmax(m, vabs(v));
        poison = vfma(v, zero, poison);
    }
    if (i < n) {  // zero padding is harmless for both
        const Vec v = vload_partial(x + i, n - i);
        m = vmax(m, vabs(v));
        poison = vfma(v, zero, poison);
    }
    float lanes[W];
    vstore(lanes, poison);
    for (int l = 0; l < W; ++l)
        if (lanes[l] != lanes[l]) return lanes[l];
    return vhmax(m);
}

inline void store_i8_partial(int8_t* p, Vec a, int64_t n)
{
    int8_t tmp[Vec::kWidth];
    vstore_i8(tmp, a);
    std::memcpy(p, tmp, size_t(n));
}

inline Vec load_i8_partial(const int8_t* p, int64_t n)
{
    int8_t tmp[Vec::kWidth] = {};
    std::memcpy(tmp, p, size_t(n));
    return vload_i8(tmp);
}

// q[i], scales[b] for n elements in blocks of `block`. Returns false if a block holds a
// NaN or inf (its absmax is not finite); nothing is promised about the outputs then.
template <typename T>
bool quantize_blocks(const T* x, int64_t n, int64_t block, int8_t* q, float* scales,
                     int thread_limit)
{
    constexpr int W = Vec::kWidth;
    const int64_t blocks = (n + block - 1) / block;
    const int threads = threads_for(n * int64_t(sizeof(T) + 1), thread_limit);
    std::atomic<bool> finite{true};
    parallel_ranges(blocks, 1, threads, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
            const int64_t lo = b * block, len = std::min(block, n - lo);
            const float absmax = block_absmax(x + lo, len);
            if (!(absmax <= 3.4028235e38f)) finite.store(false);  // NaN or inf
            const float scale = absmax / 127.0f;
            const float inv = scale > 0.0f ? 1.0f / scale : 0.0f;
            scales[b] = scale;
            const Vec vinv = vset1(inv);
            int64_t i = 0;
            for (; i + W <= len; i += W) vstore_i8(q + lo + i, vmul(vload(x + lo + i), vinv));
            if (i < len)
                store_i8_partial(q + lo + i, vmul(vload_partial(x + lo + i, len - i), vinv),
                                 len - i);
        }
    });
    return finite.load();
}

template <typename T>
void dequantize_blocks(const int8_t* q, const float* scales, int64_t n, int64_t block, T* out,
                       int thread_limit)
{
    constexpr int W = Vec::kWidth;
    const int64_t blocks = (n + block - 1) / block;
    const int threads = threads_for(n * int64_t(sizeof(T) + 1), thread_limit);
    parallel_ranges(blocks, 1, threads, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
            const int64_t lo = b * block, len = std::min(block, n - lo);
            const Vec s = vset1(scales[b]);
            int64_t i = 0;
            for (; i + W <= len; i += W) vstore(out + lo + i, vmul(vload_i8(q + lo + i), s));
            if (i < len)
                vstore_partial(out + lo + i, vmul(load_i8_partial(q + lo + i, len - i), s),
                               len - i);
        }
    });
}

}  // namespace spd
