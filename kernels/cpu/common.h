// Shared helpers of the CPU kernels: the MindSpore AOT calling convention, shape checks, a small parallel-for.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

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

// Runs body(item) for item in [0, count) on `threads` threads (the caller is one of them). Items are handed out
// through an atomic counter, so callers list expensive items first. Threads are spawned per call: a persistent
// spinning pool would compete with MindSpore's own op threads on a 2-core machine.
template <typename Body>
void parallel_for(int64_t count, int threads, Body body) {
  const int workers = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, count)));
  if (workers == 1) {
    for (int64_t i = 0; i < count; ++i) body(i);
    return;
  }
  std::atomic<int64_t> next{0};
  auto run = [&]() {
    for (int64_t i = next.fetch_add(1); i < count; i = next.fetch_add(1)) body(i);
  };
  std::vector<std::thread> pool;
  pool.reserve(workers - 1);
  for (int w = 1; w < workers; ++w) pool.emplace_back(run);
  run();
  for (auto& t : pool) t.join();
}

// Splits [0, count) into contiguous ranges, `chunks_per_thread` per thread, handed out dynamically: body(begin,
// end). More chunks than threads because a spawned thread may start late (MindSpore's op threads spin for a while
// after each op on the same cores), and a static half-and-half split would then wait for the late half.
template <typename Body>
void parallel_ranges(int64_t count, int threads, Body body, int chunks_per_thread = 4) {
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(static_cast<int64_t>(threads) * chunks_per_thread,
                                                                 count));
  parallel_for(parts, threads, [&](int64_t p) { body(count * p / parts, count * (p + 1) / parts); });
}

}  // namespace cogvlm2
