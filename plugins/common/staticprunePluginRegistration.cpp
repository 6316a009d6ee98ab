/*
 * staticprune: static registration of the plugin creators (libstaticprune_plugins.so).
 *
 * Loading the library (dlopen, ctypes.CDLL, trtexec --staticPlugins, DeepStream custom-lib-path, or linking it)
 * registers every creator with TensorRT's global plugin registry, under the namespace "staticprune".
 *
 * This is REGISTER_TENSORRT_PLUGIN with one difference: that macro registers under the empty namespace (it calls
 * registerCreator(creator, "")), while these creators report getPluginNamespace() == "staticprune". Registering
 * with the creator's own namespace keeps the two in agreement, which is what the ONNX parser looks up
 * (plugin_namespace = "staticprune") and what TensorRT's own plugin library does (it sets the creator's namespace
 * to the library namespace before registerCreator(creator, libNamespace)).
 *
 * Do not also load this library through IPluginRegistry::loadLibrary / trtexec --dynamicPlugins: that path
 * registers the creators a second time and fails. Build libstaticprune_plugins_dynamic.so
 * (-DSTATICPRUNE_BUILD_DYNAMIC_PLUGIN_LIB=ON) for dynamic loading and for version-compatible plans.
 */
#include "NvInferRuntime.h"
#include "bipartiteMergePlugin.h"
#include "staticprunePluginUtils.h"
#include "tokenUnmergePlugin.h"

#include <string>

namespace staticprune
{
namespace plugin
{
namespace
{

//! REGISTER_TENSORRT_PLUGIN's PluginRegistrar, registering under the creator's namespace.
template <typename Creator>
class NamespacedPluginRegistrar
{
public:
    NamespacedPluginRegistrar()
    {
        // Messages of the plugins go to libnvinfer's logger (when no ILoggerFinder was handed over).
        setFallbackLoggerGetter(&::getLogger);
        nvinfer1::IPluginRegistry* registry = ::getPluginRegistry();
        if (registry == nullptr || !registry->registerCreator(mCreator, mCreator.getPluginNamespace()))
        {
            logWarning(std::string("could not register plugin creator ") + mCreator.getPluginName() + " version "
                + mCreator.getPluginVersion() + " in namespace " + mCreator.getPluginNamespace()
                + " (already registered?)");
        }
    }

private:
    Creator mCreator{};
};

#define STATICPRUNE_REGISTER_TENSORRT_PLUGIN(name)                                                                 \
    static NamespacedPluginRegistrar<name> pluginRegistrar##name {}

STATICPRUNE_REGISTER_TENSORRT_PLUGIN(BipartiteMergePluginCreator);
STATICPRUNE_REGISTER_TENSORRT_PLUGIN(TokenUnmergePluginCreator);

} // namespace
} // namespace plugin
} // namespace staticprune
