/*
 * staticprune: the CUDA subset the kernels use, and small device helpers.
 *
 * Compiled by nvcc this includes the CUDA headers. With STATICPRUNE_CPU_EMULATION defined (a host C++ compiler,
 * `-x c++`), the same kernel sources run on the CPU through staticpruneCpuEmulation.h, so that their logic is
 * tested on machines without a GPU. Kernels therefore use only: __global__/__device__ functions, static
 * __shared__ arrays, __syncthreads(), integer atomicAdd, fmaf, and __half conversions; no warp intrinsics and
 * no dynamic shared memory.
 */
#ifndef STATICPRUNE_CUDA_CUH
#define STATICPRUNE_CUDA_CUH

#if defined(STATICPRUNE_CPU_EMULATION)
#include "staticpruneCpuEmulation.h"
#else
#include <cuda_fp16.h>
#include <cuda_runtime.h>
//! Kernel launch: STATICPRUNE_LAUNCH(kernel, grid, block, stream)(arguments...).
#define STATICPRUNE_LAUNCH(kernel, grid, block, stream) kernel<<<(grid), (block), 0, (stream)>>>
#endif

#include <cstddef>
#include <cstdint>

namespace staticprune
{
namespace kernels
{

template <typename T>
__device__ __forceinline__ float toFloat(T v);

template <>
__device__ __forceinline__ float toFloat<float>(float v)
{
    return v;
}

template <>
__device__ __forceinline__ float toFloat<__half>(__half v)
{
    return __half2float(v);
}

template <typename T>
__device__ __forceinline__ T fromFloat(float v);

template <>
__device__ __forceinline__ float fromFloat<float>(float v)
{
    return v;
}

template <>
__device__ __forceinline__ __half fromFloat<__half>(float v)
{
    return __float2half_rn(v);
}

inline int64_t ceilDiv(int64_t a, int64_t b)
{
    return (a + b - 1) / b;
}

//! Round a byte count up to the alignment of every workspace sub-array.
inline size_t alignWorkspace(size_t bytes)
{
    constexpr size_t kAlign = 256;
    return (bytes + kAlign - 1) / kAlign * kAlign;
}

//! Map the status of the CUDA runtime after a sequence of launches to the C interface's status code.
inline int32_t launchStatus()
{
    cudaError_t const err = cudaGetLastError();
    return err == cudaSuccess ? 0 : static_cast<int32_t>(err);
}

} // namespace kernels
} // namespace staticprune

#endif // STATICPRUNE_CUDA_CUH
