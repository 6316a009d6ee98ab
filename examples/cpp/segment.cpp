// Segment one image with a staticprune TensorRT engine (TensorRT 10.x, enqueueV3).
//
//   segment ENGINE IMAGE.ppm OUT.pgm [--plugins libstaticprune_plugins.so] [--mean r,g,b --std r,g,b]
//
// The plugin library is dlopen'ed before the engine is deserialised: its REGISTER_TENSORRT_PLUGIN creators
// register themselves. The image is a binary PPM (P6) of exactly the engine's input size (convert with e.g.
// `convert in.jpg -resize 1024x1024! in.ppm`); it is normalised with the model's mean/std (the engine's JSON
// sidecar lists them) and the int32 `labels` output (export with --labels) is written as an 8-bit PGM.
#include <NvInfer.h>
#include <cuda_runtime_api.h>
#include <dlfcn.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "trt_example_common.h"

namespace {

using namespace staticprune_example;

void parseTriple(const char* text, float out[3]) {
  if (std::sscanf(text, "%f,%f,%f", &out[0], &out[1], &out[2]) != 3) {
    std::cerr << "expected three comma-separated numbers, got " << text << "\n";
    std::exit(2);
  }
}

size_t volume(const nvinfer1::Dims& d) {
  size_t v = 1;
  for (int i = 0; i < d.nbDims; ++i) v *= static_cast<size_t>(d.d[i]);
  return v;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 4) {
    std::cerr << "usage: segment ENGINE IMAGE.ppm OUT.pgm [--plugins LIB] [--mean r,g,b --std r,g,b]\n";
    return 2;
  }
  std::string enginePath = argv[1], imagePath = argv[2], outPath = argv[3];
  float mean[3] = {0.5f, 0.5f, 0.5f}, stdv[3] = {0.5f, 0.5f, 0.5f};
  for (int i = 4; i + 1 < argc; i += 2) {
    std::string key = argv[i];
    if (key == "--plugins") {
      if (!dlopen(argv[i + 1], RTLD_NOW | RTLD_GLOBAL)) {
        std::cerr << "cannot load plugin library: " << dlerror() << "\n";
        return 2;
      }
    } else if (key == "--mean") {
      parseTriple(argv[i + 1], mean);
    } else if (key == "--std") {
      parseTriple(argv[i + 1], stdv);
    } else {
      std::cerr << "unknown option " << key << "\n";
      return 2;
    }
  }

  Logger logger;
  std::unique_ptr<nvinfer1::IRuntime> runtime(nvinfer1::createInferRuntime(logger));
  std::vector<char> plan = readFile(enginePath);
  std::unique_ptr<nvinfer1::ICudaEngine> engine(runtime->deserializeCudaEngine(plan.data(), plan.size()));
  if (!engine) {
    std::cerr << "cannot deserialise " << enginePath << " (TensorRT version, GPU or missing plugin library?)\n";
    return 1;
  }
  std::unique_ptr<nvinfer1::IExecutionContext> context(engine->createExecutionContext());

  // One input ("image", 1x3xHxW float32); outputs include "labels" (1xHxW int32).
  const char* inputName = nullptr;
  std::vector<void*> buffers;
  void* labelsDevice = nullptr;
  nvinfer1::Dims inDims{}, labelDims{};
  for (int i = 0; i < engine->getNbIOTensors(); ++i) {
    const char* name = engine->getIOTensorName(i);
    nvinfer1::Dims dims = engine->getTensorShape(name);
    size_t bytes = volume(dims) * 4;  // float32 and int32 tensors only in staticprune graphs
    void* ptr = nullptr;
    CHECK_CUDA(cudaMalloc(&ptr, bytes));
    buffers.push_back(ptr);
    context->setTensorAddress(name, ptr);
    if (engine->getTensorIOMode(name) == nvinfer1::TensorIOMode::kINPUT) {
      inputName = name;
      inDims = dims;
    } else if (std::strcmp(name, "labels") == 0) {
      labelsDevice = ptr;
      labelDims = dims;
    }
  }
  if (!inputName || !labelsDevice || inDims.nbDims != 4 || inDims.d[0] != 1) {
    std::cerr << "expected a batch-1 engine with an image input and a 'labels' output (export with --labels)\n";
    return 2;
  }
  const int H = static_cast<int>(inDims.d[2]), W = static_cast<int>(inDims.d[3]);
  int width = 0, height = 0;
  std::vector<uint8_t> rgb = readPpm(imagePath, width, height);
  if (width != W || height != H) {
    std::cerr << "image is " << width << "x" << height << ", the engine wants " << W << "x" << H << "\n";
    return 2;
  }
  std::vector<float> chw(static_cast<size_t>(3) * H * W);
  for (int c = 0; c < 3; ++c)
    for (int p = 0; p < H * W; ++p)
      chw[static_cast<size_t>(c) * H * W + p] = (rgb[static_cast<size_t>(p) * 3 + c] / 255.0f - mean[c]) / stdv[c];

  cudaStream_t stream;
  CHECK_CUDA(cudaStreamCreate(&stream));
  void* inputDevice = nullptr;
  for (int i = 0; i < engine->getNbIOTensors(); ++i)
    if (std::strcmp(engine->getIOTensorName(i), inputName) == 0) inputDevice = buffers[i];
  CHECK_CUDA(cudaMemcpyAsync(inputDevice, chw.data(), chw.size() * 4, cudaMemcpyHostToDevice, stream));
  if (!context->enqueueV3(stream)) {
    std::cerr << "enqueueV3 failed\n";
    return 1;
  }
  std::vector<int32_t> labels(volume(labelDims));
  CHECK_CUDA(cudaMemcpyAsync(labels.data(), labelsDevice, labels.size() * 4, cudaMemcpyDeviceToHost, stream));
  CHECK_CUDA(cudaStreamSynchronize(stream));

  std::ofstream out(outPath, std::ios::binary);
  out << "P5\n" << W << " " << H << "\n255\n";
  for (int32_t v : labels) out.put(static_cast<char>(v < 0 ? 0 : (v > 255 ? 255 : v)));
  std::cout << "wrote " << outPath << " (" << W << "x" << H << " class ids)\n";
  for (void* p : buffers) CHECK_CUDA(cudaFree(p));
  CHECK_CUDA(cudaStreamDestroy(stream));
  return 0;
}
