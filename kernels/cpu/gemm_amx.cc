#include "gemm_amx.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "gemm.h"

#if defined(__x86_64__) && defined(__linux__)
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define COGVLM2_HAS_AMX_CODE 1
#endif

namespace cogvlm2 {

#ifdef COGVLM2_HAS_AMX_CODE

#define COGVLM2_AMX_TARGET __attribute__((target("amx-tile,amx-bf16,amx-int8,avx512f,avx512bw")))

namespace {

constexpr long kArchReqXcompPerm = 0x1023;  // linux/arch/x86/include/uapi/asm/prctl.h
constexpr long kXfeatureTileData = 18;
constexpr int64_t kPanelRowBytes = kPackedPanel * 4;  // one k pair (bf16) or quad (int8) of a panel's 32 columns
constexpr int64_t kTileBytes = 64;                    // bytes per tile row
constexpr int64_t kPrefetchSteps = 4;                 // k steps ahead that a panel's weights are asked for
// Activation rows per chunk: as many as keep the chunk's rows (at most this many bytes) in L2 while every panel
// of the thread passes over them.
constexpr int64_t kChunkBytes = 512 << 10;

// The tile registers: 0-3 the sums of row block b and column half h (tile 2 b + h), 4-5 the two row blocks'
// activations, 6-7 the two column halves' weights; all 16 rows x 64 bytes.
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// In static storage: GCC 12's _tile_loadconfig tells the compiler it reads 8 bytes, so it may drop the stores that
// fill a configuration on the stack as dead (kernels/cpu/attention_amx.cc met it: a #GP on a zeroed config).
constexpr TileConfig tile_config() {
  TileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.colsb[t] = kTileBytes;
    config.rows[t] = kAmxRows;
  }
  return config;
}
const TileConfig kTileConfig = tile_config();

// The tile intrinsics take their register numbers as literals (they are pasted into the instruction).
#define COGVLM2_TILE_DOT(kInt8, c, a, b) \
  do {                                   \
    if constexpr (kInt8) {               \
      _tile_dpbusd(c, a, b);             \
    } else {                             \
      _tile_dpbf16ps(c, a, b);           \
    }                                    \
  } while (0)

// kBlocks (1 or 2) blocks of 16 rows of x times one panel over `steps` tiles of k, into sums [32][32] (fp32 for
// bf16, int32 for int8).
template <bool kInt8, int kBlocks>
COGVLM2_AMX_TARGET void panel_sums(const uint8_t* x, int64_t ldx, const uint8_t* panel, int64_t steps, void* sums) {
  _tile_zero(0);
  _tile_zero(1);
  if constexpr (kBlocks == 2) {
    _tile_zero(2);
    _tile_zero(3);
  }
  constexpr int64_t kStepBytes = kAmxRows * kPanelRowBytes;  // a step's two weight tiles: 32 cache lines
  for (int64_t s = 0; s < steps; ++s) {
    const uint8_t* w = panel + s * kStepBytes;
    const uint8_t* a = x + s * kTileBytes;
    // Tile loads stall on memory where decode's few rows give them nothing to overlap with: ask for the weights
    // kPrefetchSteps ahead (past the panel's end this reads the next panel, which is read next anyway).
    const char* ahead = reinterpret_cast<const char*>(w) + kPrefetchSteps * kStepBytes;
    for (int64_t line = 0; line < kStepBytes; line += 64) _mm_prefetch(ahead + line, _MM_HINT_T0);
    _tile_loadd(6, w, kPanelRowBytes);
    _tile_loadd(7, w + kTileBytes, kPanelRowBytes);
    _tile_loadd(4, a, ldx);
    COGVLM2_TILE_DOT(kInt8, 0, 4, 6);
    COGVLM2_TILE_DOT(kInt8, 1, 4, 7);
    if constexpr (kBlocks == 2) {
      _tile_loadd(5, a + kAmxRows * ldx, ldx);
      COGVLM2_TILE_DOT(kInt8, 2, 5, 6);
      COGVLM2_TILE_DOT(kInt8, 3, 5, 7);
    }
  }
  char* out = static_cast<char*>(sums);
  constexpr int64_t kRowBytes = kPackedPanel * 4;
  _tile_stored(0, out, kRowBytes);
  _tile_stored(1, out + kTileBytes, kRowBytes);
  if constexpr (kBlocks == 2) {
    _tile_stored(2, out + kAmxRows * kRowBytes, kRowBytes);
    _tile_stored(3, out + kAmxRows * kRowBytes + kTileBytes, kRowBytes);
  }
}

// What one row's 32 sums become in y (the first `cols` of them): for bf16 as they are, or times the columns'
// scales (w8a16's int8 panels); for int8 the offsets subtracted and the row's and columns' scales applied.
struct Epilogue {
  const float* col_scales = nullptr;
  const int32_t* offsets = nullptr;
  const float* row_scales = nullptr;
};

template <bool kInt8>
COGVLM2_AMX_TARGET void store_rows(const void* sums, int64_t rows, float* y, int64_t ldy, int64_t cols, bool add,
                                   const Epilogue& e, int64_t row0, int64_t c0) {
  const __mmask16 m0 = static_cast<__mmask16>(cols >= 16 ? 0xFFFF : (1u << cols) - 1);
  const __mmask16 m1 = static_cast<__mmask16>(cols >= 32 ? 0xFFFF : cols > 16 ? (1u << (cols - 16)) - 1 : 0);
  const __mmask16 masks[2] = {m0, m1};
  for (int64_t r = 0; r < rows; ++r) {
    float* out = y + r * ldy;
    for (int h = 0; h < 2; ++h) {
      const char* at = static_cast<const char*>(sums) + (r * kPackedPanel + 16 * h) * 4;
      __m512 v;
      if constexpr (kInt8) {
        const __m512i offset = _mm512_maskz_loadu_epi32(masks[h], e.offsets + c0 + 16 * h);
        const __m512i sum = _mm512_sub_epi32(_mm512_loadu_si512(at), offset);
        const __m512 scale = _mm512_maskz_loadu_ps(masks[h], e.col_scales + c0 + 16 * h);
        v = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(sum), _mm512_set1_ps(e.row_scales[row0 + r])), scale);
      } else {
        v = _mm512_loadu_ps(reinterpret_cast<const float*>(at));
        if (e.col_scales) v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(masks[h], e.col_scales + c0 + 16 * h));
      }
      if (add) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(masks[h], out + 16 * h));
      _mm512_mask_storeu_ps(out + 16 * h, masks[h], v);
    }
  }
}

// panel_at(p): panel p in the tiles' layout (the stored panel, or a conversion of it: then all rows pass over it
// at once, so that each panel is converted once, at the cost of streaming x from L3 per panel).
template <bool kInt8, class PanelAt>
void amx_panels(int64_t m, int64_t n, int64_t p0, int64_t p1, int64_t k, const uint8_t* x, int64_t ldx,
                PanelAt panel_at, float* y, bool accumulate, const Epilogue& e, bool converted = false) {
  const int64_t elem = kInt8 ? 1 : 2, steps = k / (kInt8 ? kAmxInt8K : kAmxBf16K);
  const int64_t fit = std::max<int64_t>(2 * kAmxRows, kChunkBytes / (k * elem) / (2 * kAmxRows) * 2 * kAmxRows);
  const int64_t chunk = converted ? m : fit;
  alignas(64) int32_t sums[2 * kAmxRows * kPackedPanel];
  // The rows after the last whole block, zero-padded to one block (their padding rows' sums are never stored).
  const int64_t whole = m / kAmxRows * kAmxRows, tail = m - whole;
  thread_local std::vector<uint8_t> padded;
  if (tail > 0) {
    padded.assign(kAmxRows * ldx, 0);
    std::memcpy(padded.data(), x + whole * ldx, tail * ldx);
  }
  configure_amx_tiles();
  for (int64_t r0 = 0; r0 < m; r0 += chunk) {
    const int64_t r1 = std::min(m, r0 + chunk);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t c0 = p * kPackedPanel, cols = std::min(kPackedPanel, n - c0);
      const uint8_t* panel = panel_at(p);
      for (int64_t row = r0; row < r1;) {
        const int64_t rows = std::min(2 * kAmxRows, r1 - row);
        if (rows == 2 * kAmxRows) panel_sums<kInt8, 2>(x + row * ldx, ldx, panel, steps, sums);
        else if (rows >= kAmxRows) panel_sums<kInt8, 1>(x + row * ldx, ldx, panel, steps, sums);
        else panel_sums<kInt8, 1>(padded.data(), ldx, panel, steps, sums);
        const int64_t done = rows == 2 * kAmxRows ? rows : std::min(rows, kAmxRows);
        store_rows<kInt8>(sums, done, y + row * n + c0, n, cols, accumulate, e, row, c0);
        row += done;
      }
    }
  }
  release_amx_tiles();
}

// Panels stored in the tiles' layout: k / group rows of 128 bytes each (group: k per pair or quad).
auto stored_panels(const void* wp, int64_t k, int64_t group) {
  const int64_t panel_bytes = k / group * kPanelRowBytes;
  return [=](int64_t p) { return static_cast<const uint8_t*>(wp) + p * panel_bytes; };
}

}  // namespace

COGVLM2_AMX_TARGET void configure_amx_tiles() { _tile_loadconfig(&kTileConfig); }

COGVLM2_AMX_TARGET void release_amx_tiles() { _tile_release(); }

bool cpu_has_amx() {
  static const bool has = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool bf16 = (d >> 22) & 1u, tile = (d >> 24) & 1u, int8 = (d >> 25) & 1u;
    return bf16 && tile && int8 && syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureTileData) == 0;
  }();
  return has;
}

void amx_bf16_panels(int64_t m, int64_t n, int64_t p0, int64_t p1, int64_t k, const uint16_t* x, int64_t ldx,
                     const uint16_t* wp, float* y, bool accumulate) {
  amx_panels<false>(m, n, p0, p1, k, reinterpret_cast<const uint8_t*>(x), ldx * 2, stored_panels(wp, k, 2), y,
                    accumulate, {});
}

void amx_i8_bf16_panels(int64_t m, int64_t n, int64_t p0, int64_t p1, int64_t k, const uint16_t* x, int64_t ldx,
                        const int8_t* wp, float* y, bool accumulate, const float* col_scales,
                        I8ToBf16Pairs to_pairs) {
  auto converted = [=](int64_t p) { return reinterpret_cast<const uint8_t*>(to_pairs(wp + p * k * kPackedPanel, k)); };
  amx_panels<false>(m, n, p0, p1, k, reinterpret_cast<const uint8_t*>(x), ldx * 2, converted, y, accumulate,
                    {col_scales, nullptr, nullptr}, true);
}

void amx_int8_panels(int64_t m, int64_t n, int64_t p0, int64_t p1, int64_t k, const uint8_t* x, int64_t ldx,
                     const int8_t* wp, float* y, bool accumulate, const float* col_scales, const int32_t* offsets,
                     const float* row_scales) {
  amx_panels<true>(m, n, p0, p1, k, x, ldx, stored_panels(wp, k, 4), y, accumulate,
                   {col_scales, offsets, row_scales});
}

#else

bool cpu_has_amx() { return false; }
void configure_amx_tiles() {}
void release_amx_tiles() {}

void amx_bf16_panels(int64_t, int64_t, int64_t, int64_t, int64_t, const uint16_t*, int64_t, const uint16_t*, float*,
                     bool) {}

void amx_int8_panels(int64_t, int64_t, int64_t, int64_t, int64_t, const uint8_t*, int64_t, const int8_t*, float*,
                     bool, const float*, const int32_t*, const float*) {}

void amx_i8_bf16_panels(int64_t, int64_t, int64_t, int64_t, int64_t, const uint16_t*, int64_t, const int8_t*, float*,
                        bool, const float*, I8ToBf16Pairs) {}

#endif

}  // namespace cogvlm2
