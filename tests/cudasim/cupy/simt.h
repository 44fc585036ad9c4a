// simt.h: the CUDA execution model on the CPU, as much of it as cuda_layers.py's kernels use (see
// tests/cudasim/cupy/__init__.py). A grid runs block after block; each block's threads are host
// threads, so that __syncthreads, __syncwarp and the warp shuffles are real meeting points; the
// threads of a warp exchange values through the block's exch array.
#include <math.h>
#include <stddef.h>
#include <barrier>
#include <thread>
#include <vector>
#include <functional>
#include <memory>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>
struct uint3 { unsigned x, y, z; };
// bfloat16 as cuda_bf16.h has it, but with explicit conversions only: code that converts implicitly
// (ambiguous with the real header's operators) does not compile here
struct __nv_bfloat16 {
    unsigned short x;
    __nv_bfloat16() = default;
    explicit __nv_bfloat16(float f) {
        unsigned u; memcpy(&u, &f, 4);
        if ((u & 0x7fffffffu) > 0x7f800000u) { x = (unsigned short)((u >> 16) | 0x40); return; }  // nan stays nan
        u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
        x = (unsigned short)(u >> 16);
    }
    explicit operator float() const { unsigned u = (unsigned)x << 16; float f; memcpy(&f, &u, 4); return f; }
};
static thread_local uint3 threadIdx;
static thread_local int sim_tid;
static uint3 blockIdx, blockDim, gridDim;
static float* sim_dynamic_shared;
struct SimBlock {
    std::unique_ptr<std::barrier<>> block_bar;
    std::vector<std::unique_ptr<std::barrier<>>> warp_bars;
    float exch[1024];
};
static SimBlock* sim_block;
static inline float __shfl_xor_sync(unsigned mask, float v, int off) {
    if (mask != 0xffffffffu) abort();
    int lane = sim_tid % 32, warp = sim_tid / 32;
    sim_block->exch[sim_tid] = v;
    sim_block->warp_bars[warp]->arrive_and_wait();
    float r = sim_block->exch[warp * 32 + (lane ^ off)];
    sim_block->warp_bars[warp]->arrive_and_wait();
    return r;
}
static inline void __syncthreads() { sim_block->block_bar->arrive_and_wait(); }
static inline void __syncwarp(unsigned mask = 0xffffffffu) { sim_block->warp_bars[sim_tid / 32]->arrive_and_wait(); }
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static

static void sim_run_grid(unsigned gx, unsigned gy, unsigned bx, unsigned by, long long smem, std::function<void()> body) {
    // one host thread per CUDA thread of a block, kept for the whole grid: the blocks run one after
    // another, and the threads meet at a barrier between two blocks
    unsigned nthreads = bx * by;
    if (nthreads == 0 || nthreads > 1024 || nthreads % 32 != 0) { fprintf(stderr, "bad block %u\n", nthreads); abort(); }
    if (smem > 48 * 1024) { fprintf(stderr, "too much shared memory %lld\n", smem); abort(); }
    gridDim = {gx, gy, 1};
    blockDim = {bx, by, 1};
    std::vector<float> dyn(smem / 4 + 1);
    SimBlock block;
    block.block_bar.reset(new std::barrier<>(nthreads));
    for (unsigned w = 0; w < nthreads / 32; w++) block.warp_bars.emplace_back(new std::barrier<>(32));
    sim_block = &block;
    sim_dynamic_shared = dyn.data();
    std::barrier<> between_blocks(nthreads);
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < nthreads; t++)
        threads.emplace_back([t, bx, gx, gy, &body, &between_blocks, &dyn]() {
            threadIdx = {t % bx, t / bx, 0};
            sim_tid = t;
            for (unsigned y = 0; y < gy; y++)
                for (unsigned x = 0; x < gx; x++) {
                    if (t == 0) {
                        blockIdx = {x, y, 0};
                        for (auto& f : dyn) f = nanf("");  // uninitialized shared memory
                    }
                    between_blocks.arrive_and_wait();  // the block's index and shared memory are set
                    body();
                    between_blocks.arrive_and_wait();  // every thread is done with this block
                }
        });
    for (auto& th : threads) th.join();
}
