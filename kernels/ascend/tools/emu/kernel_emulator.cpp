// Runs the real op_kernel sources on the CPU through the emulated Ascend C API (kernel_operator.h here), with
// the tiling from op_host/cogvlm2_tiling.cpp, one simulated core after another. Inputs and outputs are raw
// little-endian files in DIR (see tests/test_ascend_tiling.py, which writes them and checks the results).
//
//   kernel_emulator rotary    SOC DTYPE T H KV D DIR [reverse]
//   kernel_emulator attention SOC DTYPE H KV D BLOCK_SIZE SCALE DIR [reverse]
//
// DTYPE is f32, f16 or bf16. "reverse" runs the cores last to first: results must not depend on the order,
// since on the device the cores run concurrently. Prints a JSON line with the tiling and the peak UB use.
#include <cstdio>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "../../op_host/cogvlm2_tiling.h"
#include "kernel_operator.h"
#include "tiling_structs.h"

#define DECLARE_ROTARY(suffix)                                                                                 \
    extern "C" void rotary_cogvlm2_##suffix(GM_ADDR, GM_ADDR, GM_ADDR, GM_ADDR, GM_ADDR, GM_ADDR, GM_ADDR, \
                                            GM_ADDR, GM_ADDR);
#define DECLARE_ATTENTION(suffix)                                                                            \
    extern "C" void paged_attention_cogvlm2_##suffix(GM_ADDR, GM_ADDR, GM_ADDR, GM_ADDR, GM_ADDR, GM_ADDR, \
                                                     GM_ADDR, GM_ADDR, GM_ADDR, GM_ADDR, GM_ADDR, GM_ADDR);
DECLARE_ROTARY(f32)
DECLARE_ROTARY(f16)
DECLARE_ROTARY(bf16)
DECLARE_ATTENTION(f32)
DECLARE_ATTENTION(f16)
DECLARE_ATTENTION(bf16)

using namespace cogvlm2_ascend;

namespace {

std::vector<uint8_t> Read(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) {
        std::fprintf(stderr, "cannot read %s\n", path.c_str());
        std::exit(2);
    }
    return std::vector<uint8_t>(std::istreambuf_iterator<char>(in), {});
}

void Write(const std::string& path, const std::vector<uint8_t>& data) {
    std::ofstream out(path, std::ios::binary);
    out.write(reinterpret_cast<const char*>(data.data()), static_cast<std::streamsize>(data.size()));
}

std::vector<int32_t> ReadInts(const std::string& path) {
    const std::vector<uint8_t> bytes = Read(path);
    std::vector<int32_t> values(bytes.size() / 4);
    std::memcpy(values.data(), bytes.data(), values.size() * 4);
    return values;
}

// Runs `launch(core)` for every core with a fresh Unified Buffer of the SoC's usable size.
template <typename Launch>
void RunCores(uint32_t usedCores, const HardwareSpec& hw, bool reverse, Launch launch) {
    emu::g_ubBytes = UsableUb(hw);
    emu::g_peakUbBytes = 0;
    for (uint32_t i = 0; i < usedCores; ++i) {
        const uint32_t core = reverse ? usedCores - 1 - i : i;
        emu::UnifiedBuffer ub;
        ub.bytes.assign(emu::g_ubBytes, 0xCD);  // garbage, as real UB holds whatever the last kernel left
        emu::g_ub = &ub;
        emu::g_blockIdx = core;
        launch();
    }
}

uint32_t DtypeBytes(const std::string& dtype) { return dtype == "f32" ? 4 : 2; }

int Rotary(const HardwareSpec& hw, const std::string& dtype, char** argv, const std::string& dir, bool reverse) {
    RotaryShape shape{};
    shape.numTokens = std::atoi(argv[0]);
    shape.numHeads = std::atoi(argv[1]);
    shape.numKvHeads = std::atoi(argv[2]);
    shape.headDim = std::atoi(argv[3]);
    shape.dtypeBytes = DtypeBytes(dtype);
    shape.isBf16 = dtype == "bf16";
    const RotaryTiling t = ComputeRotaryTiling(shape, hw);
    if (!t.ok) {
        std::printf("{\"ok\": false, \"error\": \"%s\"}\n", t.error.c_str());
        return 0;
    }
    RotaryCogvlm2TilingData data{shape.numTokens, shape.numHeads, shape.numKvHeads, shape.headDim,
                                 t.headsPerTile,   t.tilesPerToken, t.split.perCore,  t.split.tailCores};
    std::vector<uint8_t> q = Read(dir + "/query.bin"), k = Read(dir + "/key.bin");
    std::vector<uint8_t> positions = Read(dir + "/positions.bin");
    std::vector<uint8_t> cosTable = Read(dir + "/cos.bin"), sinTable = Read(dir + "/sin.bin");
    std::vector<uint8_t> qOut(q.size(), 0xCD), kOut(k.size(), 0xCD);
    auto entry = dtype == "f32" ? rotary_cogvlm2_f32 : dtype == "f16" ? rotary_cogvlm2_f16 : rotary_cogvlm2_bf16;
    RunCores(t.usedCores, hw, reverse, [&] {
        entry(q.data(), k.data(), positions.data(), cosTable.data(), sinTable.data(), qOut.data(), kOut.data(),
              nullptr, reinterpret_cast<GM_ADDR>(&data));
    });
    Write(dir + "/query_out.bin", qOut);
    Write(dir + "/key_out.bin", kOut);
    std::printf("{\"ok\": true, \"used_cores\": %u, \"planned_ub_bytes\": %u, \"peak_ub_bytes\": %u}\n", t.usedCores,
                t.ubBytes, emu::g_peakUbBytes);
    return 0;
}

int Attention(const HardwareSpec& hw, const std::string& dtype, char** argv, const std::string& dir, bool reverse) {
    AttentionShape shape{};
    shape.numHeads = std::atoi(argv[0]);
    shape.numKvHeads = std::atoi(argv[1]);
    shape.headDim = std::atoi(argv[2]);
    shape.blockSize = std::atoi(argv[3]);
    const float scale = static_cast<float>(std::atof(argv[4]));
    shape.dtypeBytes = DtypeBytes(dtype);
    shape.isBf16 = dtype == "bf16";
    shape.queryStartLoc = ReadInts(dir + "/query_start_loc.bin");
    shape.seqLens = ReadInts(dir + "/seq_lens.bin");
    const AttentionTiling t = ComputeAttentionTiling(shape, hw);
    if (!t.ok) {
        std::printf("{\"ok\": false, \"error\": \"%s\"}\n", t.error.c_str());
        return 0;
    }
    std::vector<uint8_t> blockTables = Read(dir + "/block_tables.bin");
    const uint32_t numSeqs = static_cast<uint32_t>(shape.seqLens.size());
    PagedAttentionCogvlm2TilingData data{};
    data.numTokens = t.numTokens;
    data.numSeqs = numSeqs;
    data.numHeads = shape.numHeads;
    data.numKvHeads = shape.numKvHeads;
    data.headDim = shape.headDim;
    data.blockSize = shape.blockSize;
    data.maxBlocksPerSeq = numSeqs ? static_cast<uint32_t>(blockTables.size() / 4 / numSeqs) : 0;
    data.scale = scale;
    data.writeTokensPerTile = t.writeTokensPerTile;
    data.writeTilesPerCore = t.writeSplit.perCore;
    data.writeTailCores = t.writeSplit.tailCores;
    data.qTile = t.qTile;
    data.kvTile = t.kvTile;
    for (size_t c = 0; c < t.coreItemBegin.size(); ++c) data.coreItemBegin[c] = t.coreItemBegin[c];

    std::vector<uint8_t> q = Read(dir + "/query.bin"), k = Read(dir + "/key.bin"), v = Read(dir + "/value.bin");
    std::vector<uint8_t> keyCache = Read(dir + "/key_cache.bin"), valueCache = Read(dir + "/value_cache.bin");
    std::vector<uint8_t> slots = Read(dir + "/slot_mapping.bin");
    std::vector<uint8_t> qsl = Read(dir + "/query_start_loc.bin"), seqLens = Read(dir + "/seq_lens.bin");
    std::vector<uint8_t> out(q.size(), 0xCD);
    auto entry = dtype == "f32"   ? paged_attention_cogvlm2_f32
                 : dtype == "f16" ? paged_attention_cogvlm2_f16
                                  : paged_attention_cogvlm2_bf16;
    RunCores(t.usedCores, hw, reverse, [&] {
        entry(q.data(), k.data(), v.data(), keyCache.data(), valueCache.data(), slots.data(), blockTables.data(),
              qsl.data(), seqLens.data(), out.data(), nullptr, reinterpret_cast<GM_ADDR>(&data));
    });
    Write(dir + "/attn_out.bin", out);
    Write(dir + "/key_cache_out.bin", keyCache);
    Write(dir + "/value_cache_out.bin", valueCache);
    std::printf("{\"ok\": true, \"used_cores\": %u, \"q_tile\": %u, \"kv_tile\": %u, \"planned_ub_bytes\": %u, "
                "\"peak_ub_bytes\": %u}\n",
                t.usedCores, t.qTile, t.kvTile, t.ubBytes, emu::g_peakUbBytes);
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    const std::string mode = argc > 1 ? argv[1] : "";
    if (argc < 4) {
        std::fprintf(stderr, "usage: see the header of kernel_emulator.cpp\n");
        return 2;
    }
    const SocProfile* soc = FindSoc(argv[2]);
    const std::string dtype = argv[3];
    if (soc == nullptr || (dtype != "f32" && dtype != "f16" && dtype != "bf16")) {
        std::fprintf(stderr, "unknown SoC or dtype\n");
        return 2;
    }
    const HardwareSpec hw = SpecOf(*soc);
    if (mode == "rotary" && (argc == 9 || argc == 10)) {
        return Rotary(hw, dtype, argv + 4, argv[8], argc == 10 && std::string(argv[9]) == "reverse");
    }
    if (mode == "attention" && (argc == 10 || argc == 11)) {
        return Attention(hw, dtype, argv + 4, argv[9], argc == 11 && std::string(argv[10]) == "reverse");
    }
    std::fprintf(stderr, "usage: see the header of kernel_emulator.cpp\n");
    return 2;
}
