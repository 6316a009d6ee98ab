/*
 * staticprune: bipartite soft matching + size-weighted merge (ToMe), plain C interface.
 *
 * The semantics are specified in README.md next to this file; this header is the calling convention.
 * All tensors are dense row-major device arrays:
 *   x        (batch, tokens, dim)          float32 or float16 (x_dtype)
 *   metric   (batch, tokens, metric_dim)   float32 or float16 (metric_dtype), e.g. L2-normalised keys
 *   size     (batch, tokens)               float32, 0 marks a padding slot
 *   owner    (batch, num_orig)             int32, slot of every original token
 *   x_out    (batch, out_tokens, dim)      same dtype as x
 *   size_out (batch, out_tokens)           float32
 *   owner_out(batch, num_orig)             int32
 *   overflow (batch,)                      int32
 * Mode: r >= 0 merges the r best A tokens (fixed-r); r < 0 merges every A token whose best similarity is
 * > threshold (threshold mode), forcing extra merges when the result would not fit in out_tokens.
 * `flags` (bitwise OR of STATICPRUNE_MERGE_*, 0 = the default contract) selects the ToMe-faithful variants.
 */
#ifndef STATICPRUNE_BIPARTITE_MERGE_KERNELS_H
#define STATICPRUNE_BIPARTITE_MERGE_KERNELS_H

#include "staticpruneKernelApi.h"
#include "staticprunePluginContract.h" /* staticprune_bipartite_merge_out_tokens (T') */

#ifdef __cplusplus
extern "C" {
#endif

/* Variants (see README.md, "Variants"). */
enum
{
    /* threshold mode merges similarity >= threshold instead of > threshold */
    STATICPRUNE_MERGE_INCLUSIVE = 1,
    /* A = even, B = odd absolute slot indices (ToMe: a CLS in slot 0 is A token 0), prefix slots excluded;
       default: A = even, B = odd positions counted from the first slot after the prefix */
    STATICPRUNE_MERGE_ABSOLUTE_PARITY = 2,
    /* unmerged A tokens are output in selection order (score descending, lower index first; ToMe without a
       class token); default: ascending A index */
    STATICPRUNE_MERGE_KEPT_BY_SCORE = 4
};

/* Bytes of device workspace staticprune_bipartite_merge needs (0 for invalid sizes). */
STATICPRUNE_API size_t staticprune_bipartite_merge_workspace_size(
    int32_t batch, int32_t tokens, int32_t num_prefix, int32_t out_tokens);

/*
 * Enqueue the merge on `stream`. `out_tokens` must lie in [tokens - nB, tokens] (use
 * staticprune_bipartite_merge_out_tokens). Requirements: batch in [0, 65535], dim >= 1, metric_dim >= 1,
 * num_orig >= 0, 0 <= num_prefix <= tokens, flags within STATICPRUNE_MERGE_*,
 * workspace_size >= staticprune_bipartite_merge_workspace_size(...).
 * Inputs and outputs must not overlap. Returns STATICPRUNE_SUCCESS, a negative STATICPRUNE_ERROR_* code (nothing
 * was launched) or a positive cudaError_t code.
 */
STATICPRUNE_API int32_t staticprune_bipartite_merge(void const* x, int32_t x_dtype, void const* metric,
    int32_t metric_dtype, float const* size, int32_t const* owner, void* x_out, float* size_out, int32_t* owner_out,
    int32_t* overflow, int32_t batch, int32_t tokens, int32_t dim, int32_t metric_dim, int32_t num_orig,
    int32_t num_prefix, int32_t r, float threshold, int32_t flags, int32_t out_tokens, void* workspace,
    size_t workspace_size, staticprune_stream_t stream);

/*
 * The same with one threshold per image: in threshold mode (r < 0), `thresholds` (device memory, `batch` FP32
 * values; null = use `threshold`) replaces `threshold` for each image. The plugin's threshold_input = 1 mode.
 */
STATICPRUNE_API int32_t staticprune_bipartite_merge_thresholds(void const* x, int32_t x_dtype, void const* metric,
    int32_t metric_dtype, float const* size, int32_t const* owner, void* x_out, float* size_out, int32_t* owner_out,
    int32_t* overflow, int32_t batch, int32_t tokens, int32_t dim, int32_t metric_dim, int32_t num_orig,
    int32_t num_prefix, int32_t r, float threshold, float const* thresholds, int32_t flags, int32_t out_tokens,
    void* workspace, size_t workspace_size, staticprune_stream_t stream);

#ifdef __cplusplus
}
#endif

#endif /* STATICPRUNE_BIPARTITE_MERGE_KERNELS_H */
