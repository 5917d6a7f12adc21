// llama.cpp's CPU arithmetic, operation for operation, for the `gguf-llamacpp` recipe
// (jaxllm/quant/ggml_exact.py): the same float32 roundings in the same order as ggml's x86
// backend (AVX2/AVX512 build of the llama.cpp that llama-cpp-python 0.3.x vendors), so a
// GGUF model gives llama.cpp's logits bit for bit, not merely close to them.
//
// Matching to the last bit matters because of 8-bit activation blocks: one float32 rounding
// that differs flips one code, the flip grows layer by layer, and greedy tokens part at the
// next near-tie (benchmarks/results/gguf_agreement_cpu.md).
//
// Every vector reduction of ggml is written out here as scalar code in the order of its lanes
// (hsum_float_8, _mm512_reduce_add_ps as GCC defines it, ggml_vec_dot_f16's four
// accumulators), with std::fma where ggml issues an FMA. This file is built on its own with
// -ffp-contract=off so that no other product and sum is fused.
//
//   JaxllmGgmlRmsNorm(x f32 [R, E], w f32 [E]; eps) -> [R, E]      ggml_rms_norm + ggml_mul
//   JaxllmGgmlBlockDot(x f32 [R, I], w u8 [O, I] (Q8_0 codes) or [O, I/2] (Q4_1 / Q4_0 packed
//       as GGUF packs them), d f32 [O, I/32], m f32 [O, I/32] (Q4_1) or [0]; kind) -> [R, O]:
//       x quantized to Q8_1 (Q4_1) or Q8_0, then ggml_vec_dot_q4_1_q8_1 / _q4_0_q8_0 /
//       _q8_0_q8_0 (tinyBLAS_Q0_AVX sums in the same order).
//   JaxllmGgmlRope(x f32 [B, T, N, D], pos s32 [B, T], factors f32 [D/2] or [0]; base) -> same:
//       GGML_ROPE_TYPE_NORMAL on rotate-half rows (pair i is dims i and i + D/2, as jaxllm
//       un-permutes GGUF's Q/K rows), angles divided by GGUF's rope_freqs when given.
//   JaxllmGgmlAttention(q f32 [B, T, K, G, D], k f16 [B, K, S, D], v f16 [B, K, S, D],
//       mask u8 [B, T, S]; scale, interleaved) -> f32 [B, T, K, G, D]: ggml_mul_mat(k, q),
//       ggml_soft_max_ext, ggml_mul_mat(v, kq) without flash attention. A key's position is its
//       slot minus the row's first unmasked slot. With one real query row ggml takes
//       ggml_vec_dot_f16, with more tinyBLAS; interleaved: sum Q.K over dims in GGUF's order.
//   JaxllmGgmlSwiglu(g f32 [R, M], u f32 [R, M]) -> [R, M]: ggml_vec_swiglu_f32.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "pool.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kBlock = 32;

float F16ToF32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  const uint32_t e = (h >> 10) & 0x1f, m = h & 0x3ff;
  uint32_t bits;
  if (e == 0) {
    const float v = static_cast<float>(m) * 5.9604644775390625e-8f;  // m * 2^-24, exact
    return sign ? -v : v;
  }
  bits = sign | (e == 31 ? 0x7f800000u | (m << 13) : ((e + 112) << 23) | (m << 13));
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t F32ToF16(float f) {  // round to nearest even, as F16C's vcvtps2ph with imm 0
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000);
  const uint32_t ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) return sign | 0x7c00 | (ax > 0x7f800000u ? 0x200 : 0);
  if (ax >= 0x477ff000u) return sign | 0x7c00;  // >= 65520 rounds to infinity
  if (ax < 0x38800000u) {                        // below 2^-14: a subnormal half
    float v;
    std::memcpy(&v, &ax, 4);
    return sign | static_cast<uint16_t>(std::nearbyint(v * 16777216.0f));
  }
  const uint32_t r = ax + 0xfffu + ((ax >> 13) & 1u) - (112u << 23);
  return sign | static_cast<uint16_t>(r >> 13);
}

float RoundF16(float f) { return F16ToF32(F32ToF16(f)); }

// hsum_float_8 (ggml's x86 quants.c; tinyBLAS's hsum(__m256) is the same tree).
float Hsum8(const float* a) {
  const float r0 = a[4] + a[0], r1 = a[5] + a[1], r2 = a[6] + a[2], r3 = a[7] + a[3];
  return (r0 + r2) + (r1 + r3);
}

// _mm512_reduce_add_ps as GCC's avx512fintrin.h defines it.
float Reduce16(const float* a) {
  float t3[8], t6[4];
  for (int i = 0; i < 8; ++i) t3[i] = a[8 + i] + a[i];
  for (int i = 0; i < 4; ++i) t6[i] = t3[4 + i] + t3[i];
  return (t6[0] + t6[2]) + (t6[1] + t6[3]);
}

// ggml picks its vector paths at compile time from the same -march=native macros as this
// file: kExpLanes for ggml_v_expf, ggml_v_silu and the softmax's chunks, kF16Lanes for the
// float16 dot products (ggml_vec_dot_f16, tinyBLAS). 0: a CPU whose paths are not emulated.
#if defined(__AVX512F__) && defined(__AVX512DQ__)
constexpr int kExpLanes = 16;
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int kExpLanes = 8;
#else
constexpr int kExpLanes = 0;
#endif
#if defined(__AVX512F__)
constexpr int kF16Lanes = 16;
#elif defined(__AVX__) && defined(__F16C__)
constexpr int kF16Lanes = 8;
#else
constexpr int kF16Lanes = 0;
#endif

uint32_t Bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

float FromBits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// GGML_F32x8_REDUCE's last step (AVX): two hadds over lo + hi.
float HaddReduce8(const float* a) {
  const float t0 = a[0] + a[4], t1 = a[1] + a[5], t2 = a[2] + a[6], t3 = a[3] + a[7];
  return (t0 + t1) + (t2 + t3);
}

// One lane of ggml_v_expf: the AVX512 version (vscalefps) or the AVX2 one (exponent bits).
float VExp(float x) {
  const float r = 0x1.8p23f;
  const float z = std::fma(x, 0x1.715476p+0f, r);
  const float n = z - r;
  const float b = std::fma(-n, 0x1.7f7d1cp-20f, std::fma(-n, 0x1.62e4p-1f, x));
  const float u = b * b;
  const float poly = std::fma(std::fma(0x1.0e4020p-7f, b, 0x1.573e2ep-5f), u,
                              std::fma(0x1.555e66p-3f, b, 0x1.fffdb6p-2f));
  if (kExpLanes == 16) {
    if (std::fabs(n) > 192.0f) return n <= 0.0f ? 0.0f : INFINITY;
    const float j = std::fma(poly, u, std::fma(0x1.ffffecp-1f, b, 1.0f));
    return std::ldexp(j, static_cast<int>(n));  // j * 2^n, n integral
  }
  const float j = std::fma(poly, u, 0x1.ffffecp-1f * b);
  const uint32_t e = Bits(z) << 23;
  const float k = FromBits(e + 0x3f800000u);
  if (!(std::fabs(n) > 126.0f)) return std::fma(j, k, k);
  const uint32_t g = n <= 0.0f ? 0x82000000u : 0u;
  const float s1 = FromBits(g + 0x7f000000u);
  const float s2 = FromBits(e - g);
  if (std::fabs(n) > 192.0f) return s1 * s1;
  return std::fma(s2, j, s2) * s1;
}

float VSilu(float x) { return x / (1.0f + VExp(0.0f - x)); }

// ---- products of GGUF block weights -------------------------------------------------------

struct Q8Row {
  std::vector<int8_t> q;  // [N * 32]
  std::vector<float> d;   // float16 scale, widened
  std::vector<float> s;   // Q8_1: float16 d * sum(q), widened
};

// quantize_row_q8_1 / quantize_row_q8_0, x86 path.
void QuantizeRow(const float* x, int64_t n, bool with_sum, Q8Row* out) {
  const int64_t nb = n / kBlock;
  out->q.resize(n);
  out->d.resize(nb);
  out->s.resize(with_sum ? nb : 0);
  for (int64_t b = 0; b < nb; ++b) {
    const float* xb = x + b * kBlock;
    float amax = 0.0f;
    for (int k = 0; k < kBlock; ++k) amax = std::fmax(amax, std::fabs(xb[k]));
    const float d = amax / 127.f;
    const float id = amax != 0.0f ? 127.f / amax : 0.0f;
    int32_t sum = 0;
    for (int k = 0; k < kBlock; ++k) {
      const int32_t v = static_cast<int32_t>(std::nearbyint(xb[k] * id));
      const int32_t c = v > 127 ? 127 : (v < -128 ? -128 : v);
      out->q[b * kBlock + k] = static_cast<int8_t>(c);
      sum += v;
    }
    out->d[b] = F16ToF32(F32ToF16(d));
    if (with_sum) out->s[b] = F16ToF32(F32ToF16(d * static_cast<float>(sum)));
  }
}

// The weight kinds of JaxllmGgmlBlockDot: how a block's 32 codes are stored and multiplied.
enum Kind { kQ8_0 = 0, kQ4_1 = 1, kQ4_0 = 2 };

// A block's 32 codes as ggml multiplies them (Q8_0: c; Q4_1: u; Q4_0: u - 8). 4-bit blocks
// are 16 bytes, byte j holding code j (low nibble) and code j + 16 (high), as in GGUF.
void UnpackBlock(const uint8_t* w, int kind, int8_t* out) {
  if (kind == kQ8_0) {
    std::memcpy(out, w, kBlock);
    return;
  }
  const int shift = kind == kQ4_0 ? 8 : 0;
  for (int j = 0; j < kBlock / 2; ++j) {
    out[j] = static_cast<int8_t>((w[j] & 0xf) - shift);
    out[j + 16] = static_cast<int8_t>((w[j] >> 4) - shift);
  }
}

// The eight lane sums of a block, lane k = sum of codes 4k..4k+3 times activations (exact
// integers, as maddubs + madd or vpdpbusd give them).
void LaneSums(const uint8_t* w, int kind, const int8_t* x, float* lanes) {
#if defined(__AVX2__)
  const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  __m256i wv;
  if (kind == kQ8_0) {
    wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  } else {
    const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
    wv = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(packed, 4), packed),
                          _mm256_set1_epi8(0xf));
    if (kind == kQ4_0) wv = _mm256_sub_epi8(wv, _mm256_set1_epi8(8));
  }
  // |w| <= 128, |x| <= 127: the pair sums fit int16
  const __m256i pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv));
  const __m256i quads = _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
  _mm256_storeu_ps(lanes, _mm256_cvtepi32_ps(quads));
#else
  int8_t c[kBlock];
  UnpackBlock(w, kind, c);
  for (int lane = 0; lane < 8; ++lane) {
    int32_t sum = 0;
    for (int e = 0; e < 4; ++e) sum += c[4 * lane + e] * x[4 * lane + e];
    lanes[lane] = static_cast<float>(sum);
  }
#endif
}

// One output of ggml_vec_dot_q4_1_q8_1 (Q4_1), ggml_vec_dot_q4_0_q8_0 or
// ggml_vec_dot_q8_0_q8_0: acc = fma(d_w * d_x, lanes, acc) block after block, hsum_float_8,
// and for Q4_1 the offsets' sum m_w * s_x (an FMA: GCC contracts `summs += m * s`).
float BlockDot(const uint8_t* w, int kind, const float* wd, const float* wm, const Q8Row& x,
               int64_t nb) {
  const int64_t block_bytes = kind == kQ8_0 ? kBlock : kBlock / 2;
  alignas(32) float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  alignas(32) float lanes[8];
  float summs = 0.0f;
#if defined(__AVX2__) && defined(__FMA__)
  __m256 accv = _mm256_setzero_ps();
#endif
  for (int64_t b = 0; b < nb; ++b) {
    if (kind == kQ4_1) summs = std::fma(wm[b], x.s[b], summs);
    const float scale = wd[b] * x.d[b];
    LaneSums(w + b * block_bytes, kind, x.q.data() + b * kBlock, lanes);
#if defined(__AVX2__) && defined(__FMA__)  // the same eight FMAs, in one instruction
    accv = _mm256_fmadd_ps(_mm256_set1_ps(scale), _mm256_load_ps(lanes), accv);
#else
    for (int lane = 0; lane < 8; ++lane) acc[lane] = std::fma(scale, lanes[lane], acc[lane]);
#endif
  }
#if defined(__AVX2__) && defined(__FMA__)
  _mm256_store_ps(acc, accv);
#endif
  return kind == kQ4_1 ? Hsum8(acc) + summs : Hsum8(acc);
}

ffi::Error BlockDotImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> w, ffi::Buffer<ffi::F32> d,
                        ffi::Buffer<ffi::F32> m, ffi::ResultBuffer<ffi::F32> y, int32_t kind) {
  const auto dd = d.dimensions();
  if (dd.size() != 2 || (kind != kQ8_0 && kind != kQ4_1 && kind != kQ4_0)) {
    return ffi::Error::InvalidArgument("JaxllmGgmlBlockDot: d must be [O, I/32], kind 0-2");
  }
  const int64_t o = dd[0], nb = dd[1], in = nb * kBlock;
  const int64_t row_bytes = kind == kQ8_0 ? in : in / 2;
  if (static_cast<int64_t>(w.element_count()) != o * row_bytes ||
      (kind == kQ4_1) != (m.element_count() != 0)) {
    return ffi::Error::InvalidArgument("JaxllmGgmlBlockDot: weight bytes or offsets mismatch");
  }
  const int64_t rows = static_cast<int64_t>(x.element_count()) / in;
  std::vector<Q8Row> xq(rows);
  for (int64_t r = 0; r < rows; ++r) QuantizeRow(x.typed_data() + r * in, in, kind == kQ4_1, &xq[r]);
  const uint8_t* wp = w.typed_data();
  const float* dp = d.typed_data();
  const float* mp = kind == kQ4_1 ? m.typed_data() : nullptr;
  float* yp = y->typed_data();
  const JaxllmPool::Task task = [&](int share, int shares) {
    const int64_t o0 = o * share / shares, o1 = o * (share + 1) / shares;
    for (int64_t j = o0; j < o1; ++j) {
      const float* mj = mp != nullptr ? mp + j * nb : nullptr;
      for (int64_t r = 0; r < rows; ++r) {
        yp[r * o + j] = BlockDot(wp + j * row_bytes, kind, dp + j * nb, mj, xq[r], nb);
      }
    }
  };
  JaxllmGetPool().Run(task);
  return ffi::Error::Success();
}

// ---- norm, rope, swiglu --------------------------------------------------------------------

ffi::Error RmsNormImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                       ffi::ResultBuffer<ffi::F32> y, float eps) {
  const int64_t e = w.element_count();
  const int64_t rows = static_cast<int64_t>(x.element_count()) / e;
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* yp = y->typed_data();
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = xp + r * e;
    double sum = 0.0;
    for (int64_t i = 0; i < e; ++i) sum += static_cast<double>(xr[i] * xr[i]);
    const float mean = static_cast<float>(sum / static_cast<double>(e));
    const float scale = 1.0f / std::sqrt(mean + eps);
    for (int64_t i = 0; i < e; ++i) yp[r * e + i] = xr[i] * scale * wp[i];
  }
  return ffi::Error::Success();
}

ffi::Error RopeImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> pos,
                    ffi::Buffer<ffi::F32> factors, ffi::ResultBuffer<ffi::F32> y, float base) {
  const auto dims = x.dimensions();
  if (dims.size() < 3) return ffi::Error::InvalidArgument("JaxllmGgmlRope: x needs [B, T, .., D]");
  const int64_t dh = dims.back(), half = dh / 2;
  const int64_t tokens = static_cast<int64_t>(pos.element_count());
  const int64_t per_token = static_cast<int64_t>(x.element_count()) / tokens;
  const float theta_scale = powf(base, -2.0f / static_cast<float>(dh));
  const float* ff = factors.element_count() != 0 ? factors.typed_data() : nullptr;
  std::vector<float> cs(dh);
  for (int64_t t = 0; t < tokens; ++t) {
    float theta = static_cast<float>(pos.typed_data()[t]);
    for (int64_t i = 0; i < half; ++i) {
      const float angle = ff != nullptr ? theta / ff[i] : theta;  // GGUF's rope_freqs
      cs[2 * i] = cosf(angle);
      cs[2 * i + 1] = sinf(angle);
      theta *= theta_scale;
    }
    for (int64_t h = 0; h < per_token / dh; ++h) {
      const float* xr = x.typed_data() + t * per_token + h * dh;
      float* yr = y->typed_data() + t * per_token + h * dh;
      for (int64_t i = 0; i < half; ++i) {
        const float c = cs[2 * i], s = cs[2 * i + 1];
        const float x0 = xr[i], x1 = xr[i + half];
        // rotate_pairs in ops.cpp, as GCC contracts it (-ffp-contract=fast for C++)
        yr[i] = std::fma(x0, c, -(x1 * s));
        yr[i + half] = std::fma(x0, s, x1 * c);
      }
    }
  }
  return ffi::Error::Success();
}

ffi::Error SwigluImpl(ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> u,
                      ffi::ResultBuffer<ffi::F32> y) {
  const int64_t m = g.dimensions().back();
  const int64_t rows = static_cast<int64_t>(g.element_count()) / m;
  const int64_t vec_end = m - m % kExpLanes;  // ggml_vec_swiglu_f32's scalar tail uses expf
  for (int64_t r = 0; r < rows; ++r) {
    const float* gr = g.typed_data() + r * m;
    const float* ur = u.typed_data() + r * m;
    float* yr = y->typed_data() + r * m;
    for (int64_t i = 0; i < vec_end; ++i) yr[i] = VSilu(gr[i]) * ur[i];
    for (int64_t i = vec_end; i < m; ++i) yr[i] = gr[i] / (1.0f + expf(-gr[i])) * ur[i];
  }
  return ffi::Error::Success();
}

// ---- attention -----------------------------------------------------------------------------

// A float16 dot product over n values (already float16-rounded, widened).
// tinyBLAS (ggml's product for more than one query row, when n % kF16Lanes == 0): one
// accumulator of kF16Lanes, reduced as GCC's _mm512_reduce_add_ps / tinyBLAS's hsum.
// ggml_vec_dot_f16 (otherwise): four accumulators, chunk c into accumulator c % 4 over the
// first n - n % (4 * kF16Lanes) values, reduced as GGML_F32xN_REDUCE; the rest added as
// float products to a double.
float DotF16(const float* a, const float* b, int64_t n, bool tiny) {
  constexpr int L = kF16Lanes;
  float acc[4][16] = {};
  if (tiny) {
    for (int64_t c = 0; c < n / L; ++c) {
      for (int l = 0; l < L; ++l) acc[0][l] = std::fma(a[c * L + l], b[c * L + l], acc[0][l]);
    }
    return L == 16 ? Reduce16(acc[0]) : Hsum8(acc[0]);
  }
  const int64_t np = n - n % (4 * L);
  for (int64_t c = 0; c < np / L; ++c) {
    float* ac = acc[c % 4];
    for (int l = 0; l < L; ++l) ac[l] = std::fma(a[c * L + l], b[c * L + l], ac[l]);
  }
  for (int l = 0; l < L; ++l) acc[0][l] = (acc[0][l] + acc[2][l]) + (acc[1][l] + acc[3][l]);
  double sum = L == 16 ? Reduce16(acc[0]) : HaddReduce8(acc[0]);
  for (int64_t i = np; i < n; ++i) sum += static_cast<double>(a[i] * b[i]);
  return static_cast<float>(sum);
}

ffi::Error AttentionImpl(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F16> k,
                         ffi::Buffer<ffi::F16> v, ffi::Buffer<ffi::U8> mask,
                         ffi::ResultBuffer<ffi::F32> out, float scale, int32_t interleaved) {
  const auto qd = q.dimensions();
  const auto kd = k.dimensions();
  if (kF16Lanes == 0 || qd.size() != 5 || kd.size() != 4) {
    return ffi::Error::InvalidArgument("JaxllmGgmlAttention: q [B,T,K,G,D], k/v [B,K,S,D]");
  }
  const int64_t bsz = qd[0], t = qd[1], kh = qd[2], g = qd[3], dh = qd[4], s = kd[2];
  const int64_t half = dh / 2;
  const auto* kp = reinterpret_cast<const uint16_t*>(k.typed_data());
  const auto* vp = reinterpret_cast<const uint16_t*>(v.typed_data());
  const uint8_t* mp = mask.typed_data();
  float* op = out->typed_data();
  // GGUF's order of a head's dims: j = 2i + e is rotate-half dim e * D/2 + i.
  std::vector<int64_t> order(dh);
  for (int64_t j = 0; j < dh; ++j) order[j] = interleaved ? (j & 1) * half + (j >> 1) : j;
  const int64_t padded = (s + 63) / 64 * 64 + 128;  // room for the padding to 4 vectors
  std::vector<float> q16(dh), w(padded), p(padded);
  // One batch item's K in GGUF's dim order [K, S, D] and V transposed [K, D, S + 128] (zeros
  // past S: ggml's padded keys), widened once instead of once per query row and head.
  const int64_t vs = s + 128;
  std::vector<float> kc(kh * s * dh), vt(kh * dh * vs, 0.0f);
  std::vector<int64_t> first_of(t), last_of(t);
  for (int64_t b = 0; b < bsz; ++b) {
    for (int64_t kv = 0; kv < kh; ++kv) {
      for (int64_t slot = 0; slot < s; ++slot) {
        const uint16_t* kr = kp + ((b * kh + kv) * s + slot) * dh;
        const uint16_t* vr = vp + ((b * kh + kv) * s + slot) * dh;
        for (int64_t j = 0; j < dh; ++j) {
          kc[(kv * s + slot) * dh + j] = F16ToF32(kr[order[j]]);
          vt[(kv * dh + j) * vs + slot] = F16ToF32(vr[j]);
        }
      }
    }
    // Each row's first and last unmasked slot (-1: a padding row). Keys past the last hold
    // probability 0, so the row's sums stop there, as they would at ggml's padded n_kv.
    int64_t real_rows = 0;
    for (int64_t i = 0; i < t; ++i) {
      const uint8_t* mrow = mp + (b * t + i) * s;
      first_of[i] = last_of[i] = -1;
      for (int64_t j = 0; j < s; ++j) {
        if (mrow[j]) {
          if (first_of[i] < 0) first_of[i] = j;
          last_of[i] = j;
        }
      }
      real_rows += first_of[i] >= 0;
    }
    // ggml_mul_mat takes tinyBLAS for a batch of more than one row, if the shapes suit it:
    // K.Q needs D % kF16Lanes == 0, the value product D % 4 == 0 (n_kv, a multiple of 256,
    // always suits).
    const bool tiny_kq = real_rows > 1 && dh % kF16Lanes == 0;
    const bool tiny_kqv = real_rows > 1 && dh % 4 == 0;
    for (int64_t i = 0; i < t; ++i) {
      const uint8_t* mrow = mp + (b * t + i) * s;
      const int64_t first = first_of[i];
      for (int64_t h = 0; h < kh * g; ++h) {
        float* o = op + (((b * t + i) * kh * g) + h) * dh;
        if (first < 0) {  // a padding row: nothing to attend to
          std::fill(o, o + dh, 0.0f);
          continue;
        }
        const int64_t kv = h / g;
        const float* qr = q.typed_data() + (((b * t + i) * kh * g) + h) * dh;
        for (int64_t j = 0; j < dh; ++j) q16[j] = RoundF16(qr[order[j]]);
        const int64_t n = last_of[i] - first + 1;  // key positions 0 .. n-1
        const int64_t len = (n + kExpLanes - 1) / kExpLanes * kExpLanes;
        float mx = -INFINITY;
        for (int64_t pos = 0; pos < len; ++pos) {
          if (pos >= n || !mrow[first + pos]) {
            w[pos] = -INFINITY;
            continue;
          }
          const float* kr = kc.data() + (kv * s + first + pos) * dh;
          w[pos] = DotF16(kr, q16.data(), dh, tiny_kq) * scale;
          mx = std::fmax(mx, w[pos]);
        }
        double sum = 0.0;
        for (int64_t c = 0; c < len; c += kExpLanes) {
          for (int l = 0; l < kExpLanes; ++l) p[c + l] = VExp(w[c + l] - mx);
          const float* pc = p.data() + c;
          sum += static_cast<double>(kExpLanes == 16 ? Reduce16(pc) : Hsum8(pc));
        }
        const float inv = static_cast<float>(1.0 / sum);
        // positions past the last key hold probability 0, as ggml's padded n_kv do
        const int64_t step = tiny_kqv ? kF16Lanes : 4 * kF16Lanes;
        const int64_t vlen = (len + step - 1) / step * step;
        for (int64_t pos = 0; pos < vlen; ++pos) p[pos] = pos < len ? RoundF16(p[pos] * inv) : 0;
        for (int64_t dd = 0; dd < dh; ++dd) {
          o[dd] = DotF16(vt.data() + (kv * dh + dd) * vs + first, p.data(), vlen, tiny_kqv);
        }
      }
    }
  }
  return ffi::Error::Success();
}

}  // namespace

// The vector width this build emulates (16: AVX512, 8: AVX2), 0 where ggml's paths differ.
extern "C" int JaxllmGgmlLanes() {
  return kExpLanes == 0 || kF16Lanes == 0 ? 0 : kExpLanes * 100 + kF16Lanes;
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxllmGgmlBlockDot, BlockDotImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("kind"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxllmGgmlRmsNorm, RmsNormImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("eps"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxllmGgmlRope, RopeImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("base"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxllmGgmlSwiglu, SwigluImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxllmGgmlAttention, AttentionImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<int32_t>("interleaved"));
