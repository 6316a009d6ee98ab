/*
 * staticprune: entry points of TensorRT's plugin shared-library protocol (libstaticprune_plugins_dynamic.so).
 *
 * IPluginRegistry::loadLibrary (Python: trt.get_plugin_registry().load_library, trtexec --dynamicPlugins,
 * --setPluginsToSerialize for plans that embed the library) calls setLoggerFinder() and getCreators(), and
 * registers each creator under the namespace the creator reports ("staticprune"). This library has no static
 * registration, so it can be loaded that way; libstaticprune_plugins.so is the statically registering variant.
 * The entry points are those of TensorRT 10.3's own version-compatible plugin library (plugin/common/vfcCommon):
 * getCreators + setLoggerFinder. The deprecated getPluginCreators name is not exported: older TensorRT versions
 * read it as a list of IPluginV2 creators.
 */
#include "NvInferRuntime.h"
#include "bipartiteMergePlugin.h"
#include "staticprunePluginUtils.h"
#include "tokenUnmergePlugin.h"

#if defined(_WIN32)
#define STATICPRUNE_PLUGIN_EXPORT __declspec(dllexport)
#else
#define STATICPRUNE_PLUGIN_EXPORT __attribute__((visibility("default")))
#endif

extern "C" STATICPRUNE_PLUGIN_EXPORT void setLoggerFinder(nvinfer1::ILoggerFinder* finder)
{
    staticprune::plugin::setLoggerFinder(finder);
}

extern "C" STATICPRUNE_PLUGIN_EXPORT nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
{
    static staticprune::plugin::BipartiteMergePluginCreator sBipartiteMergeCreator;
    static staticprune::plugin::TokenUnmergePluginCreator sTokenUnmergeCreator;
    static nvinfer1::IPluginCreatorInterface* const kCreators[] = {&sBipartiteMergeCreator, &sTokenUnmergeCreator};
    nbCreators = static_cast<int32_t>(sizeof(kCreators) / sizeof(kCreators[0]));
    return kCreators;
}
