// Tiling of the CogVLM2 Ascend C kernels: how work is split across AI cores and how much Unified Buffer (UB)
// each core plans to use. Plain C++17 with no CANN dependency, so the op_host tiling functions call it on an NPU
// host and tests/test_ascend_tiling.py compiles and checks it on a CPU-only machine.
//
// Two kernels:
//   RotaryCogvlm2          q [T, H, D], k [T, KV, D] rotated (NeoX rotate-half) by position id from cos/sin tables.
//   PagedAttentionCogvlm2  writes this step's K/V into the paged cache by slot_mapping (phase A), then attention of
//                          a flat varlen batch (decodes + prefill chunks), GQA, causal, over the cache (phase B).
// Both are vector-only kernels: on Ascend910B they run on the AIV cores, on Ascend310P on the AI cores.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace cogvlm2_ascend {

constexpr uint32_t kMaxCores = 64;          // tiling data carries per-core arrays of kMaxCores + 1 entries
constexpr uint32_t kUbAlign = 32;           // UB buffers and DataCopy lengths are 32-byte granular
constexpr uint32_t kUbReserve = 2048;       // left free for the framework (910B reports UB 256 B under its .ini)
constexpr uint32_t kBufferNum = 2;          // double buffering of the streamed inputs
constexpr uint32_t kMaxRepeat = 255;        // vector instructions repeat at most 255 times
constexpr uint32_t kMaxKvTile = 64;         // keys per attention chunk (a divisor of block_size)
constexpr uint32_t kMaxQTile = 64;          // query tokens per attention work item
constexpr uint32_t kMinRotaryTileBytes = 2048;  // smaller tiles spend more on DMA setup than on data

// Hardware figures of one SoC, as in CANN's data/platform_config/<SoC>.ini (see docs/ascend.md).
struct SocProfile {
    const char* name;        // SoC version as aclrtGetSocName reports it, e.g. "Ascend910B2"
    uint32_t vectorCores;    // cores a vector-only kernel is launched on (AIV on 910B, AI cores on 310P)
    uint32_t cubeCores;      // AI (cube) cores
    uint32_t ubBytes;        // Unified Buffer per vector core
    bool bf16;               // vector unit converts bf16 <-> fp32
};

const std::vector<SocProfile>& KnownSocs();
// Exact name first ("Ascend910B2"), then a family name ("ascend910b" -> the family's first entry), else nullptr.
const SocProfile* FindSoc(const std::string& name);

// What the op_host read from the platform at run time (GetCoreNumAiv, GetCoreMemSize(UB)).
struct HardwareSpec {
    uint32_t cores;
    uint32_t ubBytes;
    bool bf16;
};
HardwareSpec SpecOf(const SocProfile& soc);

uint32_t AlignUp(uint32_t value, uint32_t align);
uint32_t CeilDiv(uint32_t a, uint32_t b);
uint32_t UsableUb(const HardwareSpec& hw);

// Balanced split of `total` units over `cores`: the first total % cores cores take one more unit.
// The kernels repeat this arithmetic from (perCore, tailCores); keep the two in step.
struct Split {
    uint32_t perCore;
    uint32_t tailCores;
};
Split BalancedSplit(uint32_t total, uint32_t cores);
void CoreRange(const Split& split, uint32_t core, uint32_t* begin, uint32_t* end);

// ---------------------------------------------------------------- rotary
struct RotaryShape {
    uint32_t numTokens;
    uint32_t numHeads;
    uint32_t numKvHeads;
    uint32_t headDim;
    uint32_t dtypeBytes;     // 2 (fp16/bf16) or 4 (fp32); the cos/sin tables share q's dtype
    bool isBf16;
};

// Work unit = one tile: `headsPerTile` consecutive rows of one token, rows numbered over q heads then k heads
// (row h < H is q head h, row h >= H is k head h - H). Tile i covers token i / tilesPerToken.
struct RotaryTiling {
    bool ok = false;
    std::string error;
    uint32_t usedCores = 0;
    uint32_t headsPerTile = 0;
    uint32_t tilesPerToken = 0;
    uint32_t totalTiles = 0;
    Split split{0, 0};
    uint32_t ubBytes = 0;
};

uint32_t RotaryUbBytes(const RotaryShape& shape, uint32_t headsPerTile);
RotaryTiling ComputeRotaryTiling(const RotaryShape& shape, const HardwareSpec& hw);
// Rows of tile `tile` (the kernel's RotaryKernel::Process does the same arithmetic).
void RotaryTileRows(const RotaryTiling& t, uint32_t totalRows, uint32_t tile, uint32_t* token, uint32_t* rowBegin,
                    uint32_t* rowCount);

// ---------------------------------------------------------------- paged attention
struct AttentionShape {
    uint32_t numHeads;
    uint32_t numKvHeads;
    uint32_t headDim;
    uint32_t blockSize;
    uint32_t dtypeBytes;
    bool isBf16;
    std::vector<int32_t> queryStartLoc;  // [S + 1] cumulative query counts; tokens of a sequence are contiguous
    std::vector<int32_t> seqLens;        // [S] context length of each sequence after this step (cached + new)
};

// One attention work item: `qCount` query tokens of sequence `seq` starting at its query `qBegin`, for all
// `group` query heads of KV head `kvHead`. Keys [0, cachedLen) come from the paged cache, keys
// [cachedLen, kvLen) from this step's key/value inputs (so phase B never reads what phase A writes).
struct WorkItem {
    uint32_t seq;
    uint32_t qBegin;
    uint32_t qCount;
    uint32_t kvHead;
    uint32_t cachedLen;
    uint32_t kvLen;          // keys visible to the item's last query
};

struct AttentionTiling {
    bool ok = false;
    std::string error;
    uint32_t usedCores = 0;
    uint32_t numTokens = 0;
    uint32_t numSeqs = 0;
    // phase A: cache write, split by token
    uint32_t writeTokensPerTile = 0;
    uint32_t writeTiles = 0;
    Split writeSplit{0, 0};
    uint32_t writeUbBytes = 0;
    // phase B: attention work items, split by estimated cost into contiguous ranges
    uint32_t qTile = 0;
    uint32_t kvTile = 0;
    uint32_t numItems = 0;
    std::vector<uint32_t> coreItemBegin;   // usedCores + 1 entries; core c owns [begin[c], begin[c + 1])
    uint32_t attnUbBytes = 0;
    uint32_t ubBytes = 0;                  // writeUbBytes + attnUbBytes: both phases' buffers live together
    uint64_t totalCost = 0;
    uint64_t maxCoreCost = 0;
    uint64_t maxItemCost = 0;
};

uint32_t AttentionUbBytes(uint32_t headDim, uint32_t dtypeBytes, uint32_t group, uint32_t qTile, uint32_t kvTile);
uint32_t CacheWriteUbBytes(uint32_t numKvHeads, uint32_t headDim, uint32_t dtypeBytes, uint32_t tokensPerTile);
std::vector<WorkItem> EnumerateWorkItems(const AttentionShape& shape, uint32_t qTile);
uint64_t WorkItemCost(const WorkItem& item, uint32_t group);
AttentionTiling ComputeAttentionTiling(const AttentionShape& shape, const HardwareSpec& hw);

}  // namespace cogvlm2_ascend
