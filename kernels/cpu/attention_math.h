// Inner loops of paged attention: scores of a tile of query rows against a tile of keys, and the P @ V update.
// AVX-512 versions keep the accumulators in registers; the portable versions are plain loops.
#pragma once

#include <cstdint>

#include "vec_math.h"

#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace cogvlm2 {

// K/V rows of a key tile are scattered over blocks and strided by the other KV heads, which the hardware
// prefetchers follow poorly: the loops over keys ask for the row this many keys ahead.
constexpr int64_t kPrefetchKeys = 16;

inline void prefetch_row(const float* row, int64_t d) {
  for (int64_t i = 0; i < d; i += 16) __builtin_prefetch(row + i, 0, 3);
}

// Scores use the queries transposed once per tile, qt[d][rows16], so each key scores 16 query rows per FMA and
// the softmax runs across rows in vector registers: scores are laid out [key][rows16].

#ifdef __AVX512F__

// Keys go Keys at a time so that Keys * Chunks independent FMA chains hide the FMA latency.
template <int Chunks, int Keys>
void score_rows_fixed(const float* qt, const float* const* key_rows, int64_t width, int64_t d, float* scores) {
  int64_t j = 0;
  for (; j + Keys <= width; j += Keys) {
    for (int u = 0; u < Keys; ++u)
      if (j + u + kPrefetchKeys < width) prefetch_row(key_rows[j + u + kPrefetchKeys], d);
    __m512 acc[Keys][Chunks];
    for (int u = 0; u < Keys; ++u)
      for (int c = 0; c < Chunks; ++c) acc[u][c] = _mm512_setzero_ps();
    for (int64_t i = 0; i < d; ++i) {
      const float* row = qt + i * Chunks * 16;
      for (int u = 0; u < Keys; ++u) {
        const __m512 ki = _mm512_set1_ps(key_rows[j + u][i]);
        for (int c = 0; c < Chunks; ++c) acc[u][c] = _mm512_fmadd_ps(ki, _mm512_loadu_ps(row + 16 * c), acc[u][c]);
      }
    }
    for (int u = 0; u < Keys; ++u)
      for (int c = 0; c < Chunks; ++c) _mm512_storeu_ps(scores + ((j + u) * Chunks + c) * 16, acc[u][c]);
  }
  if (Keys > 1 && j < width) score_rows_fixed<Chunks, 1>(qt, key_rows + j, width - j, d, scores + j * Chunks * 16);
}

// For Lanes query rows at once (they share the V rows): out[l][d] = out[l] * correction[l] + sum_j p[j][l] * v[j],
// p laid out [key][stride]. Each V chunk is loaded once for all lanes; Lanes * Chunks independent FMA chains.
template <int Chunks, int Lanes>
void accumulate_pv_fixed(float* out, int64_t d, const float* correction, const float* p, int64_t stride,
                         const float* const* v_rows, int64_t width) {
  __m512 acc[Lanes][Chunks];
  for (int l = 0; l < Lanes; ++l) {
    const __m512 corr = _mm512_set1_ps(correction[l]);
    for (int c = 0; c < Chunks; ++c) acc[l][c] = _mm512_mul_ps(_mm512_loadu_ps(out + l * d + 16 * c), corr);
  }
  for (int64_t j = 0; j < width; ++j) {
    if (j + kPrefetchKeys < width) prefetch_row(v_rows[j + kPrefetchKeys], 16 * Chunks);
    const float* v = v_rows[j];
    const float* pj = p + j * stride;
    for (int c = 0; c < Chunks; ++c) {
      const __m512 vc = _mm512_loadu_ps(v + 16 * c);
      for (int l = 0; l < Lanes; ++l) acc[l][c] = _mm512_fmadd_ps(_mm512_set1_ps(pj[l]), vc, acc[l][c]);
    }
  }
  for (int l = 0; l < Lanes; ++l)
    for (int c = 0; c < Chunks; ++c) _mm512_storeu_ps(out + l * d + 16 * c, acc[l][c]);
}

template <int Chunks>
void accumulate_pv_chunks(float* out, int64_t d, const float* correction, const float* p, int64_t stride,
                          const float* const* v_rows, int64_t width, int64_t lanes) {
  constexpr int kLanes = Chunks >= 8 ? 2 : (Chunks >= 4 ? 4 : 8);
  int64_t l = 0;
  for (; l + kLanes <= lanes; l += kLanes)
    accumulate_pv_fixed<Chunks, kLanes>(out + l * d, d, correction + l, p + l, stride, v_rows, width);
  for (; l < lanes; ++l) accumulate_pv_fixed<Chunks, 1>(out + l * d, d, correction + l, p + l, stride, v_rows, width);
}

// scores[j][rows16] = sum_i key_rows[j][i] * qt[i][rows16], rows16 a multiple of 16 up to 128.
inline void score_rows(const float* qt, const float* const* key_rows, int64_t width, int64_t d, int64_t rows16,
                       float* scores) {
  switch (rows16 / 16) {
    case 1: return score_rows_fixed<1, 8>(qt, key_rows, width, d, scores);
    case 2: return score_rows_fixed<2, 4>(qt, key_rows, width, d, scores);
    case 3: return score_rows_fixed<3, 2>(qt, key_rows, width, d, scores);
    case 4: return score_rows_fixed<4, 2>(qt, key_rows, width, d, scores);
    case 5: return score_rows_fixed<5, 1>(qt, key_rows, width, d, scores);
    case 6: return score_rows_fixed<6, 1>(qt, key_rows, width, d, scores);
    case 7: return score_rows_fixed<7, 1>(qt, key_rows, width, d, scores);
    default: return score_rows_fixed<8, 1>(qt, key_rows, width, d, scores);
  }
}

// Few query rows (a decode token's heads of one KV head): one dot product per (key, row) from the K row loaded
// once, instead of the transposed form's full 16-lane FMA per key element, which wastes most lanes when only a
// handful are used (measured: 4 rows of 16, the bench decode shape, spend ~75% of the score FMAs on padding).
constexpr int64_t kDotMaxRows = 8;

template <int Chunks>
void score_rows_dot_fixed(const float* q, int64_t rows, const float* const* key_rows, int64_t width, int64_t stride,
                          float* scores) {
  for (int64_t j = 0; j < width; ++j) {
    if (j + kPrefetchKeys < width) prefetch_row(key_rows[j + kPrefetchKeys], 16 * Chunks);
    __m512 key[Chunks];
    for (int c = 0; c < Chunks; ++c) key[c] = _mm512_loadu_ps(key_rows[j] + 16 * c);
    float* out = scores + j * stride;
    for (int64_t r = 0; r < rows; ++r) {
      const float* qr = q + r * 16 * Chunks;
      __m512 acc = _mm512_mul_ps(key[0], _mm512_loadu_ps(qr));
      for (int c = 1; c < Chunks; ++c) acc = _mm512_fmadd_ps(key[c], _mm512_loadu_ps(qr + 16 * c), acc);
      out[r] = _mm512_reduce_add_ps(acc);
    }
    for (int64_t r = rows; r < stride; ++r) out[r] = 0.f;  // padding lanes score 0, as in the transposed form
  }
}

// scores[j][r] = dot(q[r], key_rows[j]) for r < rows (q [rows][d], scaled), 0 for the padding lanes up to stride.
// Returns false (nothing done) where the transposed form is the one to use.
inline bool score_rows_dot(const float* q, int64_t rows, const float* const* key_rows, int64_t width, int64_t d,
                           int64_t stride, float* scores) {
  if (rows > kDotMaxRows) return false;
  switch (d % 16 == 0 && d <= 128 ? d / 16 : 0) {
    case 1: score_rows_dot_fixed<1>(q, rows, key_rows, width, stride, scores); return true;
    case 2: score_rows_dot_fixed<2>(q, rows, key_rows, width, stride, scores); return true;
    case 3: score_rows_dot_fixed<3>(q, rows, key_rows, width, stride, scores); return true;
    case 4: score_rows_dot_fixed<4>(q, rows, key_rows, width, stride, scores); return true;
    case 5: score_rows_dot_fixed<5>(q, rows, key_rows, width, stride, scores); return true;
    case 6: score_rows_dot_fixed<6>(q, rows, key_rows, width, stride, scores); return true;
    case 7: score_rows_dot_fixed<7>(q, rows, key_rows, width, stride, scores); return true;
    case 8: score_rows_dot_fixed<8>(q, rows, key_rows, width, stride, scores); return true;
    default: return false;
  }
}

// out[lanes][d] = out * correction[lane] + P^T V over `width` keys; p laid out [key][stride].
inline void accumulate_pv(float* out, int64_t d, const float* correction, const float* p, int64_t stride,
                          const float* const* v_rows, int64_t width, int64_t lanes) {
  switch (d % 16 == 0 && d <= 128 ? d / 16 : 0) {
    case 1: return accumulate_pv_chunks<1>(out, d, correction, p, stride, v_rows, width, lanes);
    case 2: return accumulate_pv_chunks<2>(out, d, correction, p, stride, v_rows, width, lanes);
    case 3: return accumulate_pv_chunks<3>(out, d, correction, p, stride, v_rows, width, lanes);
    case 4: return accumulate_pv_chunks<4>(out, d, correction, p, stride, v_rows, width, lanes);
    case 5: return accumulate_pv_chunks<5>(out, d, correction, p, stride, v_rows, width, lanes);
    case 6: return accumulate_pv_chunks<6>(out, d, correction, p, stride, v_rows, width, lanes);
    case 7: return accumulate_pv_chunks<7>(out, d, correction, p, stride, v_rows, width, lanes);
    case 8: return accumulate_pv_chunks<8>(out, d, correction, p, stride, v_rows, width, lanes);
  }
  for (int64_t l = 0; l < lanes; ++l) {
    float* o = out + l * d;
    for (int64_t i = 0; i < d; ++i) o[i] *= correction[l];
    for (int64_t j = 0; j < width; ++j) axpy(o, p[j * stride + l], v_rows[j], d);
  }
}

#else  // portable

inline bool score_rows_dot(const float*, int64_t, const float* const*, int64_t, int64_t, int64_t, float*) {
  return false;
}

inline void score_rows(const float* qt, const float* const* key_rows, int64_t width, int64_t d, int64_t rows16,
                       float* scores) {
  for (int64_t j = 0; j < width; ++j) {
    float* sc = scores + j * rows16;
    for (int64_t r = 0; r < rows16; ++r) sc[r] = 0.f;
    for (int64_t i = 0; i < d; ++i) axpy(sc, key_rows[j][i], qt + i * rows16, rows16);
  }
}

inline void accumulate_pv(float* out, int64_t d, const float* correction, const float* p, int64_t stride,
                          const float* const* v_rows, int64_t width, int64_t lanes) {
  for (int64_t l = 0; l < lanes; ++l) {
    float* o = out + l * d;
    for (int64_t i = 0; i < d; ++i) o[i] *= correction[l];
    for (int64_t j = 0; j < width; ++j) axpy(o, p[j * stride + l], v_rows[j], d);
  }
}

#endif

}  // namespace cogvlm2
