// The decoder's elementwise steps between its GEMMs, one pass each over rows of fp32 activations:
//   RmsNorm: y = x * rsqrt(mean(x^2) + eps) * w (the sum of squares accumulated in fp32, as the composite does);
//   SwiGLU:  y = silu(gate) * up of the stacked [N, 2F] gate/up projection (gate first), silu(g) = g / (1 + e^-g);
//   Gelu:    y = x / 2 * (1 + erf(x / sqrt 2)), the exact GELU of the vision encoder's MLP and adapter, in one pass
//            (MindSpore's composite takes several full-size temporaries: ~45 ms per bench image, and at a 1344 x
//            1344 image's 9,217 tokens x 15,360 more memory than the machine has).
// At decode's few rows each is a few microseconds of work: they exist as kernels so that a layer's steps are
// dispatched for ~3 us each (kernels/pyboost.py) instead of the ~60 us of every MindSpore op they replace.

#include <cmath>

#include "common.h"
#include "vec_math.h"

namespace cogvlm2 {
namespace {

constexpr int64_t kParallelMinElements = 1 << 18;  // below this one thread: waking a helper costs more

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

// erf by Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7, about fp32's rounding of erf near 1):
// erf(|x|) = 1 - t (a1 + t (a2 + t (a3 + t (a4 + t a5)))) e^(-x^2), t = 1 / (1 + p |x|), odd in x.
constexpr float kErfP = 0.3275911f, kErfA1 = 0.254829592f, kErfA2 = -0.284496736f, kErfA3 = 1.421413741f,
                kErfA4 = -1.453152027f, kErfA5 = 1.061405429f;
constexpr float kInvSqrt2 = 0.70710678118654752f;

float gelu_scalar(float x) {
  const float z = std::fabs(x) * kInvSqrt2, t = 1.f / (1.f + kErfP * z);
  const float poly = t * (kErfA1 + t * (kErfA2 + t * (kErfA3 + t * (kErfA4 + t * kErfA5))));
  const float erf_abs = 1.f - poly * fast_exp(-z * z);
  return 0.5f * x * (1.f + std::copysign(erf_abs, x));
}

void gelu_row(const float* x, int64_t n, float* y) {
  int64_t i = 0;
#ifdef __AVX512F__
  const __m512 one = _mm512_set1_ps(1.f), half = _mm512_set1_ps(0.5f), p = _mm512_set1_ps(kErfP);
  const __m512 inv_sqrt2 = _mm512_set1_ps(kInvSqrt2);
  const __m512i sign = _mm512_set1_epi32(static_cast<int32_t>(0x80000000u));
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    const __m512 z = _mm512_mul_ps(_mm512_abs_ps(v), inv_sqrt2);
    const __m512 t = _mm512_div_ps(one, _mm512_fmadd_ps(p, z, one));
    __m512 poly = _mm512_fmadd_ps(t, _mm512_set1_ps(kErfA5), _mm512_set1_ps(kErfA4));
    poly = _mm512_fmadd_ps(t, poly, _mm512_set1_ps(kErfA3));
    poly = _mm512_fmadd_ps(t, poly, _mm512_set1_ps(kErfA2));
    poly = _mm512_fmadd_ps(t, poly, _mm512_set1_ps(kErfA1));
    poly = _mm512_mul_ps(t, poly);
    const __m512 erf_abs = _mm512_fnmadd_ps(poly, exp16(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), z), z)), one);
    const __m512 erf = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(erf_abs),
                                                           _mm512_and_si512(_mm512_castps_si512(v), sign)));
    _mm512_storeu_ps(y + i, _mm512_mul_ps(_mm512_mul_ps(half, v), _mm512_add_ps(one, erf)));
  }
#endif
  for (; i < n; ++i) y[i] = gelu_scalar(x[i]);
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

// inputs: x [N,F] f32, config [threads] i32; output: y [N,F] f32 (may be x itself)
COGVLM2_AOT(Gelu) {
  using namespace cogvlm2;
  Args a{nparam, params, ndims, shapes, dtypes};
  if (nparam != 3) return kBadArity;
  if (!a.is_f32(0) || !a.is_i32(1) || !a.is_f32(2)) return kBadDtype;
  if (a.rank(0) != 2 || a.numel(2) != a.numel(0)) return kBadShape;
  const int64_t n = a.dim(0, 0), f = a.dim(0, 1);
  const float* x = a.data<float>(0);
  float* y = a.data<float>(2);
  parallel_ranges(n, threads_for(n * f, a.data<int32_t>(1)[0]), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) gelu_row(x + r * f, f, y + r * f);
  });
  return kOk;
}
