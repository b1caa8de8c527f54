// Element types the kernels understand, and scalar conversions between them.
//
// The kernels stay free of torch headers so that they compile in seconds for tests
// (tests/csrc) and can be shared by every op. Bindings map at::ScalarType to DType.
#pragma once

#include <cstdint>
#include <cstring>

#include "spd_codes.h"

namespace spd {

inline int64_t dtype_size(DType t) { return t == DType::kFloat32 ? 4 : 2; }

inline const char* dtype_name(DType t)
{
    switch (t) {
        case DType::kFloat32: return "float32";
        case DType::kBFloat16: return "bfloat16";
        case DType::kFloat16: return "float16";
    }
    return "unknown";
}

// 16-bit storage types; arithmetic always happens in fp32.
struct bf16_t {
    uint16_t bits;
};
struct fp16_t {
    uint16_t bits;
};

inline uint32_t f32_bits(float f)
{
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline float f32_from_bits(uint32_t u)
{
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

inline float to_float(float x) { return x; }
inline float to_float(bf16_t x) { return f32_from_bits(uint32_t(x.bits) << 16); }

// IEEE half -> float, exact for every input (normals, subnormals, inf, NaN).
inline float to_float(fp16_t x)
{
    const uint32_t w = uint32_t(x.bits) << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;
    // Normal numbers: move exponent and mantissa into place and rescale the bias.
    const float normalized = f32_from_bits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    // Subnormals: build 0.5 + m * 2^-24 in the mantissa and subtract 0.5.
    const float denormalized = f32_from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
    const uint32_t r =
        sign | (two_w < (1u << 27) ? f32_bits(denormalized) : f32_bits(normalized));
    return f32_from_bits(r);
}

template <typename T>
inline T from_float(float f);

template <>
inline float from_float<float>(float f)
{
    return f;
}

// Round to nearest even; every NaN becomes the quiet NaN 0x7fc0 (as torch does).
template <>
inline bf16_t from_float<bf16_t>(float f)
{
    uint32_t u = f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{0x7fc0};
    u += 0x7fffu + ((u >> 16) & 1u);
    return bf16_t{uint16_t(u >> 16)};
}

// Round to nearest even with overflow to inf, via the fp32 adder (no branches on the
// exponent): scaling by 2^112 * 2^-110 pushes the bits to drop below the mantissa.
template <>
inline fp16_t from_float<fp16_t>(float f)
{
    float base = (f < 0 ? -f : f) * 0x1.0p+112f * 0x1.0p-110f;
    const uint32_t w = f32_bits(f);
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    base = f32_from_bits((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = f32_bits(base);
    const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
    const uint32_t mantissa_bits = bits & 0x00000FFFu;
    const uint32_t nonsign = exp_bits + mantissa_bits;
    return fp16_t{uint16_t((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign))};
}

}  // namespace spd
