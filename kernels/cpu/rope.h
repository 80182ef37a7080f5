#pragma once

#include <cstdint>

namespace cogvlm2 {

// dst[h][d] = src[h][d] * cos + rotate_half(src[h]) * sin for `heads` rows of d floats (dst may equal src), with
// the composite's rounding (two products, then the sum; no FMA).
void rotate_rows(const float* src, float* dst, int64_t heads, int64_t d, const float* cos, const float* sin);

}  // namespace cogvlm2
