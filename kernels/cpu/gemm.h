// y[m, n] (+)= x[m, k] . w[n, k]: the "NT" product of activations with [out, in] weights, both read along k.
// Weights in [out, in] layout: for few tokens (decode), 4 x 4 tiles of dot products straight from the weight rows,
// no packing, so the weights are streamed once at memory speed (a packing BLAS repacks them on every call); for
// more tokens, 32-row weight panels packed k-major once per k block, then 8 x 32 broadcast-FMA tiles over them
// (AVX-512). Weights prepacked at load time into those panels (in float32, bfloat16 or float16): the same tiles,
// of 1 to 12 tokens, straight over the panels.
#pragma once

#include <cstdint>
#include <vector>

namespace cogvlm2 {

// Columns [c0, c1) of y = x @ w^T (+ y when accumulate), on the calling thread. x [m, k], w [n, k], y [m, n], all
// row-major and contiguous. Callers split the columns between threads, in multiples of kGemmColumnAlign.
// k_block x n_block: the panel of w kept in cache while every token passes over it (<= 0: defaults).
void gemm_nt_columns(int64_t m, int64_t n, int64_t c0, int64_t c1, int64_t k, const float* x, const float* w,
                     float* y, bool accumulate, int64_t k_block, int64_t n_block);

constexpr int64_t kGemmColumnAlign = 32;

// Weights packed once at load time (kernels/ops.py pack_weight) for the matmul they feed, as panels of 32 weight
// rows, so that every call streams them in the order the tiles read them without repacking (a BLAS repacks per
// call, which at decode's few tokens costs as much as the product). A short last panel is zero-padded.
//   kF32, kF16, kI8: k-major [ceil(n / 32), k, 32], wp[p][kk][c] = w[32 p + c][kk] (kI8: symmetric int8, the
//     weight being wp * scales[32 p + c], one fp32 scale per output column, passed beside the panels).
//   kBf16: k pairs interleaved, [ceil(n / 32), ceil(k / 2), 32, 2], wp[p][kk / 2][c][kk % 2] = w[32 p + c][kk]
//     (an odd k padded with zeros): vdpbf16ps's operand layout, and widened exactly to fp32 by a shift (even kk)
//     or a mask (odd kk) of each 32-bit pair.
//   kI8Quads: int8 in k quads, [ceil(n / 32), ceil(k / 4), 32, 4], wp[p][kk / 4][c][kk % 4] = w[32 p + c][kk] (k
//     padded with zeros): vpdpbusd's operand layout, four k per 32-bit lane; scales as for kI8, and beside them
//     per-column offsets, 128 * the column's sum of weights (what kInt8Dot's unsigned activations add).
constexpr int64_t kPackedPanel = 32;
enum class PanelDtype { kF32, kF16, kBf16, kI8, kI8Quads };

// How the products are taken.
//   kFloat32: weights widened to fp32 in registers and fp32 FMAs over the fp32 activations, in the f32 panels'
//     order, so 16-bit panels give bit-identical results to f32 panels of the widened weights (same k_block).
//   kBf16Dot (bf16 panels only): activations rounded to bf16 once per call (round to nearest even, denormals to
//     zero: vcvtne2ps2bf16), products by vdpbf16ps into fp32 accumulators; where the CPU lacks avx512_bf16 (or
//     `portable` asks), the same math on widened operands: per k pair, an FMA of the odd k then one of the even
//     k (bf16 products are exact in fp32, so this is what vdpbf16ps computes), hence the same results.
//   kInt8Dot (kI8Quads panels only, w8a8): activations quantized per token once per call (symmetric int8: scale =
//     max |x_row| / 127, or 1 for a zero row; q = x / scale rounded to nearest even, clamped to +-127) and stored
//     as q + 128 (unsigned); vpdpbusd sums u8 x s8 products into int32 over the whole k in one pass (exact), the
//     column's offset is subtracted, and y = float(sum) * x_scale[row] * w_scale[col] (+ y). Where the CPU lacks
//     avx512_vnni (or `portable` asks), a plain integer loop computes the same integers, hence the same results.
enum class PanelMath { kFloat32, kBf16Dot, kInt8Dot };

constexpr int kMaxTileRows = 12;

struct PanelGemm {
  PanelDtype dtype = PanelDtype::kF32;
  PanelMath math = PanelMath::kFloat32;
  bool portable = false;  // kBf16Dot, kInt8Dot: the fallback even where vdpbf16ps / vpdpbusd exists
  int64_t k_block = 0;    // k per pass over the panels (even for kBf16; kInt8Dot: always all of k); <= 0: the default
  int tile_rows = 0;      // tokens per tile, 1..kMaxTileRows; <= 0: the default
  bool amx = false;       // kBf16Dot, kInt8Dot (not portable): AMX tiles where the CPU has them (gemm_amx.h)
  int widen_rows = 0;     // kI8 under kBf16Dot: calls of up to this many tokens widen the int8 weights to fp32 in
                          // vdpbf16ps's order (the same bits) instead of pairing them as bf16 for it
  int prefetch_rows = 0;  // calls of at least this many tokens have their tiles pull the panel slice read next into
                          // L2 as they go; fewer leave the weights' one sequential stream per core to the hardware
                          // prefetcher (a second stream slowed 16-bit weights at few tokens)
};

// The activations as a panel GEMM reads them: x itself (kFloat32); x rounded to bf16 for kBf16Dot, as bf16
// (vdpbf16ps) or as the fp32 values of the rounded bf16 (the fallback), rows padded to an even length; for kInt8Dot
// the unsigned int8 q + 128 with a scale per row, rows padded with q = 0 to whole k quads.
struct Activations {
  const void* data = nullptr;
  int64_t ld = 0;          // elements per row
  int64_t elem_bytes = 4;  // 4 (fp32), 2 (bf16) or 1 (int8)
  const float* row_scales = nullptr;  // kInt8Dot: [rows]

  Activations rows_from(int64_t row) const {
    return {static_cast<const char*>(data) + row * ld * elem_bytes, ld, elem_bytes,
            row_scales ? row_scales + row : nullptr};
  }
};

struct ActivationStorage {
  std::vector<uint16_t> bf16;
  std::vector<float> widened;
  std::vector<uint8_t> int8;
  std::vector<float> row_scales;
};

// x [m, k] as `g` reads it, rounded (kBf16Dot) or quantized (kInt8Dot) once into `storage`, on up to `threads`
// threads (valid while `storage` lives).
Activations prepare_activations(const PanelGemm& g, const float* x, int64_t m, int64_t k, ActivationStorage& storage,
                                int threads);

// Panels [p0, p1) of y[m, n] = x @ w^T (+ y when accumulate), on the calling thread. wp: panels of g.dtype;
// scales: the int8 panels' [n] per-column scales (else ignored); offsets: kI8Quads' [n] per-column offsets.
void gemm_panels(const PanelGemm& g, int64_t m, int64_t n, int64_t p0, int64_t p1, int64_t k, const Activations& x,
                 const void* wp, float* y, bool accumulate, const float* scales = nullptr,
                 const int32_t* offsets = nullptr);

// Whether this CPU runs vpdpbusd (else kInt8Dot takes the fallback).
bool cpu_has_int8_dot();

}  // namespace cogvlm2
