// Fixed-width fp32 vectors with loads from and stores to fp32 / bf16 / fp16 memory.
//
// The ISA is chosen at compile time by the op builder (SPD_ISA_AVX512, SPD_ISA_AVX2 or
// neither for portable scalar code). Every kernel is written once against this
// interface: Vec::kWidth lanes, load/store of full vectors, and partial (tail) variants
// that go through a small stack buffer so that any length works with one code path.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "spd_dtype.h"

#if defined(SPD_ISA_AVX512) || defined(SPD_ISA_AVX2)
#include <immintrin.h>
#endif

namespace spd {

#if defined(SPD_ISA_AVX512)

inline const char* vec_isa_name() { return "avx512"; }

struct Vec {
    static constexpr int kWidth = 16;
    __m512 v;
};
inline Vec vset1(float x) { return Vec{_mm512_set1_ps(x)}; }
inline Vec vmul(Vec a, Vec b) { return Vec{_mm512_mul_ps(a.v, b.v)}; }
inline Vec vfma(Vec a, Vec b, Vec c) { return Vec{_mm512_fmadd_ps(a.v, b.v, c.v)}; }
inline Vec vabs(Vec a) { return Vec{_mm512_abs_ps(a.v)}; }
inline Vec vmax(Vec a, Vec b) { return Vec{_mm512_max_ps(a.v, b.v)}; }
inline float vhmax(Vec a) { return _mm512_reduce_max_ps(a.v); }

// int8 <-> fp32 lanes: round to nearest even (the MXCSR default) and saturate.
inline void vstore_i8(int8_t* p, Vec a)
{
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(a.v)));
}
inline Vec vload_i8(const int8_t* p)
{
    __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return Vec{_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(x))};
}

inline Vec vload(const float* p) { return Vec{_mm512_loadu_ps(p)}; }
inline Vec vload(const bf16_t* p)
{
    __m512i x = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return Vec{_mm512_castsi512_ps(_mm512_slli_epi32(x, 16))};
}
inline Vec vload(const fp16_t* p)
{
    return Vec{_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))};
}

// fp32 lanes -> 16-bit lanes. bf16 rounds to nearest even on the integer view and
// keeps NaNs quiet NaNs.
inline __m256i narrow(Vec a, const bf16_t*)
{
    __m512i u = _mm512_castps_si512(a.v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
    r = _mm512_srli_epi32(r, 16);
    __mmask16 nan = _mm512_cmp_ps_mask(a.v, a.v, _CMP_UNORD_Q);
    r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7fc0));
    return _mm512_cvtepi32_epi16(r);
}
inline __m256i narrow(Vec a, const fp16_t*)
{
    return _mm512_cvtps_ph(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

inline void vstore(float* p, Vec a) { _mm512_storeu_ps(p, a.v); }
template <typename T>
inline void vstore(T* p, Vec a)
{
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), narrow(a, p));
}

// Non-temporal stores (p aligned to kWidth * sizeof(T)): the written lines bypass the
// cache, which saves the read-for-ownership of every output line on large outputs.
inline void vstream(float* p, Vec a) { _mm512_stream_ps(p, a.v); }
template <typename T>
inline void vstream(T* p, Vec a)
{
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), narrow(a, p));
}
inline void vstream_fence() { _mm_sfence(); }

#elif defined(SPD_ISA_AVX2)

inline const char* vec_isa_name() { return "avx2"; }

struct Vec {
    static constexpr int kWidth = 8;
    __m256 v;
};
inline Vec vset1(float x) { return Vec{_mm256_set1_ps(x)}; }
inline Vec vmul(Vec a, Vec b) { return Vec{_mm256_mul_ps(a.v, b.v)}; }
inline Vec vfma(Vec a, Vec b, Vec c) { return Vec{_mm256_fmadd_ps(a.v, b.v, c.v)}; }
inline Vec vabs(Vec a)
{
    return Vec{_mm256_andnot_ps(_mm256_set1_ps(-0.0f), a.v)};
}
inline Vec vmax(Vec a, Vec b) { return Vec{_mm256_max_ps(a.v, b.v)}; }
inline float vhmax(Vec a)
{
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
}

inline void vstore_i8(int8_t* p, Vec a)
{
    __m256i i32 = _mm256_cvtps_epi32(a.v);  // round to nearest even
    __m128i i16 = _mm_packs_epi32(_mm256_castsi256_si128(i32), _mm256_extracti128_si256(i32, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_packs_epi16(i16, i16));
}
inline Vec vload_i8(const int8_t* p)
{
    __m128i x = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    return Vec{_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(x))};
}

inline Vec vload(const float* p) { return Vec{_mm256_loadu_ps(p)}; }
inline Vec vload(const bf16_t* p)
{
    __m256i x = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return Vec{_mm256_castsi256_ps(_mm256_slli_epi32(x, 16))};
}
inline Vec vload(const fp16_t* p)
{
    return Vec{_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))};
}

inline __m128i narrow(Vec a, const bf16_t*)
{
    __m256i u = _mm256_castps_si256(a.v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
    r = _mm256_srli_epi32(r, 16);
    __m256 nan = _mm256_cmp_ps(a.v, a.v, _CMP_UNORD_Q);
    r = _mm256_castps_si256(
        _mm256_blendv_ps(_mm256_castsi256_ps(r),
                         _mm256_castsi256_ps(_mm256_set1_epi32(0x7fc0)),
                         nan));
    // packus works within 128-bit lanes; gather the two low quadwords afterwards.
    return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08));
}
inline __m128i narrow(Vec a, const fp16_t*)
{
    return _mm256_cvtps_ph(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

inline void vstore(float* p, Vec a) { _mm256_storeu_ps(p, a.v); }
template <typename T>
inline void vstore(T* p, Vec a)
{
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), narrow(a, p));
}

inline void vstream(float* p, Vec a) { _mm256_stream_ps(p, a.v); }
template <typename T>
inline void vstream(T* p, Vec a)
{
    _mm_stream_si128(reinterpret_cast<__m128i*>(p), narrow(a, p));
}
inline void vstream_fence() { _mm_sfence(); }

#else  // portable scalar code; the compiler may still vectorize the lane loops

inline const char* vec_isa_name() { return "scalar"; }

struct Vec {
    static constexpr int kWidth = 8;
    float v[kWidth];
};
inline Vec vset1(float x)
{
    Vec r;
    for (int i = 0; i < Vec::kWidth; ++i) r.v[i] = x;
    return r;
}
inline Vec vmul(Vec a, Vec b)
{
    for (int i = 0; i < Vec::kWidth; ++i) a.v[i] *= b.v[i];
    return a;
}
inline Vec vfma(Vec a, Vec b, Vec c)
{
    for (int i = 0; i < Vec::kWidth; ++i) c.v[i] += a.v[i] * b.v[i];
    return c;
}
inline Vec vabs(Vec a)
{
    for (int i = 0; i < Vec::kWidth; ++i) a.v[i] = a.v[i] < 0 ? -a.v[i] : a.v[i];
    return a;
}
inline Vec vmax(Vec a, Vec b)
{
    for (int i = 0; i < Vec::kWidth; ++i) a.v[i] = a.v[i] > b.v[i] ? a.v[i] : b.v[i];
    return a;
}
inline float vhmax(Vec a)
{
    float m = a.v[0];
    for (int i = 1; i < Vec::kWidth; ++i) m = a.v[i] > m ? a.v[i] : m;
    return m;
}
inline void vstore_i8(int8_t* p, Vec a)
{
    for (int i = 0; i < Vec::kWidth; ++i) {
        const float r = std::nearbyint(a.v[i]);  // round half to even
        p[i] = int8_t(r > 127.0f ? 127.0f : (r < -128.0f ? -128.0f : r));
    }
}
inline Vec vload_i8(const int8_t* p)
{
    Vec r;
    for (int i = 0; i < Vec::kWidth; ++i) r.v[i] = float(p[i]);
    return r;
}
template <typename T>
inline Vec vload(const T* p)
{
    Vec r;
    for (int i = 0; i < Vec::kWidth; ++i) r.v[i] = to_float(p[i]);
    return r;
}
template <typename T>
inline void vstore(T* p, Vec a)
{
    for (int i = 0; i < Vec::kWidth; ++i) p[i] = from_float<T>(a.v[i]);
}
template <typename T>
inline void vstream(T* p, Vec a)
{
    vstore(p, a);
}
inline void vstream_fence() {}

#endif

// Tails: n < kWidth elements through a stack buffer, so no kernel needs scalar code.
template <typename T>
inline Vec vload_partial(const T* p, int64_t n)
{
    T tmp[Vec::kWidth];
    std::memset(tmp, 0, sizeof(tmp));
    std::memcpy(tmp, p, size_t(n) * sizeof(T));
    return vload(tmp);
}
template <typename T>
inline void vstore_partial(T* p, Vec a, int64_t n)
{
    T tmp[Vec::kWidth];
    vstore(tmp, a);
    std::memcpy(p, tmp, size_t(n) * sizeof(T));
}

}  // namespace spd
