// Fused rotary embedding (NeoX rotate-half) of q [N, H, d] and k [N, KV, d], in place, by position id, from full-head
// cos/sin tables [P, d] (fp32; a bf16-rounded table is just fp32 values). No FMA contraction: each element is
// x*cos + rotated*sin with two rounded products, exactly as the composite computes it.
#pragma GCC optimize("fp-contract=off")

#include "rope.h"

#include "common.h"

namespace cogvlm2 {

void rotate_rows(const float* src, float* dst, int64_t heads, int64_t d, const float* cos, const float* sin) {
  const int64_t half = d / 2;
  for (int64_t h = 0; h < heads; ++h) {
    const float* in = src + h * d;
    float* out = dst + h * d;
    for (int64_t i = 0; i < half; ++i) {
      const float a = in[i], b = in[i + half];
      const float lo_a = a * cos[i], lo_b = -b * sin[i];
      const float hi_b = b * cos[i + half], hi_a = a * sin[i + half];
      out[i] = lo_a + lo_b;
      out[i + half] = hi_b + hi_a;
    }
  }
}

}  // namespace cogvlm2

// inputs: q [N,H,d] f32, k [N,KV,d] f32, positions [N] i32, cos [P,d] f32, sin [P,d] f32, config [threads] i32
// output: done [1] i32 (a token for ordering: q and k are rewritten in place)
COGVLM2_AOT(RopeInplace) {
  using namespace cogvlm2;
  Args a{nparam, params, ndims, shapes, dtypes};
  if (nparam != 7) return kBadArity;
  if (!a.is_f32(0) || !a.is_f32(1) || !a.is_i32(2) || !a.is_f32(3) || !a.is_f32(4) || !a.is_i32(5)) return kBadDtype;
  if (a.rank(0) != 3 || a.rank(1) != 3 || a.rank(3) != 2 || a.rank(4) != 2) return kBadShape;
  const int64_t n = a.dim(0, 0), heads = a.dim(0, 1), d = a.dim(0, 2), kv = a.dim(1, 1), table = a.dim(3, 0);
  if (a.dim(1, 0) != n || a.dim(1, 2) != d || a.numel(2) != n || a.dim(3, 1) != d || a.dim(4, 0) != table ||
      a.dim(4, 1) != d || d % 2 != 0)
    return kBadShape;
  float* q = a.data<float>(0);
  float* k = a.data<float>(1);
  const int32_t* pos = a.data<int32_t>(2);
  const float* cos = a.data<float>(3);
  const float* sin = a.data<float>(4);
  for (int64_t i = 0; i < n; ++i)
    if (pos[i] < 0 || pos[i] >= table) return kBadIndex;
  const int threads = n * (heads + kv) * d >= (1 << 16) ? a.data<int32_t>(5)[0] : 1;
  parallel_ranges(n, threads, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* c = cos + static_cast<int64_t>(pos[i]) * d;
      const float* s = sin + static_cast<int64_t>(pos[i]) * d;
      rotate_rows(q + i * heads * d, q + i * heads * d, heads, d, c, s);
      rotate_rows(k + i * kv * d, k + i * kv * d, kv, d, c, s);
    }
  });
  a.data<int32_t>(6)[0] = 1;
  return kOk;
}
