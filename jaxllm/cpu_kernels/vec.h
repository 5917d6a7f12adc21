// The float vector the CPU kernels of this library compute in.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) || defined(__F16C__) || defined(__AVX2__) || defined(__SSE4_1__)
#include <immintrin.h>
#endif

// The vector is as wide as the machine's float registers: one 64-byte cache line of floats
// with AVX-512, 8 with AVX, 4 (SSE, NEON) otherwise. GCC keeps a generic vector wider than
// the registers in memory between operations: with 16 lanes on an AVX2 machine the few-row
// product ran at 4 GFLOP/s on one core, with 8 at 21.
#if defined(__AVX512F__)
#define JAXLLM_LANES 16
#elif defined(__AVX__)
#define JAXLLM_LANES 8
#else
#define JAXLLM_LANES 4
#endif
constexpr int64_t kLanes = JAXLLM_LANES;

typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t IVec __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline Vec Select(IVec mask, Vec a, Vec b) { return mask ? a : b; }

inline Vec Load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(Vec));
  return v;
}

inline float Sum(Vec v) {
  float s = 0.0f;
  for (int64_t i = 0; i < kLanes; ++i) s += v[i];
  return s;
}

inline float HalfToFloat(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  float f;
  uint32_t bits;
  if (exp == 0) {  // zero or subnormal: man * 2^-24
    f = static_cast<float>(man) * 5.9604644775390625e-8f;
    std::memcpy(&bits, &f, 4);
    bits |= sign;
  } else {
    bits = sign | (exp == 31 ? (0xffu << 23) | (man << 13) : ((exp + 112) << 23) | (man << 13));
  }
  std::memcpy(&f, &bits, 4);
  return f;
}

// kLanes IEEE halves (bits) as floats: one vcvtph2ps with AVX-512.
inline Vec LoadF16(const uint16_t* p) {
  Vec r;
#if defined(__AVX512F__)
  const __m512 v = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  std::memcpy(&r, &v, sizeof(Vec));
#elif defined(__F16C__)  // implies AVX: kLanes is 8
  for (int i = 0; i < kLanes; i += 8) {
    const __m256 v = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + i)));
    std::memcpy(reinterpret_cast<float*>(&r) + i, &v, sizeof(v));
  }
#else
  for (int i = 0; i < kLanes; ++i) r[i] = HalfToFloat(p[i]);
#endif
  return r;
}

// kLanes int8 codes as floats. GCC scalarises a generic vector conversion from bytes (one
// byte at a time through general registers, 8x slower), so x86 gets the widening
// instructions by name.
inline Vec LoadS8(const int8_t* p) {
  Vec r;
#if defined(__AVX512F__)
  const __m512 v = _mm512_cvtepi32_ps(
      _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  std::memcpy(&r, &v, sizeof(Vec));
#elif defined(__AVX2__)
  const __m256 v = _mm256_cvtepi32_ps(
      _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  std::memcpy(&r, &v, sizeof(Vec));
#elif defined(__SSE4_1__) && !defined(__AVX__)
  int32_t four;
  std::memcpy(&four, p, 4);
  const __m128 v = _mm_cvtepi32_ps(_mm_cvtepi8_epi32(_mm_cvtsi32_si128(four)));
  std::memcpy(&r, &v, sizeof(Vec));
#else
  for (int i = 0; i < kLanes; ++i) r[i] = static_cast<float>(p[i]);
#endif
  return r;
}

// kLanes bfloat16s (the high halves of floats) as floats: widen and shift.
inline Vec LoadBF16(const uint16_t* p) {
  typedef uint16_t U16 __attribute__((vector_size(kLanes * sizeof(uint16_t))));
  typedef uint32_t U32 __attribute__((vector_size(kLanes * sizeof(uint32_t))));
  U16 h;
  std::memcpy(&h, p, sizeof(h));
  const U32 u = __builtin_convertvector(h, U32) << 16;
  Vec r;
  std::memcpy(&r, &u, sizeof(Vec));
  return r;
}

// exp of each lane for x in [-87.3, 88.3] (relative error ~2e-7): x = n ln 2 + r, a degree-7
// polynomial in r, times 2^n built in the exponent bits. Callers clamp x to the range and
// patch the lanes they clamped (std::exp is a scalar libm call per lane).
inline Vec ExpInRange(Vec x) {
  const Vec n = (x * 1.44269504f + 12582912.0f) - 12582912.0f;  // round(x / ln 2)
  const Vec r = x - n * 0.693359375f + n * 2.12194440e-4f;       // x - n ln 2, two parts
  Vec p = Vec{} + 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const IVec bits = (__builtin_convertvector(n, IVec) + 127) << 23;  // 2^n, n in [-126, 127]
  Vec scale;
  std::memcpy(&scale, &bits, sizeof(Vec));
  return p * scale;
}
