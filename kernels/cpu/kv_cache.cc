// KV-cache write by slot_mapping, in place: cache [slots, KV, d] <- values [N, KV, d] at rows slot_mapping[N].

#include "kv_cache.h"

namespace cogvlm2 {

template <typename T>
void write_row(const float* src, T* dst, int64_t kv, int64_t d) {
  store_row(src, dst, kv * d);
}

template <>
void write_row<I8>(const float* src, I8* dst, int64_t kv, int64_t d) {
  for (int64_t g = 0; g < kv; ++g) quantize_head(src + g * d, d, dst + g * head_elems<I8>(d));
}

template <typename T>
int write_rows(T* cache, int64_t slots, int64_t kv, int64_t d, const float* values, const int32_t* slot_mapping,
               int64_t n, int64_t values_stride) {
  if (values_stride <= 0) values_stride = kv * d;
  for (int64_t i = 0; i < n; ++i)
    if (slot_mapping[i] < 0 || slot_mapping[i] >= slots) return kBadIndex;
  const int64_t row = kv * head_elems<T>(d);
  for (int64_t i = 0; i < n; ++i)
    write_row(values + i * values_stride, cache + static_cast<int64_t>(slot_mapping[i]) * row, kv, d);
  return kOk;
}

#define COGVLM2_WRITE_ROWS(T) \
  template int write_rows<T>(T*, int64_t, int64_t, int64_t, const float*, const int32_t*, int64_t, int64_t);
COGVLM2_WRITE_ROWS(float)
COGVLM2_WRITE_ROWS(Bf16)
COGVLM2_WRITE_ROWS(Fp16)
COGVLM2_WRITE_ROWS(I8)

}  // namespace cogvlm2

// inputs: cache [S,KV,d] f32, bf16 or f16, or [S,KV,d+4] int8 (values and scale per head), slot_mapping [N] i32,
// values [N,KV,d] f32 (rounded or quantized to the cache's dtype); output: done [1] i32
COGVLM2_AOT(WriteKVCache) {
  using namespace cogvlm2;
  Args a{nparam, params, ndims, shapes, dtypes};
  if (nparam != 4) return kBadArity;
  CacheType type;
  if (!cache_type(a, 0, type) || !a.is_i32(1) || !a.is_f32(2)) return kBadDtype;
  if (a.rank(0) != 3 || a.rank(2) != 3) return kBadShape;
  const int64_t slots = a.dim(0, 0), kv = a.dim(0, 1), n = a.dim(2, 0), d = a.dim(2, 2);
  if (a.dim(2, 1) != kv || a.dim(0, 2) != head_elems(type, d) || a.numel(1) != n) return kBadShape;
  const int status = with_cache_type(type, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return write_rows(a.data<T>(0), slots, kv, d, a.data<float>(2), a.data<int32_t>(1), n);
  });
  a.data<int32_t>(3)[0] = 1;
  return status;
}
