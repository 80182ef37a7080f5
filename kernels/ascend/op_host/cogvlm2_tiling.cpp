// Tiling of the CogVLM2 Ascend C kernels (plain C++, see cogvlm2_tiling.h).
#include "cogvlm2_tiling.h"

#include <algorithm>
#include <cctype>

namespace cogvlm2_ascend {

namespace {

// Figures from CANN's platform_config/<SoC>.ini ([SoCInfo] ai_core_cnt / vector_core_cnt, [AICoreSpec] ub_size).
// 310P is a coupled architecture: vector kernels run on its 8 AI cores (its 7 separate Vector Cores are not used).
const std::vector<SocProfile> kSocs = {
    {"Ascend910B1", 48, 24, 196608, true},
    {"Ascend910B2", 48, 24, 196608, true},
    {"Ascend910B3", 40, 20, 196608, true},
    {"Ascend310P3", 8, 8, 262144, false},
};

std::string Lower(const std::string& text) {
    std::string out = text;
    std::transform(out.begin(), out.end(), out.begin(), [](unsigned char c) { return std::tolower(c); });
    return out;
}

uint32_t Buffer(uint64_t bytes) {  // one UB buffer, rounded to the 32-byte granule
    return AlignUp(static_cast<uint32_t>(bytes), kUbAlign);
}

bool CheckHeadDim(uint32_t headDim, uint32_t dtypeBytes, std::string* error) {
    // Half of a head must start on a 32-byte boundary in fp32 (rotate-half works on the two halves), and one
    // head row must be whole 32-byte blocks in the input dtype for DataCopy: headDim % 16 == 0 gives both.
    if (headDim == 0 || headDim % 16 != 0) {
        *error = "head_dim must be a positive multiple of 16, got " + std::to_string(headDim);
        return false;
    }
    if (headDim / 8 > 255) {  // a row's stride in 32-byte fp32 blocks must fit a vector repeat stride (uint8)
        *error = "head_dim too large for one vector repeat stride: " + std::to_string(headDim);
        return false;
    }
    if (dtypeBytes != 2 && dtypeBytes != 4) {
        *error = "dtype must be 2 (fp16/bf16) or 4 (fp32) bytes, got " + std::to_string(dtypeBytes);
        return false;
    }
    return true;
}

}  // namespace

const std::vector<SocProfile>& KnownSocs() { return kSocs; }

const SocProfile* FindSoc(const std::string& name) {
    const std::string wanted = Lower(name);
    for (const SocProfile& soc : kSocs) {
        if (Lower(soc.name) == wanted) return &soc;
    }
    for (const SocProfile& soc : kSocs) {  // family name, e.g. "ascend910b" or "Ascend310P"
        if (!wanted.empty() && Lower(soc.name).rfind(wanted, 0) == 0) return &soc;
    }
    return nullptr;
}

HardwareSpec SpecOf(const SocProfile& soc) { return {soc.vectorCores, soc.ubBytes, soc.bf16}; }

uint32_t AlignUp(uint32_t value, uint32_t align) { return (value + align - 1) / align * align; }

uint32_t CeilDiv(uint32_t a, uint32_t b) { return (a + b - 1) / b; }

uint32_t UsableUb(const HardwareSpec& hw) { return hw.ubBytes > kUbReserve ? hw.ubBytes - kUbReserve : 0; }

Split BalancedSplit(uint32_t total, uint32_t cores) {
    if (cores == 0) return {0, 0};
    return {total / cores, total % cores};
}

void CoreRange(const Split& split, uint32_t core, uint32_t* begin, uint32_t* end) {
    *begin = core * split.perCore + std::min(core, split.tailCores);
    *end = *begin + split.perCore + (core < split.tailCores ? 1 : 0);
}

// ---------------------------------------------------------------- rotary

uint32_t RotaryUbBytes(const RotaryShape& shape, uint32_t headsPerTile) {
    const uint64_t rowElems = static_cast<uint64_t>(headsPerTile) * shape.headDim;
    uint64_t total = 0;
    total += kBufferNum * Buffer(rowElems * shape.dtypeBytes);              // x in (double-buffered)
    total += kBufferNum * Buffer(rowElems * shape.dtypeBytes);              // y out (double-buffered)
    total += kBufferNum * Buffer(2ull * shape.headDim * shape.dtypeBytes);  // this token's cos | sin rows
    if (shape.dtypeBytes != 4) {                                            // fp16/bf16 compute in fp32
        total += Buffer(rowElems * 4);                                      // x32
        total += Buffer(rowElems * 4);                                      // y32
        total += Buffer(2ull * shape.headDim * 4);                          // cos32 | sin32
    }
    total += Buffer(rowElems * 4);  // products of one half, kept at row stride D like x and y
    return static_cast<uint32_t>(std::min<uint64_t>(total, UINT32_MAX));
}

RotaryTiling ComputeRotaryTiling(const RotaryShape& shape, const HardwareSpec& hw) {
    RotaryTiling t;
    if (!CheckHeadDim(shape.headDim, shape.dtypeBytes, &t.error)) return t;
    if (shape.isBf16 && !hw.bf16) {
        t.error = "bf16 is not supported by this SoC's vector unit";
        return t;
    }
    if (shape.numHeads == 0 || hw.cores == 0) {
        t.error = "need at least one head and one core";
        return t;
    }
    const uint32_t rows = shape.numHeads + shape.numKvHeads;
    const uint32_t cores = std::min(hw.cores, kMaxCores);

    // Largest tile that fits UB (and the 255-repeat limit of one vector instruction).
    uint32_t fit = 0;
    for (uint32_t r = std::min(rows, kMaxRepeat); r >= 1; --r) {
        if (RotaryUbBytes(shape, r) <= UsableUb(hw)) {
            fit = r;
            break;
        }
    }
    if (fit == 0) {
        t.error = "one head row does not fit the Unified Buffer";
        return t;
    }
    // Tile height: minimise the busiest core's time, modelled as (tiles it runs) x (rows per tile + a fixed
    // per-tile cost worth kRotaryTileOverheadRows rows). Few tokens (decode) then split a token's heads across
    // cores; many tokens keep whole tokens per tile. Tiles stay >= kMinRotaryTileBytes unless UB forbids.
    constexpr uint64_t kRotaryTileOverheadRows = 4;
    const uint32_t rowBytes = shape.headDim * shape.dtypeBytes;
    const uint32_t floorRows = std::min(fit, std::max(1u, CeilDiv(kMinRotaryTileBytes, rowBytes)));
    uint32_t heads = fit;
    uint64_t bestTime = UINT64_MAX;
    for (uint32_t r = fit; r >= floorRows && shape.numTokens > 0; --r) {
        const uint64_t tiles = static_cast<uint64_t>(shape.numTokens) * CeilDiv(rows, r);
        const uint64_t time = (tiles + cores - 1) / cores * (r + kRotaryTileOverheadRows);
        if (time < bestTime) {  // strict: ties keep the taller tile (fewer DMAs)
            bestTime = time;
            heads = r;
        }
    }
    t.headsPerTile = heads;
    t.tilesPerToken = CeilDiv(rows, heads);
    t.totalTiles = shape.numTokens * t.tilesPerToken;
    t.usedCores = std::max(1u, std::min(cores, t.totalTiles));
    t.split = BalancedSplit(t.totalTiles, t.usedCores);
    t.ubBytes = RotaryUbBytes(shape, heads);
    t.ok = true;
    return t;
}

void RotaryTileRows(const RotaryTiling& t, uint32_t totalRows, uint32_t tile, uint32_t* token, uint32_t* rowBegin,
                    uint32_t* rowCount) {
    *token = tile / t.tilesPerToken;
    *rowBegin = (tile % t.tilesPerToken) * t.headsPerTile;
    *rowCount = std::min(t.headsPerTile, totalRows - *rowBegin);
}

// ---------------------------------------------------------------- paged attention

uint32_t AttentionUbBytes(uint32_t headDim, uint32_t dtypeBytes, uint32_t group, uint32_t qTile, uint32_t kvTile) {
    const uint64_t rows = static_cast<uint64_t>(group) * qTile;
    const uint64_t d = headDim;
    uint64_t total = 0;
    total += Buffer(rows * d * dtypeBytes);                    // q in (loaded once per work item)
    total += Buffer(rows * d * 4);                             // q32, pre-scaled
    total += Buffer(rows * d * 4);                             // acc32: running sum of p * v
    total += 2ull * Buffer(rows * 4);                          // running max and sum per row
    total += Buffer(rows * d * dtypeBytes);                    // out staging
    total += 2ull * kBufferNum * Buffer(kvTile * d * dtypeBytes);  // k and v chunks (double-buffered)
    if (dtypeBytes != 4) total += 2ull * Buffer(kvTile * d * 4);   // k32, v32
    total += Buffer(kvTile * d * 4);                           // q * k products
    total += Buffer(kvTile * 4);                               // scores / probabilities of one row
    total += Buffer(kvTile * 4) + 256;                         // ReduceMax / ReduceSum work area
    total += 128;                                              // scalar exchange (chunk max, sum, alpha)
    return static_cast<uint32_t>(std::min<uint64_t>(total, UINT32_MAX));
}

uint32_t CacheWriteUbBytes(uint32_t numKvHeads, uint32_t headDim, uint32_t dtypeBytes, uint32_t tokensPerTile) {
    // K rows then V rows of `tokensPerTile` tokens, passed GM -> UB -> GM (double-buffered).
    const uint64_t bytes = 2ull * tokensPerTile * numKvHeads * headDim * dtypeBytes;
    return static_cast<uint32_t>(std::min<uint64_t>(kBufferNum * static_cast<uint64_t>(Buffer(bytes)), UINT32_MAX));
}

std::vector<WorkItem> EnumerateWorkItems(const AttentionShape& shape, uint32_t qTile) {
    // Order: sequence, then query tile, then KV head. The kernel walks the same order.
    std::vector<WorkItem> items;
    const size_t numSeqs = shape.seqLens.size();
    for (size_t s = 0; s < numSeqs; ++s) {
        const uint32_t qLen = static_cast<uint32_t>(shape.queryStartLoc[s + 1] - shape.queryStartLoc[s]);
        const uint32_t cached = static_cast<uint32_t>(shape.seqLens[s]) - qLen;
        for (uint32_t q0 = 0; q0 < qLen; q0 += qTile) {
            const uint32_t count = std::min(qTile, qLen - q0);
            for (uint32_t h = 0; h < shape.numKvHeads; ++h) {
                items.push_back({static_cast<uint32_t>(s), q0, count, h, cached, cached + q0 + count});
            }
        }
    }
    return items;
}

uint64_t WorkItemCost(const WorkItem& item, uint32_t group) {
    // Each visible key is loaded once (K and V rows) and used by every row of the item; a key load costs about
    // as much vector time as four rows' dot product + axpy. Only the ratio matters: it balances cores.
    const uint64_t rows = static_cast<uint64_t>(item.qCount) * group;
    return static_cast<uint64_t>(item.kvLen) * (4 + rows);
}

namespace {

bool ValidateAttention(const AttentionShape& s, const HardwareSpec& hw, std::string* error) {
    if (!CheckHeadDim(s.headDim, s.dtypeBytes, error)) return false;
    if (s.isBf16 && !hw.bf16) {
        *error = "bf16 is not supported by this SoC's vector unit";
        return false;
    }
    if (s.numKvHeads == 0 || s.numHeads % s.numKvHeads != 0) {
        *error = "num_heads must be a multiple of num_kv_heads";
        return false;
    }
    if (s.blockSize == 0 || hw.cores == 0) {
        *error = "block_size and the core count must be positive";
        return false;
    }
    if (s.queryStartLoc.size() != s.seqLens.size() + 1 || s.queryStartLoc.empty() || s.queryStartLoc[0] != 0) {
        *error = "query_start_loc must have num_seqs + 1 entries starting at 0";
        return false;
    }
    for (size_t i = 0; i < s.seqLens.size(); ++i) {
        const int32_t qLen = s.queryStartLoc[i + 1] - s.queryStartLoc[i];
        if (qLen < 0 || s.seqLens[i] < qLen) {
            *error = "sequence " + std::to_string(i) + ": need 0 <= query count <= seq_len";
            return false;
        }
    }
    return true;
}

// Contiguous ranges of items with near-equal cost: core c starts at the first item whose cost prefix reaches
// c/used of the total. The busiest core then costs at most total/used + the largest item.
std::vector<uint32_t> PartitionByCost(const std::vector<uint64_t>& costs, uint32_t used, uint64_t total) {
    std::vector<uint32_t> begin(used + 1, static_cast<uint32_t>(costs.size()));
    begin[0] = 0;
    uint64_t prefix = 0;
    uint32_t core = 1;
    for (uint32_t i = 0; i < costs.size() && core < used; ++i) {
        // Item i goes to the next core once the cost before it reaches that core's share.
        while (core < used && prefix * used >= total * core) begin[core++] = i;
        prefix += costs[i];
    }
    return begin;
}

uint32_t MaxQueryLen(const AttentionShape& shape) {  // at least 1
    uint32_t maxQ = 1;
    for (size_t i = 0; i < shape.seqLens.size(); ++i) {
        maxQ = std::max<uint32_t>(maxQ, shape.queryStartLoc[i + 1] - shape.queryStartLoc[i]);
    }
    return maxQ;
}

// Phase A: the cache write takes at most an eighth of UB (at least one token).
void TileCacheWrite(const AttentionShape& shape, uint32_t usable, AttentionTiling* t) {
    uint32_t writeTokens = 1;
    while (writeTokens < std::max(1u, t->numTokens) &&
           CacheWriteUbBytes(shape.numKvHeads, shape.headDim, shape.dtypeBytes, writeTokens + 1) <= usable / 8) {
        ++writeTokens;
    }
    t->writeTokensPerTile = writeTokens;
    t->writeUbBytes = CacheWriteUbBytes(shape.numKvHeads, shape.headDim, shape.dtypeBytes, writeTokens);
    t->writeTiles = CeilDiv(t->numTokens, writeTokens);
}

// The largest key chunk (a divisor of block_size, so a cached chunk never crosses a block) that leaves room for
// at least one query token; 0 if even one key does not.
uint32_t LargestKvTile(const AttentionShape& shape, uint32_t group, uint32_t budget) {
    for (uint32_t k = std::min(shape.blockSize, kMaxKvTile); k >= 1; --k) {
        if (shape.blockSize % k == 0 && AttentionUbBytes(shape.headDim, shape.dtypeBytes, group, 1, k) <= budget) {
            return k;
        }
    }
    return 0;
}

// As many query tokens as fit beside a chunk of kvTile keys.
uint32_t LargestQTile(const AttentionShape& shape, uint32_t group, uint32_t kvTile, uint32_t budget) {
    uint32_t qTile = 1;
    const uint32_t qCap = std::min(MaxQueryLen(shape), kMaxQTile);
    while (qTile < qCap && AttentionUbBytes(shape.headDim, shape.dtypeBytes, group, qTile + 1, kvTile) <= budget) {
        ++qTile;
    }
    return qTile;
}

uint32_t WorkItemCount(const AttentionShape& shape, uint32_t qTile) {  // EnumerateWorkItems(...).size()
    uint32_t n = 0;
    for (size_t i = 0; i < shape.seqLens.size(); ++i) {
        const uint32_t qLen = static_cast<uint32_t>(shape.queryStartLoc[i + 1] - shape.queryStartLoc[i]);
        n += CeilDiv(qLen, qTile) * shape.numKvHeads;
    }
    return n;
}

// Phase B: key chunk and query tile within `budget`, the UB the cache write leaves.
bool TileAttention(const AttentionShape& shape, uint32_t group, uint32_t cores, uint32_t budget, AttentionTiling* t) {
    const uint32_t kvTile = LargestKvTile(shape, group, budget);
    if (kvTile == 0) {
        t->error = "one query token with one key does not fit the Unified Buffer";
        return false;
    }
    uint32_t qTile = LargestQTile(shape, group, kvTile, budget);
    // Prefill on many cores: shrink query tiles until every core has work (AssignWorkItems balances the costs).
    while (qTile > 1 && WorkItemCount(shape, qTile) < cores) qTile = CeilDiv(qTile, 2);
    t->qTile = qTile;
    t->kvTile = kvTile;
    t->attnUbBytes = AttentionUbBytes(shape.headDim, shape.dtypeBytes, group, qTile, kvTile);
    t->ubBytes = t->writeUbBytes + t->attnUbBytes;
    return true;
}

void AssignWorkItems(const AttentionShape& shape, uint32_t group, uint32_t cores, AttentionTiling* t) {
    const std::vector<WorkItem> items = EnumerateWorkItems(shape, t->qTile);
    t->numItems = static_cast<uint32_t>(items.size());
    std::vector<uint64_t> costs;
    costs.reserve(items.size());
    for (const WorkItem& item : items) {
        costs.push_back(WorkItemCost(item, group));
        t->totalCost += costs.back();
        t->maxItemCost = std::max(t->maxItemCost, costs.back());
    }

    t->usedCores = std::max(1u, std::min(cores, std::max(t->numItems, t->writeTiles)));
    t->writeSplit = BalancedSplit(t->writeTiles, t->usedCores);
    const uint32_t attnCores = std::max(1u, std::min(t->usedCores, t->numItems));
    t->coreItemBegin = PartitionByCost(costs, attnCores, t->totalCost);
    t->coreItemBegin.resize(t->usedCores + 1, t->numItems);  // cores past attnCores only write the cache
    for (uint32_t c = 0; c < t->usedCores; ++c) {
        uint64_t cost = 0;
        for (uint32_t i = t->coreItemBegin[c]; i < t->coreItemBegin[c + 1]; ++i) cost += costs[i];
        t->maxCoreCost = std::max(t->maxCoreCost, cost);
    }
}

}  // namespace

AttentionTiling ComputeAttentionTiling(const AttentionShape& shape, const HardwareSpec& hw) {
    AttentionTiling t;
    if (!ValidateAttention(shape, hw, &t.error)) return t;
    const uint32_t group = shape.numHeads / shape.numKvHeads;
    const uint32_t cores = std::min(hw.cores, kMaxCores);
    const uint32_t usable = UsableUb(hw);
    t.numSeqs = static_cast<uint32_t>(shape.seqLens.size());
    t.numTokens = static_cast<uint32_t>(shape.queryStartLoc.back());
    TileCacheWrite(shape, usable, &t);
    const uint32_t attnBudget = usable > t.writeUbBytes ? usable - t.writeUbBytes : 0;
    if (!TileAttention(shape, group, cores, attnBudget, &t)) return t;
    AssignWorkItems(shape, group, cores, &t);
    t.ok = true;
    return t;
}

}  // namespace cogvlm2_ascend
