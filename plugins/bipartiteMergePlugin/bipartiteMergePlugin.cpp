/*
 * staticprune: TensorRT IPluginV3 wrapper of the bipartite soft matching + size-weighted merge kernels.
 */
#include "bipartiteMergePlugin.h"

#include "bipartiteMergeKernels.h"
#include "staticprunePluginContract.h"

#include <cmath>
#include <cstring>
#include <exception>
#include <sstream>

using namespace nvinfer1;

namespace staticprune
{
namespace plugin
{
namespace
{

constexpr int32_t kMaxInputs = 5; // x, metric, size, owner [, threshold]
constexpr int32_t kNbOutputs = 4; // x', size', owner', overflow
constexpr int32_t kMaxRank = STATICPRUNE_CONTRACT_MAX_RANK;

enum Input : int32_t
{
    kX = 0,
    kMETRIC = 1,
    kSIZE = 2,
    kOWNER = 3,
    kTHRESHOLD = 4
};

enum Output : int32_t
{
    kX_OUT = 0,
    kSIZE_OUT = 1,
    kOWNER_OUT = 2,
    kOVERFLOW = 3
};

bool isFeatureType(DataType type)
{
    return type == DataType::kFLOAT || type == DataType::kHALF;
}

int32_t kernelDtype(DataType type)
{
    return type == DataType::kHALF ? STATICPRUNE_DTYPE_FLOAT16 : STATICPRUNE_DTYPE_FLOAT32;
}

//! T' as a dimension expression. This is the formula of staticprune_bipartite_merge_out_tokens (the plugin
//! contract, common/staticprunePluginContract.cpp) written with IExprBuilder; keep the two identical.
//! getOutputShapes checks them against each other whenever T is a build-time constant.
IDimensionExpr const* outTokensExpr(IExprBuilder& eb, IDimensionExpr const& tokens, BipartiteMergeParams const& p)
{
    IDimensionExpr const* zero = eb.constant(0);
    IDimensionExpr const* nonPrefix = eb.operation(DimensionOperation::kSUB, tokens, *eb.constant(p.numPrefix));
    nonPrefix = eb.operation(DimensionOperation::kMAX, *nonPrefix, *zero);
    IDimensionExpr const* half = eb.operation(DimensionOperation::kFLOOR_DIV, *nonPrefix, *eb.constant(2));
    if (p.r >= 0)
    {
        IDimensionExpr const* merged = eb.operation(DimensionOperation::kMIN, *eb.constant(p.r), *half);
        return eb.operation(DimensionOperation::kSUB, tokens, *merged);
    }
    if (p.capacity <= 0)
    {
        return &tokens;
    }
    IDimensionExpr const* lowest = eb.operation(DimensionOperation::kSUB, tokens, *half);
    IDimensionExpr const* capped = eb.operation(DimensionOperation::kMIN, *eb.constant(p.capacity), tokens);
    return eb.operation(DimensionOperation::kMAX, *lowest, *capped);
}

} // namespace

int32_t BipartiteMergeParams::flags() const noexcept
{
    return (inclusive ? STATICPRUNE_MERGE_INCLUSIVE : 0) | (absoluteParity ? STATICPRUNE_MERGE_ABSOLUTE_PARITY : 0)
        | (keptByScore ? STATICPRUNE_MERGE_KEPT_BY_SCORE : 0);
}

int32_t BipartiteMergeParams::nbInputs() const noexcept
{
    return thresholdInput ? 5 : 4;
}

std::string BipartiteMergeParams::describe() const
{
    std::ostringstream s;
    s << kBIPARTITE_MERGE_NAME << " r=" << r << " threshold=" << threshold << " capacity=" << capacity
      << " num_prefix=" << numPrefix << " inclusive=" << inclusive << " absolute_parity=" << absoluteParity
      << " kept_by_score=" << keptByScore << " threshold_input=" << thresholdInput;
    return s.str();
}

// ------------------------------------------------------------------------------------------------ plugin

BipartiteMergePlugin::BipartiteMergePlugin(BipartiteMergeParams const& params)
    : mParams(params)
    , mDescription(params.describe())
{
}

IPluginCapability* BipartiteMergePlugin::getCapabilityInterface(PluginCapabilityType type) noexcept
{
    switch (type)
    {
    case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
    case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
    case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    }
    return nullptr;
}

IPluginV3* BipartiteMergePlugin::clone() noexcept
{
    try
    {
        return new BipartiteMergePlugin(mParams);
    }
    catch (std::exception const& e)
    {
        logError(std::string(kBIPARTITE_MERGE_NAME) + ": clone failed: " + e.what());
    }
    return nullptr;
}

char const* BipartiteMergePlugin::getPluginName() const noexcept
{
    return kBIPARTITE_MERGE_NAME;
}

char const* BipartiteMergePlugin::getPluginVersion() const noexcept
{
    return kBIPARTITE_MERGE_VERSION;
}

char const* BipartiteMergePlugin::getPluginNamespace() const noexcept
{
    return kPLUGIN_NAMESPACE;
}

int32_t BipartiteMergePlugin::getNbOutputs() const noexcept
{
    return kNbOutputs;
}

bool BipartiteMergePlugin::contractShapes(int32_t nbInputs, int32_t const* ranks, int64_t const* dims,
    int32_t nbOutputs, int32_t* outRanks, int64_t* outDims) const noexcept
{
    if (nbOutputs != kNbOutputs)
    {
        logError(mDescription + ": expects 4 outputs (x', size', owner', overflow)");
        return false;
    }
    char message[256];
    if (staticprune_bipartite_merge_output_shapes(nbInputs, ranks, dims, mParams.r, mParams.capacity,
            mParams.numPrefix, mParams.thresholdInput, outRanks, outDims, message, sizeof(message))
        != STATICPRUNE_SUCCESS)
    {
        logError(mDescription + ": " + message);
        return false;
    }
    return true;
}

namespace
{

//! Ranks and extents of up to kMaxInputs tensors in the contract's layout (-1: unknown or out of range).
struct ContractDims
{
    int32_t ranks[kMaxInputs] = {};
    int64_t dims[kMaxInputs * kMaxRank] = {};
    int32_t outRanks[kNbOutputs] = {};
    int64_t outDims[kNbOutputs * kMaxRank] = {};

    bool set(int32_t i, Dims const& d)
    {
        if (i >= kMaxInputs || d.nbDims > kMaxRank)
        {
            return false;
        }
        ranks[i] = d.nbDims;
        for (int32_t k = 0; k < d.nbDims; ++k)
        {
            dims[i * kMaxRank + k] = d.d[k] < 0 ? -1 : d.d[k];
        }
        return true;
    }
};

} // namespace

int32_t BipartiteMergePlugin::configurePlugin(
    DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept
{
    ContractDims c;
    for (int32_t i = 0; i < nbInputs; ++i)
    {
        if (!c.set(i, in[i].desc.dims))
        {
            logError(mDescription + ": too many inputs or dimensions");
            return -1;
        }
    }
    if (out == nullptr || !contractShapes(nbInputs, c.ranks, c.dims, nbOutputs, c.outRanks, c.outDims))
    {
        return -1;
    }
    return 0;
}

int32_t BipartiteMergePlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    if (nbInputs != mParams.nbInputs() || nbOutputs != kNbOutputs)
    {
        logError(mDescription + ": expects " + std::to_string(mParams.nbInputs()) + " inputs and 4 outputs");
        return -1;
    }
    outputTypes[kX_OUT] = isFeatureType(inputTypes[kX]) ? inputTypes[kX] : DataType::kFLOAT;
    outputTypes[kSIZE_OUT] = DataType::kFLOAT;
    outputTypes[kOWNER_OUT] = DataType::kINT32;
    outputTypes[kOVERFLOW] = DataType::kINT32;
    return 0;
}

int32_t BipartiteMergePlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs,
    DimsExprs const* /*shapeInputs*/, int32_t /*nbShapeInputs*/, DimsExprs* outputs, int32_t nbOutputs,
    IExprBuilder& exprBuilder) noexcept
{
    try
    {
        // The contract validates ranks and the build-time constant extents, and gives the constant output shapes.
        ContractDims c;
        for (int32_t i = 0; i < nbInputs; ++i)
        {
            if (i >= kMaxInputs || inputs[i].nbDims > kMaxRank)
            {
                logError(mDescription + ": too many inputs or dimensions");
                return -1;
            }
            c.ranks[i] = inputs[i].nbDims;
            for (int32_t k = 0; k < inputs[i].nbDims; ++k)
            {
                IDimensionExpr const* e = inputs[i].d[k];
                c.dims[i * kMaxRank + k] = e->isConstant() ? e->getConstantValue() : -1;
            }
        }
        if (!contractShapes(nbInputs, c.ranks, c.dims, nbOutputs, c.outRanks, c.outDims))
        {
            return -1;
        }
        IDimensionExpr const* batch = inputs[kX].d[0];
        IDimensionExpr const* tokens = inputs[kX].d[1];
        IDimensionExpr const* tOut = outTokensExpr(exprBuilder, *tokens, mParams);
        if (tOut->isConstant() && tOut->getConstantValue() != c.outDims[kX_OUT * kMaxRank + 1])
        {
            logError(mDescription + ": T' expression and staticprune_bipartite_merge_out_tokens disagree");
            return -1;
        }
        outputs[kX_OUT].nbDims = 3;
        outputs[kX_OUT].d[0] = batch;
        outputs[kX_OUT].d[1] = tOut;
        outputs[kX_OUT].d[2] = inputs[kX].d[2];
        outputs[kSIZE_OUT].nbDims = 2;
        outputs[kSIZE_OUT].d[0] = batch;
        outputs[kSIZE_OUT].d[1] = tOut;
        outputs[kOWNER_OUT] = inputs[kOWNER];
        outputs[kOVERFLOW].nbDims = 1;
        outputs[kOVERFLOW].d[0] = batch;
        return 0;
    }
    catch (std::exception const& e)
    {
        logError(mDescription + ": getOutputShapes failed: " + e.what());
    }
    return -1;
}

bool BipartiteMergePlugin::supportsFormatCombination(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    if (nbInputs != mParams.nbInputs() || nbOutputs != kNbOutputs || pos < 0 || pos >= nbInputs + kNbOutputs)
    {
        return false;
    }
    PluginTensorDesc const& desc = inOut[pos].desc;
    if (desc.format != TensorFormat::kLINEAR)
    {
        return false;
    }
    if (pos >= nbInputs)
    {
        switch (pos - nbInputs)
        {
        case kX_OUT: return desc.type == inOut[kX].desc.type;
        case kSIZE_OUT: return desc.type == DataType::kFLOAT;
        case kOWNER_OUT:
        case kOVERFLOW: return desc.type == DataType::kINT32;
        default: return false;
        }
    }
    switch (pos)
    {
    case kX:
    case kMETRIC: return isFeatureType(desc.type);
    case kSIZE:
    case kTHRESHOLD: return desc.type == DataType::kFLOAT;
    case kOWNER: return desc.type == DataType::kINT32;
    default: return false;
    }
}

size_t BipartiteMergePlugin::getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
    DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept
{
    if (nbInputs != mParams.nbInputs() || nbOutputs != kNbOutputs)
    {
        return 0;
    }
    // The workspace grows with batch, tokens and output tokens: the profile's maxima bound every shape.
    int32_t const batch = toInt32(inputs[kX].max.d[0]);
    int32_t const tokens = toInt32(inputs[kX].max.d[1]);
    int32_t const tOut = toInt32(outputs[kX_OUT].max.d[1]);
    if (batch < 0 || tokens < 0 || tOut < 0 || tokens < mParams.numPrefix)
    {
        return 0;
    }
    return staticprune_bipartite_merge_workspace_size(batch, tokens, mParams.numPrefix, tOut);
}

char const* BipartiteMergePlugin::getTimingCacheID() noexcept
{
    return mDescription.c_str();
}

char const* BipartiteMergePlugin::getMetadataString() noexcept
{
    return mDescription.c_str();
}

int32_t BipartiteMergePlugin::onShapeChange(
    PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* out, int32_t nbOutputs) noexcept
{
    ContractDims c;
    for (int32_t i = 0; i < nbInputs; ++i)
    {
        if (!c.set(i, in[i].dims))
        {
            logError(mDescription + ": too many inputs or dimensions");
            return -1;
        }
    }
    if (out == nullptr || !contractShapes(nbInputs, c.ranks, c.dims, nbOutputs, c.outRanks, c.outDims))
    {
        return -1;
    }
    for (int32_t o = 0; o < kNbOutputs; ++o)
    {
        bool same = out[o].dims.nbDims == c.outRanks[o];
        for (int32_t k = 0; same && k < c.outRanks[o]; ++k)
        {
            same = out[o].dims.d[k] == c.outDims[o * kMaxRank + k];
        }
        if (!same)
        {
            logError(mDescription + ": output " + std::to_string(o) + " does not have the contract's shape");
            return -1;
        }
    }
    return 0;
}

int32_t BipartiteMergePlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* outputDesc,
    void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept
{
    Dims const& x = inputDesc[kX].dims;
    int32_t const batch = toInt32(x.d[0]);
    int32_t const tokens = toInt32(x.d[1]);
    int32_t const dim = toInt32(x.d[2]);
    int32_t const metricDim = toInt32(inputDesc[kMETRIC].dims.d[2]);
    int32_t const numOrig = toInt32(inputDesc[kOWNER].dims.d[1]);
    int32_t const tOut = toInt32(outputDesc[kX_OUT].dims.d[1]);
    if (batch < 0 || tokens < 0 || dim < 0 || metricDim < 0 || numOrig < 0 || tOut < 0)
    {
        logError(mDescription + ": tensor extents exceed int32");
        return -1;
    }
    size_t const workspaceSize = staticprune_bipartite_merge_workspace_size(batch, tokens, mParams.numPrefix, tOut);
    float const* thresholds = mParams.thresholdInput ? static_cast<float const*>(inputs[kTHRESHOLD]) : nullptr;
    int32_t const status = staticprune_bipartite_merge_thresholds(inputs[kX], kernelDtype(inputDesc[kX].type),
        inputs[kMETRIC], kernelDtype(inputDesc[kMETRIC].type), static_cast<float const*>(inputs[kSIZE]),
        static_cast<int32_t const*>(inputs[kOWNER]), outputs[kX_OUT], static_cast<float*>(outputs[kSIZE_OUT]),
        static_cast<int32_t*>(outputs[kOWNER_OUT]), static_cast<int32_t*>(outputs[kOVERFLOW]), batch, tokens, dim,
        metricDim, numOrig, mParams.numPrefix, mParams.r, mParams.threshold, thresholds, mParams.flags(), tOut,
        workspace, workspaceSize, reinterpret_cast<staticprune_stream_t>(stream));
    if (status != STATICPRUNE_SUCCESS)
    {
        logError(mDescription + ": kernel launch failed with status " + std::to_string(status));
    }
    return status;
}

IPluginV3* BipartiteMergePlugin::attachToContext(IPluginResourceContext* /*context*/) noexcept
{
    return clone();
}

PluginFieldCollection const* BipartiteMergePlugin::getFieldsToSerialize() noexcept
{
    try
    {
        mFieldsToSerialize.clear();
        mFieldsToSerialize.emplace_back("r", &mParams.r, PluginFieldType::kINT32, 1);
        mFieldsToSerialize.emplace_back("threshold", &mParams.threshold, PluginFieldType::kFLOAT32, 1);
        mFieldsToSerialize.emplace_back("capacity", &mParams.capacity, PluginFieldType::kINT32, 1);
        mFieldsToSerialize.emplace_back("num_prefix", &mParams.numPrefix, PluginFieldType::kINT32, 1);
        mFieldsToSerialize.emplace_back("inclusive", &mParams.inclusive, PluginFieldType::kINT32, 1);
        mFieldsToSerialize.emplace_back("absolute_parity", &mParams.absoluteParity, PluginFieldType::kINT32, 1);
        mFieldsToSerialize.emplace_back("kept_by_score", &mParams.keptByScore, PluginFieldType::kINT32, 1);
        mFieldsToSerialize.emplace_back("threshold_input", &mParams.thresholdInput, PluginFieldType::kINT32, 1);
        mFieldCollection.nbFields = static_cast<int32_t>(mFieldsToSerialize.size());
        mFieldCollection.fields = mFieldsToSerialize.data();
        return &mFieldCollection;
    }
    catch (std::exception const& e)
    {
        logError(mDescription + ": getFieldsToSerialize failed: " + e.what());
    }
    return nullptr;
}

// ------------------------------------------------------------------------------------------------ creator

BipartiteMergePluginCreator::BipartiteMergePluginCreator()
{
    mFieldNames.add("r", PluginFieldType::kINT32);
    mFieldNames.add("threshold", PluginFieldType::kFLOAT32);
    mFieldNames.add("capacity", PluginFieldType::kINT32);
    mFieldNames.add("num_prefix", PluginFieldType::kINT32);
    mFieldNames.add("inclusive", PluginFieldType::kINT32);
    mFieldNames.add("absolute_parity", PluginFieldType::kINT32);
    mFieldNames.add("kept_by_score", PluginFieldType::kINT32);
    mFieldNames.add("threshold_input", PluginFieldType::kINT32);
}

char const* BipartiteMergePluginCreator::getPluginName() const noexcept
{
    return kBIPARTITE_MERGE_NAME;
}

char const* BipartiteMergePluginCreator::getPluginVersion() const noexcept
{
    return kBIPARTITE_MERGE_VERSION;
}

char const* BipartiteMergePluginCreator::getPluginNamespace() const noexcept
{
    return kPLUGIN_NAMESPACE;
}

PluginFieldCollection const* BipartiteMergePluginCreator::getFieldNames() noexcept
{
    return mFieldNames.collection();
}

bool BipartiteMergePluginCreator::parseFields(PluginFieldCollection const* fc, BipartiteMergeParams& params) noexcept
{
    char const* const name = kBIPARTITE_MERGE_NAME;
    bool hasR = false;
    bool hasThreshold = false;
    for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i)
    {
        PluginField const& field = fc->fields[i];
        if (field.name == nullptr)
        {
            continue;
        }
        bool ok = true;
        if (std::strcmp(field.name, "r") == 0)
        {
            ok = readInt(field, params.r, name);
            hasR = true;
        }
        else if (std::strcmp(field.name, "threshold") == 0)
        {
            ok = readFloat(field, params.threshold, name);
            hasThreshold = true;
        }
        else if (std::strcmp(field.name, "capacity") == 0)
        {
            ok = readInt(field, params.capacity, name);
        }
        else if (std::strcmp(field.name, "num_prefix") == 0)
        {
            ok = readInt(field, params.numPrefix, name);
        }
        else if (std::strcmp(field.name, "inclusive") == 0)
        {
            ok = readInt(field, params.inclusive, name);
        }
        else if (std::strcmp(field.name, "absolute_parity") == 0)
        {
            ok = readInt(field, params.absoluteParity, name);
        }
        else if (std::strcmp(field.name, "kept_by_score") == 0)
        {
            ok = readInt(field, params.keptByScore, name);
        }
        else if (std::strcmp(field.name, "threshold_input") == 0)
        {
            ok = readInt(field, params.thresholdInput, name);
        }
        else
        {
            logWarning(std::string(name) + ": ignoring unknown attribute '" + field.name + "'");
        }
        if (!ok)
        {
            return false;
        }
    }
    if (!hasR)
    {
        params.r = -1;
    }
    // The accepted combinations are the plugin contract's (common/staticprunePluginContract.h), which the exporter's
    // checker applies to ONNX graphs too.
    char message[256];
    if (staticprune_bipartite_merge_check_fields(hasR ? 1 : 0, params.r, hasThreshold ? 1 : 0, params.threshold,
            params.capacity, params.numPrefix, params.inclusive, params.absoluteParity, params.keptByScore,
            params.thresholdInput, message, sizeof(message))
        != STATICPRUNE_SUCCESS)
    {
        logError(params.describe() + ": " + message);
        return false;
    }
    return true;
}

IPluginV3* BipartiteMergePluginCreator::createPlugin(
    char const* /*name*/, PluginFieldCollection const* fc, TensorRTPhase /*phase*/) noexcept
{
    try
    {
        BipartiteMergeParams params;
        if (!parseFields(fc, params))
        {
            return nullptr;
        }
        return new BipartiteMergePlugin(params);
    }
    catch (std::exception const& e)
    {
        logError(std::string(kBIPARTITE_MERGE_NAME) + ": createPlugin failed: " + e.what());
    }
    return nullptr;
}

} // namespace plugin
} // namespace staticprune
