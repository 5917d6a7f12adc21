// int8 x int8 products with many rows, for w8a8 on XLA:CPU (declared in int8_gemm.h).
//
// XLA:CPU's int8 dot runs far below the float32 rate, and qmatvec.cc's few-row kernels reduce
// each output across the lanes of a vector, which costs as much as the products once the
// rows no longer fit its register block. Here each vector lane is an output column instead:
// W is repacked per call, 32 columns at a time, into a panel [K/4][32][4 bytes] (4
// consecutive inputs of one column per 32-bit lane), and vpdpbusd multiplies one panel step
// by a row's 4 activation codes broadcast to every lane. A block of 6 rows x 32 columns keeps
// 12 accumulators in registers; the panel is reused by every row block, so repacking costs
// 1/M of the products.
//
// vpdpbusd multiplies unsigned by signed bytes: the activation codes go in offset by 128 (a
// flip of the sign bits of the 4 broadcast bytes) and 128 * sum(w) per column, summed while
// packing, comes off.

#include "int8_gemm.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "pool.h"

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>

namespace {

constexpr int kCols = 32;  // columns per panel: two vectors of 16 int32 lanes
constexpr int kRows = 6;   // rows per register block: 12 integer (+ 12 float) accumulators
constexpr int64_t kMinParallelMacs = 1 << 20;

// r[i] = dwords of row i -> r[j] = dword j of rows 0..15 (a 16 x 16 transpose of dwords).
inline void Transpose16(__m512i r[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  // u[4q + j], 128-bit lane L: dword 4L + j of rows 4q..4q+3.
  for (int q = 0; q < 4; ++q) {
    u[4 * q + 0] = _mm512_unpacklo_epi64(t[4 * q], t[4 * q + 2]);
    u[4 * q + 1] = _mm512_unpackhi_epi64(t[4 * q], t[4 * q + 2]);
    u[4 * q + 2] = _mm512_unpacklo_epi64(t[4 * q + 1], t[4 * q + 3]);
    u[4 * q + 3] = _mm512_unpackhi_epi64(t[4 * q + 1], t[4 * q + 3]);
  }
  for (int j = 0; j < 4; ++j) {
    const __m512i a = _mm512_shuffle_i32x4(u[j], u[4 + j], 0x88);  // lanes 0, 2 of each
    const __m512i b = _mm512_shuffle_i32x4(u[j], u[4 + j], 0xDD);  // lanes 1, 3 of each
    const __m512i c = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0x88);
    const __m512i d = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0xDD);
    r[j] = _mm512_shuffle_i32x4(a, c, 0x88);
    r[8 + j] = _mm512_shuffle_i32x4(a, c, 0xDD);
    r[4 + j] = _mm512_shuffle_i32x4(b, d, 0x88);
    r[12 + j] = _mm512_shuffle_i32x4(b, d, 0xDD);
  }
}

struct Gemm {
  const int8_t* x;    // activation codes [M, K]
  const float* xs;    // [M, groups]
  const int8_t* w;    // [N, K]
  float* y;           // [M, N]
  int64_t m, k, n, groups;
  const float* colscale;  // [N] or null: y's columns multiplied by it (one more rounding)
  const uint8_t* xu = nullptr;  // x + 128 (sign bits flipped), [M, K]: vpdpbusd's operand
};

// Columns n0..n0+31 of W (zeros past N) into panel [K/4][32] dwords, and 128 * the sum of
// each column's codes in every group into wsum [groups][32].
void Pack(const Gemm& g, int64_t n0, uint8_t* panel, int32_t* wsum) {
  const int64_t k = g.k;
  for (int half = 0; half < 2; ++half) {
    const int64_t c0 = n0 + 16 * half;
    int64_t i = 0;
    for (; i + 64 <= k; i += 64) {
      __m512i r[16];
      for (int c = 0; c < 16; ++c) {
        r[c] = c0 + c < g.n ? _mm512_loadu_si512(g.w + (c0 + c) * k + i) : _mm512_setzero_si512();
      }
      Transpose16(r);
      for (int j = 0; j < 16; ++j) {
        _mm512_storeu_si512(panel + ((i / 4 + j) * kCols + 16 * half) * 4, r[j]);
      }
    }
    for (; i < k; i += 4) {
      for (int c = 0; c < 16; ++c) {
        int32_t v = 0;
        if (c0 + c < g.n) std::memcpy(&v, g.w + (c0 + c) * k + i, 4);
        std::memcpy(panel + ((i / 4) * kCols + 16 * half + c) * 4, &v, 4);
      }
    }
  }
  const int64_t steps = k / 4 / g.groups;
  const __m512i ones = _mm512_set1_epi8(1);
  for (int64_t gi = 0; gi < g.groups; ++gi) {
    __m512i s0 = _mm512_setzero_si512(), s1 = _mm512_setzero_si512();
    for (int64_t s = gi * steps; s < (gi + 1) * steps; ++s) {
      s0 = _mm512_dpbusd_epi32(s0, ones, _mm512_loadu_si512(panel + s * kCols * 4));
      s1 = _mm512_dpbusd_epi32(s1, ones, _mm512_loadu_si512(panel + s * kCols * 4 + 64));
    }
    _mm512_storeu_si512(wsum + gi * kCols, _mm512_slli_epi32(s0, 7));
    _mm512_storeu_si512(wsum + gi * kCols + 16, _mm512_slli_epi32(s1, 7));
  }
}

// Rows m0..m0+R-1 times one packed panel (columns n0..), written to y.
template <int R>
void Block(const Gemm& g, const uint8_t* panel, const int32_t* wsum, int64_t n0, int64_t m0) {
  const int64_t k = g.k, steps = k / 4 / g.groups;
  __m512i acc[R][2];
  __m512 facc[R][2];
  for (int r = 0; r < R; ++r) facc[r][0] = facc[r][1] = _mm512_setzero_ps();
  for (int64_t gi = 0; gi < g.groups; ++gi) {
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_si512();
    const uint8_t* p = panel + gi * steps * kCols * 4;
    const uint8_t* x = g.xu + m0 * k + gi * steps * 4;
    for (int64_t s = 0; s < steps; ++s) {
      const __m512i w0 = _mm512_loadu_si512(p + s * kCols * 4);
      const __m512i w1 = _mm512_loadu_si512(p + s * kCols * 4 + 64);
      for (int r = 0; r < R; ++r) {
        int32_t v;
        std::memcpy(&v, x + r * k + 4 * s, 4);
        const __m512i b = _mm512_set1_epi32(v);  // 4 codes + 128, one broadcast load
        acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], b, w0);
        acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], b, w1);
      }
    }
    const __m512i c0 = _mm512_loadu_si512(wsum + gi * kCols);
    const __m512i c1 = _mm512_loadu_si512(wsum + gi * kCols + 16);
    for (int r = 0; r < R; ++r) {
      const __m512 sc = _mm512_set1_ps(g.xs[(m0 + r) * g.groups + gi]);
      const __m512i exact0 = _mm512_sub_epi32(acc[r][0], c0);
      const __m512i exact1 = _mm512_sub_epi32(acc[r][1], c1);
      facc[r][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(exact0), sc, facc[r][0]);
      facc[r][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(exact1), sc, facc[r][1]);
    }
  }
  const int64_t cols = std::min<int64_t>(kCols, g.n - n0);
  const __mmask16 m0mask = cols >= 16 ? 0xFFFF : (1u << cols) - 1;
  const __mmask16 m1mask = cols >= 32 ? 0xFFFF : cols <= 16 ? 0 : (1u << (cols - 16)) - 1;
  if (g.colscale != nullptr) {
    const __m512 c0 = _mm512_maskz_loadu_ps(m0mask, g.colscale + n0);
    const __m512 c1 = _mm512_maskz_loadu_ps(m1mask, g.colscale + n0 + 16);
    for (int r = 0; r < R; ++r) {
      facc[r][0] = _mm512_mul_ps(facc[r][0], c0);
      facc[r][1] = _mm512_mul_ps(facc[r][1], c1);
    }
  }
  for (int r = 0; r < R; ++r) {
    float* y = g.y + (m0 + r) * g.n + n0;
    _mm512_mask_storeu_ps(y, m0mask, facc[r][0]);
    _mm512_mask_storeu_ps(y + 16, m1mask, facc[r][1]);
  }
}

// Panels p0..p1 (32 columns each) for every row.
void Panels(const Gemm& g, int64_t p0, int64_t p1) {
  thread_local std::vector<uint8_t> panel;
  thread_local std::vector<int32_t> wsum;
  panel.resize(g.k * kCols);
  wsum.resize(g.groups * kCols);
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t n0 = p * kCols;
    Pack(g, n0, panel.data(), wsum.data());
    int64_t m0 = 0;
    for (; m0 + kRows <= g.m; m0 += kRows) Block<kRows>(g, panel.data(), wsum.data(), n0, m0);
    switch (g.m - m0) {
      case 5: Block<5>(g, panel.data(), wsum.data(), n0, m0); break;
      case 4: Block<4>(g, panel.data(), wsum.data(), n0, m0); break;
      case 3: Block<3>(g, panel.data(), wsum.data(), n0, m0); break;
      case 2: Block<2>(g, panel.data(), wsum.data(), n0, m0); break;
      case 1: Block<1>(g, panel.data(), wsum.data(), n0, m0); break;
      default: break;
    }
  }
}

bool Run(Gemm g) {
  if (g.k % 4 != 0 || g.groups <= 0 || g.k % g.groups != 0 || (g.k / g.groups) % 4 != 0) {
    return false;
  }
  // The activation codes offset by 128 once per call, not at each of the K / 4 broadcasts of
  // every panel (a scalar xor and a move to a vector register each: ~10% of the GEMM).
  thread_local std::vector<uint8_t> shifted;  // the calling thread's; the workers read it
  const int64_t size = g.m * g.k;
  shifted.resize(size);
  int64_t i = 0;
  for (; i + 64 <= size; i += 64) {
    const __m512i v = _mm512_loadu_si512(g.x + i);
    _mm512_storeu_si512(shifted.data() + i, _mm512_xor_si512(v, _mm512_set1_epi8(-128)));
  }
  for (; i < size; ++i) shifted[i] = static_cast<uint8_t>(g.x[i]) ^ 0x80u;
  g.xu = shifted.data();
  const int64_t panels = (g.n + kCols - 1) / kCols;
  if (g.m * g.n * g.k < kMinParallelMacs) {
    Panels(g, 0, panels);
    return true;
  }
  const JaxllmPool::Task task = [&g, panels](int share, int shares) {
    Panels(g, panels * share / shares, panels * (share + 1) / shares);
  };
  JaxllmGetPool().Run(task);
  return true;
}

}  // namespace

bool JaxllmInt8GroupGemm(const int8_t* x, const float* xs, const int8_t* w, float* y, int64_t m,
                         int64_t k, int64_t n, int64_t groups, const float* colscale) {
  return Run(Gemm{x, xs, w, y, m, k, n, groups, colscale});
}

#else  // no AVX512-VNNI: the callers keep their own kernels

bool JaxllmInt8GroupGemm(const int8_t*, const float*, const int8_t*, float*, int64_t, int64_t,
                         int64_t, int64_t, const float*) {
  return false;
}

#endif
