// Ragged paged attention for XLA:CPU, called through the XLA FFI: the engine's mixed step
// (decode tokens and prefill chunks of many sequences packed together) over a paged KV cache.
//
//   JaxllmPagedAttention(q [T, K, G, D], k_pages, v_pages [K, P, page, D], kv_lens [S],
//                        block_tables [S, maxp], cu_q_lens [S + 1], num_seqs [1]; scale)
//     -> out [T, K, G, D]
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

#include "pool.h"
#include "vec.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kRowsPerItem = 4;
constexpr int64_t kMaxG = 16;
constexpr int64_t kMaxPage = 256;

struct Item {
  int32_t seq, head, row0, rows;
};

struct Problem {
  const float *q, *k, *v;
  const int32_t *kv_lens, *tables, *cu;
  float* out;
  int64_t kh, g, d, pages, page, maxp;
  float scale;
};


// Explicit vectors: without -ffast-math the compiler keeps a float reduction scalar.
inline float Dot(const float* a, const float* b, int64_t d) {
  Vec acc0 = {}, acc1 = {};
  int64_t i = 0;
  for (; i + 2 * kLanes <= d; i += 2 * kLanes) {
    acc0 += Load(a + i) * Load(b + i);
    acc1 += Load(a + i + kLanes) * Load(b + i + kLanes);
  }
  for (; i + kLanes <= d; i += kLanes) acc0 += Load(a + i) * Load(b + i);
  acc0 += acc1;
  float s = 0.f;
  for (int64_t j = 0; j < kLanes; ++j) s += acc0[j];
  for (; i < d; ++i) s += a[i] * b[i];
  return s;
}

void RunItem(const Problem& p, const Item& it) {
  const int64_t g = p.g, d = p.d, page = p.page;
  const int64_t rows = it.rows * g;  // query vectors in this item
  const int32_t kv_len = p.kv_lens[it.seq];
  const int32_t q_len = p.cu[it.seq + 1] - p.cu[it.seq];
  const int64_t first_pos = kv_len - q_len + it.row0;  // position of the item's first row
  const int64_t last_pos = first_pos + it.rows - 1;
  std::vector<float> acc(rows * d, 0.f), m(rows, -INFINITY), l(rows, 0.f);
  std::vector<float> qs(rows * d), scores(rows * kMaxPage);
  for (int64_t r = 0; r < it.rows; ++r) {
    const int64_t t = p.cu[it.seq] + it.row0 + r;
    for (int64_t gi = 0; gi < g; ++gi) {
      const float* src = p.q + ((t * p.kh + it.head) * g + gi) * d;
      for (int64_t i = 0; i < d; ++i) qs[(r * g + gi) * d + i] = src[i] * p.scale;
    }
  }
  const int32_t* table = p.tables + static_cast<int64_t>(it.seq) * p.maxp;
  const int64_t n_pages = last_pos / page + 1;
  for (int64_t pi = 0; pi < n_pages; ++pi) {
    const int64_t base = pi * page;
    const int64_t n_keys = std::min<int64_t>(page, last_pos + 1 - base);
    const int64_t off = ((it.head * p.pages) + table[pi]) * page * d;
    const float* kp = p.k + off;
    const float* vp = p.v + off;
    for (int64_t r = 0; r < it.rows; ++r) {
      const int64_t visible = std::min<int64_t>(n_keys, first_pos + r + 1 - base);
      for (int64_t gi = 0; gi < g; ++gi) {
        const int64_t qi = r * g + gi;
        float* sc = scores.data() + qi * kMaxPage;
        float page_max = -INFINITY;
        for (int64_t j = 0; j < visible; ++j) {
          sc[j] = Dot(qs.data() + qi * d, kp + j * d, d);
          page_max = std::max(page_max, sc[j]);
        }
        if (visible <= 0) continue;
        const float m_new = std::max(m[qi], page_max);
        const float alpha = std::exp(m[qi] - m_new);
        float* a = acc.data() + qi * d;
        if (alpha != 1.f) {
          for (int64_t i = 0; i < d; ++i) a[i] *= alpha;
          l[qi] *= alpha;
        }
        m[qi] = m_new;
        for (int64_t j = 0; j < visible; ++j) {
          const float e = std::exp(sc[j] - m_new);
          l[qi] += e;
          const float* vj = vp + j * d;
          for (int64_t i = 0; i < d; ++i) a[i] += e * vj[i];
        }
      }
    }
  }
  for (int64_t r = 0; r < it.rows; ++r) {
    const int64_t t = p.cu[it.seq] + it.row0 + r;
    for (int64_t gi = 0; gi < g; ++gi) {
      const int64_t qi = r * g + gi;
      float* dst = p.out + ((t * p.kh + it.head) * g + gi) * d;
      const float inv = l[qi] > 0.f ? 1.f / l[qi] : 0.f;
      for (int64_t i = 0; i < d; ++i) dst[i] = acc[qi * d + i] * inv;
    }
  }
}

ffi::Error PagedAttention(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k_pages,
                          ffi::Buffer<ffi::F32> v_pages, ffi::Buffer<ffi::S32> kv_lens,
                          ffi::Buffer<ffi::S32> block_tables, ffi::Buffer<ffi::S32> cu_q_lens,
                          ffi::Buffer<ffi::S32> num_seqs, float scale,
                          ffi::ResultBuffer<ffi::F32> out) {
  auto qd = q.dimensions();
  auto kd = k_pages.dimensions();
  auto bd = block_tables.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || bd.size() != 2) {
    return ffi::Error::InvalidArgument("JaxllmPagedAttention: q [T,K,G,D], pages [K,P,page,D]");
  }
  const int64_t t = qd[0];
  Problem p{q.typed_data(),        k_pages.typed_data(),   v_pages.typed_data(),
            kv_lens.typed_data(),  block_tables.typed_data(), cu_q_lens.typed_data(),
            out->typed_data(),     qd[1], qd[2], qd[3], kd[1], kd[2], bd[1], scale};
  if (p.g > kMaxG || p.page > kMaxPage || kd[0] != p.kh || kd[3] != p.d) {
    return ffi::Error::InvalidArgument("JaxllmPagedAttention: unsupported shapes");
  }
  std::memset(p.out, 0, out->size_bytes());
  const int64_t s = std::min<int64_t>(num_seqs.typed_data()[0], bd[0]);
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
      RunItem(p, items[i]);
    }
  };
  if (items.size() <= 1) {
    task(0, 1);
  } else {
    JaxllmGetPool().Run(task);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxllmPagedAttention, PagedAttention,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>());
