#include "gemm.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <utility>
#include <vector>

#include "common.h"
#include "gemm_amx.h"

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

// ---------------------------------------------------------------- scalar conversions (exact, or vcvtne2ps2bf16's)

inline float float_from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline float bf16_to_float(uint16_t h) { return float_from_bits(static_cast<uint32_t>(h) << 16); }

inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16, exponent = (h >> 10) & 0x1Fu, mantissa = h & 0x3FFu;
  if (exponent == 0x1F) return float_from_bits(sign | 0x7F800000u | (mantissa << 13));
  if (exponent != 0) return float_from_bits(sign | ((exponent + 112) << 23) | (mantissa << 13));
  const float subnormal = static_cast<float>(mantissa) * 0x1p-24f;  // exact: 10 bits
  return sign ? -subnormal : subnormal;
}

// Round to nearest even with denormal inputs as zero and NaNs quietened: what vcvtne2ps2bf16 does.
inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  if ((u & 0x7F800000u) == 0) return static_cast<uint16_t>((u >> 16) & 0x8000u);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// ---------------------------------------------------------------- panel tiles

// A tile of R tokens x 32 columns over one k slice of a panel: y[r][0, cols) = (y +) the slice's sums. It also
// pulls `pf_lines` cache lines from `pf` into L2 as it goes (the slice read next, so that streaming it from memory
// overlaps this slice's products instead of stalling the next tile). `scales`: what an int8 panel's sums are
// scaled and offset by (all nullptr for the other dtypes).
struct TileScales {
  const float* columns = nullptr;  // the 32 columns' weight scales
  const int32_t* offsets = nullptr;  // kInt8Dot: the 32 columns' offsets (gemm.h kI8Quads)
  const float* rows = nullptr;  // kInt8Dot: the tile's tokens' activation scales
};

template <class X, class W>
using Tile = void (*)(const X* x, int64_t ldx, const W* panel, int64_t len, float* y, int64_t ldy, int64_t cols,
                      bool add, const char* pf, int64_t pf_lines, TileScales scales);

template <class X, class W>
using Tiles = std::array<Tile<X, W>, kMaxTileRows>;  // by token count - 1

// Spreads `lines` prefetches over a loop of `len` k, a batch every 4 k.
class Prefetcher {
 public:
  Prefetcher(const char* p, int64_t lines, int64_t len)
      : p_(p), lines_(lines), per_batch_(len > 0 ? (lines * 4 + len - 1) / len : 0) {}

  void at(int64_t kk) {
    if ((kk & 3) != 0) return;
    for (int64_t l = 0; l < per_batch_ && issued_ < lines_; ++l, ++issued_) __builtin_prefetch(p_ + issued_ * 64, 0, 2);
  }

 private:
  const char* p_;
  int64_t lines_, per_batch_, issued_ = 0;
};

// How a panel dtype yields fp32 weights at k index kk (p = panel + kk * 32, kk a multiple of kStep): get(p, s, c)
// is column c at k + s; load(p, w) fills w[s][h] with columns [16 h, 16 h + 16) at k + s.
struct F32Panel {
  using W = float;
  static constexpr int kStep = 1;
  static float get(const W* p, int /*s*/, int c) { return p[c]; }
#ifdef __AVX512F__
  static void load(const W* p, __m512 (&w)[kStep][2]) {
    w[0][0] = _mm512_loadu_ps(p);
    w[0][1] = _mm512_loadu_ps(p + 16);
  }
#endif
};

struct F16Panel {
  using W = uint16_t;
  static constexpr int kStep = 1;
  static float get(const W* p, int /*s*/, int c) { return half_to_float(p[c]); }
#ifdef __AVX512F__
  static void load(const W* p, __m512 (&w)[kStep][2]) {
    w[0][0] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    w[0][1] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16)));
  }
#endif
};

struct Bf16Panel {
  using W = uint16_t;
  static constexpr int kStep = 2;
  static float get(const W* p, int s, int c) { return bf16_to_float(p[2 * c + s]); }
#ifdef __AVX512F__
  static void load(const W* p, __m512 (&w)[kStep][2]) {
    const __m512i odd = _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
    for (int h = 0; h < 2; ++h) {
      const __m512i pairs = _mm512_loadu_si512(p + 32 * h);
      w[0][h] = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
      w[1][h] = _mm512_castsi512_ps(_mm512_and_si512(pairs, odd));
    }
  }
#endif
};

// Symmetric int8 with one scale per output column (w8a16): the integers widened exactly to fp32 as they are loaded;
// the tile multiplies each column's sums by its scale as it stores them (y = (x . q) * scale).
struct I8Panel {
  using W = int8_t;
  static constexpr int kStep = 1;
  static float get(const W* p, int /*s*/, int c) { return static_cast<float>(p[c]); }
#ifdef __AVX512F__
  static void load(const W* p, __m512 (&w)[kStep][2]) {
    for (int h = 0; h < 2; ++h)
      w[0][h] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * h))));
  }
#endif
};

// kDotOrder: the k order of vdpbf16ps within a pair (odd, then even) over activations padded to whole pairs;
// otherwise the f32 panels' order (even, then odd; an odd k left over is the last product).
template <class P, int R, bool kDotOrder>
void portable_tile(const float* x, int64_t ldx, const typename P::W* panel, int64_t len, float* y, int64_t ldy,
                   int64_t cols, bool add, const char* /*pf*/, int64_t /*pf_lines*/, TileScales scales) {
  constexpr int S = P::kStep;
  const float* scale = scales.columns;
  float acc[R][kPackedPanel] = {};
  const int64_t whole = kDotOrder ? (len + S - 1) / S * S : len / S * S;
  for (int64_t kk = 0; kk < len; kk += S) {
    const typename P::W* p = panel + kk * kPackedPanel;
    const int steps = kk < whole ? S : 1;
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < steps; ++i) {
        const int s = kDotOrder ? steps - 1 - i : i;
        const float a = x[r * ldx + kk + s];
#pragma omp simd
        for (int c = 0; c < kPackedPanel; ++c) acc[r][c] = std::fma(a, P::get(p, s, c), acc[r][c]);
      }
  }
  for (int r = 0; r < R; ++r)
    for (int64_t c = 0; c < cols; ++c) {
      const float sum = scale ? acc[r][c] * scale[c] : acc[r][c];
      y[r * ldy + c] = add ? y[r * ldy + c] + sum : sum;
    }
}

#ifdef __AVX512F__

// y[r][0, cols) = (y +) acc[r] (* scale per column, an int8 panel's, when there is one).
template <int R>
inline void store_tile(__m512 (&acc)[R][2], float* y, int64_t ldy, int64_t cols, bool add, const float* scale) {
  const __mmask16 m0 = cols >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << cols) - 1);
  const __mmask16 m1 = cols >= 32 ? static_cast<__mmask16>(0xFFFF)
                                  : static_cast<__mmask16>(cols > 16 ? (1u << (cols - 16)) - 1 : 0);
  if (scale) {
    const __m512 s0 = _mm512_loadu_ps(scale), s1 = _mm512_loadu_ps(scale + 16);
    for (int r = 0; r < R; ++r) {
      acc[r][0] = _mm512_mul_ps(acc[r][0], s0);
      acc[r][1] = _mm512_mul_ps(acc[r][1], s1);
    }
  }
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

template <int R, int S>
inline void fma_rows(const float* x, int64_t ldx, int s, const __m512 (&w)[S][2], __m512 (&acc)[R][2]) {
  for (int r = 0; r < R; ++r) {
    const __m512 a = _mm512_set1_ps(x[r * ldx + s]);
    acc[r][0] = _mm512_fmadd_ps(a, w[s][0], acc[r][0]);
    acc[r][1] = _mm512_fmadd_ps(a, w[s][1], acc[r][1]);
  }
}

// portable_tile's math with one broadcast of x and a widening load of the panel per k: 2 x R accumulators.
template <class P, int R, bool kDotOrder>
void widening_tile(const float* x, int64_t ldx, const typename P::W* panel, int64_t len, float* y, int64_t ldy,
                   int64_t cols, bool add, const char* pf, int64_t pf_lines, TileScales scales) {
  constexpr int S = P::kStep;
  __m512 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  Prefetcher prefetch(pf, pf_lines, len);
  const int64_t whole = kDotOrder ? (len + S - 1) / S * S : len / S * S;
  int64_t kk = 0;
  for (; kk < whole; kk += S) {
    prefetch.at(kk);
    __m512 w[S][2];
    P::load(panel + kk * kPackedPanel, w);
    for (int i = 0; i < S; ++i) fma_rows<R, S>(x + kk, ldx, kDotOrder ? S - 1 - i : i, w, acc);
  }
  if (kk < len) {
    __m512 w[S][2];
    P::load(panel + kk * kPackedPanel, w);
    fma_rows<R, S>(x + kk, ldx, 0, w, acc);
  }
  store_tile<R>(acc, y, ldy, cols, add, scales.columns);
}

// vdpbf16ps over bf16 activations (ldx in bf16, rows of whole pairs): per pair of k, one broadcast of x's pair.
template <int R>
COGVLM2_BF16_TARGET void bf16_dot_tile(const uint16_t* x, int64_t ldx, const uint16_t* panel, int64_t len, float* y,
                                       int64_t ldy, int64_t cols, bool add, const char* pf, int64_t pf_lines,
                                       TileScales scales) {
  __m512 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  Prefetcher prefetch(pf, pf_lines, len);
  for (int64_t kk = 0; kk < len; kk += 2) {
    prefetch.at(kk);
    const __m512bh b0 = reinterpret_cast<__m512bh>(_mm512_loadu_si512(panel + kk * kPackedPanel));
    const __m512bh b1 = reinterpret_cast<__m512bh>(_mm512_loadu_si512(panel + kk * kPackedPanel + 32));
    for (int r = 0; r < R; ++r) {
      uint32_t pair;
      std::memcpy(&pair, x + r * ldx + kk, sizeof(pair));
      const __m512bh a = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int32_t>(pair)));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, b0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, b1);
    }
  }
  store_tile<R>(acc, y, ldy, cols, add, scales.columns);
}

// vdpbf16ps's bits over int8 panels without their bf16 pairs (w8a16 under bf16 products, few tokens): the weights
// widened to fp32 as they are loaded (exact), each bf16 activation widened as it is broadcast, and in every k pair
// the odd k's FMA before the even k's, the order and rounding of vdpbf16ps (test_bf16_dot_fallback_is_bit_identical
// holds the same for the fallback). It skips i8_slice_to_bf16_pairs' pass over the slice, which costs more than
// the products where a slice serves one or a few tokens. An odd last k pairs with zero weights (x is 0 there).
template <int R>
void i8_dot_order_tile(const uint16_t* x, int64_t ldx, const int8_t* panel, int64_t len, float* y, int64_t ldy,
                       int64_t cols, bool add, const char* pf, int64_t pf_lines, TileScales scales) {
  __m512 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  Prefetcher prefetch(pf, pf_lines, len);
  for (int64_t kk = 0; kk < len; kk += 2) {
    prefetch.at(kk);
    __m512 even[1][2], odd[1][2] = {{_mm512_setzero_ps(), _mm512_setzero_ps()}};
    I8Panel::load(panel + kk * kPackedPanel, even);
    if (kk + 1 < len) I8Panel::load(panel + (kk + 1) * kPackedPanel, odd);
    for (int r = 0; r < R; ++r) {
      uint32_t pair;
      std::memcpy(&pair, x + r * ldx + kk, sizeof(pair));
      const __m512 a_even = _mm512_set1_ps(bf16_to_float(static_cast<uint16_t>(pair)));
      const __m512 a_odd = _mm512_set1_ps(bf16_to_float(static_cast<uint16_t>(pair >> 16)));
      for (int h = 0; h < 2; ++h)
        acc[r][h] = _mm512_fmadd_ps(a_even, even[0][h], _mm512_fmadd_ps(a_odd, odd[0][h], acc[r][h]));
    }
  }
  store_tile<R>(acc, y, ldy, cols, add, scales.columns);
}

#define COGVLM2_VNNI_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

// int32 accumulators as GCC's own vector type: as __m512i (64-bit lanes) GCC 12 copies every accumulator through
// the casts of _mm512_dpbusd_epi32 on each k step and spills some, which halves the tile's speed.
using Int32x16 = __v16si;

// y[r][0, cols) = (y +) float(acc[r] - the columns' offsets) * row r's activation scale * the columns' weight scales.
template <int R>
inline void store_int_tile(const Int32x16 (&acc)[R][2], float* y, int64_t ldy, int64_t cols, bool add,
                           TileScales s) {
  const __m512i o0 = _mm512_loadu_si512(s.offsets), o1 = _mm512_loadu_si512(s.offsets + 16);
  __m512 sums[R][2];
  for (int r = 0; r < R; ++r) {
    const __m512 row = _mm512_set1_ps(s.rows[r]);
    sums[r][0] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(reinterpret_cast<__m512i>(acc[r][0]), o0)), row);
    sums[r][1] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(reinterpret_cast<__m512i>(acc[r][1]), o1)), row);
  }
  store_tile<R>(sums, y, ldy, cols, add, s.columns);
}

// vpdpbusd over the unsigned activations (rows of whole k quads): per quad of k, one broadcast of x's four bytes
// and two int32 accumulators per token, summed over all of len.
template <int R>
COGVLM2_VNNI_TARGET void int8_dot_tile(const uint8_t* x, int64_t ldx, const int8_t* panel, int64_t len, float* y,
                                       int64_t ldy, int64_t cols, bool add, const char* pf, int64_t pf_lines,
                                       TileScales scales) {
  Int32x16 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = Int32x16{};
  Prefetcher prefetch(pf, pf_lines, len);
  for (int64_t kk = 0; kk < len; kk += 4) {
    prefetch.at(kk);
    const auto b0 = reinterpret_cast<Int32x16>(_mm512_loadu_si512(panel + kk * kPackedPanel));
    const auto b1 = reinterpret_cast<Int32x16>(_mm512_loadu_si512(panel + kk * kPackedPanel + 64));
    for (int r = 0; r < R; ++r) {
      int32_t quad;
      std::memcpy(&quad, x + r * ldx + kk, sizeof(quad));
      const auto a = reinterpret_cast<Int32x16>(_mm512_set1_epi32(quad));
      acc[r][0] = __builtin_ia32_vpdpbusd_v16si(acc[r][0], a, b0);
      acc[r][1] = __builtin_ia32_vpdpbusd_v16si(acc[r][1], a, b1);
    }
  }
  store_int_tile<R>(acc, y, ldy, cols, add, scales);
}

// quantize_row_portable with AVX-512 (the same IEEE division and rounding, so the same bytes).
COGVLM2_VNNI_TARGET float quantize_row_native(const float* x, int64_t k, int64_t ld, uint8_t* out) {
  auto first = [](int64_t count) {
    return count >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>(count > 0 ? (1u << count) - 1 : 0);
  };
  __m512 absmax = _mm512_setzero_ps();
  for (int64_t i = 0; i < k; i += 16) absmax = _mm512_max_ps(absmax, _mm512_abs_ps(_mm512_maskz_loadu_ps(first(k - i), x + i)));
  const float top = _mm512_reduce_max_ps(absmax);
  const float scale = top > 0.f ? top / kInt8Max : 1.f;
  const __m512 divisor = _mm512_set1_ps(scale), lo = _mm512_set1_ps(-kInt8Max), hi = _mm512_set1_ps(kInt8Max);
  const __m512i unsigned_zero = _mm512_set1_epi32(128);
  for (int64_t i = 0; i < ld; i += 16) {  // past k the loads give 0: q = 0 in the padding
    const __m512 q = _mm512_roundscale_ps(_mm512_div_ps(_mm512_maskz_loadu_ps(first(k - i), x + i), divisor),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512i clamped = _mm512_cvtps_epi32(_mm512_min_ps(hi, _mm512_max_ps(lo, q)));
    _mm_mask_storeu_epi8(out + i, first(ld - i), _mm512_cvtepi32_epi8(_mm512_add_epi32(clamped, unsigned_zero)));
  }
  return scale;
}

COGVLM2_BF16_TARGET void round_row_native(const float* x, int64_t k, uint16_t* out) {
  for (int64_t i = 0; i < k; i += 32) {
    const int64_t left = std::min<int64_t>(32, k - i);
    const __mmask16 lo = static_cast<__mmask16>(left >= 16 ? 0xFFFF : (1u << left) - 1);
    const __mmask16 hi = static_cast<__mmask16>(left >= 32 ? 0xFFFF : left > 16 ? (1u << (left - 16)) - 1 : 0);
    const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(hi, x + i + 16), _mm512_maskz_loadu_ps(lo, x + i));
    const __mmask32 mask = left == 32 ? ~__mmask32{0} : static_cast<__mmask32>((1ull << left) - 1);
    _mm512_mask_storeu_epi16(out + i, mask, reinterpret_cast<__m512i>(v));
  }
}

template <class P, int R, bool kDotOrder>
constexpr Tile<float, typename P::W> kWideningTile = &widening_tile<P, R, kDotOrder>;

template <size_t... I>
constexpr Tiles<uint16_t, uint16_t> dot_tiles(std::index_sequence<I...>) {
  return {{&bf16_dot_tile<static_cast<int>(I) + 1>...}};
}

const Tiles<uint16_t, uint16_t> kBf16DotTiles = dot_tiles(std::make_index_sequence<kMaxTileRows>());

template <size_t... I>
constexpr Tiles<uint16_t, int8_t> i8_dot_order_tiles(std::index_sequence<I...>) {
  return {{&i8_dot_order_tile<static_cast<int>(I) + 1>...}};
}

const Tiles<uint16_t, int8_t> kI8DotOrderTiles = i8_dot_order_tiles(std::make_index_sequence<kMaxTileRows>());

template <size_t... I>
constexpr Tiles<uint8_t, int8_t> int8_dot_tiles(std::index_sequence<I...>) {
  return {{&int8_dot_tile<static_cast<int>(I) + 1>...}};
}

const Tiles<uint8_t, int8_t> kInt8DotTiles = int8_dot_tiles(std::make_index_sequence<kMaxTileRows>());

#else

template <class P, int R, bool kDotOrder>
constexpr Tile<float, typename P::W> kWideningTile = &portable_tile<P, R, kDotOrder>;

#endif

template <class P, bool kDotOrder, size_t... I>
constexpr Tiles<float, typename P::W> widening_tiles(std::index_sequence<I...>) {
  return {{kWideningTile<P, static_cast<int>(I) + 1, kDotOrder>...}};
}

const auto kF32Tiles = widening_tiles<F32Panel, false>(std::make_index_sequence<kMaxTileRows>());
const auto kF16Tiles = widening_tiles<F16Panel, false>(std::make_index_sequence<kMaxTileRows>());
const auto kBf16WideningTiles = widening_tiles<Bf16Panel, false>(std::make_index_sequence<kMaxTileRows>());
const auto kBf16FallbackTiles = widening_tiles<Bf16Panel, true>(std::make_index_sequence<kMaxTileRows>());
const auto kI8Tiles = widening_tiles<I8Panel, false>(std::make_index_sequence<kMaxTileRows>());

// int8_dot_tile's integers by plain int32 arithmetic: the same u8 x s8 products over the same whole quads.
template <int R>
void portable_int8_dot_tile(const uint8_t* x, int64_t ldx, const int8_t* panel, int64_t len, float* y, int64_t ldy,
                            int64_t cols, bool add, const char* /*pf*/, int64_t /*pf_lines*/, TileScales scales) {
  int32_t acc[R][kPackedPanel] = {};
  for (int64_t kk = 0; kk < len; kk += 4) {
    const int8_t* p = panel + kk * kPackedPanel;
    for (int r = 0; r < R; ++r) {
      const uint8_t* a = x + r * ldx + kk;
#pragma omp simd
      for (int c = 0; c < kPackedPanel; ++c)
        acc[r][c] += a[0] * p[4 * c] + a[1] * p[4 * c + 1] + a[2] * p[4 * c + 2] + a[3] * p[4 * c + 3];
    }
  }
#ifdef __AVX512F__
  Int32x16 sums[R][2];
  for (int r = 0; r < R; ++r) {
    sums[r][0] = reinterpret_cast<Int32x16>(_mm512_loadu_si512(acc[r]));
    sums[r][1] = reinterpret_cast<Int32x16>(_mm512_loadu_si512(acc[r] + 16));
  }
  store_int_tile<R>(sums, y, ldy, cols, add, scales);
#else
  for (int r = 0; r < R; ++r)
    for (int64_t c = 0; c < cols; ++c) {
      const float sum = static_cast<float>(acc[r][c] - scales.offsets[c]) * scales.rows[r] * scales.columns[c];
      y[r * ldy + c] = add ? y[r * ldy + c] + sum : sum;
    }
#endif
}

template <size_t... I>
constexpr Tiles<uint8_t, int8_t> portable_int8_dot_tiles(std::index_sequence<I...>) {
  return {{&portable_int8_dot_tile<static_cast<int>(I) + 1>...}};
}

const auto kInt8DotFallbackTiles = portable_int8_dot_tiles(std::make_index_sequence<kMaxTileRows>());

// One token row of kInt8Dot's activations (gemm.h): out[0, ld) = q + 128 (q = 0 past k); returns the row's scale.
float quantize_row_portable(const float* x, int64_t k, int64_t ld, uint8_t* out) {
  const float scale = int8_scale(x, k);
  for (int64_t i = 0; i < k; ++i) out[i] = static_cast<uint8_t>(int8_value(x[i], scale) + 128);
  std::fill(out + k, out + ld, uint8_t{128});
  return scale;
}

#ifdef __AVX512F__

// ---------------------------------------------------------------- per-call packing (unpacked weights)

// Larger token counts: a panel of 32 weight rows is packed k-major (packed[kk][32]) once per k block, then every
// token block of 8 rows runs over it with the f32 panels' tile.
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
        kF32Tiles[rows - 1](x + r0 * k + k0, k, packed.data(), len, y + r0 * ldy + c0, ldy, cols,
                            accumulate || k0 > 0, nullptr, 0, TileScales{});
      }
    }
  }
}

#endif

// ---------------------------------------------------------------- the loop over prepacked panels

constexpr int kDefaultTileRows = 8;
constexpr int64_t kDefaultKBlock = 2048;
// Tokens are taken in chunks whose k slice (at most this many bytes) stays in L2 while every panel passes.
constexpr int64_t kChunkBytes = 512 << 10;

// One thread's panels [p0, p1): token chunks, then k blocks, then panels, then tiles of tile_rows tokens. Each y
// element gets its k blocks' sums in k order whatever the loop order, so the results do not depend on it.
// W: the stored panels' element; TileW: what the tiles read, when it differs (int8 panels under bf16 products:
// `convert` turns each k slice of a panel into bf16 k pairs once, for all the tiles of a token chunk).
template <class X, class W, class TileW = W>
struct PanelLoop {
  const Tiles<X, TileW>& tiles;
  int tile_rows;
  int64_t m, n, k, k_block;
  int64_t panel_stride;  // W elements per panel
  const X* x;
  int64_t ldx;
  const W* wp;
  float* y;
  bool accumulate;
  bool prefetch;  // the tiles prefetch the slice read next
  TileScales scales;  // int8 panels: [n] per-column scales (and offsets), the [m] rows' scales; else nullptr
  const TileW* (*convert)(const W* slice, int64_t len) = nullptr;

  void run(int64_t p0, int64_t p1) const {
    const int64_t fit = kChunkBytes / (k_block * static_cast<int64_t>(sizeof(X))) / tile_rows * tile_rows;
    const int64_t chunk = std::max<int64_t>(tile_rows, fit);
    for (int64_t r0 = 0; r0 < m; r0 += chunk)
      for (int64_t k0 = 0; k0 < k; k0 += k_block)
        for (int64_t p = p0; p < p1; ++p) slice(r0, std::min(m, r0 + chunk), k0, p, p0, p1);
  }

  // Tokens [r0, r1) over panel p's k slice from k0; the tiles share the prefetch of the slice read next (the next
  // panel's, else the first panel's next k block).
  void slice(int64_t r0, int64_t r1, int64_t k0, int64_t p, int64_t p0, int64_t p1) const {
    const int64_t len = std::min(k_block, k - k0), c0 = p * kPackedPanel, cols = std::min(kPackedPanel, n - c0);
    const W* stored = wp + p * panel_stride + k0 * kPackedPanel;
    const TileW* panel = tile_panel(stored, len);
    const bool last = p + 1 == p1;
    const int64_t next_k0 = last ? k0 + k_block : k0;
    const W* next = wp + (last ? p0 : p + 1) * panel_stride + next_k0 * kPackedPanel;
    const int64_t next_len = next_k0 < k ? std::min(k_block, k - next_k0) : 0;
    const int64_t lines = prefetch ? next_len * kPackedPanel * static_cast<int64_t>(sizeof(W)) / 64 : 0;
    const int64_t blocks = (r1 - r0 + tile_rows - 1) / tile_rows, per_block = (lines + blocks - 1) / blocks;
    for (int64_t b = 0, row = r0; row < r1; ++b, row += tile_rows) {
      const int64_t rows = std::min<int64_t>(tile_rows, r1 - row), first = std::min(b * per_block, lines);
      tiles[rows - 1](x + row * ldx + k0, ldx, panel, len, y + row * n + c0, n, cols, accumulate || k0 > 0,
                      reinterpret_cast<const char*>(next) + first * 64, std::min(per_block, lines - first),
                      tile_scales(c0, row));
    }
  }

  TileScales tile_scales(int64_t c0, int64_t row) const {
    return {scales.columns ? scales.columns + c0 : nullptr, scales.offsets ? scales.offsets + c0 : nullptr,
            scales.rows ? scales.rows + row : nullptr};
  }

  const TileW* tile_panel(const W* stored, int64_t len) const {
    if constexpr (std::is_same_v<W, TileW>) return stored;
    else return convert(stored, len);
  }
};

// An int8 k-major panel slice [len][32] as bf16 k pairs [ceil(len / 2)][32][2] (exact: |q| <= 127), in a buffer of
// this thread's valid until its next call; an odd last k is paired with zeros.
const uint16_t* i8_slice_to_bf16_pairs_portable(const int8_t* slice, int64_t len) {
  thread_local std::vector<uint16_t> buffer;
  const int64_t pairs = (len + 1) / 2;
  buffer.resize(pairs * 2 * kPackedPanel);
  for (int64_t j = 0; j < pairs; ++j)
    for (int s = 0; s < 2; ++s)
      for (int64_t c = 0; c < kPackedPanel; ++c)
        buffer[(j * kPackedPanel + c) * 2 + s] =
            2 * j + s < len ? float_to_bf16(static_cast<float>(slice[(2 * j + s) * kPackedPanel + c])) : 0;
  return buffer.data();
}

#ifdef __AVX512F__
// The same with AVX-512: the two k rows' bytes interleaved into pairs (in 128-bit lanes: columns 0-7 and 16-23 in
// the low unpack, 8-15 and 24-31 in the high one), widened to fp32 and packed to bf16 (vcvtne2ps2bf16).
COGVLM2_BF16_TARGET const uint16_t* i8_slice_to_bf16_pairs_native(const int8_t* slice, int64_t len) {
  thread_local std::vector<uint16_t> buffer;
  const int64_t pairs = (len + 1) / 2;
  buffer.resize(pairs * 2 * kPackedPanel);
  auto widen = [](__m128i bytes) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes)); };
  for (int64_t j = 0; j < pairs; ++j) {
    const int8_t* row = slice + 2 * j * kPackedPanel;
    const __m256i even = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row));
    const __m256i odd = 2 * j + 1 < len ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + kPackedPanel))
                                        : _mm256_setzero_si256();
    const __m256i lo = _mm256_unpacklo_epi8(even, odd), hi = _mm256_unpackhi_epi8(even, odd);
    const __m512 c0_7 = widen(_mm256_castsi256_si128(lo)), c8_15 = widen(_mm256_castsi256_si128(hi));
    const __m512 c16_23 = widen(_mm256_extracti128_si256(lo, 1)), c24_31 = widen(_mm256_extracti128_si256(hi, 1));
    uint16_t* out = buffer.data() + j * 2 * kPackedPanel;
    _mm512_storeu_si512(out, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(c8_15, c0_7)));
    _mm512_storeu_si512(out + kPackedPanel, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(c24_31, c16_23)));
  }
  return buffer.data();
}
#endif

bool uses_vdpbf16ps(const PanelGemm& g) { return g.math == PanelMath::kBf16Dot && !g.portable && cpu_has_bf16_dot(); }

bool uses_vpdpbusd(const PanelGemm& g) { return g.math == PanelMath::kInt8Dot && !g.portable && cpu_has_int8_dot(); }

template <class X, class TileW, class W = TileW>
void run_panels(const Tiles<X, TileW>& tiles, const PanelGemm& g, int64_t m, int64_t n, int64_t p0, int64_t p1,
                int64_t k, const Activations& x, const void* wp, float* y, bool accumulate, TileScales scales = {},
                const TileW* (*convert)(const W*, int64_t) = nullptr) {
  const bool pairs = g.dtype == PanelDtype::kBf16, quads = g.dtype == PanelDtype::kI8Quads;  // stored k groups
  const int rows = g.tile_rows > 0 ? std::min(g.tile_rows, kMaxTileRows) : kDefaultTileRows;
  int64_t kb = g.k_block > 0 ? g.k_block : kDefaultKBlock;
  kb = pairs || g.math == PanelMath::kBf16Dot ? (kb + 1) / 2 * 2 : kb;  // bf16 products read whole k pairs
  const int64_t stored_k = pairs ? (k + 1) / 2 * 2 : quads ? (k + 3) / 4 * 4 : k;
  if (quads) kb = stored_k;  // integer sums over all of k (exact), scaled once
  const PanelLoop<X, W, TileW> loop{tiles, rows, m, n, k, kb, stored_k * kPackedPanel, static_cast<const X*>(x.data),
                                    x.ld, static_cast<const W*>(wp), y, accumulate, m >= g.prefetch_rows, scales,
                                    convert};
  loop.run(p0, p1);
}

void round_rows(const float* x, int64_t rows, int64_t k, uint16_t* out, int64_t ld, bool native) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* in = x + r * k;
    uint16_t* row = out + r * ld;
#ifdef __AVX512F__
    if (native) {
      round_row_native(in, k, row);
    } else
#endif
      for (int64_t i = 0; i < k; ++i) row[i] = float_to_bf16(in[i]);
    std::fill(row + k, row + ld, uint16_t{0});
  }
}

Activations quantize_activations(const PanelGemm& g, const float* x, int64_t m, int64_t k, ActivationStorage& storage,
                                 int threads) {
  const int64_t ld = (k + 3) / 4 * 4;
  const bool native = uses_vpdpbusd(g);
  storage.int8.resize(m * ld);
  storage.row_scales.resize(m);
  parallel_ranges(m, m * k >= (1 << 16) ? threads : 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      uint8_t* row = storage.int8.data() + r * ld;
#ifdef __AVX512F__
      if (native) {
        storage.row_scales[r] = quantize_row_native(x + r * k, k, ld, row);
        continue;
      }
#endif
      storage.row_scales[r] = quantize_row_portable(x + r * k, k, ld, row);
    }
  });
  return {storage.int8.data(), ld, 1, storage.row_scales.data()};
}

}  // namespace

bool cpu_has_int8_dot() {
#if defined(__AVX512F__) && defined(__x86_64__)
  static const bool has = __builtin_cpu_supports("avx512vnni");
  return has;
#else
  return false;
#endif
}

Activations prepare_activations(const PanelGemm& g, const float* x, int64_t m, int64_t k, ActivationStorage& storage,
                                int threads) {
  if (g.math == PanelMath::kInt8Dot) return quantize_activations(g, x, m, k, storage, threads);
  if (g.math != PanelMath::kBf16Dot) return {x, k, 4};
  const int64_t ld = (k + 1) / 2 * 2;
  const bool native = uses_vdpbf16ps(g);
  storage.bf16.resize(m * ld);
  if (!native) storage.widened.resize(m * ld);
  parallel_ranges(m, m * k >= (1 << 16) ? threads : 1, [&](int64_t r0, int64_t r1) {
    round_rows(x + r0 * k, r1 - r0, k, storage.bf16.data() + r0 * ld, ld, native);
    if (!native)
      for (int64_t i = r0 * ld; i < r1 * ld; ++i) storage.widened[i] = bf16_to_float(storage.bf16[i]);
  });
  if (native) return {storage.bf16.data(), ld, 2};
  return {storage.widened.data(), ld, 4};
}

namespace {

// The fewest tokens that AMX tiles take (the last block zero-padded). bf16 sums on AMX differ from vdpbf16ps's in
// their rounding, so bf16 takes AMX at any row count: a token's result never depends on how many share its call
// (batch composition, chunking, a cached prefix), at a cost where the weights' bytes bound the step (bench decode
// at one sequence: 27.6 against 23.8 ms on vdpbf16ps; at 8: 31.3 against 36.9). The int8 dot's sums are exact
// integers either way, so it takes AMX only where that is faster, from whole blocks of 16 (measured: slower at 1
// and 8).
constexpr int64_t kAmxMinRowsBf16 = 1;
constexpr int64_t kAmxMinRowsInt8Dot = kAmxRows;

// The whole call on AMX tiles, where g asks for them, the CPU has them, k is a whole number of tiles and there are
// enough rows; false: nothing done (the AVX-512 tiles take the call).
bool run_on_amx(const PanelGemm& g, int64_t m, int64_t n, int64_t p0, int64_t p1, int64_t k, const Activations& x,
                const void* wp, float* y, bool accumulate, const float* scales, const int32_t* offsets) {
#ifndef __AVX512F__
  return false;  // AMX comes with AVX-512; a build without it keeps to the portable tiles
#else
  const bool bf16 = uses_vdpbf16ps(g) && (g.dtype == PanelDtype::kBf16 || g.dtype == PanelDtype::kI8);
  const bool int8 = uses_vpdpbusd(g);
  const int64_t tile_k = bf16 ? kAmxBf16K : kAmxInt8K, min_rows = bf16 ? kAmxMinRowsBf16 : kAmxMinRowsInt8Dot;
  if (!g.amx || !(bf16 || int8) || k % tile_k != 0 || m < min_rows || !cpu_has_amx()) return false;
  const auto* bf16_x = static_cast<const uint16_t*>(x.data);
  if (bf16 && g.dtype == PanelDtype::kBf16)
    amx_bf16_panels(m, n, p0, p1, k, bf16_x, x.ld, static_cast<const uint16_t*>(wp), y, accumulate);
  else if (bf16)
    amx_i8_bf16_panels(m, n, p0, p1, k, bf16_x, x.ld, static_cast<const int8_t*>(wp), y, accumulate, scales,
                       &i8_slice_to_bf16_pairs_native);
  else
    amx_int8_panels(m, n, p0, p1, k, static_cast<const uint8_t*>(x.data), x.ld, static_cast<const int8_t*>(wp), y,
                    accumulate, scales, offsets, x.row_scales);
  return true;
#endif
}

}  // namespace

void gemm_panels(const PanelGemm& g, int64_t m, int64_t n, int64_t p0, int64_t p1, int64_t k, const Activations& x,
                 const void* wp, float* y, bool accumulate, const float* scales, const int32_t* offsets) {
  if (run_on_amx(g, m, n, p0, p1, k, x, wp, y, accumulate, scales, offsets)) return;
  const TileScales s{scales, offsets, x.row_scales};
  switch (g.dtype) {
    case PanelDtype::kI8Quads:
#ifdef __AVX512F__
      if (uses_vpdpbusd(g)) return run_panels(kInt8DotTiles, g, m, n, p0, p1, k, x, wp, y, accumulate, s);
#endif
      return run_panels(kInt8DotFallbackTiles, g, m, n, p0, p1, k, x, wp, y, accumulate, s);
    case PanelDtype::kI8:
      if (g.math == PanelMath::kFloat32) return run_panels(kI8Tiles, g, m, n, p0, p1, k, x, wp, y, accumulate, s);
#ifdef __AVX512F__
      if (uses_vdpbf16ps(g)) {
        if (m <= g.widen_rows)
          return run_panels<uint16_t, int8_t>(kI8DotOrderTiles, g, m, n, p0, p1, k, x, wp, y, accumulate, s);
        return run_panels<uint16_t, uint16_t, int8_t>(kBf16DotTiles, g, m, n, p0, p1, k, x, wp, y, accumulate, s,
                                                       &i8_slice_to_bf16_pairs_native);
      }
#endif
      return run_panels<float, uint16_t, int8_t>(kBf16FallbackTiles, g, m, n, p0, p1, k, x, wp, y, accumulate, s,
                                                 &i8_slice_to_bf16_pairs_portable);
    case PanelDtype::kF32: return run_panels(kF32Tiles, g, m, n, p0, p1, k, x, wp, y, accumulate);
    case PanelDtype::kF16: return run_panels(kF16Tiles, g, m, n, p0, p1, k, x, wp, y, accumulate);
    case PanelDtype::kBf16: break;
  }
  if (g.math == PanelMath::kFloat32) return run_panels(kBf16WideningTiles, g, m, n, p0, p1, k, x, wp, y, accumulate);
#ifdef __AVX512F__
  if (uses_vdpbf16ps(g)) return run_panels(kBf16DotTiles, g, m, n, p0, p1, k, x, wp, y, accumulate);
#endif
  run_panels(kBf16FallbackTiles, g, m, n, p0, p1, k, x, wp, y, accumulate);
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
