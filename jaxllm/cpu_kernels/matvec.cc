// Few-row matrix products for XLA:CPU, called through the XLA FFI.
//
//   JaxllmMatVec: y[R, N] = x[R, K] @ w[N, K]^T   (w row-major, [out, in]; R <= 16)
//   JaxllmMatVecBF16: the same with w in bfloat16 (half the bytes to stream), widened to
//     float32 in registers; x and y float32.
//
// A batch-1 decode step is little else than this product over every weight matrix, so its
// speed is the speed of streaming the weights from memory. XLA:CPU runs such a dot on one
// thread. Here every core streams one contiguous block of weight rows, front to back (one
// sequential stream per thread, which the hardware prefetcher follows), with four
// independent accumulators per dot product. Measured on the 2-core dev machine: 25 GB/s on
// one thread, 32 GB/s on two, the rate of a plain reduction over the same bytes.
//
// The threads are a persistent pool that spins briefly between calls: a decode step makes
// ~120 of these calls a few hundred microseconds apart, and waking sleeping threads (as an
// OpenMP parallel region does) cost more than the work they shared.

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <mutex>
#include <unistd.h>
#include <thread>
#include <vector>

#include "pool.h"
#include "vec.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kMaxRows = 16;
constexpr int64_t kMinParallelElements = 1 << 16;


struct F32Weights {
  using T = float;
  static constexpr ffi::DataType kType = ffi::F32;
  static Vec Load(const T* p) { return ::Load(p); }
  static float Scalar(T v) { return v; }
};

struct BF16Weights {
  using T = uint16_t;
  static constexpr ffi::DataType kType = ffi::BF16;
  static Vec Load(const T* p) { return LoadBF16(p); }
  static float Scalar(T v) {
    const uint32_t bits = static_cast<uint32_t>(v) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  }
};

template <typename W>
struct Job {
  const float* x;
  const typename W::T* w;
  float* y;
  int64_t rows, k, n;
};

// y[r, j] for weight rows j in [j0, j1).
template <typename W>
void RowsSlice(const Job<W>& job, int64_t j0, int64_t j1) {
  const int64_t k = job.k;
  const int64_t k64 = k / (4 * kLanes) * (4 * kLanes);
  const int64_t k16 = k / kLanes * kLanes;
  for (int64_t j = j0; j < j1; ++j) {
    const typename W::T* wj = job.w + j * k;
    for (int64_t r = 0; r < job.rows; ++r) {
      const float* xr = job.x + r * k;
      Vec a0 = {}, a1 = {}, a2 = {}, a3 = {};
      int64_t i = 0;
      for (; i < k64; i += 4 * kLanes) {
        a0 += Load(xr + i) * W::Load(wj + i);
        a1 += Load(xr + i + kLanes) * W::Load(wj + i + kLanes);
        a2 += Load(xr + i + 2 * kLanes) * W::Load(wj + i + 2 * kLanes);
        a3 += Load(xr + i + 3 * kLanes) * W::Load(wj + i + 3 * kLanes);
      }
      for (; i < k16; i += kLanes) a0 += Load(xr + i) * W::Load(wj + i);
      float acc = Sum((a0 + a1) + (a2 + a3));
      for (; i < k; ++i) acc += xr[i] * W::Scalar(wj[i]);
      job.y[r * job.n + j] = acc;
    }
  }
}

template <typename W>
ffi::Error MatVec(ffi::Buffer<ffi::F32> x, ffi::Buffer<W::kType> w,
                  ffi::ResultBuffer<ffi::F32> y) {
  auto wd = w.dimensions();
  if (wd.size() != 2) return ffi::Error::InvalidArgument("JaxllmMatVec: weight must be 2-D");
  const int64_t n = wd[0], k = wd[1];
  auto xd = x.dimensions();
  if (xd.size() < 1 || xd.back() != k) {
    return ffi::Error::InvalidArgument("JaxllmMatVec: x's last dim must equal w's last dim");
  }
  const int64_t rows = k ? static_cast<int64_t>(x.element_count()) / k : 0;
  if (rows > kMaxRows) return ffi::Error::InvalidArgument("JaxllmMatVec: at most 16 rows");
  if (k == 0) {  // an empty sum
    std::memset(y->typed_data(), 0, y->size_bytes());
    return ffi::Error::Success();
  }
  const Job<W> job{x.typed_data(), reinterpret_cast<const typename W::T*>(w.untyped_data()),
                   y->typed_data(), rows, k, n};
  if (n * k < kMinParallelElements) {
    RowsSlice<W>(job, 0, n);
  } else {
    const JaxllmPool::Task task = [&job](int share, int shares) {
      RowsSlice<W>(job, job.n * share / shares, job.n * (share + 1) / shares);
    };
    JaxllmGetPool().Run(task);
  }
  return ffi::Error::Success();
}

}  // namespace

// The float lanes of this build's vectors (vec.h): 16, 8 or 4.
extern "C" int JaxllmLanes() { return static_cast<int>(kLanes); }

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxllmMatVec, MatVec<F32Weights>,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxllmMatVecBF16, MatVec<BF16Weights>,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
