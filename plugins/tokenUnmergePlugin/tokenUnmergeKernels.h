/*
 * staticprune: token unmerge (owner gather back to the original token grid), plain C interface.
 *
 * The semantics are specified in README.md next to this file. Dense row-major device arrays:
 *   x     (batch, tokens, dim)           float32 or float16 (dtype)
 *   owner (batch, num_orig)              int32 slot of every original token
 *   y     (batch, num_orig, dim)         to_feature_map == 0
 *         (batch, dim, grid_h, grid_w)   to_feature_map == 1, with grid_h * grid_w == num_orig
 * y has the dtype of x. An owner outside [0, tokens) gives a zero row.
 */
#ifndef STATICPRUNE_TOKEN_UNMERGE_KERNELS_H
#define STATICPRUNE_TOKEN_UNMERGE_KERNELS_H

#include "staticpruneKernelApi.h"

#ifdef __cplusplus
extern "C" {
#endif

/*
 * Enqueue the gather on `stream`. Requirements: batch in [0, 65535], tokens >= 0, dim >= 1 (dim <= 2097120 with
 * to_feature_map), num_orig >= 0; with to_feature_map, grid_h >= 1, grid_w >= 1 and grid_h * grid_w == num_orig.
 * x and y must not overlap. Returns STATICPRUNE_SUCCESS, a negative STATICPRUNE_ERROR_* code (nothing was
 * launched) or a positive cudaError_t code.
 */
STATICPRUNE_API int32_t staticprune_token_unmerge(void const* x, int32_t dtype, int32_t const* owner, void* y,
    int32_t batch, int32_t tokens, int32_t dim, int32_t num_orig, int32_t to_feature_map, int32_t grid_h,
    int32_t grid_w, staticprune_stream_t stream);

#ifdef __cplusplus
}
#endif

#endif /* STATICPRUNE_TOKEN_UNMERGE_KERNELS_H */
