/*
 * staticprune: host-only checks of the TensorRT wrappers (no GPU, no libnvinfer needed).
 *
 * Exercises, through the IPluginV3 interfaces, everything that does not launch a kernel: creators and their
 * field names, attribute validation, getFieldsToSerialize -> createPlugin(kRUNTIME) round trips, output shapes
 * through an IExprBuilder (a small constant-folding stand-in for TensorRT's), output data types, format
 * combinations, workspace sizes, onShapeChange checks, clone / attachToContext, and the dynamic-loading entry
 * point getCreators(). Exit status 0 when every check passes; each failure is printed.
 */
#include "bipartiteMergeKernels.h"
#include "bipartiteMergePlugin.h"
#include "tokenUnmergePlugin.h"

#include "NvInferImpl.h"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <deque>
#include <limits>
#include <memory>
#include <string>
#include <vector>

extern "C" nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators);

using namespace nvinfer1;
using namespace staticprune::plugin;

namespace
{

int gFailures = 0;
int gChecks = 0;

void check(bool condition, std::string const& what)
{
    ++gChecks;
    if (!condition)
    {
        ++gFailures;
        std::printf("FAIL: %s\n", what.c_str());
    }
}

// ------------------------------------------------------------------------------------------------ IExprBuilder

constexpr int64_t kUnknown = std::numeric_limits<int64_t>::min();

class DimImpl : public apiv::VDimensionExpr
{
public:
    explicit DimImpl(int64_t value)
        : mValue(value)
    {
    }
    bool isConstant() const override
    {
        return mValue != kUnknown;
    }
    int64_t getConstantValue() const override
    {
        return mValue;
    }
    bool isSizeTensor() const override
    {
        return false;
    }

private:
    int64_t mValue;
};

class Dim : public IDimensionExpr
{
public:
    explicit Dim(int64_t value)
        : mOwned(value)
    {
        mImpl = &mOwned;
    }

private:
    DimImpl mOwned;
};

class BuilderImpl : public apiv::VExprBuilder
{
public:
    IDimensionExpr const* constant(int64_t value) override
    {
        return make(value);
    }
    IDimensionExpr const* operation(
        DimensionOperation op, IDimensionExpr const& first, IDimensionExpr const& second) override
    {
        if (!first.isConstant() || !second.isConstant())
        {
            return make(kUnknown);
        }
        int64_t const a = first.getConstantValue();
        int64_t const b = second.getConstantValue();
        switch (op)
        {
        case DimensionOperation::kSUM: return make(a + b);
        case DimensionOperation::kPROD: return make(a * b);
        case DimensionOperation::kMAX: return make(a > b ? a : b);
        case DimensionOperation::kMIN: return make(a < b ? a : b);
        case DimensionOperation::kSUB: return make(a - b);
        case DimensionOperation::kEQUAL: return make(a == b ? 1 : 0);
        case DimensionOperation::kLESS: return make(a < b ? 1 : 0);
        case DimensionOperation::kFLOOR_DIV:
        {
            int64_t q = a / b;
            if ((a % b != 0) && ((a < 0) != (b < 0)))
            {
                --q;
            }
            return make(q);
        }
        case DimensionOperation::kCEIL_DIV: return make((a + b - 1) / b);
        }
        return nullptr;
    }
    IDimensionExpr const* declareSizeTensor(int32_t, IDimensionExpr const&, IDimensionExpr const&) override
    {
        return nullptr;
    }
    IDimensionExpr const* make(int64_t value)
    {
        mDims.emplace_back(std::make_unique<Dim>(value));
        return mDims.back().get();
    }

private:
    std::deque<std::unique_ptr<Dim>> mDims;
};

class Builder : public IExprBuilder
{
public:
    Builder()
    {
        mImpl = &mOwned;
    }
    IDimensionExpr const* dim(int64_t value)
    {
        return mOwned.make(value);
    }

private:
    BuilderImpl mOwned;
};

DimsExprs exprs(Builder& eb, std::vector<int64_t> const& dims)
{
    DimsExprs e{};
    e.nbDims = static_cast<int32_t>(dims.size());
    for (size_t i = 0; i < dims.size(); ++i)
    {
        e.d[i] = eb.dim(dims[i]);
    }
    return e;
}

int64_t value(IDimensionExpr const* e)
{
    return e != nullptr && e->isConstant() ? e->getConstantValue() : kUnknown;
}

// ------------------------------------------------------------------------------------------------ helpers

struct Fields
{
    std::vector<PluginField> fields;
    std::deque<int32_t> ints;
    std::deque<float> floats;

    Fields& i(char const* name, int32_t v)
    {
        ints.push_back(v);
        fields.emplace_back(name, &ints.back(), PluginFieldType::kINT32, 1);
        return *this;
    }
    Fields& f(char const* name, float v)
    {
        floats.push_back(v);
        fields.emplace_back(name, &floats.back(), PluginFieldType::kFLOAT32, 1);
        return *this;
    }
    PluginFieldCollection collection() const
    {
        return PluginFieldCollection{static_cast<int32_t>(fields.size()), fields.data()};
    }
};

template <typename Plugin>
Plugin* create(IPluginCreatorV3One& creator, Fields const& fields, TensorRTPhase phase = TensorRTPhase::kBUILD)
{
    PluginFieldCollection const fc = fields.collection();
    return static_cast<Plugin*>(creator.createPlugin("node", &fc, phase));
}

DynamicPluginTensorDesc desc(DataType type, std::vector<int64_t> const& dims)
{
    DynamicPluginTensorDesc d{};
    d.desc.type = type;
    d.desc.format = TensorFormat::kLINEAR;
    d.desc.dims.nbDims = static_cast<int32_t>(dims.size());
    for (size_t i = 0; i < dims.size(); ++i)
    {
        d.desc.dims.d[i] = dims[i];
    }
    d.min = d.desc.dims;
    d.max = d.desc.dims;
    d.opt = d.desc.dims;
    return d;
}

std::string metadata(IPluginV3* plugin)
{
    auto* build = static_cast<IPluginV3OneBuild*>(plugin->getCapabilityInterface(PluginCapabilityType::kBUILD));
    char const* text = build->getMetadataString();
    return text == nullptr ? std::string() : std::string(text);
}

//! getFieldsToSerialize -> createPlugin(kRUNTIME) gives an equal plugin.
void checkRoundTrip(IPluginV3* plugin, IPluginCreatorV3One& creator, std::string const& what)
{
    auto* runtime = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    PluginFieldCollection const* serialized = runtime->getFieldsToSerialize();
    check(serialized != nullptr && serialized->nbFields > 0, what + ": getFieldsToSerialize");
    std::unique_ptr<IPluginV3> restored(creator.createPlugin("node", serialized, TensorRTPhase::kRUNTIME));
    check(restored != nullptr, what + ": createPlugin(kRUNTIME) from the serialized fields");
    if (restored)
    {
        check(metadata(restored.get()) == metadata(plugin), what + ": round trip keeps the attributes ("
                + metadata(restored.get()) + " vs " + metadata(plugin) + ")");
    }
    std::unique_ptr<IPluginV3> cloned(plugin->clone());
    check(cloned && metadata(cloned.get()) == metadata(plugin), what + ": clone");
    std::unique_ptr<IPluginV3> attached(runtime->attachToContext(nullptr));
    check(attached && metadata(attached.get()) == metadata(plugin), what + ": attachToContext");
}

// ------------------------------------------------------------------------------------------------ merge

void checkMergeCreator()
{
    BipartiteMergePluginCreator creator;
    check(std::strcmp(creator.getPluginName(), "StaticPruneBipartiteMerge") == 0, "merge: name");
    check(std::strcmp(creator.getPluginVersion(), "1") == 0, "merge: version");
    check(std::strcmp(creator.getPluginNamespace(), "staticprune") == 0, "merge: namespace");
    PluginFieldCollection const* names = creator.getFieldNames();
    std::vector<std::string> expected{"r", "threshold", "capacity", "num_prefix", "inclusive", "absolute_parity",
        "kept_by_score", "threshold_input"};
    check(names != nullptr && names->nbFields == static_cast<int32_t>(expected.size()), "merge: field count");
    for (size_t k = 0; names != nullptr && k < expected.size() && k < static_cast<size_t>(names->nbFields); ++k)
    {
        check(expected[k] == names->fields[k].name, "merge: field " + expected[k]);
    }

    // Invalid attribute sets are refused.
    std::unique_ptr<IPluginV3> bad(create<IPluginV3>(creator, Fields().i("num_prefix", 1)));
    check(bad == nullptr, "merge: neither r nor threshold is refused");
    bad.reset(create<IPluginV3>(creator, Fields().i("r", 4).i("capacity", 10)));
    check(bad == nullptr, "merge: r with capacity is refused");
    bad.reset(create<IPluginV3>(creator, Fields().i("r", 4).i("num_prefix", -1)));
    check(bad == nullptr, "merge: negative num_prefix is refused");
    bad.reset(create<IPluginV3>(creator, Fields().f("threshold", 0.5f).i("inclusive", 2)));
    check(bad == nullptr, "merge: inclusive = 2 is refused");
    bad.reset(create<IPluginV3>(creator, Fields().f("threshold", std::nanf(""))));
    check(bad == nullptr, "merge: NaN threshold is refused");
    Fields wrongType;
    wrongType.floats.push_back(3.f);
    wrongType.fields.emplace_back("r", &wrongType.floats.back(), PluginFieldType::kFLOAT32, 1);
    bad.reset(create<IPluginV3>(creator, wrongType));
    check(bad == nullptr, "merge: a float r is refused");
    bad.reset(create<IPluginV3>(creator, Fields().i("r", 4).i("threshold_input", 1)));
    check(bad == nullptr, "merge: r with threshold_input is refused");
    std::unique_ptr<IPluginV3> ok(create<IPluginV3>(creator, Fields().i("r", 4).i("plugin_extra", 1)));
    check(ok != nullptr, "merge: unknown attributes are ignored (with a warning)");
    ok.reset(create<IPluginV3>(creator, Fields().i("r", 4).i("capacity", 0).f("threshold", 0.9f)));
    check(ok != nullptr, "merge: r with capacity = 0 and an unused threshold is accepted");
    ok.reset(create<IPluginV3>(creator, Fields().i("r", -1).i("threshold_input", 1).i("capacity", 10)));
    check(ok != nullptr, "merge: threshold_input without a threshold attribute is accepted");
}

void checkMergeThresholdInput()
{
    BipartiteMergePluginCreator creator;
    std::unique_ptr<BipartiteMergePlugin> plugin(create<BipartiteMergePlugin>(
        creator, Fields().i("r", -1).i("threshold_input", 1).i("capacity", 300).i("num_prefix", 1)));
    check(plugin != nullptr, "merge threshold input: createPlugin");
    if (!plugin)
    {
        return;
    }
    Builder eb;
    DimsExprs in[5] = {exprs(eb, {2, 513, 768}), exprs(eb, {2, 513, 768}), exprs(eb, {2, 513}),
        exprs(eb, {2, 512}), exprs(eb, {2})};
    DimsExprs out[4] = {};
    check(plugin->getOutputShapes(in, 5, nullptr, 0, out, 4, eb) == 0 && value(out[0].d[1]) == 300,
        "merge threshold input: getOutputShapes with 5 inputs");
    check(plugin->getOutputShapes(in, 4, nullptr, 0, out, 4, eb) != 0,
        "merge threshold input: 4 inputs are refused");
    DimsExprs wrongBatch[5] = {in[0], in[1], in[2], in[3], exprs(eb, {3})};
    check(plugin->getOutputShapes(wrongBatch, 5, nullptr, 0, out, 4, eb) != 0,
        "merge threshold input: a threshold of another batch is refused");
    DynamicPluginTensorDesc io[9];
    for (auto& d : io)
    {
        d = desc(DataType::kFLOAT, {1});
    }
    io[3] = desc(DataType::kINT32, {1});
    check(plugin->supportsFormatCombination(4, io, 5, 4), "merge threshold input: threshold is FP32");
    io[4] = desc(DataType::kHALF, {1});
    check(!plugin->supportsFormatCombination(4, io, 5, 4), "merge threshold input: an FP16 threshold is refused");
    io[5] = desc(DataType::kFLOAT, {1});
    check(plugin->supportsFormatCombination(5, io, 5, 4), "merge threshold input: x' follows x");
    checkRoundTrip(plugin.get(), creator, "merge threshold input");
}

void checkMergeShapes(Fields const& fields, int64_t tokens, int64_t prefix, int64_t expectedOut, std::string const& what)
{
    BipartiteMergePluginCreator creator;
    std::unique_ptr<BipartiteMergePlugin> plugin(create<BipartiteMergePlugin>(creator, fields));
    check(plugin != nullptr, what + ": createPlugin");
    if (!plugin)
    {
        return;
    }
    Builder eb;
    DimsExprs in[4] = {exprs(eb, {2, tokens, 768}), exprs(eb, {2, tokens, 64}), exprs(eb, {2, tokens}),
        exprs(eb, {2, 4096})};
    DimsExprs out[4] = {};
    check(plugin->getOutputShapes(in, 4, nullptr, 0, out, 4, eb) == 0, what + ": getOutputShapes");
    check(out[0].nbDims == 3 && value(out[0].d[0]) == 2 && value(out[0].d[1]) == expectedOut
            && value(out[0].d[2]) == 768,
        what + ": x' shape (T' = " + std::to_string(value(out[0].d[1])) + ", expected " + std::to_string(expectedOut)
            + ")");
    check(out[1].nbDims == 2 && value(out[1].d[1]) == expectedOut, what + ": size' shape");
    check(out[2].nbDims == 2 && value(out[2].d[1]) == 4096, what + ": owner' shape");
    check(out[3].nbDims == 1 && value(out[3].d[0]) == 2, what + ": overflow shape");
    PluginFieldCollection const* serialized = plugin->getFieldsToSerialize();
    int32_t r = -1;
    int32_t capacity = 0;
    for (int32_t k = 0; serialized != nullptr && k < serialized->nbFields; ++k)
    {
        if (std::strcmp(serialized->fields[k].name, "r") == 0)
        {
            r = *static_cast<int32_t const*>(serialized->fields[k].data);
        }
        if (std::strcmp(serialized->fields[k].name, "capacity") == 0)
        {
            capacity = *static_cast<int32_t const*>(serialized->fields[k].data);
        }
    }
    int32_t const viaC = staticprune_bipartite_merge_out_tokens(
        static_cast<int32_t>(tokens), static_cast<int32_t>(prefix), r, capacity);
    check(viaC == expectedOut, what + ": agrees with staticprune_bipartite_merge_out_tokens");

    // Runtime token count: T' stays an expression (not a constant), batch and channels pass through.
    DimsExprs dynIn[4] = {exprs(eb, {2, kUnknown, 768}), exprs(eb, {2, kUnknown, 64}), exprs(eb, {2, kUnknown}),
        exprs(eb, {2, 4096})};
    check(plugin->getOutputShapes(dynIn, 4, nullptr, 0, out, 4, eb) == 0 && value(out[0].d[2]) == 768,
        what + ": getOutputShapes with a runtime token count");

    // Workspace: the C helper's size for the profile maxima.
    DynamicPluginTensorDesc ins[4] = {desc(DataType::kHALF, {2, tokens, 768}), desc(DataType::kHALF, {2, tokens, 64}),
        desc(DataType::kFLOAT, {2, tokens}), desc(DataType::kINT32, {2, 4096})};
    DynamicPluginTensorDesc outs[4] = {desc(DataType::kHALF, {2, expectedOut, 768}),
        desc(DataType::kFLOAT, {2, expectedOut}), desc(DataType::kINT32, {2, 4096}), desc(DataType::kINT32, {2})};
    check(plugin->configurePlugin(ins, 4, outs, 4) == 0, what + ": configurePlugin");
    check(plugin->getWorkspaceSize(ins, 4, outs, 4)
            == staticprune_bipartite_merge_workspace_size(2, static_cast<int32_t>(tokens),
                static_cast<int32_t>(prefix), static_cast<int32_t>(expectedOut)),
        what + ": getWorkspaceSize");
    PluginTensorDesc inDesc[4] = {ins[0].desc, ins[1].desc, ins[2].desc, ins[3].desc};
    PluginTensorDesc outDesc[4] = {outs[0].desc, outs[1].desc, outs[2].desc, outs[3].desc};
    check(plugin->onShapeChange(inDesc, 4, outDesc, 4) == 0, what + ": onShapeChange");
    outDesc[0].dims.d[1] += 1;
    check(plugin->onShapeChange(inDesc, 4, outDesc, 4) != 0, what + ": onShapeChange refuses a wrong T'");
    checkRoundTrip(plugin.get(), creator, what);
}

void checkMergeFormats()
{
    BipartiteMergePluginCreator creator;
    std::unique_ptr<BipartiteMergePlugin> plugin(create<BipartiteMergePlugin>(creator, Fields().i("r", 8)));
    DataType const types[] = {DataType::kFLOAT, DataType::kHALF, DataType::kINT32, DataType::kINT8, DataType::kBF16};
    auto supported = [&](int32_t pos, DataType type, DataType xType) {
        DynamicPluginTensorDesc io[8];
        for (auto& d : io)
        {
            d = desc(DataType::kFLOAT, {1});
        }
        io[0] = desc(xType, {1, 9, 4});
        io[pos] = desc(type, {1});
        return plugin->supportsFormatCombination(pos, io, 4, 4);
    };
    for (DataType t : types)
    {
        bool const feature = t == DataType::kFLOAT || t == DataType::kHALF;
        check(supported(0, t, t) == feature, "merge: x types");
        check(supported(1, t, DataType::kHALF) == feature, "merge: metric types");
        check(supported(2, t, DataType::kHALF) == (t == DataType::kFLOAT), "merge: size is FP32");
        check(supported(3, t, DataType::kHALF) == (t == DataType::kINT32), "merge: owner is INT32");
        check(supported(4, t, DataType::kHALF) == (t == DataType::kHALF), "merge: x' follows x (fp16)");
        check(supported(4, t, DataType::kFLOAT) == (t == DataType::kFLOAT), "merge: x' follows x (fp32)");
        check(supported(5, t, DataType::kHALF) == (t == DataType::kFLOAT), "merge: size' is FP32");
        check(supported(6, t, DataType::kHALF) == (t == DataType::kINT32), "merge: owner' is INT32");
        check(supported(7, t, DataType::kHALF) == (t == DataType::kINT32), "merge: overflow is INT32");
    }
    DynamicPluginTensorDesc io[8];
    for (auto& d : io)
    {
        d = desc(DataType::kFLOAT, {1});
    }
    io[0].desc.format = TensorFormat::kHWC8;
    check(!plugin->supportsFormatCombination(0, io, 4, 4), "merge: only linear formats");

    DataType outTypes[4];
    DataType const inTypes[4] = {DataType::kHALF, DataType::kFLOAT, DataType::kFLOAT, DataType::kINT32};
    check(plugin->getOutputDataTypes(outTypes, 4, inTypes, 4) == 0 && outTypes[0] == DataType::kHALF
            && outTypes[1] == DataType::kFLOAT && outTypes[2] == DataType::kINT32 && outTypes[3] == DataType::kINT32,
        "merge: output data types");
    check(plugin->getNbOutputs() == 4, "merge: four outputs");
    for (auto type : {PluginCapabilityType::kCORE, PluginCapabilityType::kBUILD, PluginCapabilityType::kRUNTIME})
    {
        check(plugin->getCapabilityInterface(type) != nullptr, "merge: capability interfaces");
    }
    auto* core = static_cast<IPluginV3OneCore*>(plugin->getCapabilityInterface(PluginCapabilityType::kCORE));
    check(std::strcmp(core->getPluginNamespace(), creator.getPluginNamespace()) == 0
            && std::strcmp(core->getPluginName(), creator.getPluginName()) == 0
            && std::strcmp(core->getPluginVersion(), creator.getPluginVersion()) == 0,
        "merge: plugin and creator agree on name, version and namespace");
}

// ------------------------------------------------------------------------------------------------ unmerge

void checkUnmerge()
{
    TokenUnmergePluginCreator creator;
    check(std::strcmp(creator.getPluginName(), "StaticPruneTokenUnmerge") == 0, "unmerge: name");
    check(std::strcmp(creator.getPluginVersion(), "1") == 0, "unmerge: version");
    check(std::strcmp(creator.getPluginNamespace(), "staticprune") == 0, "unmerge: namespace");
    check(creator.getFieldNames()->nbFields == 3, "unmerge: field count");
    std::unique_ptr<IPluginV3> bad(create<IPluginV3>(creator, Fields().i("to_feature_map", 1).i("grid_h", 8)));
    check(bad == nullptr, "unmerge: feature map without grid_w is refused");
    bad.reset(create<IPluginV3>(creator, Fields().i("to_feature_map", 2)));
    check(bad == nullptr, "unmerge: to_feature_map = 2 is refused");

    Builder eb;
    DimsExprs in[2] = {exprs(eb, {2, 1500, 768}), exprs(eb, {2, 4096})};
    DimsExprs out[1] = {};
    std::unique_ptr<TokenUnmergePlugin> tokens(create<TokenUnmergePlugin>(creator, Fields()));
    check(tokens != nullptr && tokens->getOutputShapes(in, 2, nullptr, 0, out, 1, eb) == 0 && out[0].nbDims == 3
            && value(out[0].d[0]) == 2 && value(out[0].d[1]) == 4096 && value(out[0].d[2]) == 768,
        "unmerge: token output (B, N0, D)");
    std::unique_ptr<TokenUnmergePlugin> map(create<TokenUnmergePlugin>(
        creator, Fields().i("to_feature_map", 1).i("grid_h", 64).i("grid_w", 64)));
    check(map != nullptr && map->getOutputShapes(in, 2, nullptr, 0, out, 1, eb) == 0 && out[0].nbDims == 4
            && value(out[0].d[0]) == 2 && value(out[0].d[1]) == 768 && value(out[0].d[2]) == 64
            && value(out[0].d[3]) == 64,
        "unmerge: feature-map output (B, D, H, W)");
    std::unique_ptr<TokenUnmergePlugin> wrongGrid(create<TokenUnmergePlugin>(
        creator, Fields().i("to_feature_map", 1).i("grid_h", 60).i("grid_w", 64)));
    check(wrongGrid != nullptr && wrongGrid->getOutputShapes(in, 2, nullptr, 0, out, 1, eb) != 0,
        "unmerge: grid_h * grid_w != N0 is refused");

    auto supported = [&](TokenUnmergePlugin& p, int32_t pos, DataType type, DataType xType) {
        DynamicPluginTensorDesc io[3] = {desc(xType, {1}), desc(DataType::kINT32, {1}), desc(DataType::kFLOAT, {1})};
        io[pos] = desc(type, {1});
        return p.supportsFormatCombination(pos, io, 2, 1);
    };
    if (map)
    {
        check(supported(*map, 0, DataType::kHALF, DataType::kHALF) && supported(*map, 0, DataType::kFLOAT,
                  DataType::kFLOAT) && !supported(*map, 0, DataType::kINT32, DataType::kINT32),
            "unmerge: x types");
        check(supported(*map, 1, DataType::kINT32, DataType::kHALF) && !supported(*map, 1, DataType::kINT64,
                  DataType::kHALF), "unmerge: owner is INT32");
        check(supported(*map, 2, DataType::kHALF, DataType::kHALF) && !supported(*map, 2, DataType::kFLOAT,
                  DataType::kHALF), "unmerge: y follows x");
        DynamicPluginTensorDesc ins[2] = {desc(DataType::kHALF, {2, 1500, 768}), desc(DataType::kINT32, {2, 4096})};
        DynamicPluginTensorDesc outs[1] = {desc(DataType::kHALF, {2, 768, 64, 64})};
        check(map->configurePlugin(ins, 2, outs, 1) == 0 && map->getWorkspaceSize(ins, 2, outs, 1) == 0,
            "unmerge: configurePlugin, no workspace");
        checkRoundTrip(map.get(), creator, "unmerge feature map");
    }
    if (tokens)
    {
        checkRoundTrip(tokens.get(), creator, "unmerge tokens");
    }
}

void checkDynamicEntry()
{
    int32_t count = 0;
    IPluginCreatorInterface* const* creators = getCreators(count);
    check(count == 2 && creators != nullptr, "getCreators: two creators");
    for (int32_t k = 0; creators != nullptr && k < count; ++k)
    {
        InterfaceInfo const info = creators[k]->getInterfaceInfo();
        check(std::strcmp(info.kind, "PLUGIN CREATOR_V3ONE") == 0, "getCreators: IPluginCreatorV3One");
        auto* creator = static_cast<IPluginCreatorV3One*>(creators[k]);
        check(std::strcmp(creator->getPluginNamespace(), "staticprune") == 0, "getCreators: namespace");
    }
}

} // namespace

int main()
{
    checkMergeCreator();
    checkMergeThresholdInput();
    // Fixed r: T' = T - min(r, floor((T - P) / 2)).
    checkMergeShapes(Fields().i("r", 512).i("num_prefix", 1), 4097, 1, 3585, "merge r=512");
    checkMergeShapes(Fields().i("r", 5000).i("num_prefix", 1), 4097, 1, 2049, "merge r clamped");
    checkMergeShapes(Fields().i("r", 0), 100, 0, 100, "merge r=0");
    // Threshold: T' = clamp(capacity, T - floor((T - P) / 2), T), or T without a capacity.
    checkMergeShapes(Fields().f("threshold", 0.9f).i("capacity", 3000).i("num_prefix", 1), 4097, 1, 3000,
        "merge threshold + capacity");
    checkMergeShapes(Fields().f("threshold", 0.9f).i("capacity", 1000).i("num_prefix", 1), 4097, 1, 2049,
        "merge capacity clamped up");
    checkMergeShapes(Fields().f("threshold", 0.9f).i("num_prefix", 1), 4097, 1, 4097, "merge threshold, no cap");
    checkMergeShapes(Fields().f("threshold", 0.5f).i("capacity", 70).i("inclusive", 1).i("absolute_parity", 1)
                         .i("kept_by_score", 1),
        129, 0, 70, "merge ToMe variant");
    checkMergeFormats();
    checkUnmerge();
    checkDynamicEntry();
    std::printf("%d checks, %d failures\n", gChecks, gFailures);
    return gFailures == 0 ? 0 : 1;
}
