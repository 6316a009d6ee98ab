// Helpers shared by the staticprune TensorRT examples (segment.cpp, segment_buckets.cpp).
#pragma once

#include <NvInfer.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <iterator>
#include <string>
#include <vector>

namespace staticprune_example {

class Logger : public nvinfer1::ILogger {
  void log(Severity severity, const char* msg) noexcept override {
    if (severity <= Severity::kWARNING) std::cerr << "[TensorRT] " << msg << "\n";
  }
};

#define CHECK_CUDA(call)                                                                   \
  do {                                                                                     \
    cudaError_t status_ = (call);                                                          \
    if (status_ != cudaSuccess) {                                                          \
      std::cerr << "CUDA error " << cudaGetErrorString(status_) << " at " << #call << "\n"; \
      std::exit(1);                                                                        \
    }                                                                                      \
  } while (0)

[[noreturn]] inline void fail(const std::string& message, int code = 2) {
  std::cerr << message << "\n";
  std::exit(code);
}

inline std::vector<char> readFile(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) fail("cannot read " + path);
  return std::vector<char>((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

// Binary PPM (P6, maxval 255) -> interleaved RGB bytes.
inline std::vector<uint8_t> readPpm(const std::string& path, int& width, int& height) {
  std::ifstream f(path, std::ios::binary);
  std::string magic;
  int maxval = 0;
  f >> magic >> width >> height >> maxval;
  f.get();
  if (!f || magic != "P6" || maxval != 255) fail(path + " is not a binary 8-bit PPM (P6)");
  std::vector<uint8_t> rgb(static_cast<size_t>(width) * height * 3);
  f.read(reinterpret_cast<char*>(rgb.data()), static_cast<std::streamsize>(rgb.size()));
  if (!f) fail(path + " is shorter than its header says");
  return rgb;
}

}  // namespace staticprune_example
