// A persistent, briefly spinning thread pool shared by the CPU kernels of this library.
//
// A decode step makes hundreds of kernel calls a few hundred microseconds apart; waking
// sleeping threads (as an OpenMP parallel region does) cost more than the work they shared.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <unistd.h>
#include <vector>

// How long an idle worker spins before it sleeps. Long enough to bridge the gaps between the
// kernel calls of one decode step (tens of microseconds of small XLA ops), short enough that
// it gives its core back to XLA's own threads during a matmul: on a 2-core machine a worker
// that kept spinning (or woke every few milliseconds to spin again) took a quarter of a core
// while idle.
constexpr auto kJaxllmSpinBeforeSleep = std::chrono::microseconds(200);

inline void CpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// The caller runs share 0; worker t runs share t + 1. Shared with paged_attention.cc.
class JaxllmPool {
 public:
  using Task = std::function<void(int share, int shares)>;

  explicit JaxllmPool(int workers) : shares_(workers + 1), done_(workers) {
    for (auto& d : done_) d.store(0);
    for (int t = 0; t < workers; ++t) std::thread([this, t] { Work(t); }).detach();
  }

  int shares() const { return shares_; }

  void Run(const Task& task) {
    std::lock_guard<std::mutex> call(call_mu_);
    task_ = &task;
    const uint64_t gen = gen_.load(std::memory_order_relaxed) + 1;
    {
      std::lock_guard<std::mutex> lock(sleep_mu_);
      gen_.store(gen, std::memory_order_release);
    }
    wake_.notify_all();
    (*task_)(0, shares_);
    for (auto& d : done_) {
      while (d.load(std::memory_order_acquire) < gen) CpuRelax();
    }
  }

 private:

  void Work(int t) {
    uint64_t seen = 0;
    for (;;) {
      const auto spin_until = std::chrono::steady_clock::now() + kJaxllmSpinBeforeSleep;
      for (int spins = 0; gen_.load(std::memory_order_acquire) == seen; ++spins) {
        if ((spins & 63) != 0 || std::chrono::steady_clock::now() < spin_until) {
          CpuRelax();
          continue;
        }
        // Run() publishes gen_ under sleep_mu_ before notifying: no wake-up is lost.
        std::unique_lock<std::mutex> lock(sleep_mu_);
        wake_.wait(lock, [&] { return gen_.load(std::memory_order_acquire) != seen; });
      }
      seen = gen_.load(std::memory_order_acquire);
      (*task_)(t + 1, shares_);
      done_[t].store(seen, std::memory_order_release);
    }
  }

  const int shares_;
  std::vector<std::atomic<uint64_t>> done_;
  const Task* task_ = nullptr;
  std::atomic<uint64_t> gen_{0};
  std::mutex call_mu_, sleep_mu_;
  std::condition_variable wake_;
};

// A forked child has none of the parent's threads: it builds its own pool (the parent's is
// left as it is, since its mutexes may be held).
inline JaxllmPool& JaxllmGetPool() {
  static JaxllmPool* pool = nullptr;
  static pid_t owner = 0;
  static std::mutex mu;
  std::lock_guard<std::mutex> lock(mu);
  if (pool == nullptr || owner != getpid()) {
    int threads = static_cast<int>(std::thread::hardware_concurrency());
    pool = new JaxllmPool(std::clamp(threads, 1, 16) - 1);
    owner = getpid();
  }
  return *pool;
}

