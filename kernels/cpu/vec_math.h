// Small vector loops: axpy, column max/sum over a [rows][lanes] layout, and an exp accurate to ~2 ulp (AVX-512
// intrinsics where available, else loops the compiler vectorises with -fopenmp-simd).
#pragma once

#include <cstdint>
#include <cstring>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace cogvlm2 {

inline void add_to(float* y, const float* x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += x[i];
}

inline void axpy(float* y, float alpha, const float* x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

// Cephes-style expf: 2^n * poly(r) with x = n ln2 + r; inputs below -87 flush to ~1e-38 (callers never pass
// masked scores, so that floor never reaches a result).
#pragma omp declare simd
inline float fast_exp(float x) {
  x = x < -87.f ? -87.f : (x > 88.f ? 88.f : x);
  const float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

#ifdef __AVX512F__

// fast_exp on 16 lanes.
inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.f)), _mm512_set1_ps(88.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f),
                                                        _mm512_set1_ps(0.5f)), _MM_FROUND_TO_NEG_INF);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
}

// x laid out [count][lanes] (lanes a multiple of 16): out[lane] = max over rows (-inf for no rows).
inline void column_max(const float* x, int64_t count, int64_t lanes, float* out) {
  for (int64_t c = 0; c < lanes; c += 16) {
    __m512 acc = _mm512_set1_ps(-__builtin_inff());
    for (int64_t j = 0; j < count; ++j) acc = _mm512_max_ps(acc, _mm512_loadu_ps(x + j * lanes + c));
    _mm512_storeu_ps(out + c, acc);
  }
}

// out[lane] += sum over rows of x[row][lane].
inline void column_sum_into(const float* x, int64_t count, int64_t lanes, float* out) {
  for (int64_t c = 0; c < lanes; c += 16) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t j = 0; j < count; ++j) acc = _mm512_add_ps(acc, _mm512_loadu_ps(x + j * lanes + c));
    _mm512_storeu_ps(out + c, _mm512_add_ps(_mm512_loadu_ps(out + c), acc));
  }
}

// x[j][lanes] = exp(x[j][lanes] - shift[lanes]) over `count` rows of `lanes` floats (a multiple of 16).
inline void exp_shifted_rows(float* x, const float* shift, int64_t count, int64_t lanes) {
  for (int64_t j = 0; j < count; ++j)
    for (int64_t c = 0; c < lanes; c += 16) {
      float* p = x + j * lanes + c;
      _mm512_storeu_ps(p, exp16(_mm512_sub_ps(_mm512_loadu_ps(p), _mm512_loadu_ps(shift + c))));
    }
}

#else

inline void exp_shifted_rows(float* x, const float* shift, int64_t count, int64_t lanes) {
  for (int64_t j = 0; j < count; ++j) {
    float* p = x + j * lanes;
#pragma omp simd
    for (int64_t c = 0; c < lanes; ++c) p[c] = fast_exp(p[c] - shift[c]);
  }
}

inline void column_max(const float* x, int64_t count, int64_t lanes, float* out) {
  for (int64_t c = 0; c < lanes; ++c) out[c] = -__builtin_inff();
  for (int64_t j = 0; j < count; ++j)
    for (int64_t c = 0; c < lanes; ++c) out[c] = out[c] > x[j * lanes + c] ? out[c] : x[j * lanes + c];
}

inline void column_sum_into(const float* x, int64_t count, int64_t lanes, float* out) {
  for (int64_t j = 0; j < count; ++j) add_to(out, x + j * lanes, lanes);
}

#endif

}  // namespace cogvlm2
