// Small vector helpers shared by the CogVLM2 Ascend C kernels (fp32 compute in the Unified Buffer).
// NOT COMPILED HERE: needs CANN's kernel_operator.h (see docs/ascend.md).
#pragma once

#include "kernel_operator.h"

namespace cogvlm2 {

using AscendC::LocalTensor;

constexpr uint32_t kFp32PerRepeat = 64;  // one vector repeat covers 256 bytes
constexpr uint32_t kFp32PerBlock = 8;    // one 32-byte block

__aicore__ inline uint32_t Min(uint32_t a, uint32_t b) { return a < b ? a : b; }
__aicore__ inline uint32_t CeilDiv(uint32_t a, uint32_t b) { return (a + b - 1) / b; }

// Balanced split of tiles over cores, the same arithmetic as cogvlm2_ascend::CoreRange on the host.
__aicore__ inline void CoreRange(uint32_t perCore, uint32_t tailCores, uint32_t core, uint32_t& begin,
                                 uint32_t& end) {
    begin = core * perCore + Min(core, tailCores);
    end = begin + perCore + (core < tailCores ? 1 : 0);
}

// dst[r, 0:width] = a[r, 0:width] * row[0:width] for `rows` rows laid out `rowElems` apart; `row` is one row
// broadcast to every repeat (repeat stride 0). One instruction per 64-column segment, one repeat per row.
__aicore__ inline void MulRowsByRow(const LocalTensor<float>& dst, const LocalTensor<float>& a,
                                    const LocalTensor<float>& row, uint32_t rows, uint32_t width,
                                    uint32_t rowElems) {
    const uint8_t rowBlocks = static_cast<uint8_t>(rowElems / kFp32PerBlock);
    const AscendC::BinaryRepeatParams params(1, 1, 1, rowBlocks, rowBlocks, 0);
    for (uint32_t col = 0; col < width; col += kFp32PerRepeat) {
        const uint64_t mask = Min(width - col, kFp32PerRepeat);
        AscendC::Mul(dst[col], a[col], row[col], mask, static_cast<uint8_t>(rows), params);
    }
}

// dst[r, 0:width] = a[r, 0:width] (+|-) b[r, 0:width], all three with row stride `rowElems`.
__aicore__ inline void AddRows(const LocalTensor<float>& dst, const LocalTensor<float>& a,
                               const LocalTensor<float>& b, uint32_t rows, uint32_t width, uint32_t rowElems,
                               bool subtract) {
    const uint8_t rowBlocks = static_cast<uint8_t>(rowElems / kFp32PerBlock);
    const AscendC::BinaryRepeatParams params(1, 1, 1, rowBlocks, rowBlocks, rowBlocks);
    for (uint32_t col = 0; col < width; col += kFp32PerRepeat) {
        const uint64_t mask = Min(width - col, kFp32PerRepeat);
        if (subtract) {
            AscendC::Sub(dst[col], a[col], b[col], mask, static_cast<uint8_t>(rows), params);
        } else {
            AscendC::Add(dst[col], a[col], b[col], mask, static_cast<uint8_t>(rows), params);
        }
    }
}

// The scalar unit reads UB values the vector unit just wrote: wait for the vector pipe first.
__aicore__ inline void WaitVectorForScalar() {
    const event_t id = static_cast<event_t>(AscendC::GetTPipePtr()->FetchEventID(AscendC::HardEvent::V_S));
    AscendC::SetFlag<AscendC::HardEvent::V_S>(id);
    AscendC::WaitFlag<AscendC::HardEvent::V_S>(id);
}

// The vector unit overwrites UB values the scalar unit just wrote: wait for the scalar stores first.
__aicore__ inline void WaitScalarForVector() {
    const event_t id = static_cast<event_t>(AscendC::GetTPipePtr()->FetchEventID(AscendC::HardEvent::S_V));
    AscendC::SetFlag<AscendC::HardEvent::S_V>(id);
    AscendC::WaitFlag<AscendC::HardEvent::S_V>(id);
}

}  // namespace cogvlm2
