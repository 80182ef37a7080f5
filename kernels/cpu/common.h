// Shared helpers of the CPU kernels: the MindSpore AOT calling convention, shape checks, a small parallel-for.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <pthread.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

// MindSpore's AOT custom-op entry point: inputs then outputs in `params`, their ranks, shapes and dtype names.
// Functions with vdpbf16ps: compiled for it whatever -march says, called only where cpu_has_bf16_dot().
#define COGVLM2_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512bf16")))

namespace cogvlm2 {
// Whether this CPU runs vdpbf16ps (else the bf16 dot products take their fallbacks).
inline bool cpu_has_bf16_dot() {
#if defined(__AVX512F__) && defined(__x86_64__)
  static const bool has = __builtin_cpu_supports("avx512bf16");
  return has;
#else
  return false;
#endif
}
}  // namespace cogvlm2

#define COGVLM2_AOT(name) \
  extern "C" int name(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes, \
                      void* stream, void* extra)

namespace cogvlm2 {

// x rounded up to a multiple of `to`.
inline int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

// kCacheDtypeMismatch: a call's key and value caches hold different dtypes.
enum Status : int { kOk = 0, kBadArity = 1, kBadDtype = 2, kBadShape = 3, kBadIndex = 4, kNoBlas = 5,
                    kCacheDtypeMismatch = 6 };

struct Args {
  int nparam;
  void** params;
  int* ndims;
  int64_t** shapes;
  const char** dtypes;

  template <typename T>
  T* data(int i) const { return static_cast<T*>(params[i]); }
  int rank(int i) const { return ndims[i]; }
  int64_t dim(int i, int d) const { return shapes[i][d]; }
  int64_t numel(int i) const {
    int64_t n = 1;
    for (int d = 0; d < ndims[i]; ++d) n *= shapes[i][d];
    return n;
  }
  bool is(int i, const char* dtype) const { return std::strcmp(dtypes[i], dtype) == 0; }
  bool is_f32(int i) const { return is(i, "float32") || is(i, "float"); }
  bool is_i32(int i) const { return is(i, "int32") || is(i, "int"); }
  bool is_bf16(int i) const { return is(i, "bfloat16"); }
  bool is_f16(int i) const { return is(i, "float16") || is(i, "half"); }
};

// The symmetric int8 rule of kernels/quantization.py (quantize_int8), shared by w8a8's activations and the int8 KV
// cache: a row's scale is max |x| / 127 (1 for an all-zero row), each value x / scale rounded to nearest even and
// clamped to +-127.
constexpr float kInt8Max = 127.f;

inline float int8_scale(const float* x, int64_t n) {
  float top = 0.f;
  for (int64_t i = 0; i < n; ++i) top = std::max(top, std::fabs(x[i]));
  return top > 0.f ? top / kInt8Max : 1.f;
}

inline int32_t int8_value(float x, float scale) {
  return static_cast<int32_t>(std::min(kInt8Max, std::max(-kInt8Max, std::nearbyint(x / scale))));
}

// Tells the core this thread is spinning (on x86, so that the sibling hyperthread gets the pipeline).
inline void cpu_relax() {
#if defined(__x86_64__)
  _mm_pause();
#endif
}

// Spins until ready() or `microseconds` have passed; true if ready() came true.
template <typename Ready>
bool spin_until(Ready ready, int64_t microseconds) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::microseconds(microseconds);
  for (int i = 1;; ++i) {
    if (ready()) return true;
    if (i % 16 == 0 && std::chrono::steady_clock::now() >= deadline) return false;
    cpu_relax();
  }
}

// Helper threads kept for the life of the process. After a job a helper spins for kSpinMicroseconds, since the
// decoder's next kernel usually follows within tens of microseconds, then sleeps on a condition variable, so an
// idle engine leaves the cores to others. Measured here, two threads splitting 38 us of work: spawning a thread
// per call 52 us, waking a sleeping helper 29 us, a spinning one 18 us. In bf16 decode steps a spin of 0 us was
// slower than 100, 300 or 1000 us, which were alike; the shortest of them burns the least.
class HelperThreads {
 public:
  static constexpr int64_t kSpinMicroseconds = 100;

  // The process's pool; a fresh one in a forked child, which inherits no threads.
  static HelperThreads& instance() {
    static std::once_flag registered;
    std::call_once(registered, [] { pthread_atfork(nullptr, nullptr, [] { current() = nullptr; }); });
    if (current() == nullptr) current() = new HelperThreads();  // never destroyed: exit must not wait on helpers
    return *current();
  }

  // Runs job() on `count` helpers while the caller runs it too, and returns when every one has finished. False,
  // with nothing run, when another call holds the helpers (a concurrent caller, or a job that is itself parallel).
  bool run(int count, const std::function<void()>& job) {
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (!busy.owns_lock()) return false;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      while (static_cast<int>(threads_.size()) < count) {
        threads_.emplace_back([this, index = static_cast<int>(threads_.size())] { serve(index); });
      }
      job_ = &job;
      wanted_ = count;
      pending_.store(count, std::memory_order_relaxed);
      generation_.store(generation_.load(std::memory_order_relaxed) + 1, std::memory_order_release);
    }
    wake_.notify_all();
    job();
    if (spin_until([this] { return pending_.load(std::memory_order_acquire) == 0; }, kSpinMicroseconds)) {
      return true;
    }
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [this] { return pending_.load(std::memory_order_acquire) == 0; });
    return true;
  }

 private:
  static HelperThreads*& current() {
    static HelperThreads* pool = nullptr;
    return pool;
  }

  void serve(int index) {
    uint64_t seen = 0;
    for (;;) {
      const auto changed = [&] { return generation_.load(std::memory_order_acquire) != seen; };
      if (!spin_until(changed, kSpinMicroseconds)) {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, changed);
      }
      seen = generation_.load(std::memory_order_acquire);
      if (index >= wanted_) continue;
      (*job_)();
      if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        std::lock_guard<std::mutex> lock(mutex_);
        done_.notify_one();
      }
    }
  }

  std::mutex busy_;   // held by the one call using the helpers
  std::mutex mutex_;  // guards the sleeps and wake-ups; job_ and wanted_ are published by generation_
  std::condition_variable wake_, done_;
  std::vector<std::thread> threads_;
  const std::function<void()>* job_ = nullptr;
  int wanted_ = 0;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> pending_{0};
};

// Runs body(item) for item in [0, count) on `threads` threads (the caller is one of them). Items are handed out
// through an atomic counter, so callers list expensive items first. The helpers come from HelperThreads; when
// another call holds them, they are spawned for this call.
template <typename Body>
void parallel_for(int64_t count, int threads, Body body) {
  const int workers = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, count)));
  if (workers == 1) {
    for (int64_t i = 0; i < count; ++i) body(i);
    return;
  }
  std::atomic<int64_t> next{0};
  const std::function<void()> run = [&]() {
    for (int64_t i = next.fetch_add(1); i < count; i = next.fetch_add(1)) body(i);
  };
  if (HelperThreads::instance().run(workers - 1, run)) return;
  std::vector<std::thread> pool;
  pool.reserve(workers - 1);
  for (int w = 1; w < workers; ++w) pool.emplace_back(run);
  run();
  for (auto& t : pool) t.join();
}

// Splits [0, count) into contiguous ranges, `chunks_per_thread` per thread, handed out dynamically: body(begin,
// end). More chunks than threads because a helper may start late (MindSpore's op threads spin for a while
// after each op on the same cores), and a static half-and-half split would then wait for the late half.
template <typename Body>
void parallel_ranges(int64_t count, int threads, Body body, int chunks_per_thread = 4) {
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(static_cast<int64_t>(threads) * chunks_per_thread,
                                                                 count));
  parallel_for(parts, threads, [&](int64_t p) { body(count * p / parts, count * (p + 1) / parts); });
}

}  // namespace cogvlm2
