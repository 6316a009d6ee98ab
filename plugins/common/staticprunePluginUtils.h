/*
 * staticprune: helpers shared by the TensorRT wrappers (IPluginV3) of the staticprune kernels.
 */
#ifndef STATICPRUNE_PLUGIN_UTILS_H
#define STATICPRUNE_PLUGIN_UTILS_H

#include "NvInferRuntime.h"

#include <cstdint>
#include <string>
#include <vector>

namespace staticprune
{
namespace plugin
{

//! Namespace of every staticprune plugin: the ONNX node's `plugin_namespace` attribute.
constexpr char const* kPLUGIN_NAMESPACE = "staticprune";

//! Logger lookup, in order: the ILoggerFinder handed over by TensorRT's dynamic loading (setLoggerFinder), the
//! fallback getter installed by static registration (libnvinfer's getLogger), stderr.
void setLoggerFinder(nvinfer1::ILoggerFinder* finder) noexcept;
void setFallbackLoggerGetter(nvinfer1::ILogger* (*getter)()) noexcept;
void logMessage(nvinfer1::ILogger::Severity severity, std::string const& message) noexcept;
void logError(std::string const& message) noexcept;
void logWarning(std::string const& message) noexcept;

//! Read a scalar plugin field. Integers accept kINT8/16/32/64, reals kFLOAT16/32/64; length must be 1.
//! Returns false (and logs) on a type or length mismatch.
bool readInt(nvinfer1::PluginField const& field, int32_t& value, char const* pluginName) noexcept;
bool readFloat(nvinfer1::PluginField const& field, float& value, char const* pluginName) noexcept;

//! Dimension value as int32, or -1 if it does not fit.
int32_t toInt32(int64_t value) noexcept;

//! Field names advertised by a creator: each field with its type and a null data pointer.
class FieldNames
{
public:
    void add(char const* name, nvinfer1::PluginFieldType type);
    nvinfer1::PluginFieldCollection const* collection() noexcept;

private:
    std::vector<nvinfer1::PluginField> mFields;
    nvinfer1::PluginFieldCollection mCollection{0, nullptr};
};

} // namespace plugin
} // namespace staticprune

#endif // STATICPRUNE_PLUGIN_UTILS_H
