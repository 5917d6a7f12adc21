// Few-row products with quantized weight matrices, for XLA:CPU through the XLA FFI.
//
//   JaxllmQMatVec8: y[R, N] = x[R, K] @ dq(W)^T, W int8 [N, K], scale f32 [N, G]
//   JaxllmQMatVec4: the same with W packed int4 [N, K/2] (jaxllm.quant.qtensor's layout:
//                   in each group, byte j holds input j low and input j + group/2 high),
//                   scale f32 [N, G], offset f32 [N, G] (asymmetric) or empty (codes - 8),
//                   and the per-group sums of x, xsum f32 [R, G]
//   JaxllmW8A8Dot:  y[R, N] = sum over groups g of xs[R, g] * (x_g @ W_g^T), float32: w8a8.
//                   x float32 [R, K] is quantized here per row per group (attribute
//                   `groups`; 1: per row) to int8 codes x_g with scales xs, W int8 [N, K];
//                   each group's integer product is exact. Then y's columns times
//                   scale f32 [N] (the weights' per-channel scales), unless it is empty.
//                   valid_rows s32 [1] (or empty): only that many leading rows are
//                   computed, the rest of y is zero (a step's padding rows)
//
// G groups of K / G inputs share a scale. XLA:CPU converts quantized weights to float before
// a dot, so a batch-1 step would read each weight once as codes and twice more as floats;
// here the codes are read once, widened in registers, and scaled once per group. The rows
// of W are split across the threads of the pool in pool.h, as in matvec.cc.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "int8_gemm.h"
#include "pool.h"
#include "w8a8.h"
#include "vec.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kMinParallelElements = 1 << 16;
// From this many rows the int8 x int8 products take int8_gemm.cc's column-panel kernel.
constexpr int64_t kGemmRows = 4;

// kLanes bytes -> their kLanes low and kLanes high nibbles as floats (int8 codes: vec.h's
// LoadS8). GCC scalarises a generic vector conversion from bytes, so x86 gets the widening
// instructions by name.
#if defined(__AVX512F__)
inline Vec FromInts(__m512i v) { return (Vec)_mm512_cvtepi32_ps(v); }
// Low and high nibbles of 16 bytes.
inline void WidenNibbles(const uint8_t* p, Vec* lo, Vec* hi) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i mask = _mm_set1_epi8(15);
  *lo = FromInts(_mm512_cvtepu8_epi32(_mm_and_si128(b, mask)));
  *hi = FromInts(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(b, 4), mask)));
}
#elif defined(__AVX2__)
inline Vec FromInts(__m256i v) { return (Vec)_mm256_cvtepi32_ps(v); }
inline void WidenNibbles(const uint8_t* p, Vec* lo, Vec* hi) {
  const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  const __m128i mask = _mm_set1_epi8(15);
  *lo = FromInts(_mm256_cvtepu8_epi32(_mm_and_si128(b, mask)));
  *hi = FromInts(_mm256_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(b, 4), mask)));
}
#else
inline void WidenNibbles(const uint8_t* p, Vec* lo, Vec* hi) {
  for (int64_t i = 0; i < kLanes; ++i) {
    (*lo)[i] = static_cast<float>(p[i] & 15);
    (*hi)[i] = static_cast<float>(p[i] >> 4);
  }
}
#endif

struct Job {
  const float* x;
  const void* w;
  const float* scale;
  const float* offset;  // nullptr: symmetric int4 (codes - 8)
  const float* xsum;
  float* y;
  int64_t rows, k, n, groups;
};

// The kernels widen each run of codes once and use it for a block of up to kRowBlock rows,
// each with its own vector accumulator (a decode step of 16 sequences would otherwise widen
// every code 16 times, and the widening, not the multiply, bounds the loop). Group scales are
// folded into the widened codes; per-row sums are reduced across lanes once per output.
constexpr int kRowBlock = 8;

// Below kChains rows each row keeps kChains / RB accumulators, taking consecutive vectors in
// turn: with one, every multiply-add waited for the previous one's result, and a one-row
// step widened codes at two thirds of the rate it does with four (measured on AVX2).
constexpr int kChains = 4;

template <int RB>
void Block8Chains(const Job& job, int64_t j, int64_t r0) {
  constexpr int U = kChains / RB;
  const int64_t g = job.k / job.groups;
  const int8_t* wj = static_cast<const int8_t*>(job.w) + j * job.k;
  const float* sj = job.scale + j * job.groups;
  const float* x0 = job.x + r0 * job.k;
  Vec acc[U][RB] = {};
  for (int64_t gi = 0; gi < job.groups; ++gi) {
    const Vec s = Vec{} + sj[gi];
    const int64_t end = (gi + 1) * g;
    int64_t i = gi * g;
    for (; i + U * kLanes <= end; i += U * kLanes) {
      for (int u = 0; u < U; ++u) {
        const Vec w = LoadS8(wj + i + u * kLanes) * s;
        for (int r = 0; r < RB; ++r) acc[u][r] += Load(x0 + r * job.k + i + u * kLanes) * w;
      }
    }
    for (; i < end; i += kLanes) {
      const Vec w = LoadS8(wj + i) * s;
      for (int r = 0; r < RB; ++r) acc[0][r] += Load(x0 + r * job.k + i) * w;
    }
  }
  for (int r = 0; r < RB; ++r) {
    Vec t = acc[0][r];
    for (int u = 1; u < U; ++u) t += acc[u][r];
    job.y[(r0 + r) * job.n + j] = Sum(t);
  }
}

template <int RB>
void Block8(const Job& job, int64_t j, int64_t r0) {
  if constexpr (RB < kChains) {
    Block8Chains<RB>(job, j, r0);
    return;
  }
  const int64_t g = job.k / job.groups;
  const int8_t* wj = static_cast<const int8_t*>(job.w) + j * job.k;
  const float* sj = job.scale + j * job.groups;
  const float* x0 = job.x + r0 * job.k;
  Vec acc[RB] = {};
  for (int64_t gi = 0; gi < job.groups; ++gi) {
    const Vec s = Vec{} + sj[gi];
    for (int64_t i = gi * g; i < (gi + 1) * g; i += kLanes) {
      const Vec w = LoadS8(wj + i) * s;
      for (int r = 0; r < RB; ++r) acc[r] += Load(x0 + r * job.k + i) * w;
    }
  }
  for (int r = 0; r < RB; ++r) job.y[(r0 + r) * job.n + j] = Sum(acc[r]);
}

template <int RB>
void Block4(const Job& job, int64_t j, int64_t r0) {
  const int64_t g = job.k / job.groups, half = g / 2;
  const uint8_t* wj = static_cast<const uint8_t*>(job.w) + j * (job.k / 2);
  const float* sj = job.scale + j * job.groups;
  const float* oj = job.offset ? job.offset + j * job.groups : nullptr;
  const float* x0 = job.x + r0 * job.k;
  Vec acc[RB] = {};
  for (int64_t gi = 0; gi < job.groups; ++gi) {
    const Vec s = Vec{} + sj[gi];
    const uint8_t* b = wj + gi * half;
    for (int64_t h = 0; h < half; h += kLanes) {
      Vec lo, hi;
      WidenNibbles(b + h, &lo, &hi);
      lo *= s;
      hi *= s;
      const float* xg = x0 + gi * g + h;
      for (int r = 0; r < RB; ++r) {
        acc[r] += Load(xg + r * job.k) * lo + Load(xg + r * job.k + half) * hi;
      }
    }
  }
  // The offset per group times the group's x sum: + offset (asymmetric) or - 8 scale.
  for (int r = 0; r < RB; ++r) {
    const float* xs = job.xsum + (r0 + r) * job.groups;
    float t = Sum(acc[r]);
    for (int64_t gi = 0; gi < job.groups; ++gi) t += (oj ? oj[gi] : -8.0f * sj[gi]) * xs[gi];
    job.y[(r0 + r) * job.n + j] = t;
  }
}

// Output rows j0..j1 of `job`, the input rows in blocks of 8, 4, 2 and 1:
// block(std::integral_constant<int, RB>, j, r0) does RB rows from r0.
template <typename J, typename Block>
void BlockedRows(const J& job, int64_t j0, int64_t j1, Block block) {
  for (int64_t j = j0; j < j1; ++j) {
    int64_t r = 0;
    for (; r + kRowBlock <= job.rows; r += kRowBlock) {
      block(std::integral_constant<int, kRowBlock>{}, j, r);
    }
    if (r + 4 <= job.rows) block(std::integral_constant<int, 4>{}, j, r), r += 4;
    if (r + 2 <= job.rows) block(std::integral_constant<int, 2>{}, j, r), r += 2;
    if (r < job.rows) block(std::integral_constant<int, 1>{}, j, r);
  }
}

void Rows8(const Job& job, int64_t j0, int64_t j1) {
  BlockedRows(job, j0, j1, [&job](auto rb, int64_t j, int64_t r) {
    Block8<decltype(rb)::value>(job, j, r);
  });
}

void Rows4(const Job& job, int64_t j0, int64_t j1) {
  BlockedRows(job, j0, j1, [&job](auto rb, int64_t j, int64_t r) {
    Block4<decltype(rb)::value>(job, j, r);
  });
}

// AVX512-VNNI's vpdpbusd multiplies unsigned by signed bytes, so the activation codes go in
// offset by 128 (a flip of the sign bit) and 128 * sum(w) comes off.
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// One 64-byte run of W (w) against the same run of RB activation rows (x, rows k apart):
// acc[r] += (x_r + 128) . w per lane, wsum += sum(w) per lane.
template <int RB>
inline void DotChunk(const int8_t* w, const int8_t* x, int64_t k, __m512i* acc, __m512i* wsum) {
  const __m512i wv = _mm512_loadu_si512(w);
  *wsum = _mm512_dpbusd_epi32(*wsum, _mm512_set1_epi8(1), wv);
  for (int r = 0; r < RB; ++r) {
    const __m512i xu = _mm512_xor_si512(_mm512_loadu_si512(x + r * k), _mm512_set1_epi8(-128));
    acc[r] = _mm512_dpbusd_epi32(acc[r], xu, wv);
  }
}
#endif

#if defined(__AVX2__) && !(defined(__AVX512VNNI__) && defined(__AVX512BW__))
// AVX2's vpmaddubsw multiplies unsigned by signed bytes into saturating int16 pair sums, so
// the signs move onto the activations: |w| * (x * sign(w)). Activation codes within
// [-127, 127] (QuantizeRows clips them; x * sign(w) cannot wrap) and weight codes within
// [-128, 127] keep each pair sum within 2 * 128 * 127 < 2^15: exact.
// acc[r] += x_r . w per int32 lane for one 32-byte run of W against RB activation rows.
template <int RB>
inline void DotChunk32(const int8_t* w, const int8_t* x, int64_t k, __m256i* acc) {
  const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  const __m256i wabs = _mm256_sign_epi8(wv, wv);
  const __m256i ones = _mm256_set1_epi16(1);
  for (int r = 0; r < RB; ++r) {
    const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + r * k));
    const __m256i pairs = _mm256_maddubs_epi16(wabs, _mm256_sign_epi8(xv, wv));
    acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(pairs, ones));
  }
}

inline int32_t SumInts(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}
#endif

// Per-group activation scales: each group's exact int32 product is converted to float and
// added times its scale, groups in order with one rounding each (std::fma): the same float
// operations as int8_gemm.cc's per column, so a row's result does not depend on how many rows
// share the call (groups of a multiple of 64 inputs; others take the scalar loop).
struct GroupDotJob {
  const int8_t* x;
  const float* xs;
  const int8_t* w;
  float* y;
  int64_t rows, k, n, groups;
  const float* colscale;  // [N] or null
};

template <int RB>
void GroupDotBlock(const GroupDotJob& job, int64_t j, int64_t r0) {
  const int64_t k = job.k, g = k / job.groups;
  const int8_t* wj = job.w + j * k;
  const int8_t* x0 = job.x + r0 * k;
  const float* s0 = job.xs + r0 * job.groups;
  float out[RB] = {};
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  if (g % 64 == 0) {
    for (int64_t gi = 0; gi < job.groups; ++gi) {
      __m512i lanes[RB];
      for (int r = 0; r < RB; ++r) lanes[r] = _mm512_setzero_si512();
      __m512i wsum = _mm512_setzero_si512();
      for (int64_t i = gi * g; i < (gi + 1) * g; i += 64) {
        DotChunk<RB>(wj + i, x0 + i, k, lanes, &wsum);
      }
      const int32_t offset = 128 * _mm512_reduce_add_epi32(wsum);
      for (int r = 0; r < RB; ++r) {
        const float exact = static_cast<float>(_mm512_reduce_add_epi32(lanes[r]) - offset);
        out[r] = std::fma(exact, s0[r * job.groups + gi], out[r]);
      }
    }
    const float c = job.colscale != nullptr ? job.colscale[j] : 1.0f;
    for (int r = 0; r < RB; ++r) job.y[(r0 + r) * job.n + j] = out[r] * c;
    return;
  }
#elif defined(__AVX2__)
  if (g % 32 == 0) {
    for (int64_t gi = 0; gi < job.groups; ++gi) {
      __m256i lanes[RB];
      for (int r = 0; r < RB; ++r) lanes[r] = _mm256_setzero_si256();
      for (int64_t i = gi * g; i < (gi + 1) * g; i += 32) {
        DotChunk32<RB>(wj + i, x0 + i, k, lanes);
      }
      for (int r = 0; r < RB; ++r) {
        const float exact = static_cast<float>(SumInts(lanes[r]));
        out[r] = std::fma(exact, s0[r * job.groups + gi], out[r]);
      }
    }
    const float c = job.colscale != nullptr ? job.colscale[j] : 1.0f;
    for (int r = 0; r < RB; ++r) job.y[(r0 + r) * job.n + j] = out[r] * c;
    return;
  }
#endif
  for (int64_t gi = 0; gi < job.groups; ++gi) {
    for (int r = 0; r < RB; ++r) {
      int32_t dot = 0;
      for (int64_t i = gi * g; i < (gi + 1) * g; ++i) {
        dot += static_cast<int32_t>(x0[r * k + i]) * static_cast<int32_t>(wj[i]);
      }
      out[r] = std::fma(static_cast<float>(dot), s0[r * job.groups + gi], out[r]);
    }
  }
  const float c = job.colscale != nullptr ? job.colscale[j] : 1.0f;
  for (int r = 0; r < RB; ++r) job.y[(r0 + r) * job.n + j] = out[r] * c;
}

void GroupDotRows(const GroupDotJob& job, int64_t j0, int64_t j1) {
  BlockedRows(job, j0, j1, [&job](auto rb, int64_t j, int64_t r) {
    GroupDotBlock<decltype(rb)::value>(job, j, r);
  });
}

// Output rows split across the pool's threads (one thread for small products).
template <typename J>
void Run(const J& job, void (*rows)(const J&, int64_t, int64_t)) {
  if (job.n * job.k < kMinParallelElements) {
    rows(job, 0, job.n);
    return;
  }
  const JaxllmPool::Task task = [&job, rows](int share, int shares) {
    rows(job, job.n * share / shares, job.n * (share + 1) / shares);
  };
  JaxllmGetPool().Run(task);
}

ffi::Error Check(int64_t k, int64_t groups, int64_t multiple) {
  if (groups <= 0 || k % groups != 0 || (k / groups) % multiple != 0) {
    return ffi::Error::InvalidArgument("JaxllmQMatVec: group size must divide K by 16s");
  }
  return ffi::Error::Success();
}

ffi::Error QMatVec8(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w, ffi::Buffer<ffi::F32> scale,
                    ffi::ResultBuffer<ffi::F32> y) {
  const int64_t n = w.dimensions()[0], k = w.dimensions()[1];
  const int64_t groups = scale.dimensions()[1];
  if (auto e = Check(k, groups, kLanes); e.failure()) return e;
  const int64_t rows = static_cast<int64_t>(x.element_count()) / k;
  Run(Job{x.typed_data(), w.typed_data(), scale.typed_data(), nullptr, nullptr, y->typed_data(),
          rows, k, n, groups},
      Rows8);
  return ffi::Error::Success();
}

ffi::Error QMatVec4(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> w, ffi::Buffer<ffi::F32> scale,
                    ffi::Buffer<ffi::F32> offset, ffi::Buffer<ffi::F32> xsum,
                    ffi::ResultBuffer<ffi::F32> y) {
  const int64_t n = w.dimensions()[0], k = 2 * w.dimensions()[1];
  const int64_t groups = scale.dimensions()[1];
  if (auto e = Check(k, groups, 2 * kLanes); e.failure()) return e;
  const int64_t rows = static_cast<int64_t>(x.element_count()) / k;
  const float* off = offset.element_count() ? offset.typed_data() : nullptr;
  Run(Job{x.typed_data(), w.typed_data(), scale.typed_data(), off, xsum.typed_data(),
          y->typed_data(), rows, k, n, groups},
      Rows4);
  return ffi::Error::Success();
}

// w8a8's dynamic activation codes, as jaxllm.quant.matmul.quantize_rows computes them per
// group of g inputs: scale = max|x| * (1/127) (1 for an all-zero group), codes = x / scale rounded
// half to even and clipped to [-127, 127]. Rows r0..r1 of x [rows, k].
void QuantizeRows(const float* x, int64_t k, int64_t groups, int8_t* q, float* s, int64_t r0,
                  int64_t r1) {
  const int64_t g = k / groups;
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t gi = 0; gi < groups; ++gi) {
      const float* xg = x + r * k + gi * g;
      int8_t* qg = q + r * k + gi * g;
      int64_t i = 0;
      float amax = 0.0f;
#if defined(__AVX512F__)
      if (g % 16 == 0) {
        __m512 m = _mm512_setzero_ps();
        for (; i < g; i += 16) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(xg + i)));
        amax = _mm512_reduce_max_ps(m);
      }
#endif
      for (; i < g; ++i) amax = std::max(amax, std::fabs(xg[i]));
      // amax times 1/127, not amax / 127: XLA rewrites the division by a constant so, and
      // 4.5% of scales differed from `quantize_rows`' by an ulp.
      const float scale = amax > 0.0f ? amax * (1.0f / 127.0f) : 1.0f;
      s[r * groups + gi] = scale;
      i = 0;
#if defined(__AVX512F__)
      if (g % 16 == 0) {
        const __m512 sv = _mm512_set1_ps(scale), lo = _mm512_set1_ps(-127.0f),
                     hi = _mm512_set1_ps(127.0f);
        for (; i < g; i += 16) {
          __m512 t = _mm512_div_ps(_mm512_loadu_ps(xg + i), sv);
          t = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
          t = _mm512_min_ps(_mm512_max_ps(t, lo), hi);
          _mm_storeu_si128(reinterpret_cast<__m128i*>(qg + i),
                           _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(t)));
        }
      }
#endif
      for (; i < g; ++i) {
        const float t = std::nearbyint(xg[i] / scale);
        qg[i] = static_cast<int8_t>(std::min(std::max(t, -127.0f), 127.0f));
      }
    }
  }
}

// y[R, N] = sum over groups of xs * (x_g @ w_g^T), x int8 codes: int8_gemm.cc from
// kGemmRows rows, the few-row kernel below that.
void GroupProduct(const int8_t* x, const float* xs, const int8_t* w, float* y, int64_t rows,
                  int64_t k, int64_t n, int64_t groups, const float* colscale) {
  if (rows >= kGemmRows && JaxllmInt8GroupGemm(x, xs, w, y, rows, k, n, groups, colscale)) {
    return;
  }
  Run(GroupDotJob{x, xs, w, y, rows, k, n, groups, colscale}, GroupDotRows);
}

ffi::Error W8A8Dot(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w, ffi::Buffer<ffi::F32> scale,
                   ffi::Buffer<ffi::S32> valid_rows, ffi::ResultBuffer<ffi::F32> y,
                   int64_t groups) {
  const int64_t n = w.dimensions()[0], k = w.dimensions()[1];
  const int64_t all_rows = static_cast<int64_t>(x.element_count()) / k;
  int64_t rows = all_rows;
  if (valid_rows.element_count() == 1) {  // rows past it are padding: zero, not computed
    rows = std::min<int64_t>(std::max<int64_t>(valid_rows.typed_data()[0], 0), all_rows);
    std::memset(y->typed_data() + rows * n, 0, static_cast<size_t>((all_rows - rows) * n) * 4);
  }
  if (groups <= 0 || k % groups != 0) {
    return ffi::Error::InvalidArgument("JaxllmW8A8Dot: groups must divide K");
  }
  const int64_t scales = static_cast<int64_t>(scale.element_count());
  if (scales != 0 && scales != n) {
    return ffi::Error::InvalidArgument("JaxllmW8A8Dot: scale [N] or empty");
  }
  // Per call, not per thread: XLA may run two of these at once on different threads.
  std::vector<int8_t> q(rows * k);
  std::vector<float> s(rows * groups);
  const float* xp = x.typed_data();
  if (rows * k < kMinParallelElements) {
    QuantizeRows(xp, k, groups, q.data(), s.data(), 0, rows);
  } else {
    const JaxllmPool::Task task = [&](int share, int shares) {
      QuantizeRows(xp, k, groups, q.data(), s.data(), rows * share / shares,
                   rows * (share + 1) / shares);
    };
    JaxllmGetPool().Run(task);
  }
  GroupProduct(q.data(), s.data(), w.typed_data(), y->typed_data(), rows, k, n, groups,
               scales != 0 ? scale.typed_data() : nullptr);
  return ffi::Error::Success();
}

}  // namespace

void JaxllmQuantizeRows(const float* x, int64_t k, int64_t groups, int8_t* q, float* s,
                        int64_t r0, int64_t r1) {
  QuantizeRows(x, k, groups, q, s, r0, r1);
}

void JaxllmW8A8Product(const int8_t* q, const float* s, const int8_t* w, float* y, int64_t rows,
                       int64_t k, int64_t n, int64_t groups, const float* colscale) {
  GroupProduct(q, s, w, y, rows, k, n, groups, colscale);
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxllmQMatVec8, QMatVec8,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxllmQMatVec4, QMatVec4,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxllmW8A8Dot, W8A8Dot,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("groups"));
