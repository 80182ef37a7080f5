// Tiling data of RotaryCogvlm2, passed from the op_host tiling function to the kernel (GET_TILING_DATA).
#pragma once

#include "register/tilingdata_base.h"

namespace optiling {
BEGIN_TILING_DATA_DEF(RotaryCogvlm2TilingData)
TILING_DATA_FIELD_DEF(uint32_t, numTokens);
TILING_DATA_FIELD_DEF(uint32_t, numHeads);
TILING_DATA_FIELD_DEF(uint32_t, numKvHeads);
TILING_DATA_FIELD_DEF(uint32_t, headDim);
TILING_DATA_FIELD_DEF(uint32_t, headsPerTile);   // rows (token, head) per UB pass
TILING_DATA_FIELD_DEF(uint32_t, tilesPerToken);
TILING_DATA_FIELD_DEF(uint32_t, tilesPerCore);   // balanced split of the tiles ...
TILING_DATA_FIELD_DEF(uint32_t, tailCores);      // ... the first tailCores cores take one more
END_TILING_DATA_DEF;

REGISTER_TILING_DATA_CLASS(RotaryCogvlm2, RotaryCogvlm2TilingData)
}  // namespace optiling
