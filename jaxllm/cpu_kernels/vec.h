// The float vector the CPU kernels of this library compute in.
#pragma once

#include <cstdint>
#include <cstring>

constexpr int64_t kLanes = 16;  // one 64-byte cache line of floats

typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));

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
