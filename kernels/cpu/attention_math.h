// Inner loops of paged attention: scores of a tile of query rows against a tile of keys, and the P @ V update.
// AVX-512 versions keep the accumulators in registers; the portable versions are plain loops. K and V rows are of
// the cache's element type T (kv_cache.h), widened to fp32 as they are loaded or, where several passes read them,
// once into a per-thread buffer.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "kv_cache.h"
#include "vec_math.h"

#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace cogvlm2 {

// K/V rows of a key tile are scattered over blocks and strided by the other KV heads, which the hardware
// prefetchers follow poorly: the loops over keys ask for the row this many keys ahead.
constexpr int64_t kPrefetchKeys = 16;

template <typename T>
void prefetch_row(const T* row, int64_t d) {
  const char* bytes = reinterpret_cast<const char*>(row);
  for (int64_t i = 0; i < d * static_cast<int64_t>(sizeof(T)); i += 64) __builtin_prefetch(bytes + i, 0, 3);
}

// y[0, n) += alpha * x (x widened to fp32).
template <typename T>
void axpy_widened(float* y, float alpha, const T* x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * to_f32(x[i]);
}

// accumulate_pv for any d, as plain loops.
template <typename T>
void accumulate_pv_loops(float* out, int64_t d, const float* correction, const float* p, int64_t stride,
                         const T* const* v_rows, int64_t width, int64_t lanes) {
  for (int64_t l = 0; l < lanes; ++l) {
    float* o = out + l * d;
    for (int64_t i = 0; i < d; ++i) o[i] *= correction[l];
    for (int64_t j = 0; j < width; ++j) axpy_widened(o, p[j * stride + l], v_rows[j], d);
  }
}

// Few query rows (a decode token's heads of one KV head): one dot product per (key, row) from the K row loaded
// once, instead of the transposed form's full 16-lane FMA per key element, which wastes most lanes when only a
// handful are used (measured: 4 rows of 16, the bench decode shape, spend ~75% of the score FMAs on padding).
constexpr int64_t kDotMaxRows = 8;

// Scores use the queries transposed once per tile, qt[d][rows16], so each key scores 16 query rows per FMA and
// the softmax runs across rows in vector registers: scores are laid out [key][rows16].

#ifdef __AVX512F__

// 16 cache elements widened to fp32.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const Bf16* p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
inline __m512 load16(const Fp16* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

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
template <int Chunks, int Lanes, typename T>
void accumulate_pv_fixed(float* out, int64_t d, const float* correction, const float* p, int64_t stride,
                         const T* const* v_rows, int64_t width) {
  __m512 acc[Lanes][Chunks];
  for (int l = 0; l < Lanes; ++l) {
    const __m512 corr = _mm512_set1_ps(correction[l]);
    for (int c = 0; c < Chunks; ++c) acc[l][c] = _mm512_mul_ps(_mm512_loadu_ps(out + l * d + 16 * c), corr);
  }
  for (int64_t j = 0; j < width; ++j) {
    if (j + kPrefetchKeys < width) prefetch_row(v_rows[j + kPrefetchKeys], 16 * Chunks);
    const T* v = v_rows[j];
    const float* pj = p + j * stride;
    for (int c = 0; c < Chunks; ++c) {
      const __m512 vc = load16(v + 16 * c);
      for (int l = 0; l < Lanes; ++l) acc[l][c] = _mm512_fmadd_ps(_mm512_set1_ps(pj[l]), vc, acc[l][c]);
    }
  }
  for (int l = 0; l < Lanes; ++l)
    for (int c = 0; c < Chunks; ++c) _mm512_storeu_ps(out + l * d + 16 * c, acc[l][c]);
}

// Lanes per pass over the V rows: as many accumulators as the registers hold.
constexpr int pv_lanes(int chunks) { return chunks >= 8 ? 2 : (chunks >= 4 ? 4 : 8); }

template <int Chunks, typename T>
void accumulate_pv_chunks(float* out, int64_t d, const float* correction, const float* p, int64_t stride,
                          const T* const* v_rows, int64_t width, int64_t lanes) {
  constexpr int kLanes = pv_lanes(Chunks);
  int64_t l = 0;
  for (; l + kLanes <= lanes; l += kLanes)
    accumulate_pv_fixed<Chunks, kLanes, T>(out + l * d, d, correction + l, p + l, stride, v_rows, width);
  for (; l < lanes; ++l)
    accumulate_pv_fixed<Chunks, 1, T>(out + l * d, d, correction + l, p + l, stride, v_rows, width);
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

// The sums of four vectors, each added in _mm512_reduce_add_ps's order (so to the same values), in lanes 0, 4, 8
// and 12: a transposed reduction, cheaper than four horizontal ones.
inline __m512 reduce_add_4(__m512 a, __m512 b, __m512 c, __m512 d) {
  // lane i + lane i+8, two vectors per add
  const __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(1, 0, 1, 0)),
                                  _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, _MM_SHUFFLE(1, 0, 1, 0)),
                                  _mm512_shuffle_f32x4(c, d, _MM_SHUFFLE(3, 2, 3, 2)));
  // lane i + lane i+4: 128-bit block r now holds vector r's four partial sums
  const __m512 quads = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, _MM_SHUFFLE(2, 0, 2, 0)),
                                     _mm512_shuffle_f32x4(ab, cd, _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 pairs = _mm512_add_ps(quads, _mm512_permute_ps(quads, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm512_add_ps(pairs, _mm512_permute_ps(pairs, _MM_SHUFFLE(2, 3, 0, 1)));
}

template <int Chunks>
__m512 dot_lanes(const __m512* key, const float* q) {
  __m512 acc = _mm512_mul_ps(key[0], _mm512_loadu_ps(q));
  for (int c = 1; c < Chunks; ++c) acc = _mm512_fmadd_ps(key[c], _mm512_loadu_ps(q + 16 * c), acc);
  return acc;
}

// dot(q[r], key_row) for r < rows <= 8 in lanes [0, rows), zeros in the other lanes (q [rows][16 * Chunks]).
template <int Chunks, typename T>
__m512 dot_rows(const float* q, int64_t rows, const T* key_row) {
  __m512 key[Chunks];
  for (int c = 0; c < Chunks; ++c) key[c] = load16(key_row + 16 * c);
  __m512 acc[8];
  for (int64_t r = 0; r < 8; ++r)
    acc[r] = r < rows ? dot_lanes<Chunks>(key, q + r * 16 * Chunks) : _mm512_setzero_ps();
  const __m512 low = reduce_add_4(acc[0], acc[1], acc[2], acc[3]);
  const __m512 high = rows > 4 ? reduce_add_4(acc[4], acc[5], acc[6], acc[7]) : _mm512_setzero_ps();
  const __m512i sums = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 0, 0, 0, 0, 0, 0, 0);
  return _mm512_maskz_permutex2var_ps(0x00ff, low, sums, high);
}

// One 16-lane score row per key: rows <= 8 dot products, zeros in the padding lanes (as in the transposed form).
template <int Chunks, typename T>
void score_rows_dot_fixed(const float* q, int64_t rows, const T* const* key_rows, int64_t width, float* scores) {
  for (int64_t j = 0; j < width; ++j) {
    if (j + kPrefetchKeys < width) prefetch_row(key_rows[j + kPrefetchKeys], 16 * Chunks);
    _mm512_storeu_ps(scores + j * 16, dot_rows<Chunks>(q, rows, key_rows[j]));
  }
}

// All KV heads of one key per score row: lanes [g * group, (g + 1) * group) from KV head g's K row, the slot
// row's g-th; zeros from kv * group to stride.
template <int Chunks, typename T>
void score_heads_dot_fixed(const float* q, int64_t group, int64_t kv, const T* const* slot_rows, int64_t width,
                           int64_t stride, float* scores) {
  const int64_t d = 16 * Chunks;
  const __mmask16 rows = static_cast<__mmask16>((1u << group) - 1);
  for (int64_t j = 0; j < width; ++j) {
    if (j + kPrefetchKeys < width) prefetch_row(slot_rows[j + kPrefetchKeys], kv * d);
    float* out = scores + j * stride;
    for (int64_t g = 0; g < kv; ++g)
      _mm512_mask_storeu_ps(out + g * group, rows, dot_rows<Chunks>(q + g * group * d, group, slot_rows[j] + g * d));
    for (int64_t lane = kv * group; lane < stride; ++lane) out[lane] = 0.f;
  }
}

// scores[j][r] = dot(q[r], key_rows[j]) for r < rows (q [rows][d], scaled), 0 for the padding lanes up to stride
// (16 for these few rows). Returns false (nothing done) where the transposed form is the one to use.
template <typename T>
bool score_rows_dot(const float* q, int64_t rows, const T* const* key_rows, int64_t width, int64_t d,
                    int64_t stride, float* scores) {
  if (rows > kDotMaxRows || stride != 16) return false;
  switch (d % 16 == 0 && d <= 128 ? d / 16 : 0) {
    case 1: score_rows_dot_fixed<1, T>(q, rows, key_rows, width, scores); return true;
    case 2: score_rows_dot_fixed<2, T>(q, rows, key_rows, width, scores); return true;
    case 3: score_rows_dot_fixed<3, T>(q, rows, key_rows, width, scores); return true;
    case 4: score_rows_dot_fixed<4, T>(q, rows, key_rows, width, scores); return true;
    case 5: score_rows_dot_fixed<5, T>(q, rows, key_rows, width, scores); return true;
    case 6: score_rows_dot_fixed<6, T>(q, rows, key_rows, width, scores); return true;
    case 7: score_rows_dot_fixed<7, T>(q, rows, key_rows, width, scores); return true;
    case 8: score_rows_dot_fixed<8, T>(q, rows, key_rows, width, scores); return true;
    default: return false;
  }
}

inline bool heads_dot_applies(int64_t group, int64_t d) { return group <= kDotMaxRows && d % 16 == 0 && d <= 128; }

// scores[j][g * group + r] = dot(q[g * group + r], row g of slot_rows[j]) for the kv * group query rows of one token
// (q [kv * group][d], scaled; slot_rows[j] the key's K rows of all KV heads, d apart), 0 for the padding lanes up
// to stride. Only where heads_dot_applies(group, d).
template <typename T>
void score_heads_dot(const float* q, int64_t group, int64_t kv, const T* const* slot_rows, int64_t width,
                     int64_t d, int64_t stride, float* scores) {
  switch (d / 16) {
    case 1: return score_heads_dot_fixed<1, T>(q, group, kv, slot_rows, width, stride, scores);
    case 2: return score_heads_dot_fixed<2, T>(q, group, kv, slot_rows, width, stride, scores);
    case 3: return score_heads_dot_fixed<3, T>(q, group, kv, slot_rows, width, stride, scores);
    case 4: return score_heads_dot_fixed<4, T>(q, group, kv, slot_rows, width, stride, scores);
    case 5: return score_heads_dot_fixed<5, T>(q, group, kv, slot_rows, width, stride, scores);
    case 6: return score_heads_dot_fixed<6, T>(q, group, kv, slot_rows, width, stride, scores);
    case 7: return score_heads_dot_fixed<7, T>(q, group, kv, slot_rows, width, stride, scores);
    default: return score_heads_dot_fixed<8, T>(q, group, kv, slot_rows, width, stride, scores);
  }
}

// accumulate_pv with the rows widened as they are loaded.
template <typename T>
void accumulate_pv_direct(float* out, int64_t d, const float* correction, const float* p, int64_t stride,
                          const T* const* v_rows, int64_t width, int64_t lanes) {
  switch (d % 16 == 0 && d <= 128 ? d / 16 : 0) {
    case 1: return accumulate_pv_chunks<1, T>(out, d, correction, p, stride, v_rows, width, lanes);
    case 2: return accumulate_pv_chunks<2, T>(out, d, correction, p, stride, v_rows, width, lanes);
    case 3: return accumulate_pv_chunks<3, T>(out, d, correction, p, stride, v_rows, width, lanes);
    case 4: return accumulate_pv_chunks<4, T>(out, d, correction, p, stride, v_rows, width, lanes);
    case 5: return accumulate_pv_chunks<5, T>(out, d, correction, p, stride, v_rows, width, lanes);
    case 6: return accumulate_pv_chunks<6, T>(out, d, correction, p, stride, v_rows, width, lanes);
    case 7: return accumulate_pv_chunks<7, T>(out, d, correction, p, stride, v_rows, width, lanes);
    case 8: return accumulate_pv_chunks<8, T>(out, d, correction, p, stride, v_rows, width, lanes);
  }
  accumulate_pv_loops(out, d, correction, p, stride, v_rows, width, lanes);
}

// The lanes one pass of accumulate_pv_direct over the rows serves.
inline int64_t lanes_per_pass(int64_t d) { return d % 16 == 0 && d <= 128 ? pv_lanes(static_cast<int>(d / 16)) : 1; }

template <typename T>
void widen_row(const T* row, int64_t d, float* out) {
  int64_t i = 0;
  for (; i + 16 <= d; i += 16) _mm512_storeu_ps(out + i, load16(row + i));
  for (; i < d; ++i) out[i] = to_f32(row[i]);
}

// ---- bf16 math (compute dtype bfloat16 over a bf16 cache): Q and P rounded to bf16, products by vdpbf16ps -----
// Two key elements (or two keys) per instruction into fp32 accumulators: half the multiply instructions of the
// fp32 forms, and the cache's bf16 K and V rows are read as they are (no widened copies).

// Element e of the 32 in a pair-interleaved vector takes element kInterleave[e] of (16 of a, then 16 of b):
// a[0], b[0], a[1], b[1], ...: the bf16 dot products' operand layout (vdpbf16ps, AMX's tdpbf16ps).
alignas(64) inline constexpr uint16_t kInterleave[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                                         8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};

COGVLM2_BF16_TARGET inline __m512i interleave_bf16(__m512i halves) {
  return _mm512_permutexvar_epi16(_mm512_load_si512(kInterleave), halves);
}

// Elements [0, 16) of rows v0 and v1 pair-interleaved: v0[0], v1[0], v0[1], v1[1], ... (two keys' V as one operand).
COGVLM2_BF16_TARGET inline __m512i interleave_rows_bf16(const Bf16* v0, const Bf16* v1) {
  return interleave_bf16(_mm512_inserti64x4(
      _mm512_zextsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v0))),
      _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v1)), 1));
}

// scores[j][rows16] = sum_i key_rows[j][i] * q[i][rows16] with the fp32 queries split into two bf16 parts
// (q = high + low, to 2^-16 of q): qt2 [2][d / 2][rows16] their pairs of consecutive elements (element 2i in the
// low half), the high parts then the low parts; each key pair is broadcast straight from its cache row.
template <int Chunks, int Keys>
COGVLM2_BF16_TARGET void score_rows_bf16_fixed(const uint32_t* qt2, const Bf16* const* key_rows, int64_t width,
                                               int64_t d, float* scores) {
  const int64_t low_parts = (d / 2) * Chunks * 16;
  int64_t j = 0;
  for (; j + Keys <= width; j += Keys) {
    for (int u = 0; u < Keys; ++u)
      if (j + u + kPrefetchKeys < width) prefetch_row(key_rows[j + u + kPrefetchKeys], d);
    __m512 acc[Keys][Chunks];
    for (int u = 0; u < Keys; ++u)
      for (int c = 0; c < Chunks; ++c) acc[u][c] = _mm512_setzero_ps();
    for (int64_t i = 0; i < d / 2; ++i) {
      const uint32_t* row = qt2 + i * Chunks * 16;
      for (int u = 0; u < Keys; ++u) {
        uint32_t pair;
        std::memcpy(&pair, key_rows[j + u] + 2 * i, sizeof(pair));
        const __m512bh k = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int32_t>(pair)));
        for (int c = 0; c < Chunks; ++c) {
          acc[u][c] = _mm512_dpbf16_ps(acc[u][c], reinterpret_cast<__m512bh>(_mm512_loadu_si512(row + 16 * c)), k);
          acc[u][c] = _mm512_dpbf16_ps(acc[u][c],
                                       reinterpret_cast<__m512bh>(_mm512_loadu_si512(row + low_parts + 16 * c)), k);
        }
      }
    }
    for (int u = 0; u < Keys; ++u)
      for (int c = 0; c < Chunks; ++c) _mm512_storeu_ps(scores + ((j + u) * Chunks + c) * 16, acc[u][c]);
  }
  if (Keys > 1 && j < width)
    score_rows_bf16_fixed<Chunks, 1>(qt2, key_rows + j, width - j, d, scores + j * Chunks * 16);
}

COGVLM2_BF16_TARGET inline void score_rows_bf16(const uint32_t* qt2, const Bf16* const* key_rows, int64_t width,
                                                int64_t d, int64_t rows16, float* scores) {
  switch (rows16 / 16) {
    case 1: return score_rows_bf16_fixed<1, 8>(qt2, key_rows, width, d, scores);
    case 2: return score_rows_bf16_fixed<2, 4>(qt2, key_rows, width, d, scores);
    case 3: return score_rows_bf16_fixed<3, 2>(qt2, key_rows, width, d, scores);
    case 4: return score_rows_bf16_fixed<4, 2>(qt2, key_rows, width, d, scores);
    case 5: return score_rows_bf16_fixed<5, 1>(qt2, key_rows, width, d, scores);
    case 6: return score_rows_bf16_fixed<6, 1>(qt2, key_rows, width, d, scores);
    case 7: return score_rows_bf16_fixed<7, 1>(qt2, key_rows, width, d, scores);
    default: return score_rows_bf16_fixed<8, 1>(qt2, key_rows, width, d, scores);
  }
}

// pairs[j / 2][lane] = bf16 pair (p[j][lane] low, p[j + 1][lane] high) for j < width (an odd width's last pair
// gets 0 high); p [width][stride], stride a multiple of 16.
COGVLM2_BF16_TARGET inline void probability_pairs(const float* p, int64_t width, int64_t stride, uint32_t* pairs) {
  for (int64_t j = 0; j < width; j += 2) {
    for (int64_t lane = 0; lane < stride; lane += 16) {
      const __m512 low = _mm512_loadu_ps(p + j * stride + lane);
      const __m512 high = j + 1 < width ? _mm512_loadu_ps(p + (j + 1) * stride + lane) : _mm512_setzero_ps();
      const __m512i halves = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(high, low));
      _mm512_storeu_si512(pairs + (j / 2) * stride + lane, interleave_bf16(halves));
    }
  }
}

// accumulate_pv over bf16 V rows by key pairs: out[l] = out[l] * correction[l] + sum_j p[j][l] v[j], p as
// probability_pairs; each pair of V rows interleaved once per chunk for all lanes.
template <int Chunks, int Lanes>
COGVLM2_BF16_TARGET void accumulate_pv_bf16_fixed(float* out, int64_t d, const float* correction,
                                                  const uint32_t* pairs, int64_t stride, const Bf16* const* v_rows,
                                                  int64_t width) {
  __m512 acc[Lanes][Chunks];
  for (int l = 0; l < Lanes; ++l) {
    const __m512 corr = _mm512_set1_ps(correction[l]);
    for (int c = 0; c < Chunks; ++c) acc[l][c] = _mm512_mul_ps(_mm512_loadu_ps(out + l * d + 16 * c), corr);
  }
  for (int64_t j = 0; j < width; j += 2) {
    if (j + kPrefetchKeys < width) prefetch_row(v_rows[j + kPrefetchKeys], 16 * Chunks);
    if (j + 1 + kPrefetchKeys < width) prefetch_row(v_rows[j + 1 + kPrefetchKeys], 16 * Chunks);
    const Bf16* v0 = v_rows[j];
    const Bf16* v1 = j + 1 < width ? v_rows[j + 1] : v0;  // an odd width's partner: its probability is 0
    const uint32_t* pj = pairs + (j / 2) * stride;
    for (int c = 0; c < Chunks; ++c) {
      const __m512bh vc = reinterpret_cast<__m512bh>(interleave_rows_bf16(v0 + 16 * c, v1 + 16 * c));
      for (int l = 0; l < Lanes; ++l)
        acc[l][c] = _mm512_dpbf16_ps(acc[l][c], vc,
                                     reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int32_t>(pj[l]))));
    }
  }
  for (int l = 0; l < Lanes; ++l)
    for (int c = 0; c < Chunks; ++c) _mm512_storeu_ps(out + l * d + 16 * c, acc[l][c]);
}

template <int Chunks>
COGVLM2_BF16_TARGET void accumulate_pv_bf16_chunks(float* out, int64_t d, const float* correction,
                                                   const uint32_t* pairs, int64_t stride, const Bf16* const* v_rows,
                                                   int64_t width, int64_t lanes) {
  constexpr int kLanes = pv_lanes(Chunks);
  int64_t l = 0;
  for (; l + kLanes <= lanes; l += kLanes)
    accumulate_pv_bf16_fixed<Chunks, kLanes>(out + l * d, d, correction + l, pairs + l, stride, v_rows, width);
  for (; l < lanes; ++l)
    accumulate_pv_bf16_fixed<Chunks, 1>(out + l * d, d, correction + l, pairs + l, stride, v_rows, width);
}

// Only where bf16_dot_applies(d).
COGVLM2_BF16_TARGET inline void accumulate_pv_bf16(float* out, int64_t d, const float* correction,
                                                   const uint32_t* pairs, int64_t stride, const Bf16* const* v_rows,
                                                   int64_t width, int64_t lanes) {
  switch (d / 16) {
    case 1: return accumulate_pv_bf16_chunks<1>(out, d, correction, pairs, stride, v_rows, width, lanes);
    case 2: return accumulate_pv_bf16_chunks<2>(out, d, correction, pairs, stride, v_rows, width, lanes);
    case 3: return accumulate_pv_bf16_chunks<3>(out, d, correction, pairs, stride, v_rows, width, lanes);
    case 4: return accumulate_pv_bf16_chunks<4>(out, d, correction, pairs, stride, v_rows, width, lanes);
    case 5: return accumulate_pv_bf16_chunks<5>(out, d, correction, pairs, stride, v_rows, width, lanes);
    case 6: return accumulate_pv_bf16_chunks<6>(out, d, correction, pairs, stride, v_rows, width, lanes);
    case 7: return accumulate_pv_bf16_chunks<7>(out, d, correction, pairs, stride, v_rows, width, lanes);
    default: return accumulate_pv_bf16_chunks<8>(out, d, correction, pairs, stride, v_rows, width, lanes);
  }
}

inline bool bf16_dot_applies(int64_t d) { return d % 16 == 0 && d <= 128; }

#else  // portable

template <typename T>
bool score_rows_dot(const float*, int64_t, const T* const*, int64_t, int64_t, int64_t, float*) {
  return false;
}

inline bool heads_dot_applies(int64_t, int64_t) { return true; }

template <typename T>
void score_heads_dot(const float* q, int64_t group, int64_t kv, const T* const* slot_rows, int64_t width,
                     int64_t d, int64_t stride, float* scores) {
  for (int64_t j = 0; j < width; ++j)
    for (int64_t lane = 0; lane < stride; ++lane) {
      float dot = 0.f;
      if (lane < kv * group)
        for (int64_t i = 0; i < d; ++i) dot += q[lane * d + i] * to_f32(slot_rows[j][(lane / group) * d + i]);
      scores[j * stride + lane] = dot;
    }
}

inline void score_rows(const float* qt, const float* const* key_rows, int64_t width, int64_t d, int64_t rows16,
                       float* scores) {
  for (int64_t j = 0; j < width; ++j) {
    float* sc = scores + j * rows16;
    for (int64_t r = 0; r < rows16; ++r) sc[r] = 0.f;
    for (int64_t i = 0; i < d; ++i) axpy(sc, key_rows[j][i], qt + i * rows16, rows16);
  }
}

template <typename T>
void accumulate_pv_direct(float* out, int64_t d, const float* correction, const float* p, int64_t stride,
                          const T* const* v_rows, int64_t width, int64_t lanes) {
  accumulate_pv_loops(out, d, correction, p, stride, v_rows, width, lanes);
}

inline int64_t lanes_per_pass(int64_t) { return 1; }

inline bool bf16_dot_applies(int64_t) { return false; }
inline void score_rows_bf16(const uint32_t*, const Bf16* const*, int64_t, int64_t, int64_t, float*) {}
inline void probability_pairs(const float*, int64_t, int64_t, uint32_t*) {}
inline void accumulate_pv_bf16(float*, int64_t, const float*, const uint32_t*, int64_t, const Bf16* const*, int64_t,
                               int64_t) {}

template <typename T>
void widen_row(const T* row, int64_t d, float* out) {
  for (int64_t i = 0; i < d; ++i) out[i] = to_f32(row[i]);
}

#endif

// The rows widened to fp32, in a buffer of this thread's (valid until its next call).
template <typename T>
const float* const* widen_rows(const T* const* rows, int64_t width, int64_t d) {
  thread_local std::vector<float> buffer;
  thread_local std::vector<const float*> widened;
  buffer.resize(width * d);
  widened.resize(width);
  for (int64_t j = 0; j < width; ++j) {
    if (j + kPrefetchKeys < width) prefetch_row(rows[j + kPrefetchKeys], d);
    widen_row(rows[j], d, buffer.data() + j * d);
    widened[j] = buffer.data() + j * d;
  }
  return widened.data();
}

// The transposed scores broadcast every key element to all lanes, which a 16-bit row could only feed through a
// scalar conversion per element: its rows are widened once, then scored as fp32 rows.
template <typename T>
void score_rows(const float* qt, const T* const* key_rows, int64_t width, int64_t d, int64_t rows16,
                float* scores) {
  score_rows(qt, widen_rows(key_rows, width, d), width, d, rows16, scores);
}

// out[lanes][d] = out * correction[lane] + P^T V over `width` keys; p laid out [key][stride]. 16-bit rows are
// widened as they are loaded, or once up front when more than two passes over the lanes would each widen them
// again (measured: at two passes, a decode's four rows at head_dim 128, widening as they load is faster).
template <typename T>
void accumulate_pv(float* out, int64_t d, const float* correction, const float* p, int64_t stride,
                   const T* const* v_rows, int64_t width, int64_t lanes) {
  if (!std::is_same_v<T, float> && lanes > 2 * lanes_per_pass(d))
    return accumulate_pv_direct(out, d, correction, p, stride, widen_rows(v_rows, width, d), width, lanes);
  accumulate_pv_direct(out, d, correction, p, stride, v_rows, width, lanes);
}

}  // namespace cogvlm2
