#include "gemm.h"

#include <algorithm>
#include <vector>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace cogvlm2 {
namespace {

constexpr int kRows = 4;  // tokens per micro-tile (6 x 4 measured slower: register pressure)
constexpr int kCols = 4;  // weight rows per micro-tile

#ifdef __AVX512F__

// acc[r][c] over k in [0, len): dot(x[r], w[c]); adds the sums into y[r][c].
template <int R, int C>
void micro_tile(const float* x, int64_t ldx, const float* w, int64_t ldw, float* y, int64_t ldy, int64_t len) {
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= len; i += 16) {
    __m512 wv[C];
    for (int c = 0; c < C; ++c) wv[c] = _mm512_loadu_ps(w + c * ldw + i);
    for (int r = 0; r < R; ++r) {
      const __m512 xv = _mm512_loadu_ps(x + r * ldx + i);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_fmadd_ps(xv, wv[c], acc[r][c]);
    }
  }
  if (i < len) {
    const __mmask16 mask = static_cast<__mmask16>((1u << (len - i)) - 1);
    __m512 wv[C];
    for (int c = 0; c < C; ++c) wv[c] = _mm512_maskz_loadu_ps(mask, w + c * ldw + i);
    for (int r = 0; r < R; ++r) {
      const __m512 xv = _mm512_maskz_loadu_ps(mask, x + r * ldx + i);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_fmadd_ps(xv, wv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) y[r * ldy + c] += _mm512_reduce_add_ps(acc[r][c]);
}

#else

template <int R, int C>
void micro_tile(const float* x, int64_t ldx, const float* w, int64_t ldw, float* y, int64_t ldy, int64_t len) {
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) {
      float acc = 0.f;
#pragma omp simd reduction(+ : acc)
      for (int64_t i = 0; i < len; ++i) acc += x[r * ldx + i] * w[c * ldw + i];
      y[r * ldy + c] += acc;
    }
}

#endif

using MicroTile = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t, int64_t);

template <int R>
MicroTile pick_cols(int64_t cols) {
  switch (cols) {
    case 1: return micro_tile<R, 1>;
    case 2: return micro_tile<R, 2>;
    case 3: return micro_tile<R, 3>;
    default: return micro_tile<R, 4>;
  }
}

MicroTile pick(int64_t rows, int64_t cols) {
  switch (rows) {
    case 1: return pick_cols<1>(cols);
    case 2: return pick_cols<2>(cols);
    case 3: return pick_cols<3>(cols);
    default: return pick_cols<kRows>(cols);
  }
}

// Columns [n0, n1) of y, every token. Blocked so that a k_block x n_block panel of w stays in L2 while every token
// block (in L1) passes over it.
void gemm_columns(int64_t m, int64_t n0, int64_t n1, int64_t k, const float* x, const float* w, float* y,
                  int64_t ldy, int64_t k_block, int64_t n_block) {
  for (int64_t k0 = 0; k0 < k; k0 += k_block) {
    const int64_t len = std::min(k_block, k - k0);
    for (int64_t b0 = n0; b0 < n1; b0 += n_block) {
      const int64_t b1 = std::min(n1, b0 + n_block);
      for (int64_t r0 = 0; r0 < m; r0 += kRows) {
        const int64_t rows = std::min<int64_t>(kRows, m - r0);
        for (int64_t c0 = b0; c0 < b1; c0 += kCols) {
          const int64_t cols = std::min<int64_t>(kCols, b1 - c0);
          pick(rows, cols)(x + r0 * k + k0, k, w + c0 * k + k0, k, y + r0 * ldy + c0, ldy, len);
        }
      }
    }
  }
}

#ifdef __AVX512F__

// Larger token counts: a panel of 32 weight rows is packed k-major (packed[kk][32]) once per k block, then every
// token block of 8 rows runs over it with 8 x 2 accumulators, one broadcast of x and two packed loads per k.
constexpr int64_t kPanel = 32;
constexpr int kPanelRows = 8;
constexpr int64_t kPackedMinRows = 48;  // measured: below this the dot-product tiles win (too few rows to repay packing)

void pack_panel(const float* w, int64_t ldw, int64_t cols, int64_t len, float* packed) {
  const __m512i rows = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                          _mm512_set1_epi32(static_cast<int32_t>(ldw)));
  for (int64_t half = 0; half < 2; ++half) {
    const int64_t live = std::min<int64_t>(16, std::max<int64_t>(0, cols - 16 * half));
    const __mmask16 mask = live == 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << live) - 1);
    const float* base = w + 16 * half * ldw;
    for (int64_t kk = 0; kk < len; ++kk)
      _mm512_storeu_ps(packed + kk * kPanel + 16 * half,
                       live == 0 ? _mm512_setzero_ps()
                                 : _mm512_mask_i32gather_ps(_mm512_setzero_ps(), mask, rows, base + kk, 4));
  }
}

// R rows x 32 columns over a packed panel (packed[kk][32]): 2 x R accumulators, one broadcast of x and two packed
// loads per k. It also pulls `pf_lines` cache lines from `pf` into L2 as it goes (the weights of the next panel,
// so that streaming them from memory overlaps this panel's FMAs instead of stalling the next panel's first tile).
template <int R>
void prefetching_tile(const float* x, int64_t ldx, const float* packed, int64_t len, float* y, int64_t ldy,
                      int64_t cols, bool add, const char* pf, int64_t pf_lines) {
  __m512 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  const int64_t per_4k = len > 0 ? (pf_lines * 4 + len - 1) / len : 0;
  int64_t issued = 0;
  for (int64_t kk = 0; kk < len; ++kk) {
    if ((kk & 3) == 0)
      for (int64_t l = 0; l < per_4k && issued < pf_lines; ++l, ++issued) _mm_prefetch(pf + issued * 64, _MM_HINT_T1);
    const __m512 b0 = _mm512_loadu_ps(packed + kk * kPanel), b1 = _mm512_loadu_ps(packed + kk * kPanel + 16);
    for (int r = 0; r < R; ++r) {
      const __m512 a = _mm512_set1_ps(x[r * ldx + kk]);
      acc[r][0] = _mm512_fmadd_ps(a, b0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(a, b1, acc[r][1]);
    }
  }
  const __mmask16 m0 = cols >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << cols) - 1);
  const __mmask16 m1 = cols >= 32 ? static_cast<__mmask16>(0xFFFF)
                                  : static_cast<__mmask16>(cols > 16 ? (1u << (cols - 16)) - 1 : 0);
  for (int r = 0; r < R; ++r) {
    float* out = y + r * ldy;
    if (add) {
      acc[r][0] = _mm512_add_ps(acc[r][0], _mm512_maskz_loadu_ps(m0, out));
      acc[r][1] = _mm512_add_ps(acc[r][1], _mm512_maskz_loadu_ps(m1, out + 16));
    }
    _mm512_mask_storeu_ps(out, m0, acc[r][0]);
    _mm512_mask_storeu_ps(out + 16, m1, acc[r][1]);
  }
}

template <int R>
void packed_tile(const float* x, int64_t ldx, const float* packed, int64_t len, float* y, int64_t ldy, int64_t cols,
                 bool add) {
  prefetching_tile<R>(x, ldx, packed, len, y, ldy, cols, add, nullptr, 0);
}

using PackedTile = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t, int64_t, bool);

PackedTile pick_packed(int64_t rows) {
  static const PackedTile tiles[] = {packed_tile<1>, packed_tile<2>, packed_tile<3>, packed_tile<4>,
                                     packed_tile<5>, packed_tile<6>, packed_tile<7>, packed_tile<8>};
  return tiles[rows - 1];
}

// Columns [n0, n1) of y (ldy), every token; accumulate adds to y.
void gemm_columns_packed(int64_t m, int64_t n0, int64_t n1, int64_t k, const float* x, const float* w, float* y,
                         int64_t ldy, int64_t k_block, bool accumulate) {
  thread_local std::vector<float> packed;
  packed.resize(k_block * kPanel);
  for (int64_t k0 = 0; k0 < k; k0 += k_block) {
    const int64_t len = std::min(k_block, k - k0);
    for (int64_t c0 = n0; c0 < n1; c0 += kPanel) {
      const int64_t cols = std::min(kPanel, n1 - c0);
      pack_panel(w + c0 * k + k0, k, cols, len, packed.data());
      for (int64_t r0 = 0; r0 < m; r0 += kPanelRows) {
        const int64_t rows = std::min<int64_t>(kPanelRows, m - r0);
        pick_packed(rows)(x + r0 * k + k0, k, packed.data(), len, y + r0 * ldy + c0, ldy, cols,
                          accumulate || k0 > 0);
      }
    }
  }
}

#endif

// 8 x 32 tiles over prepacked panels: the AVX-512 tile above when available, else a portable one the compiler
// vectorises for whatever ISA it targets.
constexpr int kPrepackedRows = 8;

template <int R>
void portable_prepacked_tile(const float* x, int64_t ldx, const float* panel, int64_t len, float* y, int64_t ldy,
                             int64_t cols, bool add, const char* /*prefetch*/, int64_t /*prefetch_lines*/) {
  float acc[R][kPackedPanel] = {};
  for (int64_t kk = 0; kk < len; ++kk) {
    const float* b = panel + kk * kPackedPanel;
    for (int r = 0; r < R; ++r) {
      const float a = x[r * ldx + kk];
#pragma omp simd
      for (int c = 0; c < kPackedPanel; ++c) acc[r][c] += a * b[c];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int64_t c = 0; c < cols; ++c) y[r * ldy + c] = add ? y[r * ldy + c] + acc[r][c] : acc[r][c];
}

using PrepackedTile = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t, int64_t, bool,
                              const char*, int64_t);

PrepackedTile pick_prepacked(int64_t rows) {
#ifdef __AVX512F__
  static const PrepackedTile tiles[] = {prefetching_tile<1>, prefetching_tile<2>, prefetching_tile<3>,
                                        prefetching_tile<4>, prefetching_tile<5>, prefetching_tile<6>,
                                        prefetching_tile<7>, prefetching_tile<8>};
  return tiles[rows - 1];
#else
  static const PrepackedTile tiles[] = {
      portable_prepacked_tile<1>, portable_prepacked_tile<2>, portable_prepacked_tile<3>, portable_prepacked_tile<4>,
      portable_prepacked_tile<5>, portable_prepacked_tile<6>, portable_prepacked_tile<7>, portable_prepacked_tile<8>};
  return tiles[rows - 1];
#endif
}

// Rows are taken kRowChunk at a time so that their k-slice stays in L2 while every panel of the range passes.
constexpr int64_t kRowChunk = 128;
constexpr int64_t kDefaultPrepackedKBlock = 2048;

}  // namespace

void gemm_prepacked_panels(int64_t m, int64_t n, int64_t p0, int64_t p1, int64_t k, const float* x,
                           const float* wp, float* y, bool accumulate, int64_t k_block) {
  const int64_t kb = k_block > 0 ? k_block : kDefaultPrepackedKBlock;
  const float* end = wp + p1 * k * kPackedPanel;
  for (int64_t r_chunk = 0; r_chunk < m; r_chunk += kRowChunk) {
    const int64_t r_end = std::min(m, r_chunk + kRowChunk);
    const int64_t row_blocks = (r_end - r_chunk + kPrepackedRows - 1) / kPrepackedRows;
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t c0 = p * kPackedPanel, cols = std::min(kPackedPanel, n - c0);
      const float* panel = wp + p * k * kPackedPanel;
      for (int64_t k0 = 0; k0 < k; k0 += kb) {
        const int64_t len = std::min(kb, k - k0);
        // The slice after this one (the next k block, else the next panel's first) is prefetched while this
        // one is used, split evenly between the row blocks that pass over this one.
        const float* next = panel + (k0 + len) * kPackedPanel;
        const int64_t next_bytes = next < end ? std::min(kb, k - (k0 + len < k ? k0 + len : 0)) * kPackedPanel * 4 : 0;
        const int64_t lines_per_block = (next_bytes / 64 + row_blocks - 1) / row_blocks;
        int64_t block = 0;
        for (int64_t r0 = r_chunk; r0 < r_end; r0 += kPrepackedRows, ++block) {
          const int64_t rows = std::min<int64_t>(kPrepackedRows, r_end - r0);
          const int64_t first = std::min(block * lines_per_block, next_bytes / 64);
          const int64_t lines = std::min(lines_per_block, next_bytes / 64 - first);
          pick_prepacked(rows)(x + r0 * k + k0, k, panel + k0 * kPackedPanel, len, y + r0 * n + c0, n, cols,
                               accumulate || k0 > 0, reinterpret_cast<const char*>(next) + first * 64, lines);
        }
      }
    }
  }
}

void gemm_nt_columns(int64_t m, int64_t n, int64_t c0, int64_t c1, int64_t k, const float* x, const float* w,
                     float* y, bool accumulate, int64_t k_block, int64_t n_block) {
#ifdef __AVX512F__
  if (m >= kPackedMinRows) {
    const int64_t kc = k_block > 0 ? std::min<int64_t>(k_block, 512) : 128;
    return gemm_columns_packed(m, c0, c1, k, x, w, y, n, kc, accumulate);
  }
#endif
  if (!accumulate)
    for (int64_t r = 0; r < m; ++r) std::fill(y + r * n + c0, y + r * n + c1, 0.f);
  k_block = k_block > 0 ? k_block : k;
  n_block = n_block > 0 ? (n_block + kCols - 1) / kCols * kCols : n;
  gemm_columns(m, c0, c1, k, x, w, y, n, k_block, n_block);
}

}  // namespace cogvlm2
