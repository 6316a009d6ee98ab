/*
 * staticprune: TensorRT IPluginV3 wrapper of the bipartite soft matching + size-weighted merge kernels.
 *
 * ONNX node: op_type "StaticPruneBipartiteMerge", plugin_version "1", plugin_namespace "staticprune".
 * Inputs x (B,T,D) fp32|fp16, metric (B,T,C) fp32|fp16, size (B,T) fp32, owner (B,N0) int32
 * [, threshold (B,) fp32 with threshold_input = 1].
 * Outputs x' (B,T',D) dtype of x, size' (B,T') fp32, owner' (B,N0) int32, overflow (B,) int32.
 * Semantics, attributes and limits: README.md next to this file.
 */
#ifndef STATICPRUNE_BIPARTITE_MERGE_PLUGIN_H
#define STATICPRUNE_BIPARTITE_MERGE_PLUGIN_H

#include "NvInferRuntime.h"
#include "staticprunePluginUtils.h"

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

namespace staticprune
{
namespace plugin
{

constexpr char const* kBIPARTITE_MERGE_NAME = "StaticPruneBipartiteMerge";
constexpr char const* kBIPARTITE_MERGE_VERSION = "1";

struct BipartiteMergeParams
{
    int32_t r{-1};                                           //!< >= 0: fixed-r mode
    float threshold{std::numeric_limits<float>::infinity()}; //!< threshold mode (r < 0)
    int32_t capacity{0};                                     //!< threshold mode: output token count (0: T)
    int32_t numPrefix{0};                                    //!< protected leading tokens
    int32_t inclusive{0};                                    //!< 1: merge similarity >= threshold
    int32_t absoluteParity{0};                               //!< 1: A/B by parity of the absolute slot
    int32_t keptByScore{0};                                  //!< 1: unmerged A tokens in selection order
    int32_t thresholdInput{0};                               //!< 1: threshold mode, per-image threshold is input 4

    int32_t flags() const noexcept;
    int32_t nbInputs() const noexcept; //!< 4, or 5 with the threshold input
    std::string describe() const;
};

class BipartiteMergePlugin : public nvinfer1::IPluginV3,
                             public nvinfer1::IPluginV3OneCore,
                             public nvinfer1::IPluginV3OneBuild,
                             public nvinfer1::IPluginV3OneRuntime
{
public:
    explicit BipartiteMergePlugin(BipartiteMergeParams const& params);
    ~BipartiteMergePlugin() override = default;

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
    //! The contract's input rules and output shapes (staticprune_bipartite_merge_output_shapes); logs on failure.
    bool contractShapes(int32_t nbInputs, int32_t const* ranks, int64_t const* dims, int32_t nbOutputs,
        int32_t* outRanks, int64_t* outDims) const noexcept;

    BipartiteMergeParams mParams;
    std::string mDescription;
    std::vector<nvinfer1::PluginField> mFieldsToSerialize;
    nvinfer1::PluginFieldCollection mFieldCollection{0, nullptr};
};

class BipartiteMergePluginCreator : public nvinfer1::IPluginCreatorV3One
{
public:
    BipartiteMergePluginCreator();
    ~BipartiteMergePluginCreator() override = default;

    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override;
    nvinfer1::IPluginV3* createPlugin(char const* name, nvinfer1::PluginFieldCollection const* fc,
        nvinfer1::TensorRTPhase phase) noexcept override;

    //! Attributes to parameters (validated). Returns false and logs on an invalid combination.
    static bool parseFields(nvinfer1::PluginFieldCollection const* fc, BipartiteMergeParams& params) noexcept;

private:
    FieldNames mFieldNames;
};

} // namespace plugin
} // namespace staticprune

#endif // STATICPRUNE_BIPARTITE_MERGE_PLUGIN_H
