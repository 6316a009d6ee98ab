/*
 * staticprune: definitions shared by the plain C interfaces of the CUDA kernels.
 *
 * The kernel libraries are callable without TensorRT (ctypes, C, C++): every launch function takes device
 * pointers, sizes, a dtype enum and a CUDA stream, and returns a status code. This header needs no CUDA header:
 * `struct CUstream_st*` is exactly the type that cuda_runtime_api.h calls cudaStream_t.
 */
#ifndef STATICPRUNE_KERNEL_API_H
#define STATICPRUNE_KERNEL_API_H

#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32)
#define STATICPRUNE_API __declspec(dllexport)
#else
#define STATICPRUNE_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* A CUDA stream (cudaStream_t). Pass 0 / NULL for the legacy default stream. */
typedef struct CUstream_st* staticprune_stream_t;

/* Element type of feature tensors (x, metric, y). Sizes are always float32, indices always int32. */
typedef enum staticprune_dtype
{
    STATICPRUNE_DTYPE_FLOAT32 = 0,
    STATICPRUNE_DTYPE_FLOAT16 = 1
} staticprune_dtype;

/*
 * Status codes. 0 is success, negative values are argument errors detected before any launch, positive values
 * are cudaError_t codes reported by the CUDA runtime after the launches.
 */
enum
{
    STATICPRUNE_SUCCESS = 0,
    STATICPRUNE_ERROR_INVALID_ARGUMENT = -1,
    STATICPRUNE_ERROR_WORKSPACE_TOO_SMALL = -2,
    STATICPRUNE_ERROR_UNSUPPORTED_DTYPE = -3
};

/* Version of the kernel semantics (bumped whenever an output of any kernel changes). */
STATICPRUNE_API int32_t staticprune_kernels_abi_version(void);

#ifdef __cplusplus
}
#endif

#endif /* STATICPRUNE_KERNEL_API_H */
