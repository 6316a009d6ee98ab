/*
 * staticprune: helpers shared by the TensorRT wrappers.
 */
#include "staticprunePluginUtils.h"

#include <atomic>
#include <cstdio>
#include <limits>

namespace staticprune
{
namespace plugin
{
namespace
{

std::atomic<nvinfer1::ILoggerFinder*> gLoggerFinder{nullptr};
std::atomic<nvinfer1::ILogger* (*) ()> gFallbackLoggerGetter{nullptr};

nvinfer1::ILogger* findLogger() noexcept
{
    if (nvinfer1::ILoggerFinder* finder = gLoggerFinder.load())
    {
        return finder->findLogger();
    }
    if (auto getter = gFallbackLoggerGetter.load())
    {
        return getter();
    }
    return nullptr;
}

} // namespace

void setLoggerFinder(nvinfer1::ILoggerFinder* finder) noexcept
{
    nvinfer1::ILoggerFinder* expected = nullptr;
    gLoggerFinder.compare_exchange_strong(expected, finder);
}

void setFallbackLoggerGetter(nvinfer1::ILogger* (*getter)()) noexcept
{
    gFallbackLoggerGetter.store(getter);
}

void logMessage(nvinfer1::ILogger::Severity severity, std::string const& message) noexcept
{
    try
    {
        std::string const text = "[staticprune] " + message;
        if (nvinfer1::ILogger* logger = findLogger())
        {
            logger->log(severity, text.c_str());
        }
        else if (severity <= nvinfer1::ILogger::Severity::kWARNING)
        {
            std::fprintf(stderr, "%s\n", text.c_str());
        }
    }
    catch (...)
    {
        // Logging must never throw out of a noexcept TensorRT callback.
    }
}

void logError(std::string const& message) noexcept
{
    logMessage(nvinfer1::ILogger::Severity::kERROR, message);
}

void logWarning(std::string const& message) noexcept
{
    logMessage(nvinfer1::ILogger::Severity::kWARNING, message);
}

bool readInt(nvinfer1::PluginField const& field, int32_t& value, char const* pluginName) noexcept
{
    using nvinfer1::PluginFieldType;
    if (field.data == nullptr || field.length != 1)
    {
        logError(std::string(pluginName) + ": attribute '" + field.name + "' must be one integer");
        return false;
    }
    int64_t v = 0;
    switch (field.type)
    {
    case PluginFieldType::kINT8: v = *static_cast<int8_t const*>(field.data); break;
    case PluginFieldType::kINT16: v = *static_cast<int16_t const*>(field.data); break;
    case PluginFieldType::kINT32: v = *static_cast<int32_t const*>(field.data); break;
    case PluginFieldType::kINT64: v = *static_cast<int64_t const*>(field.data); break;
    default:
        logError(std::string(pluginName) + ": attribute '" + field.name + "' must be an integer");
        return false;
    }
    if (v < std::numeric_limits<int32_t>::min() || v > std::numeric_limits<int32_t>::max())
    {
        logError(std::string(pluginName) + ": attribute '" + field.name + "' does not fit in int32");
        return false;
    }
    value = static_cast<int32_t>(v);
    return true;
}

bool readFloat(nvinfer1::PluginField const& field, float& value, char const* pluginName) noexcept
{
    using nvinfer1::PluginFieldType;
    if (field.data == nullptr || field.length != 1)
    {
        logError(std::string(pluginName) + ": attribute '" + field.name + "' must be one number");
        return false;
    }
    switch (field.type)
    {
    case PluginFieldType::kFLOAT32: value = *static_cast<float const*>(field.data); return true;
    case PluginFieldType::kFLOAT64: value = static_cast<float>(*static_cast<double const*>(field.data)); return true;
    case PluginFieldType::kINT32: value = static_cast<float>(*static_cast<int32_t const*>(field.data)); return true;
    case PluginFieldType::kINT64: value = static_cast<float>(*static_cast<int64_t const*>(field.data)); return true;
    default:
        logError(std::string(pluginName) + ": attribute '" + field.name + "' must be a float");
        return false;
    }
}

int32_t toInt32(int64_t value) noexcept
{
    return (value < 0 || value > std::numeric_limits<int32_t>::max()) ? -1 : static_cast<int32_t>(value);
}

void FieldNames::add(char const* name, nvinfer1::PluginFieldType type)
{
    mFields.emplace_back(name, nullptr, type, 1);
    mCollection.nbFields = static_cast<int32_t>(mFields.size());
    mCollection.fields = mFields.data();
}

nvinfer1::PluginFieldCollection const* FieldNames::collection() noexcept
{
    return &mCollection;
}

} // namespace plugin
} // namespace staticprune
