/*
 * staticprune: TensorRT IPluginV3 wrapper of the token unmerge kernels.
 *
 * ONNX node: op_type "StaticPruneTokenUnmerge", plugin_version "1", plugin_namespace "staticprune".
 * Inputs x (B,T,D) fp32|fp16, owner (B,N0) int32.
 * Output y (B,N0,D), or (B,D,grid_h,grid_w) with to_feature_map = 1; dtype of x.
 * Semantics, attributes and limits: README.md next to this file.
 */
#ifndef STATICPRUNE_TOKEN_UNMERGE_PLUGIN_H
#define STATICPRUNE_TOKEN_UNMERGE_PLUGIN_H

#include "NvInferRuntime.h"
#include "staticprunePluginUtils.h"

#include <cstdint>
#include <string>
#include <vector>

namespace staticprune
{
namespace plugin
{

constexpr char const* kTOKEN_UNMERGE_NAME = "StaticPruneTokenUnmerge";
constexpr char const* kTOKEN_UNMERGE_VERSION = "1";

struct TokenUnmergeParams
{
    int32_t toFeatureMap{0}; //!< 1: output (B, D, grid_h, grid_w)
    int32_t gridH{0};
    int32_t gridW{0};

    std::string describe() const;
};

class TokenUnmergePlugin : public nvinfer1::IPluginV3,
                           public nvinfer1::IPluginV3OneCore,
                           public nvinfer1::IPluginV3OneBuild,
                           public nvinfer1::IPluginV3OneRuntime
{
public:
    explicit TokenUnmergePlugin(TokenUnmergeParams const& params);
    ~TokenUnmergePlugin() override = default;

    // IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
    nvinfer1::IPluginV3* clone() noexcept override;

    // IPluginV3OneCore
    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;

    // IPluginV3OneBuild
    int32_t getNbOutputs() const noexcept override;
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
        nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs,
        nvinfer1::DimsExprs const* shapeInputs, int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs,
        int32_t nbOutputs, nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
        int32_t nbOutputs) noexcept override;
    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;
    char const* getTimingCacheID() noexcept override;
    char const* getMetadataString() noexcept override;

    // IPluginV3OneRuntime
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::PluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

private:
    //! The contract's input rules and output shape (staticprune_token_unmerge_output_shapes) for x and owner
    //! extents (-1: unknown); logs on failure. outDims has STATICPRUNE_CONTRACT_MAX_RANK entries.
    bool contractShape(int32_t nbInputs, int32_t nbOutputs, int32_t const* ranks, int64_t const* dims,
        int32_t& outRank, int64_t* outDims) const noexcept;

    TokenUnmergeParams mParams;
    std::string mDescription;
    std::vector<nvinfer1::PluginField> mFieldsToSerialize;
    nvinfer1::PluginFieldCollection mFieldCollection{0, nullptr};
};

class TokenUnmergePluginCreator : public nvinfer1::IPluginCreatorV3One
{
public:
    TokenUnmergePluginCreator();
    ~TokenUnmergePluginCreator() override = default;

    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override;
    nvinfer1::IPluginV3* createPlugin(char const* name, nvinfer1::PluginFieldCollection const* fc,
        nvinfer1::TensorRTPhase phase) noexcept override;

    //! Attributes to parameters (validated). Returns false and logs on an invalid combination.
    static bool parseFields(nvinfer1::PluginFieldCollection const* fc, TokenUnmergeParams& params) noexcept;

private:
    FieldNames mFieldNames;
};

} // namespace plugin
} // namespace staticprune

#endif // STATICPRUNE_TOKEN_UNMERGE_PLUGIN_H
