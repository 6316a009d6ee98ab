/*
 * staticprune: the plugin contract as plain C functions (no TensorRT, no CUDA).
 *
 * Which attribute combinations each plugin creator accepts, and which output shapes each plugin reports for given
 * input shapes. The IPluginV3 creators (createPlugin) and plugins (configurePlugin, getOutputShapes,
 * onShapeChange) call these functions, and so does the exporter's checker (staticprune/export/plugin_contract.py,
 * through ctypes), so an ONNX graph is checked against the very rules TensorRT will apply, on a machine without
 * TensorRT. The functions are compiled into every library of plugins/ (kernels, plugins, CPU emulation).
 *
 * Shapes are passed as `nb` tensors of rank <= STATICPRUNE_CONTRACT_MAX_RANK, row i of a dims array holding the
 * extents of tensor i (row stride STATICPRUNE_CONTRACT_MAX_RANK). An extent of -1 is unknown (a runtime dimension);
 * outputs derived from unknown extents are -1 too. On an error, a one-line reason is written to `message` (when
 * non-null; truncated to message_size, always NUL-terminated).
 */
#ifndef STATICPRUNE_PLUGIN_CONTRACT_H
#define STATICPRUNE_PLUGIN_CONTRACT_H

#include "staticpruneKernelApi.h"

#ifdef __cplusplus
extern "C" {
#endif

#define STATICPRUNE_CONTRACT_MAX_RANK 8

/* Version of the contract (bumped whenever a rule below changes). */
STATICPRUNE_API int32_t staticprune_plugin_contract_version(void);

/*
 * Output token count T' of StaticPruneBipartiteMerge for an input of `tokens` slots with `num_prefix` protected
 * ones. With half = floor((tokens - num_prefix) / 2):
 *   r >= 0:                  T' = tokens - min(r, half)
 *   r < 0, capacity <= 0:    T' = tokens                       (threshold mode without a cap)
 *   r < 0, capacity > 0:     T' = clamp(capacity, tokens - half, tokens)
 * (half is the smaller half for either parity; tokens - half slots always hold the result.) Returns -1 if
 * tokens < 0, num_prefix < 0 or num_prefix > tokens. BipartiteMergePlugin::getOutputShapes builds the same formula
 * as a dimension expression.
 */
STATICPRUNE_API int32_t staticprune_bipartite_merge_out_tokens(
    int32_t tokens, int32_t num_prefix, int32_t r, int32_t capacity);

/*
 * The StaticPruneBipartiteMerge creator's field rules. has_r / has_threshold say whether the attribute is present
 * (an absent r means r = -1). Accepted: num_prefix >= 0; inclusive, absolute_parity, kept_by_score and
 * threshold_input in {0, 1}; fixed-r mode (r >= 0) without capacity > 0 and without threshold_input; threshold mode
 * (r < 0) with a non-NaN threshold attribute, or with threshold_input = 1 (the threshold is input 4, one FP32 value
 * per image, and the threshold attribute is ignored). Returns STATICPRUNE_SUCCESS or
 * STATICPRUNE_ERROR_INVALID_ARGUMENT (with the reason in `message`).
 */
STATICPRUNE_API int32_t staticprune_bipartite_merge_check_fields(int32_t has_r, int32_t r, int32_t has_threshold,
    float threshold, int32_t capacity, int32_t num_prefix, int32_t inclusive, int32_t absolute_parity,
    int32_t kept_by_score, int32_t threshold_input, char* message, size_t message_size);

/*
 * StaticPruneBipartiteMerge's input rules and output shapes. Inputs: x (B,T,D), metric (B,T,C), size (B,T),
 * owner (B,N0), and with threshold_input = 1 also threshold (B,); B and T must agree where known and
 * num_prefix <= T. Outputs (4): x' (B,T',D), size' (B,T'), owner' (B,N0), overflow (B,), with T' from
 * staticprune_bipartite_merge_out_tokens. out_ranks has 4 entries, out_dims 4 rows.
 */
STATICPRUNE_API int32_t staticprune_bipartite_merge_output_shapes(int32_t nb_inputs, int32_t const* in_ranks,
    int64_t const* in_dims, int32_t r, int32_t capacity, int32_t num_prefix, int32_t threshold_input,
    int32_t* out_ranks, int64_t* out_dims, char* message, size_t message_size);

/*
 * The StaticPruneTokenUnmerge creator's field rules: to_feature_map in {0, 1}; with to_feature_map = 1,
 * grid_h >= 1 and grid_w >= 1.
 */
STATICPRUNE_API int32_t staticprune_token_unmerge_check_fields(
    int32_t to_feature_map, int32_t grid_h, int32_t grid_w, char* message, size_t message_size);

/*
 * StaticPruneTokenUnmerge's input rules and output shape. Inputs: x (B,T,D), owner (B,N0) with the same B where
 * known; with to_feature_map = 1, N0 = grid_h * grid_w where known. Output (1): (B,N0,D), or (B,D,grid_h,grid_w)
 * with to_feature_map = 1.
 */
STATICPRUNE_API int32_t staticprune_token_unmerge_output_shapes(int32_t nb_inputs, int32_t const* in_ranks,
    int64_t const* in_dims, int32_t to_feature_map, int32_t grid_h, int32_t grid_w, int32_t* out_ranks,
    int64_t* out_dims, char* message, size_t message_size);

#ifdef __cplusplus
}
#endif

#endif /* STATICPRUNE_PLUGIN_CONTRACT_H */
