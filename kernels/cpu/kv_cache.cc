// KV-cache write by slot_mapping, in place: cache [slots, KV, d] <- values [N, KV, d] at rows slot_mapping[N].

#include "kv_cache.h"

namespace cogvlm2 {

int write_rows(float* cache, int64_t slots, int64_t row, const float* values, const int32_t* slot_mapping,
               int64_t n, int64_t values_stride) {
  if (values_stride <= 0) values_stride = row;
  for (int64_t i = 0; i < n; ++i)
    if (slot_mapping[i] < 0 || slot_mapping[i] >= slots) return kBadIndex;
  for (int64_t i = 0; i < n; ++i)
    std::memcpy(cache + static_cast<int64_t>(slot_mapping[i]) * row, values + i * values_stride, row * sizeof(float));
  return kOk;
}

}  // namespace cogvlm2

// inputs: cache [S,KV,d] f32, slot_mapping [N] i32, values [N,KV,d] f32; output: done [1] i32
COGVLM2_AOT(WriteKVCache) {
  using namespace cogvlm2;
  Args a{nparam, params, ndims, shapes, dtypes};
  if (nparam != 4) return kBadArity;
  if (!a.is_f32(0) || !a.is_i32(1) || !a.is_f32(2)) return kBadDtype;
  if (a.rank(0) < 2 || a.rank(2) != a.rank(0)) return kBadShape;
  const int64_t slots = a.dim(0, 0), n = a.dim(2, 0), row = a.numel(0) / std::max<int64_t>(slots, 1);
  if (a.numel(1) != n || a.numel(2) != n * row) return kBadShape;
  const int status = write_rows(a.data<float>(0), slots, row, a.data<float>(2), a.data<int32_t>(1), n);
  a.data<int32_t>(3)[0] = 1;
  return status;
}
