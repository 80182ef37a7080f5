// RotaryCogvlm2 kernel: NeoX rotate-half rotary embedding of q and k by position id, from cos/sin tables.
//   y[:half] = x[:half] * cos[:half] - x[half:] * sin[:half]
//   y[half:] = x[half:] * cos[half:] + x[:half] * sin[half:]
// Work is tiles of (one token, headsPerTile rows), rows numbered over q heads then k heads; each core takes a
// balanced range of tiles (op_host/cogvlm2_tiling.cpp). x is streamed GM -> UB through a double-buffered queue,
// fp16/bf16 are computed in fp32, y goes back UB -> GM through a second double-buffered queue.
//
// NOT COMPILED OR RUN HERE (no CANN, no NPU): see docs/ascend.md for what is verified and what is not.
#include "cogvlm2_vector_utils.h"
#include "kernel_operator.h"

using AscendC::GlobalTensor;
using AscendC::LocalTensor;
using AscendC::RoundMode;
using AscendC::TBuf;
using AscendC::TPipe;
using AscendC::TPosition;
using AscendC::TQue;

namespace {

constexpr int32_t kBufferNum = 2;  // double buffering: DMA of tile i + 1 overlaps compute of tile i

template <typename T>
class RotaryKernel {
public:
    __aicore__ inline RotaryKernel() {}

    __aicore__ inline void Init(GM_ADDR query, GM_ADDR key, GM_ADDR positions, GM_ADDR cosTable, GM_ADDR sinTable,
                                GM_ADDR queryOut, GM_ADDR keyOut, const RotaryCogvlm2TilingData* tiling) {
        numHeads_ = tiling->numHeads;
        numKvHeads_ = tiling->numKvHeads;
        headDim_ = tiling->headDim;
        headsPerTile_ = tiling->headsPerTile;
        tilesPerToken_ = tiling->tilesPerToken;
        tilesPerCore_ = tiling->tilesPerCore;
        tailCores_ = tiling->tailCores;
        totalRows_ = numHeads_ + numKvHeads_;

        queryGm_.SetGlobalBuffer(reinterpret_cast<__gm__ T*>(query));
        keyGm_.SetGlobalBuffer(reinterpret_cast<__gm__ T*>(key));
        positionsGm_.SetGlobalBuffer(reinterpret_cast<__gm__ int32_t*>(positions));
        cosGm_.SetGlobalBuffer(reinterpret_cast<__gm__ T*>(cosTable));
        sinGm_.SetGlobalBuffer(reinterpret_cast<__gm__ T*>(sinTable));
        queryOutGm_.SetGlobalBuffer(reinterpret_cast<__gm__ T*>(queryOut));
        keyOutGm_.SetGlobalBuffer(reinterpret_cast<__gm__ T*>(keyOut));

        // Same buffers, same order as cogvlm2_ascend::RotaryUbBytes.
        const uint32_t tileElems = headsPerTile_ * headDim_;
        pipe_.InitBuffer(inQueue_, kBufferNum, tileElems * sizeof(T));
        pipe_.InitBuffer(outQueue_, kBufferNum, tileElems * sizeof(T));
        pipe_.InitBuffer(tableQueue_, kBufferNum, 2 * headDim_ * sizeof(T));
        if constexpr (!AscendC::IsSameType<T, float>::value) {
            pipe_.InitBuffer(x32Buf_, tileElems * sizeof(float));
            pipe_.InitBuffer(y32Buf_, tileElems * sizeof(float));
            pipe_.InitBuffer(table32Buf_, 2 * headDim_ * sizeof(float));
        }
        pipe_.InitBuffer(tmpBuf_, tileElems * sizeof(float));
    }

    __aicore__ inline void Process() {
        uint32_t begin = 0;
        uint32_t end = 0;
        cogvlm2::CoreRange(tilesPerCore_, tailCores_, AscendC::GetBlockIdx(), begin, end);
        for (uint32_t tile = begin; tile < end; ++tile) {
            const uint32_t token = tile / tilesPerToken_;
            const uint32_t row0 = (tile % tilesPerToken_) * headsPerTile_;
            const uint32_t rows = cogvlm2::Min(headsPerTile_, totalRows_ - row0);
            CopyIn(token, row0, rows);
            Compute(rows);
            CopyOut(token, row0, rows);
        }
    }

private:
    // Rows [row0, row0 + rows) of a token: a contiguous run of q heads, then one of k heads.
    __aicore__ inline uint32_t QueryRows(uint32_t row0, uint32_t rows) const {
        return row0 >= numHeads_ ? 0 : cogvlm2::Min(rows, numHeads_ - row0);
    }

    __aicore__ inline void CopyIn(uint32_t token, uint32_t row0, uint32_t rows) {
        const uint32_t qRows = QueryRows(row0, rows);
        LocalTensor<T> x = inQueue_.AllocTensor<T>();
        if (qRows > 0) {
            const uint64_t offset = (static_cast<uint64_t>(token) * numHeads_ + row0) * headDim_;
            AscendC::DataCopy(x, queryGm_[offset], qRows * headDim_);
        }
        if (rows > qRows) {
            const uint32_t kRow0 = row0 + qRows - numHeads_;
            const uint64_t offset = (static_cast<uint64_t>(token) * numKvHeads_ + kRow0) * headDim_;
            AscendC::DataCopy(x[qRows * headDim_], keyGm_[offset], (rows - qRows) * headDim_);
        }
        inQueue_.EnQue(x);

        // cos | sin rows of this token's position id.
        const uint64_t position = static_cast<uint64_t>(positionsGm_.GetValue(token));
        LocalTensor<T> table = tableQueue_.AllocTensor<T>();
        AscendC::DataCopy(table, cosGm_[position * headDim_], headDim_);
        AscendC::DataCopy(table[headDim_], sinGm_[position * headDim_], headDim_);
        tableQueue_.EnQue(table);
    }

    __aicore__ inline void Compute(uint32_t rows) {
        LocalTensor<T> x = inQueue_.DeQue<T>();
        LocalTensor<T> table = tableQueue_.DeQue<T>();
        LocalTensor<T> y = outQueue_.AllocTensor<T>();
        const uint32_t elems = rows * headDim_;
        if constexpr (AscendC::IsSameType<T, float>::value) {
            Rotate(y, x, table, rows);
        } else {
            LocalTensor<float> x32 = x32Buf_.Get<float>();
            LocalTensor<float> y32 = y32Buf_.Get<float>();
            LocalTensor<float> table32 = table32Buf_.Get<float>();
            AscendC::Cast(x32, x, RoundMode::CAST_NONE, elems);
            AscendC::Cast(table32, table, RoundMode::CAST_NONE, 2 * headDim_);
            AscendC::PipeBarrier<PIPE_V>();
            Rotate(y32, x32, table32, rows);
            AscendC::PipeBarrier<PIPE_V>();
            AscendC::Cast(y, y32, RoundMode::CAST_RINT, elems);  // round to nearest even, as bf16() does
        }
        outQueue_.EnQue(y);
        inQueue_.FreeTensor(x);
        tableQueue_.FreeTensor(table);
    }

    // table = [cos row | sin row]; x and y hold `rows` head rows of headDim_ floats.
    __aicore__ inline void Rotate(const LocalTensor<float>& y, const LocalTensor<float>& x,
                                  const LocalTensor<float>& table, uint32_t rows) {
        const uint32_t half = headDim_ / 2;
        LocalTensor<float> tmp = tmpBuf_.Get<float>();
        LocalTensor<float> cosRow = table;
        LocalTensor<float> sinRow = table[headDim_];
        // first half
        cogvlm2::MulRowsByRow(y, x, cosRow, rows, half, headDim_);
        cogvlm2::MulRowsByRow(tmp, x[half], sinRow, rows, half, headDim_);
        AscendC::PipeBarrier<PIPE_V>();
        cogvlm2::AddRows(y, y, tmp, rows, half, headDim_, true);
        AscendC::PipeBarrier<PIPE_V>();
        // second half
        cogvlm2::MulRowsByRow(y[half], x[half], cosRow[half], rows, half, headDim_);
        cogvlm2::MulRowsByRow(tmp, x, sinRow[half], rows, half, headDim_);
        AscendC::PipeBarrier<PIPE_V>();
        cogvlm2::AddRows(y[half], y[half], tmp, rows, half, headDim_, false);
    }

    __aicore__ inline void CopyOut(uint32_t token, uint32_t row0, uint32_t rows) {
        const uint32_t qRows = QueryRows(row0, rows);
        LocalTensor<T> y = outQueue_.DeQue<T>();
        if (qRows > 0) {
            const uint64_t offset = (static_cast<uint64_t>(token) * numHeads_ + row0) * headDim_;
            AscendC::DataCopy(queryOutGm_[offset], y, qRows * headDim_);
        }
        if (rows > qRows) {
            const uint32_t kRow0 = row0 + qRows - numHeads_;
            const uint64_t offset = (static_cast<uint64_t>(token) * numKvHeads_ + kRow0) * headDim_;
            AscendC::DataCopy(keyOutGm_[offset], y[qRows * headDim_], (rows - qRows) * headDim_);
        }
        outQueue_.FreeTensor(y);
    }

    TPipe pipe_;
    TQue<TPosition::VECIN, kBufferNum> inQueue_;
    TQue<TPosition::VECIN, kBufferNum> tableQueue_;
    TQue<TPosition::VECOUT, kBufferNum> outQueue_;
    TBuf<TPosition::VECCALC> x32Buf_;
    TBuf<TPosition::VECCALC> y32Buf_;
    TBuf<TPosition::VECCALC> table32Buf_;
    TBuf<TPosition::VECCALC> tmpBuf_;
    GlobalTensor<T> queryGm_;
    GlobalTensor<T> keyGm_;
    GlobalTensor<int32_t> positionsGm_;
    GlobalTensor<T> cosGm_;
    GlobalTensor<T> sinGm_;
    GlobalTensor<T> queryOutGm_;
    GlobalTensor<T> keyOutGm_;
    uint32_t numHeads_ = 0;
    uint32_t numKvHeads_ = 0;
    uint32_t headDim_ = 0;
    uint32_t headsPerTile_ = 0;
    uint32_t tilesPerToken_ = 0;
    uint32_t tilesPerCore_ = 0;
    uint32_t tailCores_ = 0;
    uint32_t totalRows_ = 0;
};

}  // namespace

// DTYPE_QUERY is defined by the CANN build for each registered dtype of input "query".
extern "C" __global__ __aicore__ void rotary_cogvlm2(GM_ADDR query, GM_ADDR key, GM_ADDR positions,
                                                     GM_ADDR cosTable, GM_ADDR sinTable, GM_ADDR queryOut,
                                                     GM_ADDR keyOut, GM_ADDR workspace, GM_ADDR tiling) {
    GET_TILING_DATA(tilingData, tiling);
    RotaryKernel<DTYPE_QUERY> op;
    op.Init(query, key, positions, cosTable, sinTable, queryOut, keyOut, &tilingData);
    op.Process();
}
