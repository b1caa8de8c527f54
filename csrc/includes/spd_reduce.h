// The one weighted-reduction kernel: out = sum_j w[j] * in[j], fp32 accumulation.
//
// Used by the weighted_reduce op directly and by the shared-memory all-reduce for
// every reduction it does (sum and mean are weighted reductions with constant
// weights), so there is a single piece of code to vectorize, test and tune.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "spd_vec.h"

namespace spd {

inline bool built_with_openmp()
{
#ifdef _OPENMP
    return true;
#else
    return false;
#endif
}

inline int max_threads()
{
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

// Below this many bytes touched a call runs on the calling thread: waking a thread
// team costs more than it saves.
constexpr int64_t kParallelMinBytes = int64_t(1) << 20;

template <bool kStream, typename T>
inline void vput(T* p, Vec a)
{
    if (kStream)
        vstream(p, a);
    else
        vstore(p, a);
}

template <typename T>
inline Vec weighted_sum_partial(const T* const* in, const float* w, int k, int64_t i, int64_t n)
{
    Vec a = vmul(vload_partial(in[0] + i, n), vset1(w[0]));
    for (int j = 1; j < k; ++j) a = vfma(vload_partial(in[j] + i, n), vset1(w[j]), a);
    return a;
}

// out[i] = sum_j w[j] * in[j][i] for i in [begin, end). Inputs are summed in order
// j = 0..k-1 on every call, so equal inputs give bitwise-equal outputs. `out` may be
// the same pointer as an input (each element is read before it is written), but must
// not partially overlap one. kStream writes with non-temporal stores (callers fence).
template <bool kStream, typename T>
void weighted_reduce_range(T* out, const T* const* in, const float* w, int k, int64_t begin,
                           int64_t end)
{
    constexpr int W = Vec::kWidth;
    int64_t i = begin;
    if (kStream) {  // streaming stores need aligned addresses: peel a partial head
        const int64_t misalign = int64_t(reinterpret_cast<uintptr_t>(out + i) % (W * sizeof(T)));
        if (misalign % sizeof(T) == 0 && misalign != 0) {
            const int64_t head = std::min(end - i, int64_t(W - misalign / sizeof(T)));
            vstore_partial(out + i, weighted_sum_partial(in, w, k, i, head), head);
            i += head;
        } else if (misalign != 0) {  // not even element-aligned: use ordinary stores
            weighted_reduce_range<false>(out, in, w, k, begin, end);
            return;
        }
    }
    // Four independent accumulators keep the FMA pipes busy while loads stream.
    for (; i + 4 * W <= end; i += 4 * W) {
        const Vec w0 = vset1(w[0]);
        const T* p0 = in[0] + i;
        Vec a0 = vmul(vload(p0), w0);
        Vec a1 = vmul(vload(p0 + W), w0);
        Vec a2 = vmul(vload(p0 + 2 * W), w0);
        Vec a3 = vmul(vload(p0 + 3 * W), w0);
        for (int j = 1; j < k; ++j) {
            const Vec wj = vset1(w[j]);
            const T* p = in[j] + i;
            a0 = vfma(vload(p), wj, a0);
            a1 = vfma(vload(p + W), wj, a1);
            a2 = vfma(vload(p + 2 * W), wj, a2);
            a3 = vfma(vload(p + 3 * W), wj, a3);
        }
        vput<kStream>(out + i, a0);
        vput<kStream>(out + i + W, a1);
        vput<kStream>(out + i + 2 * W, a2);
        vput<kStream>(out + i + 3 * W, a3);
    }
    for (; i + W <= end; i += W) {
        Vec a = vmul(vload(in[0] + i), vset1(w[0]));
        for (int j = 1; j < k; ++j) a = vfma(vload(in[j] + i), vset1(w[j]), a);
        vput<kStream>(out + i, a);
    }
    if (i < end) vstore_partial(out + i, weighted_sum_partial(in, w, k, i, end - i), end - i);
}

// Splits [0, n) into one contiguous, vector-aligned range per thread (contiguous so the
// hardware prefetchers see long streams). threads <= 1 runs serially.
template <typename F>
void parallel_ranges(int64_t n, int64_t align, int threads, F&& body)
{
    if (threads <= 1 || n <= align) {
        body(int64_t(0), n);
        return;
    }
    const int64_t per = (n + threads - 1) / threads;
    const int64_t step = (per + align - 1) / align * align;
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(static, 1)
#endif
    for (int t = 0; t < threads; ++t) {
        const int64_t b = std::min(n, int64_t(t) * step);
        const int64_t e = std::min(n, b + step);
        if (b < e) body(b, e);
    }
}

inline int threads_for(int64_t bytes_touched, int thread_limit)
{
    if (bytes_touched < kParallelMinBytes) return 1;
    return std::max(1, std::min(thread_limit, int(bytes_touched / kParallelMinBytes)));
}

// The L3 one core can use, from sysfs (what lscpu shows). sysconf's answer is not used:
// on some VMs it reports the whole host's L3 (384 MiB where a core sees 32 MiB).
inline int64_t last_level_cache_bytes()
{
    static const int64_t bytes = [] {
        for (int i = 0; i < 8; ++i) {
            const std::string dir =
                "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i) + "/";
            std::ifstream level_file(dir + "level"), size_file(dir + "size");
            int level = 0;
            std::string size;
            if (!(level_file >> level) || !(size_file >> size) || level != 3) continue;
            int64_t value = std::atoll(size.c_str());
            if (size.back() == 'K') value <<= 10;
            if (size.back() == 'M') value <<= 20;
            if (value > 0) return value;
        }
        return int64_t(32) << 20;  // unknown: a typical server L3 slice
    }();
    return bytes;
}

// Streaming stores pay off once a reduction's working set no longer fits in half the
// last-level cache: the output would be evicted before anyone reads it, and skipping
// its read-for-ownership saves a sixth of the traffic of a 4-input reduction. Below
// that they would push a result the caller is about to use out to DRAM.
inline bool prefer_streaming_stores(int64_t bytes_touched)
{
    return bytes_touched >= last_level_cache_bytes() / 2;
}

template <typename T>
void weighted_reduce(T* out, const T* const* in, const float* w, int k, int64_t n,
                     int thread_limit, bool stream = false)
{
    const int threads = threads_for(n * int64_t(sizeof(T)) * (k + 1), thread_limit);
    parallel_ranges(n, 4 * Vec::kWidth, threads, [&](int64_t b, int64_t e) {
        if (stream) {
            weighted_reduce_range<true>(out, in, w, k, b, e);
            vstream_fence();
        } else {
            weighted_reduce_range<false>(out, in, w, k, b, e);
        }
    });
}

inline void parallel_copy(void* dst, const void* src, int64_t bytes, int thread_limit)
{
    const int threads = threads_for(2 * bytes, thread_limit);
    parallel_ranges(bytes, 4096, threads, [&](int64_t b, int64_t e) {
        std::memcpy(static_cast<char*>(dst) + b, static_cast<const char*>(src) + b, size_t(e - b));
    });
}

// Calls f with a typed null pointer for the runtime dtype (a compile-time dispatch).
template <typename F>
auto dispatch_dtype(DType t, F&& f)
{
    switch (t) {
        case DType::kBFloat16: return f(static_cast<bf16_t*>(nullptr));
        case DType::kFloat16: return f(static_cast<fp16_t*>(nullptr));
        default: return f(static_cast<float*>(nullptr));
    }
}

}  // namespace spd
