// The decoder's elementwise steps between its GEMMs, one pass each over rows of fp32 activations:
//   RmsNorm: y = x * rsqrt(mean(x^2) + eps) * w (the sum of squares accumulated in fp32, as the composite does);
//   SwiGLU:  y = silu(gate) * up of the stacked [N, 2F] gate/up projection (gate first), silu(g) = g / (1 + e^-g).
// At decode's few rows each is a few microseconds of work: they exist as kernels so that a layer's steps are
// dispatched for ~3 us each (kernels/pyboost.py) instead of the ~60 us of every MindSpore op they replace.

#include <cmath>

#include "common.h"
#include "vec_math.h"

namespace cogvlm2 {
namespace {

constexpr int64_t kParallelMinElements = 1 << 18;  // below this one thread: a spawned thread costs more

int threads_for(int64_t elements, int threads) { return elements >= kParallelMinElements ? threads : 1; }

void rms_norm_row(const float* x, const float* w, int64_t d, float eps, float* y) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < d; ++i) sum += x[i] * x[i];
  const float scale = 1.f / std::sqrt(sum / static_cast<float>(d) + eps);
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) y[i] = x[i] * scale * w[i];
}

void swiglu_row(const float* gate_up, int64_t f, float* y) {
  const float* up = gate_up + f;
  int64_t i = 0;
#ifdef __AVX512F__
  const __m512 one = _mm512_set1_ps(1.f);
  for (; i < f; i += 16) {
    const __mmask16 live = f - i >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (f - i)) - 1);
    const __m512 g = _mm512_maskz_loadu_ps(live, gate_up + i);
    const __m512 silu = _mm512_div_ps(g, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
    _mm512_mask_storeu_ps(y + i, live, _mm512_mul_ps(silu, _mm512_maskz_loadu_ps(live, up + i)));
  }
#endif
  for (; i < f; ++i) {
    const float g = gate_up[i];
    y[i] = g / (1.f + fast_exp(-g)) * up[i];
  }
}

}  // namespace
}  // namespace cogvlm2

// inputs: x [N,d] f32, w [d] f32, eps [1] f32, config [threads] i32; output: y [N,d] f32
COGVLM2_AOT(RmsNorm) {
  using namespace cogvlm2;
  Args a{nparam, params, ndims, shapes, dtypes};
  if (nparam != 5) return kBadArity;
  if (!a.is_f32(0) || !a.is_f32(1) || !a.is_f32(2) || !a.is_i32(3) || !a.is_f32(4)) return kBadDtype;
  if (a.rank(0) != 2 || a.numel(1) != a.dim(0, 1) || a.numel(2) != 1 || a.numel(4) != a.numel(0)) return kBadShape;
  const int64_t n = a.dim(0, 0), d = a.dim(0, 1);
  const float* x = a.data<float>(0);
  const float* w = a.data<float>(1);
  const float eps = a.data<float>(2)[0];
  float* y = a.data<float>(4);
  parallel_ranges(n, threads_for(n * d, a.data<int32_t>(3)[0]), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) rms_norm_row(x + r * d, w, d, eps, y + r * d);
  });
  return kOk;
}

// inputs: gate_up [N,2F] f32, config [threads] i32; output: y [N,F] f32
COGVLM2_AOT(SwiGLU) {
  using namespace cogvlm2;
  Args a{nparam, params, ndims, shapes, dtypes};
  if (nparam != 3) return kBadArity;
  if (!a.is_f32(0) || !a.is_i32(1) || !a.is_f32(2)) return kBadDtype;
  if (a.rank(0) != 2 || a.dim(0, 1) % 2 != 0 || a.numel(2) * 2 != a.numel(0)) return kBadShape;
  const int64_t n = a.dim(0, 0), f = a.dim(0, 1) / 2;
  const float* gate_up = a.data<float>(0);
  float* y = a.data<float>(2);
  parallel_ranges(n, threads_for(n * f, a.data<int32_t>(1)[0]), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) swiglu_row(gate_up + r * 2 * f, f, y + r * f);
  });
  return kOk;
}
