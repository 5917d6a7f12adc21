// The ragged paged attention of paged_attention.cc on plain pointers, for kernels of this
// library that run it inside a larger call (layer.cc).
#pragma once

#include <cstdint>

enum class JaxllmPageType { kF32, kF16, kBF16, kS8 };

// q [t, kh, g, d] float32 -> out [t, kh, g, d]; pages [kh, pages, page, d] of `type` (kBF16:
// bfloat16 bits; kS8: int8 codes with float32 k_scales, v_scales [kh, pages, page]).
// kv_lens [num_seqs], tables [num_seqs, maxp], cu [num_seqs + 1], as JaxllmPagedAttention.
struct JaxllmRaggedArgs {
  JaxllmPageType type;
  const float* q;
  const void *k, *v;
  const float *k_scales, *v_scales;
  const int32_t *kv_lens, *tables, *cu;
  float* out;
  int64_t t, kh, g, d, pages, page, maxp, num_seqs;
  float scale;
};

// False (computing nothing) for shapes the kernel does not take.
bool JaxllmRaggedAttention(const JaxllmRaggedArgs& args);
