// y[m, n] (+)= x[m, k] . w[n, k]: the "NT" product of activations with [out, in] weights, both read along k.
// Few tokens (decode): 4 x 4 tiles of dot products straight from the weight rows, no packing, so the weights are
// streamed once at memory speed (a packing BLAS repacks them on every call). More tokens: 32-row weight panels
// packed k-major once per k block, then 8 x 32 broadcast-FMA tiles over them (AVX-512).
#pragma once

#include <cstdint>

namespace cogvlm2 {

// Columns [c0, c1) of y = x @ w^T (+ y when accumulate), on the calling thread. x [m, k], w [n, k], y [m, n], all
// row-major and contiguous. Callers split the columns between threads, in multiples of kGemmColumnAlign.
// k_block x n_block: the panel of w kept in cache while every token passes over it (<= 0: defaults).
void gemm_nt_columns(int64_t m, int64_t n, int64_t c0, int64_t c1, int64_t k, const float* x, const float* w,
                     float* y, bool accumulate, int64_t k_block, int64_t n_block);

constexpr int64_t kGemmColumnAlign = 32;

// Weights packed once at load time for the matmul they feed: w [n, k] as column panels wp[p][kk][c] =
// w[32 p + c][kk], shape [ceil(n / 32), k, 32] (a short last panel is zero-padded). Every call then streams the
// weights in the order the 8 x 32 broadcast-FMA tiles read them, without repacking (a BLAS repacks per call, which
// at decode's few tokens costs as much as the product).
constexpr int64_t kPackedPanel = 32;

// Panels [p0, p1) of y[m, n] = x @ w^T (+ y when accumulate), on the calling thread. k_block <= 0: the default.
void gemm_prepacked_panels(int64_t m, int64_t n, int64_t p0, int64_t p1, int64_t k, const float* x,
                           const float* wp, float* y, bool accumulate, int64_t k_block);

}  // namespace cogvlm2
