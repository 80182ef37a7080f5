// The panel GEMM's many-token products on AMX tiles (Intel Sapphire Rapids and later: amx_bf16, amx_int8), where
// one tile instruction takes a 16 x 32 bf16 (or 16 x 64 int8) block of activations times a 32 x 16 (64 x 16) block
// of weights: 16 times the multiply-adds of an AVX-512 FMA. The prepacked panels are already in the tiles' weight
// layout (gemm.h: kBf16 rows of 32 columns x one k pair, kI8Quads rows of 32 columns x one k quad), so a weight
// tile is 16 rows of one half of a panel, read with the panel's row stride; nothing is repacked.
#pragma once

#include <cstdint>

namespace cogvlm2 {

// Whether AMX tiles can run here: the CPU has amx_tile, amx_bf16 and amx_int8, and Linux granted this process the
// tile state (arch_prctl ARCH_REQ_XCOMP_PERM, asked once). False off x86-64 Linux.
bool cpu_has_amx();

// This thread's tile registers configured as every AMX user here takes them (tiles 0-7 of 16 rows x 64 bytes), and
// released; between the two, only tile code runs on the thread.
void configure_amx_tiles();
void release_amx_tiles();

// The k an AMX call takes per tile: 32 for bf16, 64 for int8. The callers use AMX only where k is a whole multiple
// of it (every projection of the real model); tokens go in blocks of kAmxRows, the last one zero-padded (at
// decode's few tokens the weights' bytes set the time, and a tile instruction costs no more for padding rows).
constexpr int64_t kAmxBf16K = 32;
constexpr int64_t kAmxInt8K = 64;
constexpr int64_t kAmxRows = 16;

// Panels [p0, p1) of y[m, n] = x @ w^T (+ y when accumulate) over bf16 activations x [m, ldx] (ldx >= k) and kBf16
// panels; any m >= 1, k a multiple of kAmxBf16K. fp32 accumulation over all of k inside the tiles (each product
// exact, the sums rounded to nearest even: not the bits of vdpbf16ps, whose order within a k pair differs).
void amx_bf16_panels(int64_t m, int64_t n, int64_t p0, int64_t p1, int64_t k, const uint16_t* x, int64_t ldx,
                     const uint16_t* wp, float* y, bool accumulate);

// The same over kI8 panels (w8a16's int8, k-major) under bf16 products: each panel's k turned into bf16 k pairs
// (exact) by `to_pairs` (it returns a buffer valid until its next call), once per panel and chunk of rows, and
// each column's sums multiplied by its scale as they are stored.
using I8ToBf16Pairs = const uint16_t* (*)(const int8_t* panel, int64_t k);
void amx_i8_bf16_panels(int64_t m, int64_t n, int64_t p0, int64_t p1, int64_t k, const uint16_t* x, int64_t ldx,
                        const int8_t* wp, float* y, bool accumulate, const float* col_scales,
                        I8ToBf16Pairs to_pairs);

// The same for kInt8Dot: unsigned activations (q + 128, gemm.h) times kI8Quads panels, int32 sums over all of k
// (exact, so the same integers as vpdpbusd), then y = float(sum - offset[c]) * row_scales[r] * col_scales[c] (+ y);
// k a multiple of kAmxInt8K.
void amx_int8_panels(int64_t m, int64_t n, int64_t p0, int64_t p1, int64_t k, const uint8_t* x, int64_t ldx,
                     const int8_t* wp, float* y, bool accumulate, const float* col_scales, const int32_t* offsets,
                     const float* row_scales);

}  // namespace cogvlm2
