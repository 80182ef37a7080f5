// Kernel-side tiling structs for the emulator. On an NPU the CANN build generates these from
// op_host/*_tiling.h (BEGIN_TILING_DATA_DEF); tests/test_ascend_tiling.py checks the field lists match.
#pragma once

#include <cstdint>

struct RotaryCogvlm2TilingData {
    uint32_t numTokens;
    uint32_t numHeads;
    uint32_t numKvHeads;
    uint32_t headDim;
    uint32_t headsPerTile;
    uint32_t tilesPerToken;
    uint32_t tilesPerCore;
    uint32_t tailCores;
};

struct PagedAttentionCogvlm2TilingData {
    uint32_t numTokens;
    uint32_t numSeqs;
    uint32_t numHeads;
    uint32_t numKvHeads;
    uint32_t headDim;
    uint32_t blockSize;
    uint32_t maxBlocksPerSeq;
    float scale;
    uint32_t writeTokensPerTile;
    uint32_t writeTilesPerCore;
    uint32_t writeTailCores;
    uint32_t qTile;
    uint32_t kvTile;
    uint32_t coreItemBegin[65];
};
