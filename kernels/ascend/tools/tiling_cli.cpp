// Command-line driver of the plain-C++ tiling library, for tests on machines without CANN. Prints JSON.
//
//   tiling_cli socs
//   tiling_cli rotary    SOC TOKENS HEADS KV_HEADS HEAD_DIM DTYPE_BYTES IS_BF16
//   tiling_cli attention SOC HEADS KV_HEADS HEAD_DIM BLOCK_SIZE DTYPE_BYTES IS_BF16 QUERY_START_LOC SEQ_LENS
//
// SOC is a profile name ("Ascend910B2") or "custom:CORES:UB_BYTES:BF16". QUERY_START_LOC and SEQ_LENS are
// comma-separated ("-" for an empty list). Each core's share is listed the way the kernel walks it.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <string>
#include <vector>

#include "../op_host/cogvlm2_tiling.h"

using namespace cogvlm2_ascend;

namespace {

std::vector<int32_t> ParseList(const std::string& text) {
    std::vector<int32_t> values;
    if (text == "-") return values;
    std::stringstream stream(text);
    std::string item;
    while (std::getline(stream, item, ',')) values.push_back(static_cast<int32_t>(std::stol(item)));
    return values;
}

bool ParseSpec(const std::string& soc, HardwareSpec* spec) {
    if (soc.rfind("custom:", 0) == 0) {
        unsigned cores = 0, ub = 0, bf16 = 0;
        if (std::sscanf(soc.c_str(), "custom:%u:%u:%u", &cores, &ub, &bf16) != 3) return false;
        *spec = {cores, ub, bf16 != 0};
        return true;
    }
    const SocProfile* profile = FindSoc(soc);
    if (profile == nullptr) return false;
    *spec = SpecOf(*profile);
    return true;
}

std::string Quote(const std::string& text) {
    std::string out = "\"";
    for (char c : text) out += (c == '"' || c == '\\') ? std::string("\\") + c : std::string(1, c);
    return out + "\"";
}

int Socs() {
    std::printf("[");
    const auto& socs = KnownSocs();
    for (size_t i = 0; i < socs.size(); ++i) {
        std::printf("%s{\"name\": %s, \"vector_cores\": %u, \"cube_cores\": %u, \"ub_bytes\": %u, \"bf16\": %s}",
                    i ? ", " : "", Quote(socs[i].name).c_str(), socs[i].vectorCores, socs[i].cubeCores,
                    socs[i].ubBytes, socs[i].bf16 ? "true" : "false");
    }
    std::printf("]\n");
    return 0;
}

int Rotary(const HardwareSpec& hw, char** argv) {
    RotaryShape shape{};
    shape.numTokens = std::atoi(argv[0]);
    shape.numHeads = std::atoi(argv[1]);
    shape.numKvHeads = std::atoi(argv[2]);
    shape.headDim = std::atoi(argv[3]);
    shape.dtypeBytes = std::atoi(argv[4]);
    shape.isBf16 = std::atoi(argv[5]) != 0;
    const RotaryTiling t = ComputeRotaryTiling(shape, hw);
    if (!t.ok) {
        std::printf("{\"ok\": false, \"error\": %s}\n", Quote(t.error).c_str());
        return 0;
    }
    const uint32_t rows = shape.numHeads + shape.numKvHeads;
    std::printf("{\"ok\": true, \"used_cores\": %u, \"heads_per_tile\": %u, \"tiles_per_token\": %u, "
                "\"total_tiles\": %u, \"ub_bytes\": %u, \"usable_ub\": %u, \"cores\": [",
                t.usedCores, t.headsPerTile, t.tilesPerToken, t.totalTiles, t.ubBytes, UsableUb(hw));
    for (uint32_t c = 0; c < t.usedCores; ++c) {
        uint32_t begin = 0, end = 0;
        CoreRange(t.split, c, &begin, &end);
        std::printf("%s[", c ? ", " : "");
        for (uint32_t tile = begin; tile < end; ++tile) {
            uint32_t token = 0, row0 = 0, count = 0;
            RotaryTileRows(t, rows, tile, &token, &row0, &count);
            std::printf("%s[%u, %u, %u]", tile > begin ? ", " : "", token, row0, count);
        }
        std::printf("]");
    }
    std::printf("]}\n");
    return 0;
}

int Attention(const HardwareSpec& hw, char** argv) {
    AttentionShape shape{};
    shape.numHeads = std::atoi(argv[0]);
    shape.numKvHeads = std::atoi(argv[1]);
    shape.headDim = std::atoi(argv[2]);
    shape.blockSize = std::atoi(argv[3]);
    shape.dtypeBytes = std::atoi(argv[4]);
    shape.isBf16 = std::atoi(argv[5]) != 0;
    shape.queryStartLoc = ParseList(argv[6]);
    shape.seqLens = ParseList(argv[7]);
    const AttentionTiling t = ComputeAttentionTiling(shape, hw);
    if (!t.ok) {
        std::printf("{\"ok\": false, \"error\": %s}\n", Quote(t.error).c_str());
        return 0;
    }
    std::printf("{\"ok\": true, \"used_cores\": %u, \"q_tile\": %u, \"kv_tile\": %u, \"num_items\": %u, "
                "\"write_tokens_per_tile\": %u, \"write_tiles\": %u, \"write_ub_bytes\": %u, \"attn_ub_bytes\": %u, "
                "\"ub_bytes\": %u, \"usable_ub\": %u, \"total_cost\": %llu, \"max_core_cost\": %llu, "
                "\"max_item_cost\": %llu, \"cores\": [",
                t.usedCores, t.qTile, t.kvTile, t.numItems, t.writeTokensPerTile, t.writeTiles, t.writeUbBytes,
                t.attnUbBytes, t.ubBytes, UsableUb(hw), static_cast<unsigned long long>(t.totalCost),
                static_cast<unsigned long long>(t.maxCoreCost), static_cast<unsigned long long>(t.maxItemCost));
    const std::vector<WorkItem> items = EnumerateWorkItems(shape, t.qTile);
    for (uint32_t c = 0; c < t.usedCores; ++c) {
        uint32_t begin = 0, end = 0;
        CoreRange(t.writeSplit, c, &begin, &end);
        const uint32_t firstToken = std::min(begin * t.writeTokensPerTile, t.numTokens);
        const uint32_t lastToken = std::min(end * t.writeTokensPerTile, t.numTokens);
        std::printf("%s{\"write_tokens\": [%u, %u], \"items\": [", c ? ", " : "", firstToken, lastToken);
        for (uint32_t i = t.coreItemBegin[c]; i < t.coreItemBegin[c + 1]; ++i) {
            const WorkItem& w = items[i];
            std::printf("%s[%u, %u, %u, %u, %u, %u]", i > t.coreItemBegin[c] ? ", " : "", w.seq, w.qBegin,
                        w.qCount, w.kvHead, w.cachedLen, w.kvLen);
        }
        std::printf("]}");
    }
    std::printf("]}\n");
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    const std::string mode = argc > 1 ? argv[1] : "";
    if (mode == "socs") return Socs();
    HardwareSpec hw{};
    if (argc > 2 && !ParseSpec(argv[2], &hw)) {
        std::fprintf(stderr, "unknown SoC %s\n", argv[2]);
        return 2;
    }
    if (mode == "rotary" && argc == 9) return Rotary(hw, argv + 3);
    if (mode == "attention" && argc == 11) return Attention(hw, argv + 3);
    std::fprintf(stderr, "usage: see the header of tiling_cli.cpp\n");
    return 2;
}
