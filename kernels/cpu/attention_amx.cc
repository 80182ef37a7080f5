#include "attention_amx.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "attention_math.h"
#include "gemm_amx.h"

// With AVX-512 only: the operands are built with it, and without it the bf16 math never takes the query tiles'
// dot-product forms that this replaces.
#if defined(__AVX512F__) && defined(__x86_64__) && defined(__linux__)
#include <immintrin.h>
#define COGVLM2_HAS_AMX_CODE 1
#endif

namespace cogvlm2 {

#ifdef COGVLM2_HAS_AMX_CODE

#define COGVLM2_AMX_ATTENTION_TARGET __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512bf16")))

namespace {

constexpr int64_t kMaxD = 256;

// The byte stride of `count` rows when they are evenly spaced (one strided tile load reads them), else 0.
int64_t even_stride(const Bf16* const* rows, int64_t count) {
  const int64_t step = rows[1] - rows[0];
  if (step <= 0) return 0;
  for (int64_t r = 2; r < count; ++r)
    if (rows[r] - rows[r - 1] != step) return 0;
  return step * static_cast<int64_t>(sizeof(Bf16));
}

// vt [d][kp] dwords, (i, jp) = (v[2 jp][i], v[2 jp + 1][i]): each key pair's rows interleaved into 16 dwords per 16
// of d, scattered down the columns of vt.
COGVLM2_AMX_ATTENTION_TARGET void transpose_value_pairs(const Bf16* const* v_rows, int64_t seen, int64_t d,
                                                         int64_t kp, uint32_t* vt) {
  alignas(64) static const Bf16 kZeros[kMaxD] = {};
  const __m512i down = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                          _mm512_set1_epi32(static_cast<int32_t>(kp)));
  for (int64_t jp = 0; 2 * jp < seen; ++jp) {
    const Bf16* v0 = v_rows[2 * jp];
    const Bf16* v1 = 2 * jp + 1 < seen ? v_rows[2 * jp + 1] : kZeros;
    for (int64_t c0 = 0; c0 < d; c0 += 16)
      _mm512_i32scatter_epi32(vt + c0 * kp + jp, down, interleave_rows_bf16(v0 + c0, v1 + c0), 4);
  }
}

}  // namespace

bool amx_attention_applies(int64_t d) { return d % kAmxBf16K == 0 && d <= kMaxD && cpu_has_amx(); }

// Tiles: 0 the scores, 4 the keys, 6 and 7 the queries' high and low pairs.
COGVLM2_AMX_ATTENTION_TARGET void amx_scores(const uint32_t* qt2, const Bf16* const* key_rows, int64_t width,
                                             int64_t d, int64_t stride, float* scores) {
  thread_local std::vector<Bf16> packed;  // a group's keys when they are not evenly spaced, zero-padded
  const int64_t lane_bytes = stride * 4, low = (d / 2) * stride;
  for (int64_t j0 = 0; j0 < width; j0 += kAmxRows) {
    const int64_t keys = std::min(kAmxRows, width - j0);
    int64_t key_bytes = keys == kAmxRows ? even_stride(key_rows + j0, keys) : 0;
    const Bf16* a = key_rows[j0];
    if (key_bytes == 0) {
      packed.assign(kAmxRows * d, Bf16{0});
      for (int64_t r = 0; r < keys; ++r) std::memcpy(packed.data() + r * d, key_rows[j0 + r], d * sizeof(Bf16));
      a = packed.data();
      key_bytes = d * static_cast<int64_t>(sizeof(Bf16));
    }
    for (int64_t l0 = 0; l0 < stride; l0 += kAmxRows) {
      _tile_zero(0);
      for (int64_t i0 = 0; i0 < d; i0 += kAmxBf16K) {
        _tile_loadd(4, a + i0, key_bytes);
        _tile_loadd(6, qt2 + (i0 / 2) * stride + l0, lane_bytes);
        _tile_dpbf16ps(0, 4, 6);
        _tile_loadd(7, qt2 + low + (i0 / 2) * stride + l0, lane_bytes);
        _tile_dpbf16ps(0, 4, 7);
      }
      _tile_stored(0, scores + j0 * stride + l0, lane_bytes);
    }
  }
}

// Tiles: 0 the output rows, 4 V^T, 6 the probabilities' pairs.
COGVLM2_AMX_ATTENTION_TARGET void amx_accumulate_pv(float* out_t, int64_t d, const float* correction, uint32_t* pairs,
                                                    int64_t stride, const Bf16* const* v_rows, int64_t seen) {
  const int64_t half = (seen + 1) / 2, kp = round_up(half, kAmxRows), lane_bytes = stride * 4;
  std::fill(pairs + half * stride, pairs + kp * stride, 0u);
  thread_local std::vector<uint32_t> vt;
  vt.assign(d * kp, 0u);
  transpose_value_pairs(v_rows, seen, d, kp, vt.data());
  for (int64_t i = 0; i < d; ++i)
    for (int64_t l0 = 0; l0 < stride; l0 += 16) {
      float* row = out_t + i * stride + l0;
      _mm512_storeu_ps(row, _mm512_mul_ps(_mm512_loadu_ps(row), _mm512_loadu_ps(correction + l0)));
    }
  for (int64_t c0 = 0; c0 < d; c0 += kAmxRows)
    for (int64_t l0 = 0; l0 < stride; l0 += kAmxRows) {
      float* c = out_t + c0 * stride + l0;
      _tile_loadd(0, c, lane_bytes);
      for (int64_t p0 = 0; p0 < kp; p0 += kAmxRows) {
        _tile_loadd(4, vt.data() + c0 * kp + p0, kp * 4);
        _tile_loadd(6, pairs + p0 * stride + l0, lane_bytes);
        _tile_dpbf16ps(0, 4, 6);
      }
      _tile_stored(0, c, lane_bytes);
    }
}

#else

bool amx_attention_applies(int64_t) { return false; }
void amx_scores(const uint32_t*, const Bf16* const*, int64_t, int64_t, int64_t, float*) {}
void amx_accumulate_pv(float*, int64_t, const float*, uint32_t*, int64_t, const Bf16* const*, int64_t) {}

#endif

}  // namespace cogvlm2
