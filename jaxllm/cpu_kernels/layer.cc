// One decoder layer of a w8a8 Llama model over the engine's paged KV cache, in one XLA FFI
// call: the CPU engine's step runs 30 of these instead of ~15 small XLA ops and 5 kernel
// calls per layer.
//
//   JaxllmW8A8Layer(x [T, E], attn_norm [E], qkv [Nq, E] s8, qkv_scale [Nq],
//                   o [E, HD] s8, o_scale [E], mlp_norm [E], gate_up [2M, E] s8,
//                   gate_up_scale [2M], down [E, M] s8, down_scale [E], cos, sin [T, D/2],
//                   k_pages, v_pages [K, P, page, D], k_scales, v_scales [K, P, page] (int8
//                   pages; empty otherwise), slot_mapping [T], kv_lens [S],
//                   block_tables [S, maxp], cu_q_lens [S + 1], num_seqs [1];
//                   eps, sm_scale, group)
//     -> y [T, E], k_pages, v_pages, k_scales, v_scales (aliased to the inputs: written in
//        place)
//
// It computes what jaxllm.model.Block.paged computes with w8a8 QuantizedLinears (per-channel
// int8 weights, activations quantized per token per `group` inputs): RMSNorm, the fused QKV
// product (Nq = K * (G + 2) * D, each KV head's G queries then its key and value), RoPE,
// this step's keys and values written at their slots, the ragged paged attention
// (paged_attention.cc), the output product plus the residual, RMSNorm, SwiGLU and the down
// product plus the residual. The products are qmatvec.cc's (the same codes and the same
// float operations); the norms and SiLU are this file's, so results agree with the XLA
// graph to rounding, not bit for bit.
//
// Only the step's tokens are computed: rows from cu_q_lens[num_seqs] on (the bucket's
// padding) come out zero and write nothing. Pages are float32, float16, bfloat16 held as
// uint16 bits (jaxllm.quant.kv_bits) or int8 codes with a scale per token per KV head
// (jaxllm.quant.kv.QuantizedKV); slots outside the pool are dropped, as the XLA scatter drops
// them.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

#include "paged_attention.h"
#include "pool.h"
#include "vec.h"
#include "w8a8.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kMinParallelElements = 1 << 14;

typedef uint32_t UVec __attribute__((vector_size(kLanes * sizeof(uint32_t))));

struct Layer {
  const float *x, *attn_norm, *qkv_scale, *o_scale, *mlp_norm, *gu_scale, *down_scale;
  const float *cos, *sin;
  const int8_t *qkv, *o, *gu, *down;
  void *k_pages, *v_pages;
  float *k_scales, *v_scales;  // int8 pages: one scale per token per KV head
  JaxllmPageType type;
  const int32_t *slots, *kv_lens, *tables, *cu;
  float* y;
  int64_t t, n, e, kh, g, d, m, hd, nq, pages, page, maxp, num_seqs, group;
  float eps, sm_scale;
};

// Rows [0, n) split over the pool; one thread for little work.
template <typename F>
void ForRows(int64_t n, int64_t per_row, const F& f) {
  if (n <= 1 || n * per_row < kMinParallelElements) {
    f(0, n);
    return;
  }
  const JaxllmPool::Task task = [&](int share, int shares) {
    f(n * share / shares, n * (share + 1) / shares);
  };
  JaxllmGetPool().Run(task);
}

// out = w * (x * rsqrt(mean(x^2) + eps)), in the order of jaxllm.model.RMSNorm. e % kLanes == 0.
void NormRow(const float* x, const float* w, int64_t e, float eps, float* out) {
  Vec acc{};
  for (int64_t i = 0; i < e; i += kLanes) {
    const Vec v = Load(x + i);
    acc += v * v;
  }
  const float r = 1.0f / std::sqrt(Sum(acc) / static_cast<float>(e) + eps);
  for (int64_t i = 0; i < e; i += kLanes) {
    const Vec v = Load(w + i) * (Load(x + i) * r);
    std::memcpy(out + i, &v, sizeof(Vec));
  }
}


// exp of each lane over float32's whole range (relative error ~2e-7; below -87.3: 0 within
// float32's normal range, above 88.7: inf), for SiLU.
inline Vec ExpAll(Vec x) {
  const IVec high = x > 88.7f;
  x = Select(x < -87.3f, Vec{} - 87.3f, x);
  return Select(high, Vec{} + INFINITY, ExpInRange(Select(high, Vec{} + 88.0f, x)));
}

// Half-width page writes (kLanes floats at a time), rounded to nearest even.
inline uint16_t FloatToHalf(float f) {
#if defined(__F16C__) || defined(__AVX512F__)
  return static_cast<uint16_t>(_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT));
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);  // NaN
  if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds past 65504
  if (a < 0x38800000u) {  // subnormal half (or zero): round a * 2^24 to an integer
    float mag;
    std::memcpy(&mag, &a, 4);
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(std::nearbyint(mag * 16777216.0f)));
  }
  const uint32_t rounded = a + 0xfffu + ((a >> 13) & 1u);
  return static_cast<uint16_t>(sign | ((rounded - 0x38000000u) >> 13));
#endif
}

struct HalfStore {
  static void Store(uint16_t* dst, Vec v) {
#if defined(__AVX512F__)
    __m512 f;
    std::memcpy(&f, &v, sizeof(Vec));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst),
                        _mm512_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#else
    for (int i = 0; i < kLanes; ++i) dst[i] = FloatToHalf(v[i]);
#endif
  }
};

struct Bfloat16Store {
  // Round to nearest even on the bits; NaN stays a (quiet) NaN.
  static void Store(uint16_t* dst, Vec v) {
    UVec u;
    std::memcpy(&u, &v, sizeof(Vec));
    const UVec rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const UVec nan = (UVec)((u & 0x7fffffffu) > 0x7f800000u);
    const UVec out = (nan & ((u >> 16) | 0x40u)) | (~nan & rounded);
    for (int i = 0; i < kLanes; ++i) dst[i] = static_cast<uint16_t>(out[i]);
  }
};

// One key or value vector v [d] into its page slot dst: rounded to float16 or bfloat16, or
// (int8 pages) to int8 codes with the vector's scale, as jaxllm.quant.kv.quantize_kv: scale
// = max|v| * (1/127) (1 for a zero vector), codes = v / scale rounded half to even.
template <typename T>
void WriteVector(T* dst, const float* v, int64_t d, JaxllmPageType type, float* scale) {
  if constexpr (sizeof(T) == 4) {
    std::memcpy(dst, v, d * sizeof(float));
  } else if constexpr (sizeof(T) == 1) {
    float amax = 0.0f;
    for (int64_t i = 0; i < d; ++i) amax = std::max(amax, std::fabs(v[i]));
    const float sc = amax > 0.0f ? amax * (1.0f / 127.0f) : 1.0f;
    *scale = sc;
    for (int64_t i = 0; i < d; ++i) {
      const float c = std::nearbyint(v[i] / sc);
      dst[i] = static_cast<int8_t>(std::min(std::max(c, -127.0f), 127.0f));
    }
  } else {
    for (int64_t i = 0; i < d; i += kLanes) {
      if (type == JaxllmPageType::kF16) {
        HalfStore::Store(dst + i, Load(v + i));
      } else {
        Bfloat16Store::Store(dst + i, Load(v + i));
      }
    }
  }
}

// Row r's product (scaled per channel); queries and key roped (rotate-half) with the row's
// tables; queries to q [n, K, G, D], key and value into their pages at the row's slot.
template <typename T>
void QkvRow(const Layer& a, const float* qkv_row, int64_t r, float* q) {
  const int64_t d = a.d, half = d / 2, g = a.g;
  const float* cs = a.cos + r * half;
  const float* sn = a.sin + r * half;
  const int64_t slot = a.slots[r];
  const bool write = slot >= 0 && slot < a.pages * a.page;
  for (int64_t h = 0; h < a.kh; ++h) {
    const int64_t at = h * a.pages * a.page + slot;  // the slot in this head's pages
    for (int64_t j = 0; j < g + 2; ++j) {
      if (j >= g && !write) continue;
      const int64_t c = (h * (g + 2) + j) * d;
      const float* src = qkv_row + c;
      float vec[256];  // head_dim <= 256
      if (j == g + 1) {  // the value: no rotation
        for (int64_t i = 0; i < d; i += kLanes) {
          const Vec v = Load(src + i);
          std::memcpy(vec + i, &v, sizeof(Vec));
        }
        WriteVector(static_cast<T*>(a.v_pages) + at * d, vec, d, a.type, a.v_scales + at);
        continue;
      }
      int64_t i = 0;
      for (; i + kLanes <= half; i += kLanes) {
        const Vec x1 = Load(src + i), x2 = Load(src + half + i);
        const Vec c1 = Load(cs + i), s1 = Load(sn + i);
        const Vec lo = x1 * c1 - x2 * s1, hi = x2 * c1 + x1 * s1;
        std::memcpy(vec + i, &lo, sizeof(Vec));
        std::memcpy(vec + half + i, &hi, sizeof(Vec));
      }
      for (; i < half; ++i) {  // head_dim 16: half a vector
        const float x1 = src[i], x2 = src[half + i];
        vec[i] = x1 * cs[i] - x2 * sn[i];
        vec[half + i] = x2 * cs[i] + x1 * sn[i];
      }
      if (j < g) {
        std::memcpy(q + ((r * a.kh + h) * g + j) * d, vec, d * sizeof(float));
      } else {
        WriteVector(static_cast<T*>(a.k_pages) + at * d, vec, d, a.type, a.k_scales + at);
      }
    }
  }
}

// Per-call scratch of the calling thread, grown once: a step allocates nothing.
struct Scratch {
  std::vector<int8_t> codes;
  std::vector<float> scales, h, qkv, q, att, x1, gu, act;
};

template <typename T>
void RunLayer(const Layer& a) {
  thread_local Scratch s;
  const int64_t n = a.n, e = a.e, hd = a.hd, m = a.m, nq = a.nq, grp = a.group;
  const int64_t widest = std::max({e, hd, m});
  s.codes.resize(n * widest);
  s.scales.resize(n * (widest / grp));
  s.h.resize(n * e);
  s.qkv.resize(n * nq);
  s.q.resize(n * hd);
  s.att.resize(n * hd);
  s.x1.resize(n * e);
  s.gu.resize(n * 2 * m);
  s.act.resize(n * m);
  int8_t* codes = s.codes.data();
  float *scales = s.scales.data(), *h = s.h.data(), *qkv = s.qkv.data(), *q = s.q.data();
  float *att = s.att.data(), *x1 = s.x1.data(), *gu = s.gu.data(), *act = s.act.data();

  // Attention: norm, quantize, QKV product, RoPE and the cache writes, attention.
  ForRows(n, e, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) NormRow(a.x + r * e, a.attn_norm, e, a.eps, h + r * e);
    JaxllmQuantizeRows(h, e, e / grp, codes, scales, r0, r1);
  });
  JaxllmW8A8Product(codes, scales, a.qkv, qkv, n, e, nq, e / grp, a.qkv_scale);
  ForRows(n, nq, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) QkvRow<T>(a, qkv + r * nq, r, q);
  });
  JaxllmRaggedAttention(JaxllmRaggedArgs{a.type, q, a.k_pages, a.v_pages, a.k_scales, a.v_scales,
                                         a.kv_lens, a.tables, a.cu, att, n, a.kh, a.g, a.d,
                                         a.pages, a.page, a.maxp, a.num_seqs, a.sm_scale});

  // Output product plus the residual; the MLP's norm and quantization.
  ForRows(n, hd, [&](int64_t r0, int64_t r1) {
    JaxllmQuantizeRows(att, hd, hd / grp, codes, scales, r0, r1);
  });
  JaxllmW8A8Product(codes, scales, a.o, h, n, hd, e, hd / grp, a.o_scale);
  ForRows(n, e, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t i = 0; i < e; i += kLanes) {
        const Vec v = Load(a.x + r * e + i) + Load(h + r * e + i);
        std::memcpy(x1 + r * e + i, &v, sizeof(Vec));
      }
      NormRow(x1 + r * e, a.mlp_norm, e, a.eps, h + r * e);
    }
    JaxllmQuantizeRows(h, e, e / grp, codes, scales, r0, r1);
  });

  // MLP: gate/up product, SwiGLU, quantize, down product plus the residual.
  JaxllmW8A8Product(codes, scales, a.gu, gu, n, e, 2 * m, e / grp, a.gu_scale);
  ForRows(n, 2 * m, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* gr = gu + r * 2 * m;
      for (int64_t i = 0; i < m; i += kLanes) {
        const Vec z = Load(gr + i), up = Load(gr + m + i);
        const Vec sig = 1.0f / (1.0f + ExpAll(-z));
        const Vec v = (z * sig) * up;
        std::memcpy(act + r * m + i, &v, sizeof(Vec));
      }
    }
    JaxllmQuantizeRows(act, m, m / grp, codes, scales, r0, r1);
  });
  JaxllmW8A8Product(codes, scales, a.down, h, n, m, e, m / grp, a.down_scale);
  ForRows(n, e, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t i = 0; i < e; i += kLanes) {
        const Vec v = Load(x1 + r * e + i) + Load(h + r * e + i);
        std::memcpy(a.y + r * e + i, &v, sizeof(Vec));
      }
    }
  });
  if (a.t > n) std::memset(a.y + n * e, 0, static_cast<size_t>((a.t - n) * e) * sizeof(float));
}

ffi::Error Fail(const char* what) {
  return ffi::Error::InvalidArgument(std::string("JaxllmW8A8Layer: ") + what);
}

ffi::Error W8A8Layer(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> attn_norm,
                     ffi::Buffer<ffi::S8> qkv, ffi::Buffer<ffi::F32> qkv_scale,
                     ffi::Buffer<ffi::S8> o, ffi::Buffer<ffi::F32> o_scale,
                     ffi::Buffer<ffi::F32> mlp_norm, ffi::Buffer<ffi::S8> gu,
                     ffi::Buffer<ffi::F32> gu_scale, ffi::Buffer<ffi::S8> down,
                     ffi::Buffer<ffi::F32> down_scale, ffi::Buffer<ffi::F32> cos,
                     ffi::Buffer<ffi::F32> sin, ffi::AnyBuffer, ffi::AnyBuffer,
                     ffi::Buffer<ffi::F32>, ffi::Buffer<ffi::F32>, ffi::Buffer<ffi::S32> slots, ffi::Buffer<ffi::S32> kv_lens,
                     ffi::Buffer<ffi::S32> tables, ffi::Buffer<ffi::S32> cu,
                     ffi::Buffer<ffi::S32> num_seqs, float eps, float sm_scale, int64_t group,
                     ffi::ResultBuffer<ffi::F32> y, ffi::Result<ffi::AnyBuffer> k_out,
                     ffi::Result<ffi::AnyBuffer> v_out, ffi::ResultBuffer<ffi::F32> ks_out,
                     ffi::ResultBuffer<ffi::F32> vs_out) {
  auto xd = x.dimensions();
  auto kd = k_out->dimensions();
  auto td = tables.dimensions();
  if (xd.size() != 2 || kd.size() != 4 || td.size() != 2) {
    return Fail("x [T, E], pages [K, P, page, D], block_tables [S, maxp]");
  }
  Layer a{};
  a.t = xd[0];
  a.e = xd[1];
  a.kh = kd[0];
  a.pages = kd[1];
  a.page = kd[2];
  a.d = kd[3];
  a.nq = qkv.dimensions()[0];
  a.hd = o.dimensions()[1];
  a.m = down.dimensions()[1];
  a.group = group;
  if (a.nq % (a.kh * a.d) != 0 || a.nq / (a.kh * a.d) < 3) return Fail("qkv rows != K (G+2) D");
  a.g = a.nq / (a.kh * a.d) - 2;
  if (qkv.dimensions()[1] != a.e || a.hd != a.kh * a.g * a.d || o.dimensions()[0] != a.e ||
      gu.dimensions()[0] != 2 * a.m || gu.dimensions()[1] != a.e || down.dimensions()[0] != a.e) {
    return Fail("weight shapes do not match x and the pages");
  }
  if (a.e % kLanes != 0 || a.m % kLanes != 0 || a.d % kLanes != 0 || a.d > 256 || group <= 0 ||
      a.e % group != 0 || a.hd % group != 0 || a.m % group != 0) {
    return Fail("E, M, head_dim multiples of 16 (head_dim <= 256), group dividing E, H*D, M");
  }
  const auto count = [](auto& b) { return static_cast<int64_t>(b.element_count()); };
  if (count(cos) != a.t * a.d / 2 || count(sin) != a.t * a.d / 2 || count(slots) != a.t ||
      count(cu) != td[0] + 1 || count(kv_lens) != td[0] || count(num_seqs) != 1) {
    return Fail("rope tables [T, D/2], slot_mapping [T], kv_lens [S], cu_q_lens [S + 1]");
  }
  switch (k_out->element_type()) {
    case ffi::F32: a.type = JaxllmPageType::kF32; break;
    case ffi::F16: a.type = JaxllmPageType::kF16; break;
    case ffi::U16: a.type = JaxllmPageType::kBF16; break;
    case ffi::S8: a.type = JaxllmPageType::kS8; break;
    default: return Fail("pages of float32, float16, uint16 (bfloat16 bits) or int8");
  }
  const int64_t slots_total = a.kh * a.pages * a.page;
  const bool scaled = a.type == JaxllmPageType::kS8;
  if (count(*ks_out) != (scaled ? slots_total : 0) || count(*vs_out) != count(*ks_out)) {
    return Fail("int8 pages need scales [K, P, page] (other pages: empty ones)");
  }
  if (v_out->element_type() != k_out->element_type()) return Fail("k and v pages differ");
  a.x = x.typed_data();
  a.attn_norm = attn_norm.typed_data();
  a.qkv = qkv.typed_data();
  a.qkv_scale = qkv_scale.typed_data();
  a.o = o.typed_data();
  a.o_scale = o_scale.typed_data();
  a.mlp_norm = mlp_norm.typed_data();
  a.gu = gu.typed_data();
  a.gu_scale = gu_scale.typed_data();
  a.down = down.typed_data();
  a.down_scale = down_scale.typed_data();
  a.cos = cos.typed_data();
  a.sin = sin.typed_data();
  a.k_pages = k_out->untyped_data();  // aliased to the input pages: XLA passes them in place
  a.v_pages = v_out->untyped_data();
  a.k_scales = scaled ? ks_out->typed_data() : nullptr;
  a.v_scales = scaled ? vs_out->typed_data() : nullptr;
  a.slots = slots.typed_data();
  a.kv_lens = kv_lens.typed_data();
  a.tables = tables.typed_data();
  a.cu = cu.typed_data();
  a.maxp = td[1];
  a.num_seqs = std::min<int64_t>(std::max<int64_t>(num_seqs.typed_data()[0], 0), td[0]);
  a.n = std::min<int64_t>(std::max<int64_t>(a.cu[a.num_seqs], 0), a.t);
  a.y = y->typed_data();
  a.eps = eps;
  a.sm_scale = sm_scale;
  if (a.type == JaxllmPageType::kF32) {
    RunLayer<float>(a);
  } else if (scaled) {
    RunLayer<int8_t>(a);
  } else {
    RunLayer<uint16_t>(a);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxllmW8A8Layer, W8A8Layer,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // attn_norm
                                  .Arg<ffi::Buffer<ffi::S8>>()   // qkv
                                  .Arg<ffi::Buffer<ffi::F32>>()  // qkv_scale
                                  .Arg<ffi::Buffer<ffi::S8>>()   // o
                                  .Arg<ffi::Buffer<ffi::F32>>()  // o_scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // mlp_norm
                                  .Arg<ffi::Buffer<ffi::S8>>()   // gate_up
                                  .Arg<ffi::Buffer<ffi::F32>>()  // gate_up_scale
                                  .Arg<ffi::Buffer<ffi::S8>>()   // down
                                  .Arg<ffi::Buffer<ffi::F32>>()  // down_scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // cos
                                  .Arg<ffi::Buffer<ffi::F32>>()  // sin
                                  .Arg<ffi::AnyBuffer>()         // k_pages (aliased)
                                  .Arg<ffi::AnyBuffer>()         // v_pages (aliased)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k_scales (aliased)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v_scales (aliased)
                                  .Arg<ffi::Buffer<ffi::S32>>()  // slot_mapping
                                  .Arg<ffi::Buffer<ffi::S32>>()  // kv_lens
                                  .Arg<ffi::Buffer<ffi::S32>>()  // block_tables
                                  .Arg<ffi::Buffer<ffi::S32>>()  // cu_q_lens
                                  .Arg<ffi::Buffer<ffi::S32>>()  // num_seqs
                                  .Attr<float>("eps")
                                  .Attr<float>("sm_scale")
                                  .Attr<int64_t>("group")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
