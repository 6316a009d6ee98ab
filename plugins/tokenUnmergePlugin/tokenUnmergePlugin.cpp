/*
 * staticprune: TensorRT IPluginV3 wrapper of the token unmerge kernels.
 */
#include "tokenUnmergePlugin.h"

#include "staticprunePluginContract.h"
#include "tokenUnmergeKernels.h"

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

constexpr int32_t kNbInputs = 2; // x, owner
constexpr int32_t kNbOutputs = 1;

enum Input : int32_t
{
    kX = 0,
    kOWNER = 1
};

constexpr int32_t kMaxRank = STATICPRUNE_CONTRACT_MAX_RANK;

bool isFeatureType(DataType type)
{
    return type == DataType::kFLOAT || type == DataType::kHALF;
}

//! x and owner in the contract's layout (-1: unknown extent).
struct ContractDims
{
    int32_t ranks[kNbInputs] = {};
    int64_t dims[kNbInputs * kMaxRank] = {};
    int32_t outRank = 0;
    int64_t outDims[kMaxRank] = {};

    bool set(int32_t i, int32_t nbDims, int64_t const* d)
    {
        if (i >= kNbInputs || nbDims > kMaxRank)
        {
            return false;
        }
        ranks[i] = nbDims;
        for (int32_t k = 0; k < nbDims; ++k)
        {
            dims[i * kMaxRank + k] = d[k] < 0 ? -1 : d[k];
        }
        return true;
    }
};

} // namespace

std::string TokenUnmergeParams::describe() const
{
    std::ostringstream s;
    s << kTOKEN_UNMERGE_NAME << " to_feature_map=" << toFeatureMap << " grid_h=" << gridH << " grid_w=" << gridW;
    return s.str();
}

// ------------------------------------------------------------------------------------------------ plugin

TokenUnmergePlugin::TokenUnmergePlugin(TokenUnmergeParams const& params)
    : mParams(params)
    , mDescription(params.describe())
{
}

IPluginCapability* TokenUnmergePlugin::getCapabilityInterface(PluginCapabilityType type) noexcept
{
    switch (type)
    {
    case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
    case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
    case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    }
    return nullptr;
}

IPluginV3* TokenUnmergePlugin::clone() noexcept
{
    try
    {
        return new TokenUnmergePlugin(mParams);
    }
    catch (std::exception const& e)
    {
        logError(std::string(kTOKEN_UNMERGE_NAME) + ": clone failed: " + e.what());
    }
    return nullptr;
}

char const* TokenUnmergePlugin::getPluginName() const noexcept
{
    return kTOKEN_UNMERGE_NAME;
}

char const* TokenUnmergePlugin::getPluginVersion() const noexcept
{
    return kTOKEN_UNMERGE_VERSION;
}

char const* TokenUnmergePlugin::getPluginNamespace() const noexcept
{
    return kPLUGIN_NAMESPACE;
}

int32_t TokenUnmergePlugin::getNbOutputs() const noexcept
{
    return kNbOutputs;
}

bool TokenUnmergePlugin::contractShape(int32_t nbInputs, int32_t nbOutputs, int32_t const* ranks,
    int64_t const* dims, int32_t& outRank, int64_t* outDims) const noexcept
{
    if (nbOutputs != kNbOutputs)
    {
        logError(mDescription + ": expects 1 output");
        return false;
    }
    char message[256];
    if (staticprune_token_unmerge_output_shapes(nbInputs, ranks, dims, mParams.toFeatureMap, mParams.gridH,
            mParams.gridW, &outRank, outDims, message, sizeof(message))
        != STATICPRUNE_SUCCESS)
    {
        logError(mDescription + ": " + message);
        return false;
    }
    return true;
}

int32_t TokenUnmergePlugin::configurePlugin(
    DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept
{
    ContractDims c;
    for (int32_t i = 0; i < nbInputs; ++i)
    {
        if (!c.set(i, in[i].desc.dims.nbDims, in[i].desc.dims.d))
        {
            logError(mDescription + ": expects 2 inputs (x, owner)");
            return -1;
        }
    }
    return contractShape(nbInputs, nbOutputs, c.ranks, c.dims, c.outRank, c.outDims) ? 0 : -1;
}

int32_t TokenUnmergePlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    if (nbInputs != kNbInputs || nbOutputs != kNbOutputs)
    {
        logError(mDescription + ": expects 2 inputs and 1 output");
        return -1;
    }
    outputTypes[0] = isFeatureType(inputTypes[kX]) ? inputTypes[kX] : DataType::kFLOAT;
    return 0;
}

int32_t TokenUnmergePlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs,
    DimsExprs const* /*shapeInputs*/, int32_t /*nbShapeInputs*/, DimsExprs* outputs, int32_t nbOutputs,
    IExprBuilder& exprBuilder) noexcept
{
    // The contract validates ranks and build-time constant extents; the expressions below follow its output shape
    // (staticprune_token_unmerge_output_shapes).
    ContractDims c;
    for (int32_t i = 0; i < nbInputs; ++i)
    {
        if (i >= kNbInputs || inputs[i].nbDims > kMaxRank)
        {
            logError(mDescription + ": expects 2 inputs (x, owner)");
            return -1;
        }
        int64_t known[kMaxRank] = {};
        for (int32_t k = 0; k < inputs[i].nbDims; ++k)
        {
            known[k] = inputs[i].d[k]->isConstant() ? inputs[i].d[k]->getConstantValue() : -1;
        }
        c.set(i, inputs[i].nbDims, known);
    }
    if (!contractShape(nbInputs, nbOutputs, c.ranks, c.dims, c.outRank, c.outDims))
    {
        return -1;
    }
    IDimensionExpr const* numOrig = inputs[kOWNER].d[1];
    DimsExprs& y = outputs[0];
    if (mParams.toFeatureMap)
    {
        y.nbDims = 4;
        y.d[0] = inputs[kX].d[0];
        y.d[1] = inputs[kX].d[2];
        y.d[2] = exprBuilder.constant(mParams.gridH);
        y.d[3] = exprBuilder.constant(mParams.gridW);
    }
    else
    {
        y.nbDims = 3;
        y.d[0] = inputs[kX].d[0];
        y.d[1] = numOrig;
        y.d[2] = inputs[kX].d[2];
    }
    return 0;
}

bool TokenUnmergePlugin::supportsFormatCombination(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    if (nbInputs != kNbInputs || nbOutputs != kNbOutputs || pos < 0 || pos >= kNbInputs + kNbOutputs)
    {
        return false;
    }
    PluginTensorDesc const& desc = inOut[pos].desc;
    if (desc.format != TensorFormat::kLINEAR)
    {
        return false;
    }
    switch (pos)
    {
    case kX: return isFeatureType(desc.type);
    case kOWNER: return desc.type == DataType::kINT32;
    case kNbInputs: return desc.type == inOut[kX].desc.type;
    default: return false;
    }
}

size_t TokenUnmergePlugin::getWorkspaceSize(DynamicPluginTensorDesc const* /*inputs*/, int32_t /*nbInputs*/,
    DynamicPluginTensorDesc const* /*outputs*/, int32_t /*nbOutputs*/) const noexcept
{
    return 0;
}

char const* TokenUnmergePlugin::getTimingCacheID() noexcept
{
    return mDescription.c_str();
}

char const* TokenUnmergePlugin::getMetadataString() noexcept
{
    return mDescription.c_str();
}

int32_t TokenUnmergePlugin::onShapeChange(
    PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* out, int32_t nbOutputs) noexcept
{
    ContractDims c;
    for (int32_t i = 0; i < nbInputs; ++i)
    {
        if (!c.set(i, in[i].dims.nbDims, in[i].dims.d))
        {
            logError(mDescription + ": expects 2 inputs (x, owner)");
            return -1;
        }
    }
    if (!contractShape(nbInputs, nbOutputs, c.ranks, c.dims, c.outRank, c.outDims))
    {
        return -1;
    }
    bool same = out != nullptr && out[0].dims.nbDims == c.outRank;
    for (int32_t k = 0; same && k < c.outRank; ++k)
    {
        same = out[0].dims.d[k] == c.outDims[k];
    }
    if (!same)
    {
        logError(mDescription + ": the output does not have the contract's shape");
        return -1;
    }
    return 0;
}

int32_t TokenUnmergePlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* /*outputDesc*/,
    void const* const* inputs, void* const* outputs, void* /*workspace*/, cudaStream_t stream) noexcept
{
    Dims const& x = inputDesc[kX].dims;
    int32_t const batch = toInt32(x.d[0]);
    int32_t const tokens = toInt32(x.d[1]);
    int32_t const dim = toInt32(x.d[2]);
    int32_t const numOrig = toInt32(inputDesc[kOWNER].dims.d[1]);
    if (batch < 0 || tokens < 0 || dim < 0 || numOrig < 0)
    {
        logError(mDescription + ": tensor extents exceed int32");
        return -1;
    }
    int32_t const dtype
        = inputDesc[kX].type == DataType::kHALF ? STATICPRUNE_DTYPE_FLOAT16 : STATICPRUNE_DTYPE_FLOAT32;
    int32_t const status = staticprune_token_unmerge(inputs[kX], dtype, static_cast<int32_t const*>(inputs[kOWNER]),
        outputs[0], batch, tokens, dim, numOrig, mParams.toFeatureMap, mParams.gridH, mParams.gridW,
        reinterpret_cast<staticprune_stream_t>(stream));
    if (status != STATICPRUNE_SUCCESS)
    {
        logError(mDescription + ": kernel launch failed with status " + std::to_string(status));
    }
    return status;
}

IPluginV3* TokenUnmergePlugin::attachToContext(IPluginResourceContext* /*context*/) noexcept
{
    return clone();
}

PluginFieldCollection const* TokenUnmergePlugin::getFieldsToSerialize() noexcept
{
    try
    {
        mFieldsToSerialize.clear();
        mFieldsToSerialize.emplace_back("to_feature_map", &mParams.toFeatureMap, PluginFieldType::kINT32, 1);
        mFieldsToSerialize.emplace_back("grid_h", &mParams.gridH, PluginFieldType::kINT32, 1);
        mFieldsToSerialize.emplace_back("grid_w", &mParams.gridW, PluginFieldType::kINT32, 1);
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

TokenUnmergePluginCreator::TokenUnmergePluginCreator()
{
    mFieldNames.add("to_feature_map", PluginFieldType::kINT32);
    mFieldNames.add("grid_h", PluginFieldType::kINT32);
    mFieldNames.add("grid_w", PluginFieldType::kINT32);
}

char const* TokenUnmergePluginCreator::getPluginName() const noexcept
{
    return kTOKEN_UNMERGE_NAME;
}

char const* TokenUnmergePluginCreator::getPluginVersion() const noexcept
{
    return kTOKEN_UNMERGE_VERSION;
}

char const* TokenUnmergePluginCreator::getPluginNamespace() const noexcept
{
    return kPLUGIN_NAMESPACE;
}

PluginFieldCollection const* TokenUnmergePluginCreator::getFieldNames() noexcept
{
    return mFieldNames.collection();
}

bool TokenUnmergePluginCreator::parseFields(PluginFieldCollection const* fc, TokenUnmergeParams& params) noexcept
{
    char const* const name = kTOKEN_UNMERGE_NAME;
    for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i)
    {
        PluginField const& field = fc->fields[i];
        if (field.name == nullptr)
        {
            continue;
        }
        bool ok = true;
        if (std::strcmp(field.name, "to_feature_map") == 0)
        {
            ok = readInt(field, params.toFeatureMap, name);
        }
        else if (std::strcmp(field.name, "grid_h") == 0)
        {
            ok = readInt(field, params.gridH, name);
        }
        else if (std::strcmp(field.name, "grid_w") == 0)
        {
            ok = readInt(field, params.gridW, name);
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
    // The plugin contract's field rules (common/staticprunePluginContract.h), shared with the exporter's checker.
    char message[256];
    if (staticprune_token_unmerge_check_fields(params.toFeatureMap, params.gridH, params.gridW, message,
            sizeof(message))
        != STATICPRUNE_SUCCESS)
    {
        logError(params.describe() + ": " + message);
        return false;
    }
    return true;
}

IPluginV3* TokenUnmergePluginCreator::createPlugin(
    char const* /*name*/, PluginFieldCollection const* fc, TensorRTPhase /*phase*/) noexcept
{
    try
    {
        TokenUnmergeParams params;
        if (!parseFields(fc, params))
        {
            return nullptr;
        }
        return new TokenUnmergePlugin(params);
    }
    catch (std::exception const& e)
    {
        logError(std::string(kTOKEN_UNMERGE_NAME) + ": createPlugin failed: " + e.what());
    }
    return nullptr;
}

} // namespace plugin
} // namespace staticprune
