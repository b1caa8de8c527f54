// C entry points over csrc/includes, compiled by tests/test_isa_kernels.py once per vector
// ISA (scalar, AVX2, AVX-512) so every code path of the kernel is tested on this host.
#include <cstdint>

#include "spd_quant.h"
#include "spd_reduce.h"

extern "C" {

const char* spd_test_isa() { return spd::vec_isa_name(); }

int64_t spd_test_llc_bytes() { return spd::last_level_cache_bytes(); }

void spd_test_weighted_reduce(int dtype, void* out, const void* const* in, const float* w, int k,
                              int64_t n, int threads, int stream)
{
    spd::dispatch_dtype(spd::DType(dtype), [&](auto* tag) {
        using T = std::remove_pointer_t<decltype(tag)>;
        spd::weighted_reduce(static_cast<T*>(out), reinterpret_cast<const T* const*>(in), w, k, n,
                             threads, stream != 0);
    });
}

// float -> dtype -> float through the vector loads and stores (full vectors and tails).
void spd_test_round_trip(int dtype, const float* in, float* narrow_out, void* bits_out, int64_t n)
{
    spd::dispatch_dtype(spd::DType(dtype), [&](auto* tag) {
        using T = std::remove_pointer_t<decltype(tag)>;
        T* bits = static_cast<T*>(bits_out);
        constexpr int W = spd::Vec::kWidth;
        int64_t i = 0;
        for (; i + W <= n; i += W) spd::vstore(bits + i, spd::vload(in + i));
        if (i < n) spd::vstore_partial(bits + i, spd::vload_partial(in + i, n - i), n - i);
        for (i = 0; i + W <= n; i += W) spd::vstore(narrow_out + i, spd::vload(bits + i));
        if (i < n) spd::vstore_partial(narrow_out + i, spd::vload_partial(bits + i, n - i), n - i);
    });
}

// The scalar conversions of spd_dtype.h (used by the portable path).
void spd_test_scalar_round_trip(int dtype, const float* in, float* narrow_out, void* bits_out,
                                int64_t n)
{
    spd::dispatch_dtype(spd::DType(dtype), [&](auto* tag) {
        using T = std::remove_pointer_t<decltype(tag)>;
        T* bits = static_cast<T*>(bits_out);
        for (int64_t i = 0; i < n; ++i) {
            bits[i] = spd::from_float<T>(in[i]);
            narrow_out[i] = spd::to_float(bits[i]);
        }
    });
}

int spd_test_quantize(int dtype, const void* x, int64_t n, int64_t block, int8_t* q,
                      float* scales)
{
    return spd::dispatch_dtype(spd::DType(dtype), [&](auto* tag) {
        using T = std::remove_pointer_t<decltype(tag)>;
        return int(spd::quantize_blocks(static_cast<const T*>(x), n, block, q, scales, 2));
    });
}

void spd_test_dequantize(int dtype, const int8_t* q, const float* scales, int64_t n,
                         int64_t block, void* out)
{
    spd::dispatch_dtype(spd::DType(dtype), [&](auto* tag) {
        using T = std::remove_pointer_t<decltype(tag)>;
        spd::dequantize_blocks(q, scales, n, block, static_cast<T*>(out), 2);
    });
}

}  // extern "C"
