// RotaryCogvlm2 op host: op definition, shape inference and tiling (the split itself is in cogvlm2_tiling.cpp).
//
// query [T, H, D], key [T, KV, D]  -> query_out, key_out of the same shapes (NeoX rotate-half over the whole head)
// positions [T] int32              position id of each token (not its index: image tokens share positions)
// cos_table, sin_table [P, D]      rows by position, same dtype as query (both halves of a row are used)
//
// NOT COMPILED HERE: this file needs CANN's headers (see docs/ascend.md).
#include "cogvlm2_tiling.h"
#include "register/op_def_registry.h"
#include "rotary_cogvlm2_tiling.h"
#include "tiling/platform/platform_ascendc.h"

namespace optiling {
namespace {

constexpr size_t kQuery = 0;
constexpr size_t kKey = 1;

ge::graphStatus RotaryTilingFunc(gert::TilingContext* context) {
    const gert::Shape& q = context->GetInputShape(kQuery)->GetStorageShape();
    const gert::Shape& k = context->GetInputShape(kKey)->GetStorageShape();
    if (q.GetDimNum() != 3 || k.GetDimNum() != 3 || q.GetDim(0) != k.GetDim(0) || q.GetDim(2) != k.GetDim(2)) {
        return ge::GRAPH_FAILED;
    }
    const ge::DataType dtype = context->GetInputDesc(kQuery)->GetDataType();
    cogvlm2_ascend::RotaryShape shape{};
    shape.numTokens = static_cast<uint32_t>(q.GetDim(0));
    shape.numHeads = static_cast<uint32_t>(q.GetDim(1));
    shape.numKvHeads = static_cast<uint32_t>(k.GetDim(1));
    shape.headDim = static_cast<uint32_t>(q.GetDim(2));
    shape.dtypeBytes = static_cast<uint32_t>(ge::GetSizeByDataType(dtype));
    shape.isBf16 = dtype == ge::DT_BF16;

    // Core count and UB size come from the platform this runs on; the SoC table in cogvlm2_tiling.cpp only
    // serves the tests and documents the expected figures.
    auto platform = platform_ascendc::PlatformAscendC(context->GetPlatformInfo());
    uint64_t ubBytes = 0;
    platform.GetCoreMemSize(platform_ascendc::CoreMemType::UB, ubBytes);
    const cogvlm2_ascend::HardwareSpec hw{platform.GetCoreNumAiv(), static_cast<uint32_t>(ubBytes),
                                          platform.GetSocVersion() != platform_ascendc::SocVersion::ASCEND310P};
    const cogvlm2_ascend::RotaryTiling tiling = cogvlm2_ascend::ComputeRotaryTiling(shape, hw);
    if (!tiling.ok) return ge::GRAPH_FAILED;

    RotaryCogvlm2TilingData data;
    data.set_numTokens(shape.numTokens);
    data.set_numHeads(shape.numHeads);
    data.set_numKvHeads(shape.numKvHeads);
    data.set_headDim(shape.headDim);
    data.set_headsPerTile(tiling.headsPerTile);
    data.set_tilesPerToken(tiling.tilesPerToken);
    data.set_tilesPerCore(tiling.split.perCore);
    data.set_tailCores(tiling.split.tailCores);
    data.SaveToBuffer(context->GetRawTilingData()->GetData(), context->GetRawTilingData()->GetCapacity());
    context->GetRawTilingData()->SetDataSize(data.GetDataSize());
    context->SetBlockDim(tiling.usedCores);
    size_t* workspace = context->GetWorkspaceSizes(1);
    workspace[0] = platform.GetLibApiWorkSpaceSize();  // the framework's own scratch; the kernel needs none
    return ge::GRAPH_SUCCESS;
}

}  // namespace
}  // namespace optiling

namespace ge {

static ge::graphStatus RotaryInferShape(gert::InferShapeContext* context) {
    *context->GetOutputShape(0) = *context->GetInputShape(0);
    *context->GetOutputShape(1) = *context->GetInputShape(1);
    return GRAPH_SUCCESS;
}

static ge::graphStatus RotaryInferDataType(gert::InferDataTypeContext* context) {
    context->SetOutputDataType(0, context->GetInputDataType(0));
    context->SetOutputDataType(1, context->GetInputDataType(1));
    return GRAPH_SUCCESS;
}

}  // namespace ge

namespace ops {

class RotaryCogvlm2 : public OpDef {
public:
    explicit RotaryCogvlm2(const char* name) : OpDef(name) {
        // 910B: fp16, bf16, fp32. The tables share query's dtype; positions are int32.
        const std::vector<ge::DataType> floats = {ge::DT_FLOAT16, ge::DT_BF16, ge::DT_FLOAT};
        const std::vector<ge::DataType> ints = {ge::DT_INT32, ge::DT_INT32, ge::DT_INT32};
        const std::vector<ge::Format> nd(floats.size(), ge::FORMAT_ND);
        Declare(*this, floats, ints, nd);
        this->SetInferShape(ge::RotaryInferShape).SetInferDataType(ge::RotaryInferDataType);
        this->AICore().SetTiling(optiling::RotaryTilingFunc);
        this->AICore().AddConfig("ascend910b");

        // 310P's vector unit has no bf16: register fp16 and fp32 only.
        OpAICoreConfig config310p;
        const std::vector<ge::DataType> floats310p = {ge::DT_FLOAT16, ge::DT_FLOAT};
        const std::vector<ge::DataType> ints310p = {ge::DT_INT32, ge::DT_INT32};
        const std::vector<ge::Format> nd310p(floats310p.size(), ge::FORMAT_ND);
        Declare(config310p, floats310p, ints310p, nd310p);
        config310p.DynamicCompileStaticFlag(true).DynamicRankSupportFlag(true).DynamicShapeSupportFlag(true);
        this->AICore().AddConfig("ascend310p", config310p);
    }

private:
    template <typename Def>
    static void Declare(Def& def, const std::vector<ge::DataType>& floats, const std::vector<ge::DataType>& ints,
                        const std::vector<ge::Format>& nd) {
        def.Input("query").ParamType(REQUIRED).DataType(floats).Format(nd).UnknownShapeFormat(nd);
        def.Input("key").ParamType(REQUIRED).DataType(floats).Format(nd).UnknownShapeFormat(nd);
        def.Input("positions").ParamType(REQUIRED).DataType(ints).Format(nd).UnknownShapeFormat(nd);
        def.Input("cos_table").ParamType(REQUIRED).DataType(floats).Format(nd).UnknownShapeFormat(nd);
        def.Input("sin_table").ParamType(REQUIRED).DataType(floats).Format(nd).UnknownShapeFormat(nd);
        def.Output("query_out").ParamType(REQUIRED).DataType(floats).Format(nd).UnknownShapeFormat(nd);
        def.Output("key_out").ParamType(REQUIRED).DataType(floats).Format(nd).UnknownShapeFormat(nd);
    }
};

OP_ADD(RotaryCogvlm2);

}  // namespace ops
