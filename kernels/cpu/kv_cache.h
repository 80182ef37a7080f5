#pragma once

#include "common.h"

namespace cogvlm2 {

// cache rows [slots, row] <- values rows [n, row] at slot_mapping; kBadIndex (nothing written) on a bad slot.
// values_stride: floats between consecutive value rows (<= 0: row, i.e. contiguous).
int write_rows(float* cache, int64_t slots, int64_t row, const float* values, const int32_t* slot_mapping,
               int64_t n, int64_t values_stride = 0);

}  // namespace cogvlm2
