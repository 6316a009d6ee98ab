/*
 * staticprune: the plugin contract (field rules and output shapes) as plain C functions; see the header.
 */
#include "staticprunePluginContract.h"

#include <algorithm>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <initializer_list>

namespace
{

constexpr int32_t kMaxRank = STATICPRUNE_CONTRACT_MAX_RANK;

int32_t fail(char* message, size_t messageSize, char const* format, ...)
{
    if (message != nullptr && messageSize > 0)
    {
        va_list args;
        va_start(args, format);
        std::vsnprintf(message, messageSize, format, args);
        va_end(args);
    }
    return STATICPRUNE_ERROR_INVALID_ARGUMENT;
}

int32_t succeed(char* message, size_t messageSize)
{
    if (message != nullptr && messageSize > 0)
    {
        message[0] = '\0';
    }
    return STATICPRUNE_SUCCESS;
}

bool isFlag(int32_t value)
{
    return value == 0 || value == 1;
}

int64_t dim(int64_t const* dims, int32_t tensor, int32_t axis)
{
    return dims[tensor * kMaxRank + axis];
}

void setShape(int32_t* ranks, int64_t* dims, int32_t tensor, std::initializer_list<int64_t> extents)
{
    ranks[tensor] = static_cast<int32_t>(extents.size());
    int32_t axis = 0;
    for (int64_t extent : extents)
    {
        dims[tensor * kMaxRank + axis++] = extent;
    }
    for (; axis < kMaxRank; ++axis)
    {
        dims[tensor * kMaxRank + axis] = -1;
    }
}

//! Two extents agree when either is unknown (-1) or both are equal.
bool agree(int64_t a, int64_t b)
{
    return a < 0 || b < 0 || a == b;
}

//! The known one of two agreeing extents (-1 if neither is known).
int64_t known(int64_t a, int64_t b)
{
    return a >= 0 ? a : b;
}

} // namespace

extern "C" STATICPRUNE_API int32_t staticprune_plugin_contract_version(void)
{
    return 1;
}

extern "C" STATICPRUNE_API int32_t staticprune_bipartite_merge_out_tokens(
    int32_t tokens, int32_t num_prefix, int32_t r, int32_t capacity)
{
    if (tokens < 0 || num_prefix < 0 || num_prefix > tokens)
    {
        return -1;
    }
    int32_t const half = (tokens - num_prefix) / 2; // the smaller half, for either parity
    if (r >= 0)
    {
        return tokens - std::min(r, half);
    }
    if (capacity <= 0)
    {
        return tokens;
    }
    return std::max(tokens - half, std::min(capacity, tokens));
}

extern "C" STATICPRUNE_API int32_t staticprune_bipartite_merge_check_fields(int32_t has_r, int32_t r,
    int32_t has_threshold, float threshold, int32_t capacity, int32_t num_prefix, int32_t inclusive,
    int32_t absolute_parity, int32_t kept_by_score, int32_t threshold_input, char* message, size_t message_size)
{
    if (num_prefix < 0)
    {
        return fail(message, message_size, "num_prefix = %d: must be >= 0", num_prefix);
    }
    if (!isFlag(inclusive) || !isFlag(absolute_parity) || !isFlag(kept_by_score) || !isFlag(threshold_input))
    {
        return fail(message, message_size,
            "inclusive = %d, absolute_parity = %d, kept_by_score = %d, threshold_input = %d: each is 0 or 1",
            inclusive, absolute_parity, kept_by_score, threshold_input);
    }
    int32_t const mode_r = has_r ? r : -1;
    if (mode_r >= 0 && capacity > 0)
    {
        return fail(message, message_size,
            "r = %d with capacity = %d: capacity applies to threshold mode only (set r < 0, or drop capacity)", mode_r,
            capacity);
    }
    if (mode_r >= 0 && threshold_input)
    {
        return fail(message, message_size,
            "r = %d with threshold_input = 1: a threshold input applies to threshold mode only", mode_r);
    }
    if (mode_r < 0 && !threshold_input && (!has_threshold || std::isnan(threshold)))
    {
        return fail(message, message_size,
            "no mode: set r >= 0 (fixed-r mode), a threshold (threshold mode) or threshold_input = 1");
    }
    return succeed(message, message_size);
}

extern "C" STATICPRUNE_API int32_t staticprune_bipartite_merge_output_shapes(int32_t nb_inputs,
    int32_t const* in_ranks, int64_t const* in_dims, int32_t r, int32_t capacity, int32_t num_prefix,
    int32_t threshold_input, int32_t* out_ranks, int64_t* out_dims, char* message, size_t message_size)
{
    int32_t const expected_inputs = threshold_input ? 5 : 4;
    if (nb_inputs != expected_inputs)
    {
        return fail(message, message_size,
            "%d inputs: expects %d (x, metric, size, owner%s)", nb_inputs, expected_inputs,
            threshold_input ? ", threshold" : "");
    }
    if (in_ranks == nullptr || in_dims == nullptr || out_ranks == nullptr || out_dims == nullptr)
    {
        return fail(message, message_size, "null shape arrays");
    }
    if (in_ranks[0] != 3 || in_ranks[1] != 3 || in_ranks[2] != 2 || in_ranks[3] != 2
        || (threshold_input && in_ranks[4] != 1))
    {
        return fail(message, message_size,
            "input ranks %d, %d, %d, %d: expects x (B,T,D), metric (B,T,C), size (B,T), owner (B,N0)%s", in_ranks[0],
            in_ranks[1], in_ranks[2], in_ranks[3], threshold_input ? ", threshold (B,)" : "");
    }
    int64_t batch = dim(in_dims, 0, 0);
    int64_t tokens = dim(in_dims, 0, 1);
    for (int32_t i = 1; i < nb_inputs; ++i)
    {
        if (!agree(batch, dim(in_dims, i, 0)))
        {
            return fail(message, message_size, "input %d has batch %lld, x has %lld", i,
                static_cast<long long>(dim(in_dims, i, 0)), static_cast<long long>(batch));
        }
        batch = known(batch, dim(in_dims, i, 0));
    }
    for (int32_t i = 1; i <= 2; ++i)
    {
        if (!agree(tokens, dim(in_dims, i, 1)))
        {
            return fail(message, message_size, "input %d has %lld tokens, x has %lld", i,
                static_cast<long long>(dim(in_dims, i, 1)), static_cast<long long>(tokens));
        }
        tokens = known(tokens, dim(in_dims, i, 1));
    }
    if (tokens > INT32_MAX)
    {
        return fail(message, message_size, "%lld tokens exceed int32", static_cast<long long>(tokens));
    }
    if (tokens >= 0 && tokens < num_prefix)
    {
        return fail(message, message_size, "num_prefix = %d exceeds the %lld tokens", num_prefix,
            static_cast<long long>(tokens));
    }
    int64_t const out_tokens = tokens < 0
        ? -1
        : staticprune_bipartite_merge_out_tokens(static_cast<int32_t>(tokens), num_prefix, r, capacity);
    setShape(out_ranks, out_dims, 0, {batch, out_tokens, dim(in_dims, 0, 2)});
    setShape(out_ranks, out_dims, 1, {batch, out_tokens});
    setShape(out_ranks, out_dims, 2, {batch, dim(in_dims, 3, 1)});
    setShape(out_ranks, out_dims, 3, {batch});
    return succeed(message, message_size);
}

extern "C" STATICPRUNE_API int32_t staticprune_token_unmerge_check_fields(
    int32_t to_feature_map, int32_t grid_h, int32_t grid_w, char* message, size_t message_size)
{
    if (!isFlag(to_feature_map))
    {
        return fail(message, message_size, "to_feature_map = %d: must be 0 or 1", to_feature_map);
    }
    if (to_feature_map == 1 && (grid_h < 1 || grid_w < 1))
    {
        return fail(message, message_size, "to_feature_map = 1 needs grid_h >= 1 and grid_w >= 1 (got %d, %d)",
            grid_h, grid_w);
    }
    return succeed(message, message_size);
}

extern "C" STATICPRUNE_API int32_t staticprune_token_unmerge_output_shapes(int32_t nb_inputs, int32_t const* in_ranks,
    int64_t const* in_dims, int32_t to_feature_map, int32_t grid_h, int32_t grid_w, int32_t* out_ranks,
    int64_t* out_dims, char* message, size_t message_size)
{
    if (nb_inputs != 2)
    {
        return fail(message, message_size, "%d inputs: expects 2 (x, owner)", nb_inputs);
    }
    if (in_ranks == nullptr || in_dims == nullptr || out_ranks == nullptr || out_dims == nullptr)
    {
        return fail(message, message_size, "null shape arrays");
    }
    if (in_ranks[0] != 3 || in_ranks[1] != 2)
    {
        return fail(message, message_size, "input ranks %d, %d: expects x (B,T,D) and owner (B,N0)", in_ranks[0],
            in_ranks[1]);
    }
    int64_t const batch_x = dim(in_dims, 0, 0);
    int64_t const batch_owner = dim(in_dims, 1, 0);
    if (!agree(batch_x, batch_owner))
    {
        return fail(message, message_size, "x has batch %lld, owner %lld", static_cast<long long>(batch_x),
            static_cast<long long>(batch_owner));
    }
    int64_t const batch = known(batch_x, batch_owner);
    int64_t const num_orig = dim(in_dims, 1, 1);
    int64_t const channels = dim(in_dims, 0, 2);
    if (to_feature_map)
    {
        if (num_orig >= 0 && num_orig != static_cast<int64_t>(grid_h) * grid_w)
        {
            return fail(message, message_size, "owner has %lld tokens, not grid_h * grid_w = %d * %d",
                static_cast<long long>(num_orig), grid_h, grid_w);
        }
        setShape(out_ranks, out_dims, 0, {batch, channels, grid_h, grid_w});
    }
    else
    {
        setShape(out_ranks, out_dims, 0, {batch, num_orig, channels});
    }
    return succeed(message, message_size);
}
