/*
 * staticprune: CUDA kernels of the bipartite soft matching + size-weighted merge (ToMe).
 *
 * Pipeline per call (all on one stream, no host synchronisation, no float atomics):
 *   1. similarityArgmaxKernel  tiled A x B similarity (sequential FP32 FMA chain over channels per score) and,
 *                              per A token, the best valid B partner (lowest index on ties) and its score.
 *   2. scoreRankKernel         rank of every A token in the order (score descending, A index ascending),
 *                              by counting (deterministic, no sort).
 *   3. planKernel              one block per image: how many A tokens merge (fixed r or threshold + capacity,
 *                              overflow), merge flags, new slots (order-preserving prefix sums), inverse map,
 *                              per-B merge counts (integer atomics) and list offsets.
 *   4. mergeListKernel         the merged A tokens sorted by (partner B, A index), by counting.
 *   5. mergeOutputKernel       one block per output slot: copy, size-weighted merge (FP32, list order =
 *                              ascending A index) or padding.
 *   6. ownerUpdateKernel       owner'[n] = new slot of owner[n].
 */
#include "bipartiteMergeKernels.h"
#include "staticpruneCuda.cuh"

#include <algorithm>
#include <climits>

namespace staticprune
{
namespace kernels
{
namespace
{

constexpr int kSimTileA = 64;    // A tokens per similarity block
constexpr int kSimTileB = 64;    // B tokens per inner tile
constexpr int kSimTileK = 16;    // channels per shared-memory stage
constexpr int kSimThreads = 256; // 16 x 16 threads, 4 x 4 scores each
constexpr int kSimLanes = 16;

constexpr int kRankThreads = 256;
constexpr int kRankTile = 1024;

constexpr int kPlanThreads = 512;

constexpr int kMergeThreads = 128;
constexpr int kMergeVec = 4;
constexpr int kMergeListTile = 128;

constexpr int kOwnerThreads = 256;

constexpr int kMaxGridY = 65535;

//! Slot of A token i / B token j, given the slot of A token 0 and of B token 0 (see Split).
__device__ __forceinline__ int posA(int firstA, int i)
{
    return firstA + 2 * i;
}

__device__ __forceinline__ int posB(int firstB, int j)
{
    return firstB + 2 * j;
}

//! True if (s1, i1) comes before (s2, i2) in the selection order: higher score first, lower index on ties.
__device__ __forceinline__ bool scoreBefore(float s1, int i1, float s2, int i2)
{
    return s1 > s2 || (s1 == s2 && i1 < i2);
}

//! Block-wide exclusive prefix sum of one int per thread (Hillis-Steele in shared memory). All threads call it.
template <int kThreads>
__device__ int blockExclusiveScan(int value, int* scratch, int& total)
{
    int const tid = threadIdx.x;
    scratch[tid] = value;
    __syncthreads();
    for (int offset = 1; offset < kThreads; offset <<= 1)
    {
        int const add = tid >= offset ? scratch[tid - offset] : 0;
        __syncthreads();
        scratch[tid] += add;
        __syncthreads();
    }
    int const inclusive = scratch[tid];
    total = scratch[kThreads - 1];
    __syncthreads();
    return inclusive - value;
}

template <typename MT>
__global__ void __launch_bounds__(kSimThreads) similarityArgmaxKernel(MT const* __restrict__ metric,
    float const* __restrict__ size, int T, int C, int firstA, int firstB, int nA, int nB,
    float* __restrict__ bestScore, int* __restrict__ bestIdx)
{
    __shared__ float sA[kSimTileK][kSimTileA];
    __shared__ float sB[kSimTileK][kSimTileB];
    __shared__ int sBValid[kSimTileB];
    __shared__ float sRedScore[kSimTileA][kSimLanes];
    __shared__ int sRedIdx[kSimTileA][kSimLanes];

    int const b = blockIdx.y;
    int const a0 = blockIdx.x * kSimTileA;
    int const tid = threadIdx.x;
    int const tx = tid % kSimLanes;
    int const ty = tid / kSimLanes;
    MT const* m = metric + static_cast<size_t>(b) * T * C;
    float const* sz = size + static_cast<size_t>(b) * T;

    // Thread (ty, tx) owns A rows ty + 16 r and B columns tx + 16 c of every tile.
    float best[4];
    int bestJ[4];
#pragma unroll
    for (int r = 0; r < 4; ++r)
    {
        best[r] = -INFINITY;
        bestJ[r] = -1;
    }

    for (int j0 = 0; j0 < nB; j0 += kSimTileB)
    {
        if (tid < kSimTileB)
        {
            int const j = j0 + tid;
            sBValid[tid] = (j < nB && sz[posB(firstB, j)] > 0.f) ? 1 : 0;
        }
        float acc[4][4];
#pragma unroll
        for (int r = 0; r < 4; ++r)
        {
#pragma unroll
            for (int c = 0; c < 4; ++c)
            {
                acc[r][c] = 0.f;
            }
        }
        for (int k0 = 0; k0 < C; k0 += kSimTileK)
        {
            for (int e = tid; e < kSimTileA * kSimTileK; e += kSimThreads)
            {
                int const row = e / kSimTileK;
                int const kk = e % kSimTileK;
                int const i = a0 + row;
                int const k = k0 + kk;
                sA[kk][row] = (i < nA && k < C) ? toFloat(m[static_cast<size_t>(posA(firstA, i)) * C + k]) : 0.f;
            }
            for (int e = tid; e < kSimTileB * kSimTileK; e += kSimThreads)
            {
                int const col = e / kSimTileK;
                int const kk = e % kSimTileK;
                int const j = j0 + col;
                int const k = k0 + kk;
                sB[kk][col] = (j < nB && k < C) ? toFloat(m[static_cast<size_t>(posB(firstB, j)) * C + k]) : 0.f;
            }
            __syncthreads();
            int const kEnd = min(kSimTileK, C - k0);
            for (int kk = 0; kk < kEnd; ++kk)
            {
                float av[4];
                float bv[4];
#pragma unroll
                for (int r = 0; r < 4; ++r)
                {
                    av[r] = sA[kk][ty + kSimLanes * r];
                }
#pragma unroll
                for (int c = 0; c < 4; ++c)
                {
                    bv[c] = sB[kk][tx + kSimLanes * c];
                }
#pragma unroll
                for (int r = 0; r < 4; ++r)
                {
#pragma unroll
                    for (int c = 0; c < 4; ++c)
                    {
                        acc[r][c] = fmaf(av[r], bv[c], acc[r][c]);
                    }
                }
            }
            __syncthreads();
        }
        // Columns are visited in increasing B index, so a strict comparison keeps the lowest index on ties.
#pragma unroll
        for (int c = 0; c < 4; ++c)
        {
            int const col = tx + kSimLanes * c;
            if (sBValid[col])
            {
#pragma unroll
                for (int r = 0; r < 4; ++r)
                {
                    if (acc[r][c] > best[r])
                    {
                        best[r] = acc[r][c];
                        bestJ[r] = j0 + col;
                    }
                }
            }
        }
        __syncthreads();
    }

#pragma unroll
    for (int r = 0; r < 4; ++r)
    {
        sRedScore[ty + kSimLanes * r][tx] = best[r];
        sRedIdx[ty + kSimLanes * r][tx] = bestJ[r];
    }
    __syncthreads();
    if (tid < kSimTileA)
    {
        // (score desc, index asc) is a total order, so this reduction does not depend on the lane order.
        float bs = -INFINITY;
        int bj = -1;
        for (int lane = 0; lane < kSimLanes; ++lane)
        {
            int const j = sRedIdx[tid][lane];
            float const s = sRedScore[tid][lane];
            if (j >= 0 && (bj < 0 || scoreBefore(s, j, bs, bj)))
            {
                bs = s;
                bj = j;
            }
        }
        int const i = a0 + tid;
        if (i < nA)
        {
            bool const mergeable = bj >= 0 && sz[posA(firstA, i)] > 0.f;
            bestScore[static_cast<size_t>(b) * nA + i] = mergeable ? bs : -INFINITY;
            bestIdx[static_cast<size_t>(b) * nA + i] = mergeable ? bj : -1;
        }
    }
}

__global__ void __launch_bounds__(kRankThreads) scoreRankKernel(
    float const* __restrict__ bestScore, int nA, int* __restrict__ rank)
{
    __shared__ float sTile[kRankTile];
    int const b = blockIdx.y;
    int const i = blockIdx.x * kRankThreads + threadIdx.x;
    float const* s = bestScore + static_cast<size_t>(b) * nA;
    float const si = i < nA ? s[i] : 0.f;
    int count = 0;
    for (int t0 = 0; t0 < nA; t0 += kRankTile)
    {
        int const n = min(kRankTile, nA - t0);
        for (int e = threadIdx.x; e < n; e += kRankThreads)
        {
            sTile[e] = s[t0 + e];
        }
        __syncthreads();
        if (i < nA)
        {
            for (int e = 0; e < n; ++e)
            {
                count += scoreBefore(sTile[e], t0 + e, si, i) ? 1 : 0;
            }
        }
        __syncthreads();
    }
    if (i < nA)
    {
        rank[static_cast<size_t>(b) * nA + i] = count;
    }
}

__global__ void __launch_bounds__(kPlanThreads) planKernel(float const* __restrict__ size,
    float const* __restrict__ bestScore, int const* __restrict__ bestIdx, int const* __restrict__ rank, int T, int P,
    int firstA, int firstB, int nA, int nB, int Tout, int r, float threshold, float const* __restrict__ thresholds,
    int inclusive, int keptByScore, int* __restrict__ listKey, int* __restrict__ slotOfPos, int* __restrict__ srcOfSlot, int* __restrict__ bOffset,
    int* __restrict__ bCount, int* __restrict__ rankScratch, int* __restrict__ overflow)
{
    __shared__ int sScan[kPlanThreads];
    __shared__ int sMerge;

    int const b = blockIdx.x;
    int const tid = threadIdx.x;
    float const* sz = size + static_cast<size_t>(b) * T;
    float const* score = bestScore + static_cast<size_t>(b) * nA;
    int const* dst = bestIdx + static_cast<size_t>(b) * nA;
    int const* rk = rank + static_cast<size_t>(b) * nA;
    int* key = listKey + static_cast<size_t>(b) * nA;
    int* slot = slotOfPos + static_cast<size_t>(b) * T;
    int* src = srcOfSlot + static_cast<size_t>(b) * Tout;
    int* bOff = bOffset + static_cast<size_t>(b) * nB;
    int* bCnt = bCount + static_cast<size_t>(b) * nB;
    int* byRank = rankScratch + static_cast<size_t>(b) * nA;
    // Threshold mode with a threshold input: one threshold per image replaces the attribute.
    float const thr = thresholds != nullptr ? thresholds[b] : threshold;

    // 1. Counts: valid A, valid B, mergeable A (a valid partner exists), A above the threshold.
    int validA = 0;
    int mergeable = 0;
    int above = 0;
    int validB = 0;
    for (int i = tid; i < nA; i += kPlanThreads)
    {
        validA += sz[posA(firstA, i)] > 0.f ? 1 : 0;
        bool const m = dst[i] >= 0;
        mergeable += m ? 1 : 0;
        above += (m && (inclusive ? score[i] >= thr : score[i] > thr)) ? 1 : 0;
    }
    for (int j = tid; j < nB; j += kPlanThreads)
    {
        validB += sz[posB(firstB, j)] > 0.f ? 1 : 0;
    }
    blockExclusiveScan<kPlanThreads>(validA, sScan, validA);
    blockExclusiveScan<kPlanThreads>(mergeable, sScan, mergeable);
    blockExclusiveScan<kPlanThreads>(above, sScan, above);
    blockExclusiveScan<kPlanThreads>(validB, sScan, validB);

    // 2. How many merge. Mergeable A tokens hold ranks 0 .. mergeable-1 (their scores are finite).
    if (tid == 0)
    {
        int const keptWithoutMerge = P + validA + validB;
        int const selected = r >= 0 ? min(r, mergeable) : above;
        int const forced = max(0, keptWithoutMerge - selected - Tout);
        int const nMerge = min(selected + forced, mergeable);
        sMerge = nMerge;
        overflow[b] = nMerge - selected;
    }
    __syncthreads();
    int const nMerge = sMerge;

    // 3. Unmerged valid A tokens get the slots after the prefix, in A index order (prefix count over contiguous
    //    chunks), or with keptByScore in selection order (flags scattered by rank, which is a permutation).
    int const perA = (nA + kPlanThreads - 1) / kPlanThreads;
    int const aBegin = min(nA, tid * perA);
    int const aEnd = min(nA, aBegin + perA);
    int local = 0;
    int keptA = 0;
    if (keptByScore)
    {
        for (int i = tid; i < nA; i += kPlanThreads)
        {
            bool const merged = dst[i] >= 0 && rk[i] < nMerge;
            byRank[rk[i]] = (!merged && sz[posA(firstA, i)] > 0.f) ? 1 : 0;
        }
        __syncthreads();
        for (int k = aBegin; k < aEnd; ++k)
        {
            local += byRank[k];
        }
        int next = P + blockExclusiveScan<kPlanThreads>(local, sScan, keptA);
        for (int k = aBegin; k < aEnd; ++k)
        {
            byRank[k] = byRank[k] != 0 ? next++ : -1;
        }
        __syncthreads();
        for (int i = tid; i < nA; i += kPlanThreads)
        {
            bool const merged = dst[i] >= 0 && rk[i] < nMerge;
            key[i] = merged ? dst[i] : INT_MAX;
            if (!merged)
            {
                int const p = posA(firstA, i);
                int const s = byRank[rk[i]];
                slot[p] = s < Tout ? s : -1;
                if (s >= 0 && s < Tout)
                {
                    src[s] = p;
                }
            }
        }
    }
    else
    {
        for (int i = aBegin; i < aEnd; ++i)
        {
            bool const merged = dst[i] >= 0 && rk[i] < nMerge;
            local += (!merged && sz[posA(firstA, i)] > 0.f) ? 1 : 0;
        }
        int next = P + blockExclusiveScan<kPlanThreads>(local, sScan, keptA);
        for (int i = aBegin; i < aEnd; ++i)
        {
            bool const merged = dst[i] >= 0 && rk[i] < nMerge;
            key[i] = merged ? dst[i] : INT_MAX;
            if (merged)
            {
                continue; // takes its partner's slot in step 6
            }
            int const p = posA(firstA, i);
            if (sz[p] > 0.f)
            {
                int const s = next++;
                slot[p] = s < Tout ? s : -1;
                if (s < Tout)
                {
                    src[s] = p;
                }
            }
            else
            {
                slot[p] = -1;
            }
        }
    }

    // 4. Valid B tokens follow, in order.
    int const perB = (nB + kPlanThreads - 1) / kPlanThreads;
    int const bBegin = min(nB, tid * perB);
    int const bEnd = min(nB, bBegin + perB);
    local = 0;
    for (int j = bBegin; j < bEnd; ++j)
    {
        local += sz[posB(firstB, j)] > 0.f ? 1 : 0;
    }
    int keptB = 0;
    int next = P + keptA + blockExclusiveScan<kPlanThreads>(local, sScan, keptB);
    for (int j = bBegin; j < bEnd; ++j)
    {
        int const p = posB(firstB, j);
        if (sz[p] > 0.f)
        {
            int const s = next++;
            slot[p] = s < Tout ? s : -1;
            if (s < Tout)
            {
                src[s] = p;
            }
        }
        else
        {
            slot[p] = -1;
        }
    }

    // Prefix tokens stay in place; the remaining output slots are padding.
    for (int p = tid; p < P; p += kPlanThreads)
    {
        slot[p] = p;
        src[p] = p;
    }
    for (int s = P + keptA + keptB + tid; s < Tout; s += kPlanThreads)
    {
        src[s] = -1;
    }

    // 5. Number of A tokens merged into each B token (integer atomics: the counts do not depend on order) and the
    //    offsets of their lists.
    for (int j = tid; j < nB; j += kPlanThreads)
    {
        bCnt[j] = 0;
    }
    __syncthreads();
    for (int i = tid; i < nA; i += kPlanThreads)
    {
        if (key[i] != INT_MAX)
        {
            atomicAdd(&bCnt[key[i]], 1);
        }
    }
    __syncthreads();
    local = 0;
    for (int j = bBegin; j < bEnd; ++j)
    {
        local += bCnt[j];
    }
    int totalMerged = 0;
    int offset = blockExclusiveScan<kPlanThreads>(local, sScan, totalMerged);
    for (int j = bBegin; j < bEnd; ++j)
    {
        bOff[j] = offset;
        offset += bCnt[j];
    }

    // 6. Merged A tokens now live in their partner's slot (B slots were written in step 4, before the scans).
    for (int i = tid; i < nA; i += kPlanThreads)
    {
        if (key[i] != INT_MAX)
        {
            slot[posA(firstA, i)] = slot[posB(firstB, key[i])];
        }
    }
}

__global__ void __launch_bounds__(kRankThreads) mergeListKernel(
    int const* __restrict__ listKey, int nA, int* __restrict__ mergeList)
{
    __shared__ int sTile[kRankTile];
    int const b = blockIdx.y;
    int const i = blockIdx.x * kRankThreads + threadIdx.x;
    int const* key = listKey + static_cast<size_t>(b) * nA;
    int const ki = i < nA ? key[i] : INT_MAX;
    int position = 0;
    for (int t0 = 0; t0 < nA; t0 += kRankTile)
    {
        int const n = min(kRankTile, nA - t0);
        for (int e = threadIdx.x; e < n; e += kRankThreads)
        {
            sTile[e] = key[t0 + e];
        }
        __syncthreads();
        if (ki != INT_MAX)
        {
            for (int e = 0; e < n; ++e)
            {
                int const kj = sTile[e];
                position += (kj < ki || (kj == ki && t0 + e < i)) ? 1 : 0;
            }
        }
        __syncthreads();
    }
    if (i < nA && ki != INT_MAX)
    {
        mergeList[static_cast<size_t>(b) * nA + position] = i;
    }
}

template <typename XT>
__global__ void __launch_bounds__(kMergeThreads) mergeOutputKernel(XT const* __restrict__ x,
    float const* __restrict__ size, int const* __restrict__ srcOfSlot, int const* __restrict__ bOffset,
    int const* __restrict__ bCount, int const* __restrict__ mergeList, int T, int D, int firstA, int firstB, int nA,
    int nB, int Tout, XT* __restrict__ xOut, float* __restrict__ sizeOut)
{
    __shared__ int sPos[kMergeListTile];
    __shared__ float sSize[kMergeListTile];

    int const s = blockIdx.x;
    int const b = blockIdx.y;
    int const tid = threadIdx.x;
    int const p = srcOfSlot[static_cast<size_t>(b) * Tout + s];
    XT* out = xOut + (static_cast<size_t>(b) * Tout + s) * D;
    float* sizeSlot = sizeOut + static_cast<size_t>(b) * Tout + s;

    if (p < 0)
    {
        for (int d = tid; d < D; d += kMergeThreads)
        {
            out[d] = fromFloat<XT>(0.f);
        }
        if (tid == 0)
        {
            *sizeSlot = 0.f;
        }
        return;
    }

    XT const* xb = x + static_cast<size_t>(b) * T * D;
    float const* sz = size + static_cast<size_t>(b) * T;
    int count = 0;
    int offset = 0;
    if (p >= firstB && ((p - firstB) & 1) == 0)
    {
        int const j = (p - firstB) >> 1;
        count = bCount[static_cast<size_t>(b) * nB + j];
        offset = bOffset[static_cast<size_t>(b) * nB + j];
    }
    float const sp = sz[p];
    XT const* row = xb + static_cast<size_t>(p) * D;

    if (count == 0)
    {
        // Nothing merged into this slot: an exact copy.
        for (int d = tid; d < D; d += kMergeThreads)
        {
            out[d] = row[d];
        }
        if (tid == 0)
        {
            *sizeSlot = sp;
        }
        return;
    }

    int const* list = mergeList + static_cast<size_t>(b) * nA + offset;
    for (int d0 = 0; d0 < D; d0 += kMergeThreads * kMergeVec)
    {
        float acc[kMergeVec];
#pragma unroll
        for (int q = 0; q < kMergeVec; ++q)
        {
            int const d = d0 + tid + q * kMergeThreads;
            acc[q] = d < D ? toFloat(row[d]) * sp : 0.f;
        }
        float total = sp;
        for (int k0 = 0; k0 < count; k0 += kMergeListTile)
        {
            int const n = min(kMergeListTile, count - k0);
            __syncthreads();
            for (int e = tid; e < n; e += kMergeThreads)
            {
                int const a = posA(firstA, list[k0 + e]);
                sPos[e] = a;
                sSize[e] = sz[a];
            }
            __syncthreads();
            // Ascending A index: the list is sorted by (partner, A index).
            for (int e = 0; e < n; ++e)
            {
                float const w = sSize[e];
                total += w;
                XT const* src = xb + static_cast<size_t>(sPos[e]) * D;
#pragma unroll
                for (int q = 0; q < kMergeVec; ++q)
                {
                    int const d = d0 + tid + q * kMergeThreads;
                    if (d < D)
                    {
                        acc[q] = fmaf(toFloat(src[d]), w, acc[q]);
                    }
                }
            }
        }
#pragma unroll
        for (int q = 0; q < kMergeVec; ++q)
        {
            int const d = d0 + tid + q * kMergeThreads;
            if (d < D)
            {
                out[d] = fromFloat<XT>(acc[q] / total);
            }
        }
        if (d0 == 0 && tid == 0)
        {
            *sizeSlot = total;
        }
    }
}

__global__ void __launch_bounds__(kOwnerThreads) ownerUpdateKernel(int const* __restrict__ owner,
    int const* __restrict__ slotOfPos, int T, int N0, int* __restrict__ ownerOut)
{
    int const b = blockIdx.y;
    int const n = blockIdx.x * kOwnerThreads + threadIdx.x;
    if (n >= N0)
    {
        return;
    }
    size_t const idx = static_cast<size_t>(b) * N0 + n;
    int const o = owner[idx];
    ownerOut[idx] = (o >= 0 && o < T) ? slotOfPos[static_cast<size_t>(b) * T + o] : -1;
}

//! Where the A and B halves start and how long they are. Slots below numPrefix are in neither half.
struct Split
{
    int firstA;
    int firstB;
    int nA;
    int nB;

    Split(int T, int P, bool absoluteParity)
    {
        if (absoluteParity)
        {
            firstA = P + (P & 1);       // first even slot >= P
            firstB = P + ((P + 1) & 1); // first odd slot >= P
        }
        else
        {
            firstA = P;
            firstB = P + 1;
        }
        nA = T > firstA ? (T - firstA + 1) / 2 : 0;
        nB = T > firstB ? (T - firstB + 1) / 2 : 0;
    }
};

//! Sub-arrays of the workspace. With base == nullptr only the total size is computed. Sized for the larger half
//! so that one size serves both parities.
struct MergeWorkspace
{
    float* bestScore;
    int* bestIdx;
    int* rank;
    int* listKey;
    int* mergeList;
    int* slotOfPos;
    int* srcOfSlot;
    int* bOffset;
    int* bCount;
    size_t bytes;

    MergeWorkspace(void* base, int64_t batch, int64_t T, int64_t P, int64_t Tout)
    {
        int64_t const half = (T - P + 1) / 2;
        auto* const start = static_cast<char*>(base);
        size_t used = 0;
        auto take = [&](int64_t elements) {
            char* const ptr = start == nullptr ? nullptr : start + used;
            used += alignWorkspace(static_cast<size_t>(elements) * 4);
            return ptr;
        };
        bestScore = reinterpret_cast<float*>(take(batch * half));
        bestIdx = reinterpret_cast<int*>(take(batch * half));
        rank = reinterpret_cast<int*>(take(batch * half));
        listKey = reinterpret_cast<int*>(take(batch * half));
        mergeList = reinterpret_cast<int*>(take(batch * half));
        slotOfPos = reinterpret_cast<int*>(take(batch * T));
        srcOfSlot = reinterpret_cast<int*>(take(batch * Tout));
        bOffset = reinterpret_cast<int*>(take(batch * half));
        bCount = reinterpret_cast<int*>(take(batch * half));
        bytes = used;
    }
};

struct MergeArgs
{
    float const* size;
    int32_t const* owner;
    float* sizeOut;
    int32_t* ownerOut;
    int32_t* overflow;
    int batch;
    int T;
    int D;
    int C;
    int N0;
    int P;
    int r;
    float threshold;
    float const* thresholds; // (batch,) device values replacing `threshold`, or null
    int32_t flags;
    int Tout;
};

template <typename XT, typename MT>
void launchMerge(XT const* x, MT const* metric, XT* xOut, MergeArgs const& a, MergeWorkspace const& ws,
    cudaStream_t stream)
{
    Split const split(a.T, a.P, (a.flags & STATICPRUNE_MERGE_ABSOLUTE_PARITY) != 0);
    int const inclusive = (a.flags & STATICPRUNE_MERGE_INCLUSIVE) != 0 ? 1 : 0;
    int const keptByScore = (a.flags & STATICPRUNE_MERGE_KEPT_BY_SCORE) != 0 ? 1 : 0;
    unsigned const batch = static_cast<unsigned>(a.batch);
    if (split.nA > 0)
    {
        dim3 const simGrid(static_cast<unsigned>(ceilDiv(split.nA, kSimTileA)), batch);
        STATICPRUNE_LAUNCH(similarityArgmaxKernel<MT>, simGrid, kSimThreads, stream)(metric, a.size, a.T, a.C,
            split.firstA, split.firstB, split.nA, split.nB, ws.bestScore, ws.bestIdx);
        dim3 const rankGrid(static_cast<unsigned>(ceilDiv(split.nA, kRankThreads)), batch);
        STATICPRUNE_LAUNCH(scoreRankKernel, rankGrid, kRankThreads, stream)(ws.bestScore, split.nA, ws.rank);
    }
    // The merge list is written by mergeListKernel after planKernel: planKernel borrows it as scratch.
    STATICPRUNE_LAUNCH(planKernel, batch, kPlanThreads, stream)(a.size, ws.bestScore, ws.bestIdx, ws.rank, a.T, a.P,
        split.firstA, split.firstB, split.nA, split.nB, a.Tout, a.r, a.threshold, a.thresholds, inclusive, keptByScore,
        ws.listKey,
        ws.slotOfPos, ws.srcOfSlot, ws.bOffset, ws.bCount, ws.mergeList, a.overflow);
    if (split.nA > 0)
    {
        dim3 const listGrid(static_cast<unsigned>(ceilDiv(split.nA, kRankThreads)), batch);
        STATICPRUNE_LAUNCH(mergeListKernel, listGrid, kRankThreads, stream)(ws.listKey, split.nA, ws.mergeList);
    }
    if (a.Tout > 0)
    {
        dim3 const outGrid(static_cast<unsigned>(a.Tout), batch);
        STATICPRUNE_LAUNCH(mergeOutputKernel<XT>, outGrid, kMergeThreads, stream)(x, a.size, ws.srcOfSlot,
            ws.bOffset, ws.bCount, ws.mergeList, a.T, a.D, split.firstA, split.firstB, split.nA, split.nB, a.Tout,
            xOut, a.sizeOut);
    }
    if (a.N0 > 0)
    {
        dim3 const ownerGrid(static_cast<unsigned>(ceilDiv(a.N0, kOwnerThreads)), batch);
        STATICPRUNE_LAUNCH(ownerUpdateKernel, ownerGrid, kOwnerThreads, stream)(
            a.owner, ws.slotOfPos, a.T, a.N0, a.ownerOut);
    }
}

template <typename XT>
void dispatchMetric(void const* x, void const* metric, int32_t metricDtype, void* xOut, MergeArgs const& a,
    MergeWorkspace const& ws, cudaStream_t stream)
{
    if (metricDtype == STATICPRUNE_DTYPE_FLOAT32)
    {
        launchMerge(static_cast<XT const*>(x), static_cast<float const*>(metric), static_cast<XT*>(xOut), a, ws,
            stream);
    }
    else
    {
        launchMerge(static_cast<XT const*>(x), static_cast<__half const*>(metric), static_cast<XT*>(xOut), a, ws,
            stream);
    }
}

bool validDtype(int32_t dtype)
{
    return dtype == STATICPRUNE_DTYPE_FLOAT32 || dtype == STATICPRUNE_DTYPE_FLOAT16;
}

constexpr int32_t kKnownFlags
    = STATICPRUNE_MERGE_INCLUSIVE | STATICPRUNE_MERGE_ABSOLUTE_PARITY | STATICPRUNE_MERGE_KEPT_BY_SCORE;

} // namespace
} // namespace kernels
} // namespace staticprune

using namespace staticprune::kernels;

extern "C" STATICPRUNE_API int32_t staticprune_kernels_abi_version(void)
{
    return 1;
}

// staticprune_bipartite_merge_out_tokens is part of the plugin contract (common/staticprunePluginContract.cpp).

extern "C" STATICPRUNE_API size_t staticprune_bipartite_merge_workspace_size(
    int32_t batch, int32_t tokens, int32_t num_prefix, int32_t out_tokens)
{
    if (batch < 0 || tokens < 0 || num_prefix < 0 || num_prefix > tokens || out_tokens < 0)
    {
        return 0;
    }
    return MergeWorkspace(nullptr, batch, tokens, num_prefix, out_tokens).bytes;
}

extern "C" STATICPRUNE_API int32_t staticprune_bipartite_merge_thresholds(void const* x, int32_t x_dtype,
    void const* metric, int32_t metric_dtype, float const* size, int32_t const* owner, void* x_out, float* size_out,
    int32_t* owner_out, int32_t* overflow, int32_t batch, int32_t tokens, int32_t dim, int32_t metric_dim,
    int32_t num_orig, int32_t num_prefix, int32_t r, float threshold, float const* thresholds, int32_t flags,
    int32_t out_tokens, void* workspace, size_t workspace_size, staticprune_stream_t stream)
{
    if (!validDtype(x_dtype) || !validDtype(metric_dtype))
    {
        return STATICPRUNE_ERROR_UNSUPPORTED_DTYPE;
    }
    if (batch < 0 || batch > kMaxGridY || tokens < 0 || dim < 1 || metric_dim < 1 || num_orig < 0 || num_prefix < 0
        || num_prefix > tokens || (flags & ~kKnownFlags) != 0)
    {
        return STATICPRUNE_ERROR_INVALID_ARGUMENT;
    }
    int32_t const half = (tokens - num_prefix) / 2;
    if (out_tokens < tokens - half || out_tokens > tokens)
    {
        return STATICPRUNE_ERROR_INVALID_ARGUMENT;
    }
    if (batch == 0)
    {
        return STATICPRUNE_SUCCESS;
    }
    if ((tokens > 0 && (x == nullptr || metric == nullptr || size == nullptr))
        || (out_tokens > 0 && (x_out == nullptr || size_out == nullptr))
        || (num_orig > 0 && (owner == nullptr || owner_out == nullptr)) || overflow == nullptr)
    {
        return STATICPRUNE_ERROR_INVALID_ARGUMENT;
    }
    size_t const needed = staticprune_bipartite_merge_workspace_size(batch, tokens, num_prefix, out_tokens);
    if (workspace_size < needed || (needed > 0 && workspace == nullptr))
    {
        return STATICPRUNE_ERROR_WORKSPACE_TOO_SMALL;
    }
    MergeWorkspace const ws(workspace, batch, tokens, num_prefix, out_tokens);
    MergeArgs const args{size, owner, size_out, owner_out, overflow, batch, tokens, dim, metric_dim, num_orig,
        num_prefix, r, threshold, r < 0 ? thresholds : nullptr, flags, out_tokens};
    auto* const cudaStream = reinterpret_cast<cudaStream_t>(stream);
    if (x_dtype == STATICPRUNE_DTYPE_FLOAT32)
    {
        dispatchMetric<float>(x, metric, metric_dtype, x_out, args, ws, cudaStream);
    }
    else
    {
        dispatchMetric<__half>(x, metric, metric_dtype, x_out, args, ws, cudaStream);
    }
    return launchStatus();
}

extern "C" STATICPRUNE_API int32_t staticprune_bipartite_merge(void const* x, int32_t x_dtype, void const* metric,
    int32_t metric_dtype, float const* size, int32_t const* owner, void* x_out, float* size_out, int32_t* owner_out,
    int32_t* overflow, int32_t batch, int32_t tokens, int32_t dim, int32_t metric_dim, int32_t num_orig,
    int32_t num_prefix, int32_t r, float threshold, int32_t flags, int32_t out_tokens, void* workspace,
    size_t workspace_size, staticprune_stream_t stream)
{
    return staticprune_bipartite_merge_thresholds(x, x_dtype, metric, metric_dtype, size, owner, x_out, size_out,
        owner_out, overflow, batch, tokens, dim, metric_dim, num_orig, num_prefix, r, threshold, nullptr, flags,
        out_tokens, workspace, workspace_size, stream);
}
