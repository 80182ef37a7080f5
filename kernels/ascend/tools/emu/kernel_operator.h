// A CPU emulation of the small subset of the Ascend C API that the CogVLM2 kernels use, so that the real
// op_kernel sources compile with g++ and run on a CPU (tests/test_ascend_tiling.py). It is OUR model of the
// API semantics as documented by CANN, not CANN's CPU twin (tikicpulib): passing here shows the kernels'
// logic (work split, chunking, causal limits, online softmax, casts) is right under that model; it does not
// show that CANN's compiler accepts the code or that the hardware behaves identically.
//
// Checks it adds on top of plain execution:
//   - each core's UB allocations (TPipe::InitBuffer) fit the SoC's UB size given to the emulator;
//   - vector operands start on 32-byte UB boundaries; DataCopy lengths are whole 32-byte blocks;
//   - every LocalTensor access stays inside its buffer; queues never hand out more buffers than their depth.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <type_traits>
#include <vector>

#define __aicore__
#define __global__
#define __gm__
#define GM_ADDR uint8_t*

#define EMU_CHECK(cond, what)                                                                   \
    do {                                                                                        \
        if (!(cond)) {                                                                          \
            std::fprintf(stderr, "emulator check failed: %s (%s:%d)\n", what, __FILE__, __LINE__); \
            std::abort();                                                                       \
        }                                                                                       \
    } while (0)

enum pipe_t { PIPE_S, PIPE_V, PIPE_MTE2, PIPE_MTE3, PIPE_ALL };
using event_t = int32_t;

// bf16 storage with round-to-nearest-even from fp32, as the hardware's CAST_RINT.
struct bfloat16_t {
    uint16_t bits;
};
using half = _Float16;

namespace emu {

inline float ToFloat(float v) { return v; }
inline float ToFloat(half v) { return static_cast<float>(v); }
inline float ToFloat(bfloat16_t v) {
    uint32_t u = static_cast<uint32_t>(v.bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
template <typename T>
T FromFloat(float v);
template <>
inline float FromFloat<float>(float v) { return v; }
template <>
inline half FromFloat<half>(float v) { return static_cast<half>(v); }
template <>
inline bfloat16_t FromFloat<bfloat16_t>(float v) {
    uint32_t u;
    std::memcpy(&u, &v, 4);
    u += 0x7FFF + ((u >> 16) & 1);  // round to nearest, ties to even
    return bfloat16_t{static_cast<uint16_t>(u >> 16)};
}

// One core's Unified Buffer: allocations are 32-byte aligned offsets into an arena of the SoC's UB size.
struct UnifiedBuffer {
    std::vector<uint8_t> bytes;
    uint32_t used = 0;
    uint32_t peak = 0;
};
inline uint32_t g_ubBytes = 192 * 1024;
inline uint32_t g_blockIdx = 0;
inline UnifiedBuffer* g_ub = nullptr;
inline uint32_t g_peakUbBytes = 0;  // max over cores, reported to the tests

inline void CheckUbAligned(const void* p, const char* what) {
    const auto offset = static_cast<const uint8_t*>(p) - g_ub->bytes.data();
    EMU_CHECK(offset % 32 == 0, what);
}

}  // namespace emu

namespace AscendC {

enum class TPosition { GM, VECIN, VECOUT, VECCALC };
enum class RoundMode { CAST_NONE, CAST_RINT, CAST_ROUND, CAST_FLOOR, CAST_CEIL, CAST_TRUNC };
enum class HardEvent { V_S, S_V, MTE2_V, V_MTE3, MTE3_V, MTE2_S };

template <typename A, typename B>
struct IsSameType {
    static constexpr bool value = std::is_same<A, B>::value;
};

inline uint32_t GetBlockIdx() { return emu::g_blockIdx; }

template <pipe_t pipe>
inline void PipeBarrier() {}  // the emulator executes every instruction to completion in program order
template <HardEvent event>
inline void SetFlag(event_t) {}
template <HardEvent event>
inline void WaitFlag(event_t) {}

template <typename T>
class LocalTensor {
public:
    LocalTensor() = default;
    LocalTensor(T* data, uint32_t size) : data_(data), size_(size) {}
    template <typename U, typename = std::enable_if_t<std::is_same<U, T>::value>>
    LocalTensor(const LocalTensor<U>& other) : data_(other.data()), size_(other.size()) {}
    LocalTensor operator[](uint32_t offset) const {
        EMU_CHECK(offset <= size_, "LocalTensor offset past its buffer");
        return LocalTensor(data_ + offset, size_ - offset);
    }
    T GetValue(uint32_t i) const {
        EMU_CHECK(i < size_, "LocalTensor::GetValue out of bounds");
        return data_[i];
    }
    void SetValue(uint32_t i, T value) const {
        EMU_CHECK(i < size_, "LocalTensor::SetValue out of bounds");
        data_[i] = value;
    }
    T* data() const { return data_; }
    uint32_t size() const { return size_; }
    T& At(uint64_t i) const {
        EMU_CHECK(i < size_, "vector instruction reads or writes past its buffer");
        return data_[i];
    }

private:
    T* data_ = nullptr;
    uint32_t size_ = 0;
};

template <typename T>
class GlobalTensor {
public:
    void SetGlobalBuffer(__gm__ T* data) { data_ = data; }
    GlobalTensor operator[](uint64_t offset) const {
        GlobalTensor out;
        out.data_ = data_ + offset;
        return out;
    }
    T GetValue(uint64_t i) const { return data_[i]; }
    T* data() const { return data_; }

private:
    T* data_ = nullptr;
};

class TPipe;
inline TPipe* g_pipe = nullptr;

// A queue of `depth` equal buffers; AllocTensor/EnQue/DeQue/FreeTensor as in Ascend C.
template <TPosition pos, int32_t depth>
class TQue {
public:
    template <typename T>
    LocalTensor<T> AllocTensor() {
        EMU_CHECK(outstanding_ < static_cast<uint32_t>(depth), "queue: more tensors allocated than its depth");
        uint8_t* slot = buffers_[next_];
        next_ = (next_ + 1) % buffers_.size();
        ++outstanding_;
        return LocalTensor<T>(reinterpret_cast<T*>(slot), bytes_ / sizeof(T));
    }
    template <typename T>
    void EnQue(const LocalTensor<T>& t) { fifo_.push_back(reinterpret_cast<uint8_t*>(t.data())); }
    template <typename T>
    LocalTensor<T> DeQue() {
        EMU_CHECK(!fifo_.empty(), "DeQue on an empty queue");
        uint8_t* slot = fifo_.front();
        fifo_.pop_front();
        return LocalTensor<T>(reinterpret_cast<T*>(slot), bytes_ / sizeof(T));
    }
    template <typename T>
    void FreeTensor(const LocalTensor<T>&) {
        EMU_CHECK(outstanding_ > 0, "FreeTensor without AllocTensor");
        --outstanding_;
    }
    void Init(std::vector<uint8_t*> buffers, uint32_t bytes) {
        buffers_ = std::move(buffers);
        bytes_ = bytes;
    }

private:
    std::vector<uint8_t*> buffers_;
    std::deque<uint8_t*> fifo_;
    uint32_t bytes_ = 0;
    uint32_t next_ = 0;
    uint32_t outstanding_ = 0;
};

template <TPosition src, TPosition dst, int32_t depth>
class TQueBind : public TQue<src, depth> {};

template <TPosition pos>
class TBuf {
public:
    template <typename T>
    LocalTensor<T> Get() const { return LocalTensor<T>(reinterpret_cast<T*>(data_), bytes_ / sizeof(T)); }
    void Init(uint8_t* data, uint32_t bytes) {
        data_ = data;
        bytes_ = bytes;
    }

private:
    uint8_t* data_ = nullptr;
    uint32_t bytes_ = 0;
};

class TPipe {
public:
    TPipe() { g_pipe = this; }
    template <TPosition pos, int32_t depth>
    void InitBuffer(TQue<pos, depth>& queue, int32_t num, uint32_t bytes) {
        std::vector<uint8_t*> buffers;
        for (int32_t i = 0; i < num; ++i) buffers.push_back(Take(bytes));
        queue.Init(buffers, bytes);
    }
    template <TPosition pos>
    void InitBuffer(TBuf<pos>& buf, uint32_t bytes) { buf.Init(Take(bytes), bytes); }
    event_t FetchEventID(HardEvent) { return 0; }

private:
    uint8_t* Take(uint32_t bytes) {
        emu::UnifiedBuffer& ub = *emu::g_ub;
        const uint32_t aligned = (bytes + 31) / 32 * 32;
        EMU_CHECK(ub.used + aligned <= emu::g_ubBytes, "Unified Buffer overflow: more than the SoC's usable UB");
        uint8_t* p = ub.bytes.data() + ub.used;
        ub.used += aligned;
        if (ub.used > emu::g_peakUbBytes) emu::g_peakUbBytes = ub.used;
        return p;
    }
};

inline TPipe* GetTPipePtr() { return g_pipe; }

struct BinaryRepeatParams {
    BinaryRepeatParams(uint8_t dstBlk, uint8_t src0Blk, uint8_t src1Blk, uint8_t dstRep, uint8_t src0Rep,
                       uint8_t src1Rep)
        : dstBlkStride(dstBlk), src0BlkStride(src0Blk), src1BlkStride(src1Blk), dstRepStride(dstRep),
          src0RepStride(src0Rep), src1RepStride(src1Rep) {}
    uint8_t dstBlkStride, src0BlkStride, src1BlkStride, dstRepStride, src0RepStride, src1RepStride;
};

struct DataCopyParams {
    uint16_t blockCount = 1;
    uint16_t blockLen = 0;   // 32-byte blocks
    uint16_t srcStride = 0;  // gap between blocks, 32-byte blocks
    uint16_t dstStride = 0;
};

// ---- data movement
template <typename T>
void DataCopy(const LocalTensor<T>& dst, const GlobalTensor<T>& src, uint32_t count) {
    EMU_CHECK(count * sizeof(T) % 32 == 0, "DataCopy GM->UB length is not whole 32-byte blocks");
    emu::CheckUbAligned(dst.data(), "DataCopy GM->UB destination not 32-byte aligned");
    EMU_CHECK(count <= dst.size(), "DataCopy GM->UB past the UB buffer");
    std::memcpy(dst.data(), src.data(), count * sizeof(T));
}
template <typename T>
void DataCopy(const GlobalTensor<T>& dst, const LocalTensor<T>& src, uint32_t count) {
    EMU_CHECK(count * sizeof(T) % 32 == 0, "DataCopy UB->GM length is not whole 32-byte blocks");
    emu::CheckUbAligned(src.data(), "DataCopy UB->GM source not 32-byte aligned");
    EMU_CHECK(count <= src.size(), "DataCopy UB->GM past the UB buffer");
    std::memcpy(dst.data(), src.data(), count * sizeof(T));
}
template <typename T>
void DataCopy(const LocalTensor<T>& dst, const GlobalTensor<T>& src, const DataCopyParams& p) {
    emu::CheckUbAligned(dst.data(), "strided DataCopy destination not 32-byte aligned");
    const uint32_t blockElems = 32 / sizeof(T);
    for (uint32_t b = 0; b < p.blockCount; ++b) {
        const uint64_t s = static_cast<uint64_t>(b) * (p.blockLen + p.srcStride) * blockElems;
        const uint64_t d = static_cast<uint64_t>(b) * (p.blockLen + p.dstStride) * blockElems;
        EMU_CHECK(d + p.blockLen * blockElems <= dst.size(), "strided DataCopy past the UB buffer");
        std::memcpy(dst.data() + d, src.data() + s, p.blockLen * 32);
    }
}

// ---- vector instructions (count form)
template <typename T>
void CheckVector(const LocalTensor<T>& t, uint32_t count) {
    emu::CheckUbAligned(t.data(), "vector operand not 32-byte aligned");
    EMU_CHECK(count <= t.size(), "vector instruction past its buffer");
}
template <typename D, typename S>
void Cast(const LocalTensor<D>& dst, const LocalTensor<S>& src, RoundMode, uint32_t count) {
    CheckVector(dst, count);
    CheckVector(src, count);
    for (uint32_t i = 0; i < count; ++i) dst.data()[i] = emu::FromFloat<D>(emu::ToFloat(src.data()[i]));
}
inline void Muls(const LocalTensor<float>& dst, const LocalTensor<float>& src, float s, uint32_t count) {
    CheckVector(dst, count);
    CheckVector(src, count);
    for (uint32_t i = 0; i < count; ++i) dst.data()[i] = src.data()[i] * s;
}
inline void Adds(const LocalTensor<float>& dst, const LocalTensor<float>& src, float s, uint32_t count) {
    CheckVector(dst, count);
    CheckVector(src, count);
    for (uint32_t i = 0; i < count; ++i) dst.data()[i] = src.data()[i] + s;
}
inline void Exp(const LocalTensor<float>& dst, const LocalTensor<float>& src, uint32_t count) {
    CheckVector(dst, count);
    CheckVector(src, count);
    for (uint32_t i = 0; i < count; ++i) dst.data()[i] = std::exp(src.data()[i]);
}
inline void Duplicate(const LocalTensor<float>& dst, float value, uint32_t count) {
    CheckVector(dst, count);
    for (uint32_t i = 0; i < count; ++i) dst.data()[i] = value;
}
inline void Axpy(const LocalTensor<float>& dst, const LocalTensor<float>& src, float s, uint32_t count) {
    CheckVector(dst, count);
    CheckVector(src, count);
    for (uint32_t i = 0; i < count; ++i) dst.data()[i] += src.data()[i] * s;
}
inline void ReduceMax(const LocalTensor<float>& dst, const LocalTensor<float>& src, const LocalTensor<float>& work,
                      int32_t count) {
    CheckVector(src, count);
    CheckVector(work, 8);
    float m = src.data()[0];
    for (int32_t i = 1; i < count; ++i) m = std::fmax(m, src.data()[i]);
    dst.SetValue(0, m);
}
inline void ReduceSum(const LocalTensor<float>& dst, const LocalTensor<float>& src, const LocalTensor<float>& work,
                      int32_t count) {
    CheckVector(src, count);
    CheckVector(work, 8);
    float s = 0.0f;
    for (int32_t i = 0; i < count; ++i) s += src.data()[i];
    dst.SetValue(0, s);
}

// ---- vector instructions (mask + repeat form): element i of repeat r sits at
// r * repStride * 8 + (i / 8) * blkStride * 8 + i % 8 (fp32, strides in 32-byte blocks), i < mask <= 64.
inline uint64_t Element(uint32_t rep, uint32_t i, uint8_t repStride, uint8_t blkStride) {
    return static_cast<uint64_t>(rep) * repStride * 8 + (i / 8) * blkStride * 8 + i % 8;
}
template <typename Op>
void Binary(const LocalTensor<float>& dst, const LocalTensor<float>& a, const LocalTensor<float>& b, uint64_t mask,
            uint8_t repeat, const BinaryRepeatParams& p, Op op) {
    EMU_CHECK(mask >= 1 && mask <= 64, "fp32 mask must be in [1, 64]");
    emu::CheckUbAligned(dst.data(), "vector operand not 32-byte aligned");
    emu::CheckUbAligned(a.data(), "vector operand not 32-byte aligned");
    emu::CheckUbAligned(b.data(), "vector operand not 32-byte aligned");
    for (uint32_t r = 0; r < repeat; ++r) {
        for (uint32_t i = 0; i < mask; ++i) {
            const float x = a.At(Element(r, i, p.src0RepStride, p.src0BlkStride));
            const float y = b.At(Element(r, i, p.src1RepStride, p.src1BlkStride));
            dst.At(Element(r, i, p.dstRepStride, p.dstBlkStride)) = op(x, y);
        }
    }
}
inline void Mul(const LocalTensor<float>& d, const LocalTensor<float>& a, const LocalTensor<float>& b, uint64_t mask,
                uint8_t repeat, const BinaryRepeatParams& p) {
    Binary(d, a, b, mask, repeat, p, [](float x, float y) { return x * y; });
}
inline void Add(const LocalTensor<float>& d, const LocalTensor<float>& a, const LocalTensor<float>& b, uint64_t mask,
                uint8_t repeat, const BinaryRepeatParams& p) {
    Binary(d, a, b, mask, repeat, p, [](float x, float y) { return x + y; });
}
inline void Sub(const LocalTensor<float>& d, const LocalTensor<float>& a, const LocalTensor<float>& b, uint64_t mask,
                uint8_t repeat, const BinaryRepeatParams& p) {
    Binary(d, a, b, mask, repeat, p, [](float x, float y) { return x - y; });
}
// One sum per repeat: dst[r * dstRepStride] = sum of the repeat's first `mask` elements.
inline void WholeReduceSum(const LocalTensor<float>& dst, const LocalTensor<float>& src, int32_t mask,
                           int32_t repeat, int32_t dstRepStride, int32_t srcBlkStride, int32_t srcRepStride) {
    EMU_CHECK(mask >= 1 && mask <= 64, "fp32 mask must be in [1, 64]");
    emu::CheckUbAligned(dst.data(), "vector operand not 32-byte aligned");
    emu::CheckUbAligned(src.data(), "vector operand not 32-byte aligned");
    for (int32_t r = 0; r < repeat; ++r) {
        float s = 0.0f;
        for (int32_t i = 0; i < mask; ++i) {
            s += src.At(Element(r, i, static_cast<uint8_t>(srcRepStride), static_cast<uint8_t>(srcBlkStride)));
        }
        dst.At(static_cast<uint64_t>(r) * dstRepStride) = s;
    }
}

}  // namespace AscendC

// GET_TILING_DATA copies the host's tiling struct; the emulator harness defines EMU_TILING_TYPE per kernel.
#define GET_TILING_DATA(name, ptr) EMU_TILING_TYPE name = *reinterpret_cast<const EMU_TILING_TYPE*>(ptr)
