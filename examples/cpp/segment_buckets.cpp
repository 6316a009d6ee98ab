// Segment one image with a staticprune capacity-bucket pipeline built into TensorRT engines (TensorRT 10.x).
//
//   segment_buckets DIR IMAGE.ppm OUT.pgm [--plugins libstaticprune_plugins.so]
//
// DIR is a folder written by `staticprune export --buckets ... -o DIR` and built by `staticprune build DIR`, which
// writes DIR/pipeline.engines.txt (parsed by bucket_manifest.h; grammar in docs/buckets.md). Every engine listed
// there is deserialised once. Per image: the prefix engine (stage 0) runs; the count of the reduction point
// (`<count><suffix>`, e.g. `count_next`, int32 per image) is copied to the host; the smallest bucket of the next
// stage that holds the largest count runs on the state the previous stage left on the GPU (input `tokens` reads
// the previous stage's output `tokens_next`, and so on); repeated at every point. All engines of one stage write
// into the same output buffers (their shapes are equal: each stage pads its state to every patch), so every
// binding is set once at load time and a dispatch is only the choice of which context to enqueue.
//
// The image is a binary PPM (P6) of the pipeline's input size, normalised with the mean/std of the manifest (or
// fed as 0..255 for a --raw-input export); the int32 `labels` output (export with --labels) is written as an
// 8-bit PGM. The bucket chosen at each point is printed.
#include <NvInfer.h>
#include <cuda_runtime_api.h>
#include <dlfcn.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "bucket_manifest.h"
#include "trt_example_common.h"

namespace {

using namespace staticprune_example;

size_t elementBytes(nvinfer1::DataType t) {
  switch (t) {
    case nvinfer1::DataType::kHALF:
    case nvinfer1::DataType::kBF16:
      return 2;
    case nvinfer1::DataType::kINT8:
    case nvinfer1::DataType::kBOOL:
    case nvinfer1::DataType::kUINT8:
    case nvinfer1::DataType::kFP8:
      return 1;
    case nvinfer1::DataType::kINT64:
      return 8;
    default:  // kFLOAT, kINT32 (kINT4 is a weight-only type, never an I/O tensor here)
      return 4;
  }
}

size_t tensorBytes(const nvinfer1::ICudaEngine& engine, const char* name) {
  nvinfer1::Dims d = engine.getTensorShape(name);
  size_t v = 1;
  for (int i = 0; i < d.nbDims; ++i) {
    if (d.d[i] < 0) fail(std::string("tensor '") + name + "' has a dynamic shape; staticprune engines are static");
    v *= static_cast<size_t>(d.d[i]);
  }
  return v * elementBytes(engine.getTensorDataType(name));
}

struct DeviceBuffer {
  void* ptr = nullptr;
  size_t bytes = 0;
};

struct LoadedEngine {
  BucketEngine entry;
  std::unique_ptr<nvinfer1::ICudaEngine> engine;
  std::unique_ptr<nvinfer1::IExecutionContext> context;
};

struct Stage {
  std::vector<LoadedEngine> engines;          // capacities increasing (stage 0: the prefix alone)
  std::map<std::string, DeviceBuffer> outputs;  // shared by every engine of the stage
};

}  // namespace

int main(int argc, char** argv) {
  if (argc < 4) fail("usage: segment_buckets DIR IMAGE.ppm OUT.pgm [--plugins LIB]");
  const std::string dir = argv[1], imagePath = argv[2], outPath = argv[3];
  for (int i = 4; i < argc; i += 2) {
    if (std::string(argv[i]) != "--plugins" || i + 1 >= argc) fail(std::string("unknown option ") + argv[i]);
    if (!dlopen(argv[i + 1], RTLD_NOW | RTLD_GLOBAL)) fail(std::string("cannot load plugin library: ") + dlerror());
  }

  const std::string manifestPath = dir + "/pipeline.engines.txt";
  std::ifstream manifestFile(manifestPath);
  if (!manifestFile) fail("cannot read " + manifestPath + "; build the pipeline with 'staticprune build " + dir + "'");
  BucketManifest manifest;
  std::string problem = parseBucketManifest(manifestFile, manifest);
  if (!problem.empty()) fail(manifestPath + ": " + problem);
  if (manifest.batch != 1) fail("this example feeds one image; the pipeline was exported with batch " +
                                std::to_string(manifest.batch));
  if (std::find(manifest.outputs.begin(), manifest.outputs.end(), "labels") == manifest.outputs.end())
    fail("the pipeline has no 'labels' output; export it with --labels");

  Logger logger;
  std::unique_ptr<nvinfer1::IRuntime> runtime(nvinfer1::createInferRuntime(logger));
  std::vector<Stage> stages(manifest.stages.size());
  std::vector<DeviceBuffer> allocations;
  DeviceBuffer image;
  for (size_t k = 0; k < stages.size(); ++k) {
    Stage& stage = stages[k];
    for (const BucketEngine& entry : manifest.stages[k]) {
      const std::string path = dir + "/" + entry.engine;
      std::vector<char> plan = readFile(path);
      LoadedEngine loaded{entry, nullptr, nullptr};
      loaded.engine.reset(runtime->deserializeCudaEngine(plan.data(), plan.size()));
      if (!loaded.engine) fail("cannot deserialise " + path + " (TensorRT version, GPU or missing plugin library?)", 1);
      loaded.context.reset(loaded.engine->createExecutionContext());
      stage.engines.push_back(std::move(loaded));
    }
    // Outputs: one buffer per name for the whole stage, as large as the largest engine's tensor of that name.
    for (const LoadedEngine& e : stage.engines)
      for (int i = 0; i < e.engine->getNbIOTensors(); ++i) {
        const char* name = e.engine->getIOTensorName(i);
        if (e.engine->getTensorIOMode(name) != nvinfer1::TensorIOMode::kOUTPUT) continue;
        DeviceBuffer& b = stage.outputs[name];
        b.bytes = std::max(b.bytes, tensorBytes(*e.engine, name));
      }
    for (auto& named : stage.outputs) {
      CHECK_CUDA(cudaMalloc(&named.second.ptr, named.second.bytes));
      allocations.push_back(named.second);
    }
    for (LoadedEngine& e : stage.engines)
      for (int i = 0; i < e.engine->getNbIOTensors(); ++i) {
        const char* name = e.engine->getIOTensorName(i);
        void* address = nullptr;
        if (e.engine->getTensorIOMode(name) == nvinfer1::TensorIOMode::kOUTPUT) {
          address = stage.outputs[name].ptr;
        } else if (k == 0) {  // the prefix reads the image
          if (manifest.input != name)
            fail(e.entry.engine + ": input '" + name + "' is not the image input '" + manifest.input + "'");
          if (!image.ptr) {
            image.bytes = tensorBytes(*e.engine, name);
            CHECK_CUDA(cudaMalloc(&image.ptr, image.bytes));
            allocations.push_back(image);
          }
          address = image.ptr;
        } else {  // a state input reads the previous stage's `<name><suffix>` output, where it already is
          auto handoff = stages[k - 1].outputs.find(name + manifest.suffix);
          if (handoff == stages[k - 1].outputs.end() || handoff->second.bytes != tensorBytes(*e.engine, name))
            fail(e.entry.engine + ": input '" + name + "' has no output '" + name + manifest.suffix +
                 "' of the same size in stage " + std::to_string(k - 1));
          address = handoff->second.ptr;
        }
        if (!e.context->setTensorAddress(name, address)) fail(e.entry.engine + ": cannot bind '" + name + "'", 1);
      }
  }
  const std::string countName = manifest.count + manifest.suffix;
  for (size_t k = 0; k + 1 < stages.size(); ++k)
    if (!stages[k].outputs.count(countName)) fail("stage " + std::to_string(k) + " has no output '" + countName + "'");
  const DeviceBuffer labelsDevice = stages.back().outputs["labels"];
  if (labelsDevice.bytes != static_cast<size_t>(manifest.height) * manifest.width * 4)
    fail("the last stage's 'labels' output is not 1xHxW int32");

  int width = 0, height = 0;
  std::vector<uint8_t> rgb = readPpm(imagePath, width, height);
  const int H = manifest.height, W = manifest.width;
  if (width != W || height != H)
    fail("image is " + std::to_string(width) + "x" + std::to_string(height) + ", the pipeline wants " +
         std::to_string(W) + "x" + std::to_string(H));
  if (image.bytes != static_cast<size_t>(3) * H * W * 4) fail("the prefix engine's input is not 1x3xHxW float32");
  std::vector<float> chw(static_cast<size_t>(3) * H * W);
  for (int c = 0; c < 3; ++c)
    for (int p = 0; p < H * W; ++p) {
      const float byte = rgb[static_cast<size_t>(p) * 3 + c];
      chw[static_cast<size_t>(c) * H * W + p] =
          manifest.rawInput ? byte : (byte / 255.0f - manifest.mean[c]) / manifest.stdv[c];
    }

  cudaStream_t stream;
  CHECK_CUDA(cudaStreamCreate(&stream));
  CHECK_CUDA(cudaMemcpyAsync(image.ptr, chw.data(), image.bytes, cudaMemcpyHostToDevice, stream));
  std::vector<int32_t> counts(static_cast<size_t>(manifest.batch));
  for (size_t k = 0; k < stages.size(); ++k) {
    const LoadedEngine* chosen = &stages[k].engines.front();
    if (k > 0) {  // the count the previous stage handed over decides the bucket
      CHECK_CUDA(cudaMemcpyAsync(counts.data(), stages[k - 1].outputs[countName].ptr, counts.size() * 4,
                                 cudaMemcpyDeviceToHost, stream));
      CHECK_CUDA(cudaStreamSynchronize(stream));
      const int largest = *std::max_element(counts.begin(), counts.end());
      const BucketEngine& bucket = pickBucket(manifest.stages[k], largest);
      for (const LoadedEngine& e : stages[k].engines)
        if (e.entry.capacity == bucket.capacity) chosen = &e;
      std::cout << "point " << manifest.points[k - 1] << ": " << largest << " tokens -> bucket " << bucket.capacity
                << (largest > bucket.capacity ? " (overflow: more than the largest bucket)" : "") << "\n";
    }
    if (!chosen->context->enqueueV3(stream)) fail("enqueueV3 failed on " + chosen->entry.engine, 1);
  }
  std::vector<int32_t> labels(labelsDevice.bytes / 4);
  CHECK_CUDA(cudaMemcpyAsync(labels.data(), labelsDevice.ptr, labelsDevice.bytes, cudaMemcpyDeviceToHost, stream));
  CHECK_CUDA(cudaStreamSynchronize(stream));

  std::ofstream out(outPath, std::ios::binary);
  out << "P5\n" << W << " " << H << "\n255\n";
  for (int32_t v : labels) out.put(static_cast<char>(v < 0 ? 0 : (v > 255 ? 255 : v)));
  std::cout << "wrote " << outPath << " (" << W << "x" << H << " class ids)\n";
  for (const DeviceBuffer& b : allocations) CHECK_CUDA(cudaFree(b.ptr));
  CHECK_CUDA(cudaStreamDestroy(stream));
  return 0;
}
