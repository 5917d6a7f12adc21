// Ragged paged attention for XLA:CPU, called through the XLA FFI: the engine's mixed step
// (decode tokens and prefill chunks of many sequences packed together) over a paged KV cache.
//
//   JaxllmPagedAttention(q [T, K, G, D], k_pages, v_pages [K, P, page, D], kv_lens [S],
//                        block_tables [S, maxp], cu_q_lens [S + 1], num_seqs [1]; scale)
//     -> out [T, K, G, D]
//
// q and out are float32. The pages are float32 (JaxllmPagedAttention), float16
// (JaxllmPagedAttentionF16, llama.cpp's default cache) or bfloat16 (JaxllmPagedAttentionBF16,
// or JaxllmPagedAttentionBF16Bits for bfloat16 held as uint16 bits, as the engine holds them):
// a decode step is bound by reading the cache, so half-width pages are converted to float32
// in registers as they are read, never copied. int8 pages (JaxllmPagedAttentionS8, the
// kv-int8 recipe) come with float32 scales [K, P, page] for k and v after the pages, one per
// token per KV head: each key or value vector is widened and multiplied by its scale as read.
//
// Sequence s owns rows cu_q_lens[s]:cu_q_lens[s+1], the last q_len of its kv_len tokens, and
// attends causally to its own pages. A work item is (sequence, KV head, block of up to 4
// rows): it walks the pages once, scoring each key for all G query heads of each row (K/V
// are read once per group and block), with an online softmax rescaled once per page. Items
// are handed out from an atomic counter to the shared pool, so long prefill chunks and short
// decodes balance. Only keys below each row's position are read: never a page past kv_len.
// Rows outside every sequence are zero.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "paged_attention.h"
#include "pool.h"
#include "vec.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kRowsPerItem = 4;
constexpr int64_t kMaxG = 16;
constexpr int64_t kMaxPage = 256;
constexpr int64_t kMaxD = 256;

struct Item {
  int32_t seq, head, row0, rows;
};

// The page element types (vec.h's loads): Load gives kLanes of them as float32.
struct F32Pages {
  using T = float;
  static constexpr ffi::DataType kType = ffi::F32;
  static constexpr bool kScaled = false;
  static Vec Load(const T* p) { return ::Load(p); }
};

struct F16Pages {
  using T = uint16_t;
  static constexpr ffi::DataType kType = ffi::F16;
  static constexpr bool kScaled = false;
  static Vec Load(const T* p) { return LoadF16(p); }
};

struct BF16Pages {
  using T = uint16_t;
  static constexpr ffi::DataType kType = ffi::BF16;
  static constexpr bool kScaled = false;
  static Vec Load(const T* p) { return LoadBF16(p); }
};

// bfloat16 pages the engine holds as uint16 bit patterns (XLA:CPU has no bfloat16 scatter).
struct BF16BitsPages {
  using T = uint16_t;
  static constexpr ffi::DataType kType = ffi::U16;
  static constexpr bool kScaled = false;
  static Vec Load(const T* p) { return LoadBF16(p); }
};

// int8 codes with a float32 scale per vector (k_scales, v_scales in the problem).
struct S8Pages {
  using T = int8_t;
  static constexpr ffi::DataType kType = ffi::S8;
  static constexpr bool kScaled = true;
  static Vec Load(const T* p) { return LoadS8(p); }
};

template <typename Pages>
struct Problem {
  const float* q;
  const typename Pages::T *k, *v;
  const int32_t *kv_lens, *tables, *cu;
  float* out;
  int64_t kh, g, d, pages, page, maxp;
  float scale;
  const float *k_scales = nullptr, *v_scales = nullptr;  // [K, P, page] for S8Pages
};




// Lane j of the result is the sum of the lanes of v[j] (a transposing tree of shuffles):
// 16 dot products finish in 30 shuffles instead of 16 serial horizontal sums. Each level
// folds every vector's lanes in half and packs two vectors' halves into one.
#define JAXLLM_FOLD(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
inline Vec SumEach(const Vec* v) {
#if JAXLLM_LANES == 16
  Vec w[8], x[4], y[2];
  for (int i = 0; i < 8; ++i) {
    const Vec a = v[2 * i], b = v[2 * i + 1];
    w[i] = JAXLLM_FOLD(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           JAXLLM_FOLD(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  }
  for (int i = 0; i < 4; ++i) {
    const Vec a = w[2 * i], b = w[2 * i + 1];
    x[i] = JAXLLM_FOLD(a, b, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
           JAXLLM_FOLD(a, b, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  }
  for (int i = 0; i < 2; ++i) {
    const Vec a = x[2 * i], b = x[2 * i + 1];
    y[i] = JAXLLM_FOLD(a, b, 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
           JAXLLM_FOLD(a, b, 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  }
  return JAXLLM_FOLD(y[0], y[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         JAXLLM_FOLD(y[0], y[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
#elif JAXLLM_LANES == 8
  Vec w[4], x[2];
  for (int i = 0; i < 4; ++i) {
    const Vec a = v[2 * i], b = v[2 * i + 1];
    w[i] = JAXLLM_FOLD(a, b, 0, 1, 2, 3, 8, 9, 10, 11) + JAXLLM_FOLD(a, b, 4, 5, 6, 7, 12, 13, 14, 15);
  }
  for (int i = 0; i < 2; ++i) {
    const Vec a = w[2 * i], b = w[2 * i + 1];
    x[i] = JAXLLM_FOLD(a, b, 0, 1, 4, 5, 8, 9, 12, 13) + JAXLLM_FOLD(a, b, 2, 3, 6, 7, 10, 11, 14, 15);
  }
  return JAXLLM_FOLD(x[0], x[1], 0, 2, 4, 6, 8, 10, 12, 14) +
         JAXLLM_FOLD(x[0], x[1], 1, 3, 5, 7, 9, 11, 13, 15);
#else
  const Vec w0 = JAXLLM_FOLD(v[0], v[1], 0, 1, 4, 5) + JAXLLM_FOLD(v[0], v[1], 2, 3, 6, 7);
  const Vec w1 = JAXLLM_FOLD(v[2], v[3], 0, 1, 4, 5) + JAXLLM_FOLD(v[2], v[3], 2, 3, 6, 7);
  return JAXLLM_FOLD(w0, w1, 0, 2, 4, 6) + JAXLLM_FOLD(w0, w1, 1, 3, 5, 7);
#endif
}

// v with the upper half of its lanes swapped with the lower half.
inline Vec SwapHalves(Vec v) {
#if JAXLLM_LANES == 16
  return JAXLLM_FOLD(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
#elif JAXLLM_LANES == 8
  return JAXLLM_FOLD(v, v, 4, 5, 6, 7, 0, 1, 2, 3);
#else
  return JAXLLM_FOLD(v, v, 2, 3, 0, 1);
#endif
}

inline float MaxOf(Vec v) {
  v = Select(v > SwapHalves(v), v, SwapHalves(v));
  float m = v[0];
  for (int i = 1; i < kLanes / 2; ++i) m = std::max(m, v[i]);
  return m;
}

inline float SumOf(Vec v) {
  v += SwapHalves(v);
#if JAXLLM_LANES == 16
  v += JAXLLM_FOLD(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
  v += JAXLLM_FOLD(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
#elif JAXLLM_LANES == 8
  v += JAXLLM_FOLD(v, v, 2, 3, 0, 1, 6, 7, 4, 5);
#endif
  return v[0] + v[1];
}
#undef JAXLLM_FOLD

// exp of each lane for x <= 0 (scores less their running maximum), relative error ~2e-7;
// lanes below -87 (masked keys: -inf) give 0. std::exp is a scalar libm call per key.
inline Vec Exp(Vec x) {
  const IVec dead = x < -87.0f;
  return Select(dead, Vec{}, ExpInRange(Select(dead, Vec{} - 87.0f, x)));
}

// acc[q] += sum over the chunk's nk keys j of e[q][j] * v_j, NQ queries of NV vectors each
// held in registers across the keys.
template <typename Pages, int NV, int NQ>
inline void QueryBlockValues(const typename Pages::T* vp, int64_t d, int64_t nk, const Vec* e,
                         Vec* acc) {
  Vec a[NQ][NV];
  for (int q = 0; q < NQ; ++q) {
    for (int v = 0; v < NV; ++v) a[q][v] = acc[q * NV + v];
  }
  for (int64_t j = 0; j < nk; ++j) {
    Vec row[NV];
    for (int v = 0; v < NV; ++v) row[v] = Pages::Load(vp + j * d + v * kLanes);
    for (int q = 0; q < NQ; ++q) {
      const Vec ej = Vec{} + e[q][j];
      for (int v = 0; v < NV; ++v) a[q][v] += ej * row[v];
    }
  }
  for (int q = 0; q < NQ; ++q) {
    for (int v = 0; v < NV; ++v) acc[q * NV + v] = a[q][v];
  }
}

// One item: its rows * G query vectors walk the sequence's pages in chunks of kLanes keys.
// Each key and value vector is read (and widened from a half-width page) once per chunk and
// used for every query of the item; each chunk's scores come out as one vector per query
// (SumEach), its exponentials are taken together, and the online-softmax rescale happens once
// per chunk.
// NV: head_dim / kLanes when known at compile time (the common head sizes), so a key's vectors
// stay in registers; 0 reads it from the problem.
template <typename Pages, int NV>
void RunItem(const Problem<Pages>& p, const Item& it) {
  const int64_t g = p.g, d = p.d, page = p.page, nv = NV ? NV : d / kLanes;
  const int64_t nq = it.rows * g;  // query vectors in this item
  const int32_t kv_len = p.kv_lens[it.seq];
  const int32_t q_len = p.cu[it.seq + 1] - p.cu[it.seq];
  const int64_t first_pos = kv_len - q_len + it.row0;  // position of the item's first row
  const int64_t last_pos = first_pos + it.rows - 1;
  // Per-thread scratch, grown once: an item allocates nothing.
  thread_local std::vector<Vec> qs, acc, part, ev, vbuf;
  thread_local std::vector<float> m, l;
  qs.resize(nq * nv);
  part.resize(nq * kLanes);
  ev.resize(nq);
  vbuf.resize(kLanes * nv);
  acc.assign(nq * nv, Vec{});
  m.assign(nq, -INFINITY);
  l.assign(nq, 0.f);
  // Plain pointers: thread_local objects in a shared library are reached through a TLS
  // lookup, which the compiler may redo inside the loops.
  Vec* const qsp = qs.data();
  Vec* const accp = acc.data();
  Vec* const partp = part.data();
  Vec* const evp = ev.data();
  Vec* const vbufp = vbuf.data();
  float* const mp = m.data();
  float* const lp = l.data();
  for (int64_t r = 0; r < it.rows; ++r) {
    const int64_t t = p.cu[it.seq] + it.row0 + r;
    for (int64_t gi = 0; gi < g; ++gi) {
      const float* src = p.q + ((t * p.kh + it.head) * g + gi) * d;
      for (int64_t v = 0; v < nv; ++v) qsp[(r * g + gi) * nv + v] = Load(src + v * kLanes) * p.scale;
    }
  }
  IVec lane;
  for (int i = 0; i < kLanes; ++i) lane[i] = i;
  const int32_t* table = p.tables + static_cast<int64_t>(it.seq) * p.maxp;
  const int64_t n_pages = last_pos / page + 1;
  Vec row[kMaxD / kLanes];
  for (int64_t pi = 0; pi < n_pages; ++pi) {
    const int64_t base = pi * page;
    const int64_t n_keys = std::min<int64_t>(page, last_pos + 1 - base);
    const int64_t slot0 = ((it.head * p.pages) + table[pi]) * page;  // of the page's first key
    const int64_t off = slot0 * d;
    for (int64_t c0 = 0; c0 < n_keys; c0 += kLanes) {
      const int64_t nk = std::min<int64_t>(kLanes, n_keys - c0);  // >= 1: the last row sees all
      const typename Pages::T* kp = p.k + off + c0 * d;
      const typename Pages::T* vp = p.v + off + c0 * d;
      for (int64_t j = 0; j < nk; ++j) {
        for (int64_t v = 0; v < nv; ++v) row[v] = Pages::Load(kp + j * d + v * kLanes);
        for (int64_t qi = 0; qi < nq; ++qi) {
          const Vec* q = qsp + qi * nv;
          Vec a = q[0] * row[0];
          for (int64_t v = 1; v < nv; ++v) a += q[v] * row[v];
          partp[qi * kLanes + j] = a;
        }
      }
      for (int64_t j = nk; j < kLanes; ++j) {
        for (int64_t qi = 0; qi < nq; ++qi) partp[qi * kLanes + j] = Vec{};
      }
      // int8 pages: the chunk's key scales multiply its scores and its value scales its
      // probabilities, one vector product per query instead of one per key vector. Lanes past
      // the chunk stay 0 (their slots may hold anything).
      Vec k_scale{}, v_scale{};
      if constexpr (Pages::kScaled) {
        std::memcpy(&k_scale, p.k_scales + slot0 + c0, nk * sizeof(float));
        std::memcpy(&v_scale, p.v_scales + slot0 + c0, nk * sizeof(float));
      }
      for (int64_t qi = 0; qi < nq; ++qi) {
        const int64_t visible = std::min<int64_t>(nk, first_pos + qi / g + 1 - base - c0);
        if (visible <= 0) {  // a row before this chunk: nothing to add, state untouched
          evp[qi] = Vec{};
          continue;
        }
        Vec dots = SumEach(&partp[qi * kLanes]);
        if constexpr (Pages::kScaled) dots *= k_scale;
        const Vec s = Select(lane < static_cast<int32_t>(visible), dots, Vec{} - INFINITY);
        const float m_new = std::max(mp[qi], MaxOf(s));
        const float alpha = std::exp(mp[qi] - m_new);  // 0 on the first chunk (m = -inf)
        const Vec e = Exp(s - m_new);                 // 0 in the masked lanes
        lp[qi] = lp[qi] * alpha + SumOf(e);
        mp[qi] = m_new;
        if (alpha != 1.f) {
          Vec* a = accp + qi * nv;
          for (int64_t v = 0; v < nv; ++v) a[v] *= alpha;
        }
        if constexpr (Pages::kScaled) {
          evp[qi] = e * v_scale;  // l above sums the unscaled probabilities
        } else {
          evp[qi] = e;
        }
      }
      // Values: the chunk is widened once into vbuf, and each query's accumulators stay in
      // registers across the chunk's keys (a store per vector per chunk, not per key: with
      // the accumulators in memory the stores bounded the loop).
      if constexpr (NV > 0) {
        // Blocks of up to kAccVectors / NV queries accumulate in registers, each value vector
        // widened once per block (a query whose row precedes the chunk adds zeros: its e is 0
        // and every key below the item's last row is written, so finite). Half the machine's
        // vector registers hold accumulators: 16 of AVX-512's 32, 8 of AVX's 16.
        constexpr int64_t kAccVectors = kLanes == 16 ? 16 : 8;
        constexpr int64_t kBlock = NV < kAccVectors ? kAccVectors / NV : 1;
        for (int64_t q0 = 0; q0 < nq; q0 += kBlock) {
          const Vec* e = evp + q0;
          Vec* acc = accp + q0 * NV;
          switch (std::min(kBlock, nq - q0)) {
            case 1: QueryBlockValues<Pages, NV, 1>(vp, d, nk, e, acc); break;
            case 2: QueryBlockValues<Pages, NV, 2>(vp, d, nk, e, acc); break;
            case 3: QueryBlockValues<Pages, NV, 3>(vp, d, nk, e, acc); break;
            default: QueryBlockValues<Pages, NV, (kBlock >= 4 ? 4 : kBlock)>(vp, d, nk, e, acc);
          }
        }
        continue;
      }
      for (int64_t j = 0; j < nk; ++j) {
        for (int64_t v = 0; v < nv; ++v) vbufp[j * nv + v] = Pages::Load(vp + j * d + v * kLanes);
      }
      for (int64_t qi = 0; qi < nq; ++qi) {
        if (first_pos + qi / g + 1 - base - c0 <= 0) continue;  // a row before this chunk
        Vec a[kMaxD / kLanes];
        for (int64_t v = 0; v < nv; ++v) a[v] = accp[qi * nv + v];
        for (int64_t j = 0; j < nk; ++j) {
          const Vec ej = Vec{} + evp[qi][j];  // 0 past the row's last key
          for (int64_t v = 0; v < nv; ++v) a[v] += ej * vbufp[j * nv + v];
        }
        for (int64_t v = 0; v < nv; ++v) accp[qi * nv + v] = a[v];
      }
    }
  }
  for (int64_t r = 0; r < it.rows; ++r) {
    const int64_t t = p.cu[it.seq] + it.row0 + r;
    for (int64_t gi = 0; gi < g; ++gi) {
      const int64_t qi = r * g + gi;
      float* dst = p.out + ((t * p.kh + it.head) * g + gi) * d;
      const float inv = lp[qi] > 0.f ? 1.f / lp[qi] : 0.f;
      for (int64_t v = 0; v < nv; ++v) {
        const Vec o = accp[qi * nv + v] * inv;
        std::memcpy(dst + v * kLanes, &o, sizeof(Vec));
      }
    }
  }
}

template <typename Pages>
Problem<Pages> MakeProblem(ffi::Buffer<ffi::F32>& q, ffi::AnyBuffer& k_pages,
                           ffi::AnyBuffer& v_pages, ffi::Buffer<ffi::S32>& kv_lens,
                           ffi::Buffer<ffi::S32>& block_tables, ffi::Buffer<ffi::S32>& cu_q_lens,
                           float scale, ffi::ResultBuffer<ffi::F32>& out) {
  auto qd = q.dimensions();
  auto kd = k_pages.dimensions();
  auto bd = block_tables.dimensions();
  return Problem<Pages>{q.typed_data(),
                        reinterpret_cast<const typename Pages::T*>(k_pages.untyped_data()),
                        reinterpret_cast<const typename Pages::T*>(v_pages.untyped_data()),
                        kv_lens.typed_data(), block_tables.typed_data(), cu_q_lens.typed_data(),
                        out->typed_data(), qd[1], qd[2], qd[3], kd[1], kd[2], bd[1], scale};
}

// Every item of the step: rows past a sequence's tokens (and those of no sequence) are zero.
// s: the sequence slots in use (clamped to block_tables' rows by the caller).
template <typename Pages>
void Attend(const Problem<Pages>& p, int64_t t, int64_t s) {
  std::memset(p.out, 0, static_cast<size_t>(t * p.kh * p.g * p.d) * sizeof(float));
  std::vector<Item> items;
  for (int32_t si = 0; si < s; ++si) {
    const int32_t q_len = p.cu[si + 1] - p.cu[si];
    if (q_len <= 0 || p.cu[si + 1] > t || p.kv_lens[si] < q_len) continue;
    if ((p.kv_lens[si] + p.page - 1) / p.page > p.maxp) continue;
    for (int32_t r0 = 0; r0 < q_len; r0 += kRowsPerItem) {
      const int32_t rows = std::min<int32_t>(kRowsPerItem, q_len - r0);
      for (int32_t h = 0; h < p.kh; ++h) items.push_back({si, h, r0, rows});
    }
  }
  // Items with the most keys first, so the tail of the queue is short work.
  std::sort(items.begin(), items.end(), [&p](const Item& a, const Item& b) {
    const int64_t ka = p.kv_lens[a.seq] - (p.cu[a.seq + 1] - p.cu[a.seq]) + a.row0 + a.rows;
    const int64_t kb = p.kv_lens[b.seq] - (p.cu[b.seq + 1] - p.cu[b.seq]) + b.row0 + b.rows;
    return ka * a.rows > kb * b.rows;
  });
  std::atomic<int64_t> next{0};
  const JaxllmPool::Task task = [&](int, int) {
    for (int64_t i = next.fetch_add(1); i < static_cast<int64_t>(items.size());
         i = next.fetch_add(1)) {
      switch (p.d / kLanes) {
        case 4: RunItem<Pages, 4>(p, items[i]); break;
        case 8: RunItem<Pages, 8>(p, items[i]); break;
        case 16: RunItem<Pages, 16>(p, items[i]); break;
        default: RunItem<Pages, 0>(p, items[i]);
      }
    }
  };
  if (items.size() <= 1) {
    task(0, 1);
  } else {
    JaxllmGetPool().Run(task);
  }
}

bool Supported(int64_t g, int64_t page, int64_t d) {
  return g <= kMaxG && page <= kMaxPage && d % kLanes == 0 && d <= kMaxD;
}

template <typename Pages>
ffi::Error Solve(Problem<Pages>& p, ffi::Buffer<ffi::F32>& q, ffi::AnyBuffer& k_pages,
                 ffi::Buffer<ffi::S32>& block_tables, ffi::Buffer<ffi::S32>& num_seqs,
                 ffi::ResultBuffer<ffi::F32>& out) {
  auto qd = q.dimensions();
  auto kd = k_pages.dimensions();
  auto bd = block_tables.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || bd.size() != 2) {
    return ffi::Error::InvalidArgument("JaxllmPagedAttention: q [T,K,G,D], pages [K,P,page,D]");
  }
  if (!Supported(p.g, p.page, p.d) || kd[0] != p.kh || kd[3] != p.d) {
    return ffi::Error::InvalidArgument("JaxllmPagedAttention: unsupported shapes");
  }
  Attend(p, qd[0], std::min<int64_t>(num_seqs.typed_data()[0], bd[0]));
  return ffi::Error::Success();
}

template <typename Pages>
ffi::Error PagedAttention(ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k_pages, ffi::AnyBuffer v_pages,
                          ffi::Buffer<ffi::S32> kv_lens, ffi::Buffer<ffi::S32> block_tables,
                          ffi::Buffer<ffi::S32> cu_q_lens, ffi::Buffer<ffi::S32> num_seqs,
                          float scale, ffi::ResultBuffer<ffi::F32> out) {
  if (k_pages.element_type() != Pages::kType || v_pages.element_type() != Pages::kType) {
    return ffi::Error::InvalidArgument("JaxllmPagedAttention: page dtype of another target");
  }
  auto p = MakeProblem<Pages>(q, k_pages, v_pages, kv_lens, block_tables, cu_q_lens, scale, out);
  return Solve(p, q, k_pages, block_tables, num_seqs, out);
}

ffi::Error PagedAttentionS8(ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k_pages,
                            ffi::AnyBuffer v_pages, ffi::Buffer<ffi::F32> k_scales,
                            ffi::Buffer<ffi::F32> v_scales, ffi::Buffer<ffi::S32> kv_lens,
                            ffi::Buffer<ffi::S32> block_tables, ffi::Buffer<ffi::S32> cu_q_lens,
                            ffi::Buffer<ffi::S32> num_seqs, float scale,
                            ffi::ResultBuffer<ffi::F32> out) {
  if (k_pages.element_type() != ffi::S8 || v_pages.element_type() != ffi::S8 ||
      k_scales.element_count() * k_pages.dimensions().back() != k_pages.element_count() ||
      v_scales.element_count() * v_pages.dimensions().back() != v_pages.element_count()) {
    return ffi::Error::InvalidArgument(
        "JaxllmPagedAttentionS8: int8 pages [K,P,page,D] and float32 scales [K,P,page]");
  }
  auto p = MakeProblem<S8Pages>(q, k_pages, v_pages, kv_lens, block_tables, cu_q_lens, scale,
                                out);
  p.k_scales = k_scales.typed_data();
  p.v_scales = v_scales.typed_data();
  return Solve(p, q, k_pages, block_tables, num_seqs, out);
}

}  // namespace

bool JaxllmRaggedAttention(const JaxllmRaggedArgs& a) {
  if (!Supported(a.g, a.page, a.d)) return false;
  auto run = [&a](auto tag) {
    using Pages = decltype(tag);
    Problem<Pages> p{a.q, static_cast<const typename Pages::T*>(a.k),
                     static_cast<const typename Pages::T*>(a.v), a.kv_lens, a.tables, a.cu, a.out,
                     a.kh, a.g, a.d, a.pages, a.page, a.maxp, a.scale};
    p.k_scales = a.k_scales;
    p.v_scales = a.v_scales;
    Attend(p, a.t, a.num_seqs);
  };
  switch (a.type) {
    case JaxllmPageType::kF32: run(F32Pages{}); break;
    case JaxllmPageType::kF16: run(F16Pages{}); break;
    case JaxllmPageType::kBF16: run(BF16Pages{}); break;
    case JaxllmPageType::kS8: run(S8Pages{}); break;
  }
  return true;
}

#define JAXLLM_PAGED_HANDLER(name, pages)                                     \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, PagedAttention<pages>,                  \
                                ffi::Ffi::Bind()                              \
                                    .Arg<ffi::Buffer<ffi::F32>>()             \
                                    .Arg<ffi::AnyBuffer>()                    \
                                    .Arg<ffi::AnyBuffer>()                    \
                                    .Arg<ffi::Buffer<ffi::S32>>()             \
                                    .Arg<ffi::Buffer<ffi::S32>>()             \
                                    .Arg<ffi::Buffer<ffi::S32>>()             \
                                    .Arg<ffi::Buffer<ffi::S32>>()             \
                                    .Attr<float>("scale")                     \
                                    .Ret<ffi::Buffer<ffi::F32>>());

JAXLLM_PAGED_HANDLER(JaxllmPagedAttention, F32Pages)
JAXLLM_PAGED_HANDLER(JaxllmPagedAttentionF16, F16Pages)
JAXLLM_PAGED_HANDLER(JaxllmPagedAttentionBF16, BF16Pages)
JAXLLM_PAGED_HANDLER(JaxllmPagedAttentionBF16Bits, BF16BitsPages)

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxllmPagedAttentionS8, PagedAttentionS8,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>());
