// KV-cache write by slot_mapping, in place: cache [slots, KV, d] <- values [N, KV, d] at rows slot_mapping[N].

#include "kv_cache.h"

namespace cogvlm2 {

template <typename T>
int write_rows(T* cache, int64_t slots, int64_t row, const float* values, const int32_t* slot_mapping, int64_t n,
               int64_t values_stride) {
  if (values_stride <= 0) values_stride = row;
  for (int64_t i = 0; i < n; ++i)
    if (slot_mapping[i] < 0 || slot_mapping[i] >= slots) return kBadIndex;
  for (int64_t i = 0; i < n; ++i)
    store_row(values + i * values_stride, cache + static_cast<int64_t>(slot_mapping[i]) * row, row);
  return kOk;
}

template int write_rows<float>(float*, int64_t, int64_t, const float*, const int32_t*, int64_t, int64_t);
template int write_rows<Bf16>(Bf16*, int64_t, int64_t, const float*, const int32_t*, int64_t, int64_t);
template int write_rows<Fp16>(Fp16*, int64_t, int64_t, const float*, const int32_t*, int64_t, int64_t);

}  // namespace cogvlm2

// inputs: cache [S,KV,d] f32, bf16 or f16, slot_mapping [N] i32, values [N,KV,d] f32 (rounded to the cache's
// dtype); output: done [1] i32
COGVLM2_AOT(WriteKVCache) {
  using namespace cogvlm2;
  Args a{nparam, params, ndims, shapes, dtypes};
  if (nparam != 4) return kBadArity;
  CacheType type;
  if (!cache_type(a, 0, type) || !a.is_i32(1) || !a.is_f32(2)) return kBadDtype;
  if (a.rank(0) < 2 || a.rank(2) != a.rank(0)) return kBadShape;
  const int64_t slots = a.dim(0, 0), n = a.dim(2, 0), row = a.numel(0) / std::max<int64_t>(slots, 1);
  if (a.numel(1) != n || a.numel(2) != n * row) return kBadShape;
  const int status = with_cache_type(type, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return write_rows(a.data<T>(0), slots, row, a.data<float>(2), a.data<int32_t>(1), n);
  });
  a.data<int32_t>(3)[0] = 1;
  return status;
}
