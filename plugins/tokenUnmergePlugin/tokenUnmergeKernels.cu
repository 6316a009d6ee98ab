/*
 * staticprune: CUDA kernels of the token unmerge.
 *
 *   gatherTokensKernel      y[b, n, :] = x[b, owner[b, n], :]            one block per (original token, image)
 *   gatherFeatureMapKernel  y[b, :, h, w] = x[b, owner[b, h*W + w], :]   32 x 32 tiles through shared memory,
 *                           so that reads (along channels) and writes (along tokens) are both coalesced.
 * Pure copies: the output bits equal the input bits.
 */
#include "staticpruneCuda.cuh"
#include "tokenUnmergeKernels.h"

namespace staticprune
{
namespace kernels
{
namespace
{

constexpr int kGatherThreads = 128;
constexpr int kTile = 32;
constexpr int kTileRows = 8;
constexpr int kMaxGridYZ = 65535;

template <typename XT>
__global__ void __launch_bounds__(kGatherThreads) gatherTokensKernel(
    XT const* __restrict__ x, int const* __restrict__ owner, int T, int D, int N0, XT* __restrict__ y)
{
    int const n = blockIdx.x;
    int const b = blockIdx.y;
    int const o = owner[static_cast<size_t>(b) * N0 + n];
    XT* out = y + (static_cast<size_t>(b) * N0 + n) * D;
    if (o < 0 || o >= T)
    {
        for (int d = threadIdx.x; d < D; d += kGatherThreads)
        {
            out[d] = fromFloat<XT>(0.f);
        }
        return;
    }
    XT const* in = x + (static_cast<size_t>(b) * T + o) * D;
    for (int d = threadIdx.x; d < D; d += kGatherThreads)
    {
        out[d] = in[d];
    }
}

template <typename XT>
__global__ void __launch_bounds__(kTile* kTileRows) gatherFeatureMapKernel(
    XT const* __restrict__ x, int const* __restrict__ owner, int T, int D, int N0, XT* __restrict__ y)
{
    // Float staging is exact for both float32 and float16 values.
    __shared__ float sTile[kTile][kTile + 1];
    __shared__ int sOwner[kTile];

    int const n0 = blockIdx.x * kTile;
    int const d0 = blockIdx.y * kTile;
    int const b = blockIdx.z;
    int const tx = threadIdx.x;
    int const ty = threadIdx.y;

    if (ty == 0)
    {
        int const n = n0 + tx;
        int const o = n < N0 ? owner[static_cast<size_t>(b) * N0 + n] : -1;
        sOwner[tx] = (o >= 0 && o < T) ? o : -1;
    }
    __syncthreads();
    // Read: row k of the tile is original token n0 + k; lanes run along channels.
    for (int k = ty; k < kTile; k += kTileRows)
    {
        int const o = sOwner[k];
        int const d = d0 + tx;
        sTile[k][tx] = (o >= 0 && d < D) ? toFloat(x[(static_cast<size_t>(b) * T + o) * D + d]) : 0.f;
    }
    __syncthreads();
    // Write: row k is channel d0 + k; lanes run along tokens.
    for (int k = ty; k < kTile; k += kTileRows)
    {
        int const d = d0 + k;
        int const n = n0 + tx;
        if (d < D && n < N0)
        {
            y[(static_cast<size_t>(b) * D + d) * N0 + n] = fromFloat<XT>(sTile[tx][k]);
        }
    }
}

template <typename XT>
void launchUnmerge(XT const* x, int32_t const* owner, XT* y, int batch, int T, int D, int N0, bool toFeatureMap,
    cudaStream_t stream)
{
    if (toFeatureMap)
    {
        dim3 const grid(static_cast<unsigned>(ceilDiv(N0, kTile)), static_cast<unsigned>(ceilDiv(D, kTile)),
            static_cast<unsigned>(batch));
        STATICPRUNE_LAUNCH(gatherFeatureMapKernel<XT>, grid, dim3(kTile, kTileRows), stream)(x, owner, T, D, N0, y);
    }
    else
    {
        dim3 const grid(static_cast<unsigned>(N0), static_cast<unsigned>(batch));
        STATICPRUNE_LAUNCH(gatherTokensKernel<XT>, grid, kGatherThreads, stream)(x, owner, T, D, N0, y);
    }
}

} // namespace
} // namespace kernels
} // namespace staticprune

using namespace staticprune::kernels;

extern "C" STATICPRUNE_API int32_t staticprune_token_unmerge(void const* x, int32_t dtype, int32_t const* owner,
    void* y, int32_t batch, int32_t tokens, int32_t dim, int32_t num_orig, int32_t to_feature_map, int32_t grid_h,
    int32_t grid_w, staticprune_stream_t stream)
{
    if (dtype != STATICPRUNE_DTYPE_FLOAT32 && dtype != STATICPRUNE_DTYPE_FLOAT16)
    {
        return STATICPRUNE_ERROR_UNSUPPORTED_DTYPE;
    }
    if (batch < 0 || batch > kMaxGridYZ || tokens < 0 || dim < 1 || num_orig < 0
        || (to_feature_map != 0 && to_feature_map != 1))
    {
        return STATICPRUNE_ERROR_INVALID_ARGUMENT;
    }
    bool const toFeatureMap = to_feature_map == 1;
    if (toFeatureMap
        && (grid_h < 1 || grid_w < 1 || static_cast<int64_t>(grid_h) * grid_w != num_orig
            || ceilDiv(dim, kTile) > kMaxGridYZ))
    {
        return STATICPRUNE_ERROR_INVALID_ARGUMENT;
    }
    if (batch == 0 || num_orig == 0)
    {
        return STATICPRUNE_SUCCESS;
    }
    if ((tokens > 0 && x == nullptr) || owner == nullptr || y == nullptr)
    {
        return STATICPRUNE_ERROR_INVALID_ARGUMENT;
    }
    auto* const cudaStream = reinterpret_cast<cudaStream_t>(stream);
    if (dtype == STATICPRUNE_DTYPE_FLOAT32)
    {
        launchUnmerge(static_cast<float const*>(x), owner, static_cast<float*>(y), batch, tokens, dim, num_orig,
            toFeatureMap, cudaStream);
    }
    else
    {
        launchUnmerge(static_cast<__half const*>(x), owner, static_cast<__half*>(y), batch, tokens, dim, num_orig,
            toFeatureMap, cudaStream);
    }
    return launchStatus();
}
