/*
 * staticprune: a CPU emulation of the small CUDA subset used by the kernels (tests only).
 *
 * Build the kernel sources as host C++ with -DSTATICPRUNE_CPU_EMULATION -std=c++20 -x c++ and the launch
 * functions run every CUDA block on the CPU, one block at a time, with one fiber (ucontext) per CUDA thread on a
 * single OS thread (compile with -U_FORTIFY_SOURCE): __syncthreads() switches to the next fiber, and a block's fibers pass a barrier together once
 * every fiber that has not returned has reached it (round-robin, deterministic). __shared__ arrays are
 * function-local statics (shared by the fibers of the running block), atomicAdd is a plain add (one OS thread),
 * __half is _Float16 (round-to-nearest-even conversions, as __float2half_rn). Device pointers are host pointers.
 * Floating-point code that uses fmaf explicitly gives the same bits as on the GPU; this emulation checks the
 * kernels' logic (indexing, synchronisation, tie rules, determinism), not their speed.
 *
 * Not thread-safe: one launch at a time per process.
 */
#ifndef STATICPRUNE_CPU_EMULATION_H
#define STATICPRUNE_CPU_EMULATION_H

#if defined(_FORTIFY_SOURCE) && _FORTIFY_SOURCE > 0
// Fortified longjmp refuses to jump between stacks; build the emulation with -U_FORTIFY_SOURCE.
#error "staticprune CPU emulation: compile with -U_FORTIFY_SOURCE"
#endif

#include <setjmp.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <memory>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

using __half = _Float16;
using cudaStream_t = struct CUstream_st*;
using cudaError_t = int;
constexpr cudaError_t cudaSuccess = 0;

inline float __half2float(__half v)
{
    return static_cast<float>(v);
}

inline __half __float2half_rn(float v)
{
    return static_cast<__half>(v);
}

inline cudaError_t cudaGetLastError()
{
    return cudaSuccess;
}

struct dim3
{
    unsigned x, y, z;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1)
        : x(x_)
        , y(y_)
        , z(z_)
    {
    }
};

inline dim3 threadIdx;
inline dim3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

using std::max;
using std::min;

inline int atomicAdd(int* address, int value)
{
    int const old = *address;
    *address = old + value;
    return old;
}

namespace staticprune_emulation
{

constexpr size_t kFiberStackBytes = 64 * 1024;

struct Fiber
{
    ucontext_t context; // entry point, used once per block
    jmp_buf resume;     // where the fiber continues after a __syncthreads()
    char* stack = nullptr;
    dim3 index;
    bool started = false;
    bool finished = false;
};

struct GridState
{
    jmp_buf scheduler;
    std::vector<Fiber> fibers;
    size_t current = 0;
    std::vector<size_t> order;
    uint64_t shuffle = 0x5eed;
    std::function<void()> const* body = nullptr;
};

//! Fiber stacks, kept from launch to launch (allocating them is the dominant cost of small launches).
inline char* fiberStack(size_t t)
{
    static std::vector<std::unique_ptr<char[]>> pool;
    while (pool.size() <= t)
    {
        pool.emplace_back(new char[kFiberStackBytes]);
    }
    return pool[t].get();
}

inline GridState*& currentGrid()
{
    static GridState* state = nullptr;
    return state;
}

[[noreturn]] inline void fiberEntry()
{
    GridState* const grid = currentGrid();
    (*grid->body)();
    grid->fibers[grid->current].finished = true;
    _longjmp(grid->scheduler, 1);
}

//! Runs one fiber until its next __syncthreads() or its end. Kept out of line so that no local of the scheduler
//! loop lives in a frame that calls _setjmp.
__attribute__((noinline)) inline void resumeFiber(GridState& state, Fiber& fiber)
{
    if (_setjmp(state.scheduler) == 0)
    {
        if (!fiber.started)
        {
            fiber.started = true;
            setcontext(&fiber.context);
        }
        _longjmp(fiber.resume, 1);
    }
}

//! Runs `body` for every thread of every block; blocks run one after another, their threads as fibers.
//! Fibers start through makecontext/setcontext and then switch with _setjmp/_longjmp, which unlike swapcontext
//! do not make a signal-mask system call per switch.
inline void runGrid(dim3 grid, dim3 block, std::function<void()> const& body)
{
    long const nThreads = static_cast<long>(block.x) * block.y * block.z;
    long const nBlocks = static_cast<long>(grid.x) * grid.y * grid.z;
    if (nThreads <= 0 || nBlocks <= 0)
    {
        return;
    }
    GridState state;
    state.body = &body;
    state.fibers.resize(nThreads);
    ucontext_t entry;
    getcontext(&entry);
    for (long t = 0; t < nThreads; ++t)
    {
        state.order.push_back(static_cast<size_t>(t));
        state.fibers[t].stack = fiberStack(static_cast<size_t>(t));
        state.fibers[t].index
            = dim3(t % block.x, (t / block.x) % block.y, t / (static_cast<long>(block.x) * block.y));
    }
    currentGrid() = &state;
    blockDim = block;
    gridDim = grid;
    for (long blk = 0; blk < nBlocks; ++blk)
    {
        blockIdx = dim3(blk % grid.x, (blk / grid.x) % grid.y, blk / (static_cast<long>(grid.x) * grid.y));
        for (auto& fiber : state.fibers)
        {
            fiber.context = entry;
            fiber.context.uc_stack.ss_sp = fiber.stack;
            fiber.context.uc_stack.ss_size = kFiberStackBytes;
            fiber.context.uc_link = nullptr;
            makecontext(&fiber.context, fiberEntry, 0);
            fiber.started = false;
            fiber.finished = false;
        }
        // Each round resumes every live fiber once; a fiber runs until its next __syncthreads() or its return, so
        // after a round every live fiber waits at the same barrier and the next round releases them together.
        // The order of the fibers changes from round to round (a fixed pseudo-random shuffle), so that a missing
        // __syncthreads() shows up as a wrong result instead of being hidden by one lucky order.
        bool live = true;
        while (live)
        {
            live = false;
            for (size_t k = state.fibers.size(); k > 1; --k)
            {
                state.shuffle = state.shuffle * 6364136223846793005ULL + 1442695040888963407ULL;
                std::swap(state.order[k - 1], state.order[(state.shuffle >> 33) % k]);
            }
            for (size_t const t : state.order)
            {
                Fiber& fiber = state.fibers[t];
                if (fiber.finished)
                {
                    continue;
                }
                state.current = t;
                threadIdx = fiber.index;
                resumeFiber(state, fiber);
                live = live || !fiber.finished;
            }
        }
    }
    currentGrid() = nullptr;
}

template <typename Kernel>
struct Launcher
{
    Kernel kernel;
    dim3 grid;
    dim3 block;

    template <typename... Args>
    void operator()(Args... args) const
    {
        runGrid(grid, block, [&]() { kernel(args...); });
    }
};

template <typename Kernel>
Launcher<Kernel> makeLauncher(Kernel kernel, dim3 grid, dim3 block)
{
    return Launcher<Kernel>{kernel, grid, block};
}

} // namespace staticprune_emulation

inline void __syncthreads()
{
    auto* const grid = staticprune_emulation::currentGrid();
    if (_setjmp(grid->fibers[grid->current].resume) == 0)
    {
        _longjmp(grid->scheduler, 1);
    }
}

#define STATICPRUNE_LAUNCH(kernel, grid, block, stream)                                                             \
    (static_cast<void>(stream), ::staticprune_emulation::makeLauncher(&kernel, dim3(grid), dim3(block)))

#endif // STATICPRUNE_CPU_EMULATION_H
