// Tiling data of PagedAttentionCogvlm2, passed from the op_host tiling function to the kernel (GET_TILING_DATA).
#pragma once

#include "register/tilingdata_base.h"

namespace optiling {
BEGIN_TILING_DATA_DEF(PagedAttentionCogvlm2TilingData)
TILING_DATA_FIELD_DEF(uint32_t, numTokens);
TILING_DATA_FIELD_DEF(uint32_t, numSeqs);
TILING_DATA_FIELD_DEF(uint32_t, numHeads);
TILING_DATA_FIELD_DEF(uint32_t, numKvHeads);
TILING_DATA_FIELD_DEF(uint32_t, headDim);
TILING_DATA_FIELD_DEF(uint32_t, blockSize);
TILING_DATA_FIELD_DEF(uint32_t, maxBlocksPerSeq);     // row length of block_tables
TILING_DATA_FIELD_DEF(float, scale);
// phase A: cache write
TILING_DATA_FIELD_DEF(uint32_t, writeTokensPerTile);
TILING_DATA_FIELD_DEF(uint32_t, writeTilesPerCore);
TILING_DATA_FIELD_DEF(uint32_t, writeTailCores);
// phase B: attention
TILING_DATA_FIELD_DEF(uint32_t, qTile);
TILING_DATA_FIELD_DEF(uint32_t, kvTile);
TILING_DATA_FIELD_DEF_ARR(uint32_t, 65, coreItemBegin);  // cogvlm2_ascend::kMaxCores + 1
END_TILING_DATA_DEF;

REGISTER_TILING_DATA_CLASS(PagedAttentionCogvlm2, PagedAttentionCogvlm2TilingData)
}  // namespace optiling
