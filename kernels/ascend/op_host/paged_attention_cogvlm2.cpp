// PagedAttentionCogvlm2 op host: op definition, shape inference and tiling (split in cogvlm2_tiling.cpp).
//
// Inputs (T tokens of this step, S sequences, tokens of a sequence contiguous, sequences in any order):
//   0 query            [T, H, D]           after rotary
//   1 key, 2 value     [T, KV, D]          this step's K (after rotary) and V
//   3 key_cache,       [num_slots, KV, D]  paged caches (num_slots = num_blocks * block_size); written IN PLACE
//   4 value_cache                          at slot_mapping (phase A), read through block_tables (phase B)
//   5 slot_mapping     [T] int32           cache slot of each token; < 0 = padding, not written
//   6 block_tables     [S, max_blocks] int32
//   7 query_start_loc  [S + 1] int32       cumulative query counts (value-dependent: read by the tiling)
//   8 seq_lens         [S] int32           context length after this step (value-dependent)
// Attrs: block_size (int), scale (float, <= 0 means 1 / sqrt(D)).
// Output: attn_out [T, H, D]. Query head h reads KV head h / (H / KV); query i of a sequence sees keys
// [0, seq_len - q_len + i] (causal within the chunk, everything cached before it).
//
// NOT COMPILED HERE: this file needs CANN's headers (see docs/ascend.md).
#include <cmath>

#include "cogvlm2_tiling.h"
#include "paged_attention_cogvlm2_tiling.h"
#include "register/op_def_registry.h"
#include "tiling/platform/platform_ascendc.h"

namespace optiling {
namespace {

constexpr size_t kQuery = 0;
constexpr size_t kKey = 1;
constexpr size_t kBlockTables = 6;
constexpr size_t kQueryStartLoc = 7;
constexpr size_t kSeqLens = 8;
constexpr size_t kAttrBlockSize = 0;
constexpr size_t kAttrScale = 1;

std::vector<int32_t> ReadInt32Input(gert::TilingContext* context, size_t index) {
    // Value-dependent inputs (ValueDepend in the op definition) reach the tiling function with their data.
    const gert::Tensor* tensor = context->GetInputTensor(index);
    if (tensor == nullptr || tensor->GetData<int32_t>() == nullptr) return {};
    const int32_t* data = tensor->GetData<int32_t>();
    return std::vector<int32_t>(data, data + tensor->GetShapeSize());
}

ge::graphStatus PagedAttentionTilingFunc(gert::TilingContext* context) {
    const gert::Shape& q = context->GetInputShape(kQuery)->GetStorageShape();
    const gert::Shape& k = context->GetInputShape(kKey)->GetStorageShape();
    const gert::Shape& tables = context->GetInputShape(kBlockTables)->GetStorageShape();
    if (q.GetDimNum() != 3 || k.GetDimNum() != 3 || tables.GetDimNum() != 2) return ge::GRAPH_FAILED;
    const gert::RuntimeAttrs* attrs = context->GetAttrs();
    const int64_t* blockSize = attrs->GetAttrPointer<int64_t>(kAttrBlockSize);
    const float* scaleAttr = attrs->GetAttrPointer<float>(kAttrScale);
    if (blockSize == nullptr || *blockSize <= 0) return ge::GRAPH_FAILED;

    const ge::DataType dtype = context->GetInputDesc(kQuery)->GetDataType();
    cogvlm2_ascend::AttentionShape shape{};
    shape.numHeads = static_cast<uint32_t>(q.GetDim(1));
    shape.numKvHeads = static_cast<uint32_t>(k.GetDim(1));
    shape.headDim = static_cast<uint32_t>(q.GetDim(2));
    shape.blockSize = static_cast<uint32_t>(*blockSize);
    shape.dtypeBytes = static_cast<uint32_t>(ge::GetSizeByDataType(dtype));
    shape.isBf16 = dtype == ge::DT_BF16;
    shape.queryStartLoc = ReadInt32Input(context, kQueryStartLoc);
    shape.seqLens = ReadInt32Input(context, kSeqLens);

    auto platform = platform_ascendc::PlatformAscendC(context->GetPlatformInfo());
    uint64_t ubBytes = 0;
    platform.GetCoreMemSize(platform_ascendc::CoreMemType::UB, ubBytes);
    const cogvlm2_ascend::HardwareSpec hw{platform.GetCoreNumAiv(), static_cast<uint32_t>(ubBytes),
                                          platform.GetSocVersion() != platform_ascendc::SocVersion::ASCEND310P};
    const cogvlm2_ascend::AttentionTiling tiling = cogvlm2_ascend::ComputeAttentionTiling(shape, hw);
    if (!tiling.ok || tiling.numTokens != static_cast<uint32_t>(q.GetDim(0))) return ge::GRAPH_FAILED;

    PagedAttentionCogvlm2TilingData data;
    data.set_numTokens(tiling.numTokens);
    data.set_numSeqs(tiling.numSeqs);
    data.set_numHeads(shape.numHeads);
    data.set_numKvHeads(shape.numKvHeads);
    data.set_headDim(shape.headDim);
    data.set_blockSize(shape.blockSize);
    data.set_maxBlocksPerSeq(static_cast<uint32_t>(tables.GetDim(1)));
    const bool scaleGiven = scaleAttr != nullptr && *scaleAttr > 0.0f;
    const float scale = scaleGiven ? *scaleAttr : 1.0f / std::sqrt(static_cast<float>(shape.headDim));
    data.set_scale(scale);
    data.set_writeTokensPerTile(tiling.writeTokensPerTile);
    data.set_writeTilesPerCore(tiling.writeSplit.perCore);
    data.set_writeTailCores(tiling.writeSplit.tailCores);
    data.set_qTile(tiling.qTile);
    data.set_kvTile(tiling.kvTile);
    uint32_t itemBegin[cogvlm2_ascend::kMaxCores + 1] = {};
    for (size_t c = 0; c < tiling.coreItemBegin.size(); ++c) itemBegin[c] = tiling.coreItemBegin[c];
    data.set_coreItemBegin(itemBegin);
    data.SaveToBuffer(context->GetRawTilingData()->GetData(), context->GetRawTilingData()->GetCapacity());
    context->GetRawTilingData()->SetDataSize(data.GetDataSize());
    context->SetBlockDim(tiling.usedCores);
    size_t* workspace = context->GetWorkspaceSizes(1);
    workspace[0] = platform.GetLibApiWorkSpaceSize();
    return ge::GRAPH_SUCCESS;
}

}  // namespace
}  // namespace optiling

namespace ge {

static ge::graphStatus PagedAttentionInferShape(gert::InferShapeContext* context) {
    *context->GetOutputShape(0) = *context->GetInputShape(0);
    return GRAPH_SUCCESS;
}

static ge::graphStatus PagedAttentionInferDataType(gert::InferDataTypeContext* context) {
    context->SetOutputDataType(0, context->GetInputDataType(0));
    return GRAPH_SUCCESS;
}

}  // namespace ge

namespace ops {

class PagedAttentionCogvlm2 : public OpDef {
public:
    explicit PagedAttentionCogvlm2(const char* name) : OpDef(name) {
        const std::vector<ge::DataType> floats = {ge::DT_FLOAT16, ge::DT_BF16, ge::DT_FLOAT};
        Declare(*this, floats);
        this->Attr("block_size").AttrType(REQUIRED).Int();
        this->Attr("scale").AttrType(OPTIONAL).Float(0.0f);
        this->SetInferShape(ge::PagedAttentionInferShape).SetInferDataType(ge::PagedAttentionInferDataType);
        this->AICore().SetTiling(optiling::PagedAttentionTilingFunc);
        this->AICore().AddConfig("ascend910b");

        OpAICoreConfig config310p;  // no bf16 on 310P's vector unit
        Declare(config310p, {ge::DT_FLOAT16, ge::DT_FLOAT});
        config310p.DynamicCompileStaticFlag(true).DynamicRankSupportFlag(true).DynamicShapeSupportFlag(true);
        this->AICore().AddConfig("ascend310p", config310p);
    }

private:
    template <typename Def>
    static void Declare(Def& def, const std::vector<ge::DataType>& floats) {
        const std::vector<ge::DataType> ints(floats.size(), ge::DT_INT32);
        const std::vector<ge::Format> nd(floats.size(), ge::FORMAT_ND);
        def.Input("query").ParamType(REQUIRED).DataType(floats).Format(nd).UnknownShapeFormat(nd);
        def.Input("key").ParamType(REQUIRED).DataType(floats).Format(nd).UnknownShapeFormat(nd);
        def.Input("value").ParamType(REQUIRED).DataType(floats).Format(nd).UnknownShapeFormat(nd);
        def.Input("key_cache").ParamType(REQUIRED).DataType(floats).Format(nd).UnknownShapeFormat(nd);
        def.Input("value_cache").ParamType(REQUIRED).DataType(floats).Format(nd).UnknownShapeFormat(nd);
        def.Input("slot_mapping").ParamType(REQUIRED).DataType(ints).Format(nd).UnknownShapeFormat(nd);
        def.Input("block_tables").ParamType(REQUIRED).DataType(ints).Format(nd).UnknownShapeFormat(nd);
        def.Input("query_start_loc").ParamType(REQUIRED).DataType(ints).Format(nd).UnknownShapeFormat(nd)
            .ValueDepend(REQUIRED);
        def.Input("seq_lens").ParamType(REQUIRED).DataType(ints).Format(nd).UnknownShapeFormat(nd)
            .ValueDepend(REQUIRED);
        def.Output("attn_out").ParamType(REQUIRED).DataType(floats).Format(nd).UnknownShapeFormat(nd);
    }
};

OP_ADD(PagedAttentionCogvlm2);

}  // namespace ops
