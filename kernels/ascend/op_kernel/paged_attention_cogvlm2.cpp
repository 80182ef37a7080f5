// PagedAttentionCogvlm2 kernel: KV-cache write + paged attention over a flat varlen batch (decodes and prefill
// chunks together), GQA, causal. Vector-only (AIV on 910B, AI cores on 310P), fp32 compute.
//
// Phase A  each core copies its balanced range of this step's tokens' K/V rows to key_cache/value_cache at
//          slot_mapping (GM -> UB -> GM).
// Phase B  each core runs its contiguous range of work items (sequence, query tile, KV head), ranges balanced
//          by cost on the host (op_host/cogvlm2_tiling.cpp). For an item: load its group * qTile query rows
//          (pre-scaled), then stream keys in chunks of kvTile through double-buffered queues: keys before the
//          step (cachedLen) from the cache through block_tables, one block at a time (kvTile divides
//          block_size), this step's keys straight from the key/value inputs. Online softmax per row:
//          running max m, sum l, acc += exp(s - m) * v; finally out = acc / l.
// Phase B never reads a slot phase A writes (it reads this step's K/V from the inputs), so no barrier
// between the phases and no cross-core synchronisation is needed.
//
// NOT COMPILED OR RUN HERE (no CANN, no NPU): see docs/ascend.md for what is verified and what is not.
// It favours plain correctness over speed: dot products and p * v run on the vector unit, one row at a time;
// a production kernel would put q.k^T and p.v on the cube unit (or use MindSpore's built-in PagedAttention).
#include "cogvlm2_vector_utils.h"
#include "kernel_operator.h"

using AscendC::DataCopyParams;
using AscendC::GlobalTensor;
using AscendC::LocalTensor;
using AscendC::RoundMode;
using AscendC::TBuf;
using AscendC::TPipe;
using AscendC::TPosition;
using AscendC::TQue;
using AscendC::TQueBind;

namespace {

constexpr int32_t kBufferNum = 2;
constexpr float kNegativeLarge = -3.0e38f;  // initial running max; exp(kNegativeLarge - m) == 0
constexpr uint32_t kUbBlockBytes = 32;

struct Item {
    uint32_t seq;
    uint32_t qStart;     // row of the sequence's first query token in the flat batch
    uint32_t q0;         // first query of the item, counted within the sequence's queries
    uint32_t qCount;
    uint32_t kvHead;
    uint32_t cachedLen;  // keys [0, cachedLen) are in the cache, [cachedLen, ...) in this step's inputs
};

template <typename T>
class PagedAttentionKernel {
public:
    __aicore__ inline PagedAttentionKernel() {}

    __aicore__ inline void Init(GM_ADDR query, GM_ADDR key, GM_ADDR value, GM_ADDR keyCache, GM_ADDR valueCache,
                                GM_ADDR slotMapping, GM_ADDR blockTables, GM_ADDR queryStartLoc, GM_ADDR seqLens,
                                GM_ADDR out, const PagedAttentionCogvlm2TilingData* tiling) {
        tiling_ = tiling;
        numTokens_ = tiling->numTokens;
        numSeqs_ = tiling->numSeqs;
        numHeads_ = tiling->numHeads;
        numKvHeads_ = tiling->numKvHeads;
        headDim_ = tiling->headDim;
        blockSize_ = tiling->blockSize;
        maxBlocksPerSeq_ = tiling->maxBlocksPerSeq;
        scale_ = tiling->scale;
        qTile_ = tiling->qTile;
        kvTile_ = tiling->kvTile;
        group_ = numHeads_ / numKvHeads_;
        kvRowElems_ = numKvHeads_ * headDim_;

        queryGm_.SetGlobalBuffer(reinterpret_cast<__gm__ T*>(query));
        keyGm_.SetGlobalBuffer(reinterpret_cast<__gm__ T*>(key));
        valueGm_.SetGlobalBuffer(reinterpret_cast<__gm__ T*>(value));
        keyCacheGm_.SetGlobalBuffer(reinterpret_cast<__gm__ T*>(keyCache));
        valueCacheGm_.SetGlobalBuffer(reinterpret_cast<__gm__ T*>(valueCache));
        slotMappingGm_.SetGlobalBuffer(reinterpret_cast<__gm__ int32_t*>(slotMapping));
        blockTablesGm_.SetGlobalBuffer(reinterpret_cast<__gm__ int32_t*>(blockTables));
        queryStartLocGm_.SetGlobalBuffer(reinterpret_cast<__gm__ int32_t*>(queryStartLoc));
        seqLensGm_.SetGlobalBuffer(reinterpret_cast<__gm__ int32_t*>(seqLens));
        outGm_.SetGlobalBuffer(reinterpret_cast<__gm__ T*>(out));

        // Same buffers as cogvlm2_ascend::CacheWriteUbBytes + AttentionUbBytes; both phases' buffers coexist.
        const uint32_t rows = qTile_ * group_;
        pipe_.InitBuffer(writeQueue_, kBufferNum, 2 * tiling->writeTokensPerTile * kvRowElems_ * sizeof(T));
        pipe_.InitBuffer(queryQueue_, 1, rows * headDim_ * sizeof(T));
        pipe_.InitBuffer(query32Buf_, rows * headDim_ * sizeof(float));
        pipe_.InitBuffer(accBuf_, rows * headDim_ * sizeof(float));
        pipe_.InitBuffer(rowMaxBuf_, AlignBlock(rows * sizeof(float)));
        pipe_.InitBuffer(rowSumBuf_, AlignBlock(rows * sizeof(float)));
        pipe_.InitBuffer(outQueue_, 1, rows * headDim_ * sizeof(T));
        pipe_.InitBuffer(keyQueue_, kBufferNum, kvTile_ * headDim_ * sizeof(T));
        pipe_.InitBuffer(valueQueue_, kBufferNum, kvTile_ * headDim_ * sizeof(T));
        if constexpr (!AscendC::IsSameType<T, float>::value) {
            pipe_.InitBuffer(key32Buf_, kvTile_ * headDim_ * sizeof(float));
            pipe_.InitBuffer(value32Buf_, kvTile_ * headDim_ * sizeof(float));
        }
        pipe_.InitBuffer(productBuf_, kvTile_ * headDim_ * sizeof(float));
        pipe_.InitBuffer(scoreBuf_, AlignBlock(kvTile_ * sizeof(float)));
        pipe_.InitBuffer(workBuf_, AlignBlock(kvTile_ * sizeof(float)) + 256);
        pipe_.InitBuffer(scalarBuf_, 128);  // floats [0] chunk max, [8] chunk sum, [16..23] alpha
    }

    __aicore__ inline void Process() {
        WriteCache();
        Attend();
    }

private:
    __aicore__ static inline uint32_t AlignBlock(uint32_t bytes) {
        return (bytes + kUbBlockBytes - 1) / kUbBlockBytes * kUbBlockBytes;
    }

    // ------------------------------------------------------------ phase A: cache write
    __aicore__ inline void WriteCache() {
        const uint32_t tokensPerTile = tiling_->writeTokensPerTile;
        uint32_t begin = 0;
        uint32_t end = 0;
        cogvlm2::CoreRange(tiling_->writeTilesPerCore, tiling_->writeTailCores, AscendC::GetBlockIdx(), begin, end);
        for (uint32_t tile = begin; tile < end; ++tile) {
            const uint32_t token0 = tile * tokensPerTile;
            const uint32_t count = cogvlm2::Min(tokensPerTile, numTokens_ - token0);
            const uint64_t src = static_cast<uint64_t>(token0) * kvRowElems_;
            LocalTensor<T> rows = writeQueue_.AllocTensor<T>();  // [count K rows | count V rows]
            AscendC::DataCopy(rows, keyGm_[src], count * kvRowElems_);
            AscendC::DataCopy(rows[count * kvRowElems_], valueGm_[src], count * kvRowElems_);
            writeQueue_.EnQue(rows);
            rows = writeQueue_.DeQue<T>();
            for (uint32_t i = 0; i < count; ++i) {
                const int32_t slot = slotMappingGm_.GetValue(token0 + i);
                if (slot < 0) continue;  // padding token
                const uint64_t dst = static_cast<uint64_t>(slot) * kvRowElems_;
                AscendC::DataCopy(keyCacheGm_[dst], rows[i * kvRowElems_], kvRowElems_);
                AscendC::DataCopy(valueCacheGm_[dst], rows[(count + i) * kvRowElems_], kvRowElems_);
            }
            writeQueue_.FreeTensor(rows);
        }
    }

    // ------------------------------------------------------------ phase B: attention
    __aicore__ inline void Attend() {
        const uint32_t core = AscendC::GetBlockIdx();
        const uint32_t begin = tiling_->coreItemBegin[core];
        const uint32_t end = tiling_->coreItemBegin[core + 1];
        // Walk items in the host's order (sequence, query tile, KV head), skipping whole sequences before ours.
        uint32_t item = 0;
        for (uint32_t s = 0; s < numSeqs_ && item < end; ++s) {
            const uint32_t qStart = static_cast<uint32_t>(queryStartLocGm_.GetValue(s));
            const uint32_t qLen = static_cast<uint32_t>(queryStartLocGm_.GetValue(s + 1)) - qStart;
            const uint32_t seqLen = static_cast<uint32_t>(seqLensGm_.GetValue(s));
            const uint32_t seqItems = cogvlm2::CeilDiv(qLen, qTile_) * numKvHeads_;
            if (item + seqItems <= begin) {
                item += seqItems;
                continue;
            }
            for (uint32_t q0 = 0; q0 < qLen && item < end; q0 += qTile_) {
                for (uint32_t h = 0; h < numKvHeads_ && item < end; ++h, ++item) {
                    if (item < begin) continue;
                    const Item work{s, qStart, q0, cogvlm2::Min(qTile_, qLen - q0), h, seqLen - qLen};
                    RunItem(work);
                }
            }
        }
    }

    __aicore__ inline void RunItem(const Item& item) {
        const uint32_t rows = item.qCount * group_;
        LoadQuery(item, rows);
        cogvlm2::WaitScalarForVector();  // the previous item's scalar stores to the row state are done
        AscendC::Duplicate(accBuf_.Get<float>(), 0.0f, rows * headDim_);
        AscendC::Duplicate(rowMaxBuf_.Get<float>(), kNegativeLarge, rows);
        AscendC::Duplicate(rowSumBuf_.Get<float>(), 0.0f, rows);
        AscendC::PipeBarrier<PIPE_V>();

        const uint32_t kvLen = item.cachedLen + item.q0 + item.qCount;  // keys the item's last query sees
        const uint32_t cachedChunks = cogvlm2::CeilDiv(item.cachedLen, kvTile_);
        const uint32_t chunks = cachedChunks + cogvlm2::CeilDiv(kvLen - item.cachedLen, kvTile_);
        if (chunks > 0) LoadChunk(item, ChunkStart(item, 0, cachedChunks), ChunkCount(item, 0, cachedChunks, kvLen));
        for (uint32_t c = 0; c < chunks; ++c) {
            if (c + 1 < chunks) {  // prefetch the next chunk into the other buffer while this one is computed
                LoadChunk(item, ChunkStart(item, c + 1, cachedChunks), ChunkCount(item, c + 1, cachedChunks, kvLen));
            }
            ComputeChunk(item, rows, ChunkStart(item, c, cachedChunks), ChunkCount(item, c, cachedChunks, kvLen));
        }
        StoreOutput(item, rows);
    }

    // Chunks [0, cachedChunks) cover the cached keys in steps of kvTile (never crossing a block, as kvTile
    // divides block_size); the rest cover this step's keys from cachedLen on.
    __aicore__ inline uint32_t ChunkStart(const Item& item, uint32_t chunk, uint32_t cachedChunks) const {
        return chunk < cachedChunks ? chunk * kvTile_ : item.cachedLen + (chunk - cachedChunks) * kvTile_;
    }

    __aicore__ inline uint32_t ChunkCount(const Item& item, uint32_t chunk, uint32_t cachedChunks,
                                          uint32_t kvLen) const {
        const uint32_t start = ChunkStart(item, chunk, cachedChunks);
        const uint32_t limit = chunk < cachedChunks ? item.cachedLen : kvLen;
        return cogvlm2::Min(kvTile_, limit - start);
    }

    __aicore__ inline void LoadQuery(const Item& item, uint32_t rows) {
        // The group's query heads of one token are contiguous: one copy per query token.
        LocalTensor<T> q = queryQueue_.AllocTensor<T>();
        for (uint32_t i = 0; i < item.qCount; ++i) {
            const uint64_t token = item.qStart + item.q0 + i;
            const uint64_t src = (token * numHeads_ + item.kvHead * group_) * headDim_;
            AscendC::DataCopy(q[i * group_ * headDim_], queryGm_[src], group_ * headDim_);
        }
        queryQueue_.EnQue(q);
        q = queryQueue_.DeQue<T>();
        LocalTensor<float> q32 = query32Buf_.Get<float>();
        if constexpr (AscendC::IsSameType<T, float>::value) {
            AscendC::Muls(q32, q, scale_, rows * headDim_);
        } else {
            AscendC::Cast(q32, q, RoundMode::CAST_NONE, rows * headDim_);
            AscendC::PipeBarrier<PIPE_V>();
            AscendC::Muls(q32, q32, scale_, rows * headDim_);  // scores come out already scaled
        }
        queryQueue_.FreeTensor(q);
    }

    __aicore__ inline void LoadChunk(const Item& item, uint32_t start, uint32_t count) {
        uint64_t row = 0;  // first key's row in the [rows, KV, D] source
        bool fromCache = start < item.cachedLen;
        if (fromCache) {
            const uint64_t block = static_cast<uint64_t>(
                blockTablesGm_.GetValue(item.seq * maxBlocksPerSeq_ + start / blockSize_));
            row = block * blockSize_ + start % blockSize_;
        } else {
            row = item.qStart + (start - item.cachedLen);
        }
        // `count` rows of one KV head: headDim_ elements each, kvRowElems_ apart in GM, packed in UB.
        DataCopyParams params;
        params.blockCount = static_cast<uint16_t>(count);
        params.blockLen = static_cast<uint16_t>(headDim_ * sizeof(T) / kUbBlockBytes);
        params.srcStride = static_cast<uint16_t>((numKvHeads_ - 1) * headDim_ * sizeof(T) / kUbBlockBytes);
        params.dstStride = 0;
        const uint64_t src = (row * numKvHeads_ + item.kvHead) * headDim_;
        LocalTensor<T> k = keyQueue_.AllocTensor<T>();
        LocalTensor<T> v = valueQueue_.AllocTensor<T>();
        if (fromCache) {
            AscendC::DataCopy(k, keyCacheGm_[src], params);
            AscendC::DataCopy(v, valueCacheGm_[src], params);
        } else {
            AscendC::DataCopy(k, keyGm_[src], params);
            AscendC::DataCopy(v, valueGm_[src], params);
        }
        keyQueue_.EnQue(k);
        valueQueue_.EnQue(v);
    }

    __aicore__ inline void ComputeChunk(const Item& item, uint32_t rows, uint32_t start, uint32_t count) {
        LocalTensor<T> kIn = keyQueue_.DeQue<T>();
        LocalTensor<T> vIn = valueQueue_.DeQue<T>();
        LocalTensor<float> k32;
        LocalTensor<float> v32;
        if constexpr (AscendC::IsSameType<T, float>::value) {
            k32 = kIn;
            v32 = vIn;
        } else {
            k32 = key32Buf_.Get<float>();
            v32 = value32Buf_.Get<float>();
            AscendC::Cast(k32, kIn, RoundMode::CAST_NONE, count * headDim_);
            AscendC::Cast(v32, vIn, RoundMode::CAST_NONE, count * headDim_);
            AscendC::PipeBarrier<PIPE_V>();
        }
        LocalTensor<float> q32 = query32Buf_.Get<float>();
        for (uint32_t r = 0; r < rows; ++r) {
            const uint32_t position = item.cachedLen + item.q0 + r / group_;  // the query's index in its sequence
            if (position < start) continue;                                   // causal: sees none of this chunk
            const uint32_t visible = cogvlm2::Min(count, position + 1 - start);
            Scores(q32[r * headDim_], k32, visible);
            UpdateRow(r, v32, visible);
        }
        keyQueue_.FreeTensor(kIn);
        valueQueue_.FreeTensor(vIn);
    }

    // score[j] = q . k[j] for j < visible (q is pre-scaled).
    __aicore__ inline void Scores(const LocalTensor<float>& qRow, const LocalTensor<float>& k32, uint32_t visible) {
        LocalTensor<float> product = productBuf_.Get<float>();
        LocalTensor<float> score = scoreBuf_.Get<float>();
        cogvlm2::MulRowsByRow(product, k32, qRow, visible, headDim_, headDim_);
        AscendC::PipeBarrier<PIPE_V>();
        // Fold each further 64-column segment into the first, then one WholeReduceSum repeat per key row.
        for (uint32_t col = cogvlm2::kFp32PerRepeat; col < headDim_; col += cogvlm2::kFp32PerRepeat) {
            const uint32_t width = cogvlm2::Min(cogvlm2::kFp32PerRepeat, headDim_ - col);
            cogvlm2::AddRows(product, product, product[col], visible, width, headDim_, false);
            AscendC::PipeBarrier<PIPE_V>();
        }
        const int32_t firstWidth = static_cast<int32_t>(cogvlm2::Min(cogvlm2::kFp32PerRepeat, headDim_));
        AscendC::WholeReduceSum(score, product, firstWidth, static_cast<int32_t>(visible), 1, 1,
                                static_cast<int32_t>(headDim_ / cogvlm2::kFp32PerBlock));
        AscendC::PipeBarrier<PIPE_V>();
    }

    // Online softmax step for row r over this chunk's `visible` scores.
    __aicore__ inline void UpdateRow(uint32_t r, const LocalTensor<float>& v32, uint32_t visible) {
        LocalTensor<float> score = scoreBuf_.Get<float>();
        LocalTensor<float> work = workBuf_.Get<float>();
        LocalTensor<float> scalars = scalarBuf_.Get<float>();
        LocalTensor<float> rowMax = rowMaxBuf_.Get<float>();
        LocalTensor<float> rowSum = rowSumBuf_.Get<float>();
        LocalTensor<float> acc = accBuf_.Get<float>()[r * headDim_];

        AscendC::ReduceMax(scalars, score, work, static_cast<int32_t>(visible));
        cogvlm2::WaitVectorForScalar();
        const float oldMax = rowMax.GetValue(r);
        const float chunkMax = scalars.GetValue(0);
        const float newMax = chunkMax > oldMax ? chunkMax : oldMax;

        AscendC::Adds(score, score, -newMax, visible);
        AscendC::PipeBarrier<PIPE_V>();
        AscendC::Exp(score, score, visible);  // p[j] = exp(s[j] - m_new)
        AscendC::PipeBarrier<PIPE_V>();
        AscendC::ReduceSum(scalars[8], score, work, static_cast<int32_t>(visible));
        AscendC::Duplicate(scalars[16], oldMax - newMax, 8);  // alpha = exp(m_old - m_new): the scalar unit has no exp
        AscendC::PipeBarrier<PIPE_V>();
        AscendC::Exp(scalars[16], scalars[16], 8);
        cogvlm2::WaitVectorForScalar();
        const float alpha = scalars.GetValue(16);
        rowSum.SetValue(r, rowSum.GetValue(r) * alpha + scalars.GetValue(8));
        rowMax.SetValue(r, newMax);

        // acc = alpha * acc + sum_j p[j] * v[j]
        AscendC::Muls(acc, acc, alpha, headDim_);
        AscendC::PipeBarrier<PIPE_V>();
        for (uint32_t j = 0; j < visible; ++j) {
            AscendC::Axpy(acc, v32[j * headDim_], score.GetValue(j), headDim_);
            AscendC::PipeBarrier<PIPE_V>();
        }
    }

    __aicore__ inline void StoreOutput(const Item& item, uint32_t rows) {
        LocalTensor<float> acc = accBuf_.Get<float>();
        LocalTensor<float> rowSum = rowSumBuf_.Get<float>();
        LocalTensor<T> out = outQueue_.AllocTensor<T>();
        cogvlm2::WaitVectorForScalar();  // the last Axpy is done before the scalar unit moves on
        for (uint32_t r = 0; r < rows; ++r) {
            const float inverse = 1.0f / rowSum.GetValue(r);  // > 0: every query sees at least itself
            if constexpr (AscendC::IsSameType<T, float>::value) {
                AscendC::Muls(out[r * headDim_], acc[r * headDim_], inverse, headDim_);
            } else {
                AscendC::Muls(acc[r * headDim_], acc[r * headDim_], inverse, headDim_);
            }
        }
        if constexpr (!AscendC::IsSameType<T, float>::value) {
            AscendC::PipeBarrier<PIPE_V>();
            AscendC::Cast(out, acc, RoundMode::CAST_RINT, rows * headDim_);
        }
        outQueue_.EnQue(out);
        out = outQueue_.DeQue<T>();
        for (uint32_t i = 0; i < item.qCount; ++i) {
            const uint64_t token = item.qStart + item.q0 + i;
            const uint64_t dst = (token * numHeads_ + item.kvHead * group_) * headDim_;
            AscendC::DataCopy(outGm_[dst], out[i * group_ * headDim_], group_ * headDim_);
        }
        outQueue_.FreeTensor(out);
    }

    const PagedAttentionCogvlm2TilingData* tiling_ = nullptr;
    TPipe pipe_;
    TQueBind<TPosition::VECIN, TPosition::VECOUT, kBufferNum> writeQueue_;
    TQue<TPosition::VECIN, 1> queryQueue_;
    TQue<TPosition::VECOUT, 1> outQueue_;
    TQue<TPosition::VECIN, kBufferNum> keyQueue_;
    TQue<TPosition::VECIN, kBufferNum> valueQueue_;
    TBuf<TPosition::VECCALC> query32Buf_;
    TBuf<TPosition::VECCALC> accBuf_;
    TBuf<TPosition::VECCALC> rowMaxBuf_;
    TBuf<TPosition::VECCALC> rowSumBuf_;
    TBuf<TPosition::VECCALC> key32Buf_;
    TBuf<TPosition::VECCALC> value32Buf_;
    TBuf<TPosition::VECCALC> productBuf_;
    TBuf<TPosition::VECCALC> scoreBuf_;
    TBuf<TPosition::VECCALC> workBuf_;
    TBuf<TPosition::VECCALC> scalarBuf_;
    GlobalTensor<T> queryGm_;
    GlobalTensor<T> keyGm_;
    GlobalTensor<T> valueGm_;
    GlobalTensor<T> keyCacheGm_;
    GlobalTensor<T> valueCacheGm_;
    GlobalTensor<int32_t> slotMappingGm_;
    GlobalTensor<int32_t> blockTablesGm_;
    GlobalTensor<int32_t> queryStartLocGm_;
    GlobalTensor<int32_t> seqLensGm_;
    GlobalTensor<T> outGm_;
    uint32_t numTokens_ = 0;
    uint32_t numSeqs_ = 0;
    uint32_t numHeads_ = 0;
    uint32_t numKvHeads_ = 0;
    uint32_t headDim_ = 0;
    uint32_t blockSize_ = 0;
    uint32_t maxBlocksPerSeq_ = 0;
    float scale_ = 1.0f;
    uint32_t qTile_ = 0;
    uint32_t kvTile_ = 0;
    uint32_t group_ = 0;
    uint32_t kvRowElems_ = 0;
};

}  // namespace

extern "C" __global__ __aicore__ void paged_attention_cogvlm2(GM_ADDR query, GM_ADDR key, GM_ADDR value,
                                                              GM_ADDR keyCache, GM_ADDR valueCache,
                                                              GM_ADDR slotMapping, GM_ADDR blockTables,
                                                              GM_ADDR queryStartLoc, GM_ADDR seqLens, GM_ADDR out,
                                                              GM_ADDR workspace, GM_ADDR tiling) {
    GET_TILING_DATA(tilingData, tiling);
    PagedAttentionKernel<DTYPE_QUERY> op;
    op.Init(query, key, value, keyCache, valueCache, slotMapping, blockTables, queryStartLoc, seqLens, out,
            &tilingData);
    op.Process();
}
