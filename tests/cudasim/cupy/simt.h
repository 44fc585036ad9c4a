// simt.h: the CUDA execution model on the CPU, as much of it as cuda_layers.py's kernels use (see
// tests/cudasim/cupy/__init__.py). A grid runs block after block. Each CUDA thread of a block is a
// fiber (ucontext) of one host thread: it runs until it reaches a barrier (__syncthreads, __syncwarp,
// or either half of a warp shuffle), and waits there until every thread of its block (or of its warp)
// has arrived at that barrier or has returned, as on a GPU. So the barriers are real meeting points,
// in a deterministic order, at the cost of a context switch each.
#include <math.h>
#include <stddef.h>
#include <functional>
#include <vector>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>
#include <ucontext.h>
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
static uint3 threadIdx, blockIdx, blockDim, gridDim;
static float* sim_dynamic_shared;

enum SimState { SIM_READY, SIM_AT_WARP_BARRIER, SIM_AT_BLOCK_BARRIER, SIM_DONE };
struct SimThread {
    ucontext_t context;
    std::vector<char> stack;
    SimState state;
    long long warp_barriers, block_barriers;  // how many of each it has arrived at
};
static std::vector<SimThread> sim_threads;
static int sim_current;  // the thread running now
static ucontext_t sim_scheduler;
static const std::function<void()>* sim_body;
static float sim_exchange[1024];  // each thread's value in a warp shuffle

static void sim_arrive(SimState barrier) {
    SimThread& me = sim_threads[sim_current];
    (barrier == SIM_AT_WARP_BARRIER ? me.warp_barriers : me.block_barriers)++;
    me.state = barrier;
    swapcontext(&me.context, &sim_scheduler);  // back to the scheduler, until the others have arrived
}
static inline void __syncthreads() { sim_arrive(SIM_AT_BLOCK_BARRIER); }
static inline void __syncwarp(unsigned mask = 0xffffffffu) {
    if (mask != 0xffffffffu) abort();
    sim_arrive(SIM_AT_WARP_BARRIER);
}
static inline float __shfl_xor_sync(unsigned mask, float v, int offset) {
    if (mask != 0xffffffffu) abort();
    int lane = sim_current % 32, warp = sim_current / 32;
    sim_exchange[sim_current] = v;
    __syncwarp();  // every lane has put its value
    float r = sim_exchange[warp * 32 + (lane ^ offset)];
    __syncwarp();  // every lane has taken its partner's
    return r;
}

// nvcuda::wmma, the tensor cores' warp-wide matrix products, as far as the kernels use them. Every
// lane of the simulation holds the whole tile (a GPU spreads it over the 32 lanes, in an order of its
// own), which is all the same to code that only loads, multiplies, stores and changes every element
// alike. Loads and stores check the GPU's rules: a 32-byte aligned pointer, ldm a multiple of 16 bytes.
namespace nvcuda { namespace wmma {
struct matrix_a {}; struct matrix_b {}; struct accumulator {};
struct row_major {}; struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
namespace precision { struct tf32 {}; }
template <typename T> struct element_of { typedef T type; };
template <> struct element_of<precision::tf32> { typedef float type; };
template <typename Use, int M, int N, int K> struct tile;
template <int M, int N, int K> struct tile<matrix_a, M, N, K> { static const int rows = M, cols = K; };
template <int M, int N, int K> struct tile<matrix_b, M, N, K> { static const int rows = K, cols = N; };
template <int M, int N, int K> struct tile<accumulator, M, N, K> { static const int rows = M, cols = N; };
template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
    typedef typename element_of<T>::type element_type;
    static const int rows = tile<Use, M, N, K>::rows, cols = tile<Use, M, N, K>::cols;
    static const int num_elements = rows * cols;
    element_type x[num_elements];  // the tile, row-major
};
static inline void sim_check_tile(const void* p, unsigned ldm, int size, const char* what) {
    if ((unsigned long)p % 32 != 0 || (ldm * size) % 16 != 0) {
        fprintf(stderr, "wmma::%s: pointer %p must be 32-byte aligned and ldm %u a multiple of 16 bytes\n", what, p, ldm);
        abort();
    }
}
template <typename Use, int M, int N, int K, typename T, typename L, typename E>
static inline void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const E* p, unsigned ldm) {
    sim_check_tile(p, ldm, sizeof(E), "load_matrix_sync");
    bool col = __is_same(L, col_major);
    for (int r = 0; r < f.rows; r++)
        for (int c = 0; c < f.cols; c++) f.x[r * f.cols + c] = col ? p[(long)c * ldm + r] : p[(long)r * ldm + c];
}
template <int M, int N, int K, typename T>
static inline void load_matrix_sync(fragment<accumulator, M, N, K, T>& f, const T* p, unsigned ldm, layout_t layout) {
    sim_check_tile(p, ldm, sizeof(T), "load_matrix_sync");
    for (int r = 0; r < f.rows; r++)
        for (int c = 0; c < f.cols; c++)
            f.x[r * f.cols + c] = layout == mem_col_major ? p[(long)c * ldm + r] : p[(long)r * ldm + c];
}
template <int M, int N, int K, typename T>
static inline void store_matrix_sync(T* p, const fragment<accumulator, M, N, K, T>& f, unsigned ldm, layout_t layout) {
    sim_check_tile(p, ldm, sizeof(T), "store_matrix_sync");
    for (int r = 0; r < f.rows; r++)
        for (int c = 0; c < f.cols; c++)
            (layout == mem_col_major ? p[(long)c * ldm + r] : p[(long)r * ldm + c]) = f.x[r * f.cols + c];
}
template <typename Use, int M, int N, int K, typename T, typename L, typename V>
static inline void fill_fragment(fragment<Use, M, N, K, T, L>& f, const V& v) {
    for (int i = 0; i < f.num_elements; i++) f.x[i] = (typename fragment<Use, M, N, K, T, L>::element_type)v;
}
template <int M, int N, int K, typename T, typename LA, typename LB>
static inline void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
                            const fragment<matrix_b, M, N, K, T, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
    float out[M * N];
    for (int r = 0; r < M; r++)
        for (int n = 0; n < N; n++) {
            float sum = c.x[r * N + n];
            for (int k = 0; k < K; k++) sum += (float)a.x[r * K + k] * (float)b.x[k * N + n];
            out[r * N + n] = sum;
        }
    for (int i = 0; i < M * N; i++) d.x[i] = out[i];
}
static inline float __float_to_tf32(float f) {  // to 10 bits of mantissa, to nearest (ties away from zero)
    unsigned u; memcpy(&u, &f, 4);
    if ((u & 0x7f800000u) != 0x7f800000u) u = (u + 0x1000u) & ~0x1fffu;
    memcpy(&f, &u, 4);
    return f;
}
} }
#define __global__
#define __align__(n) __attribute__((aligned(n)))
#define __device__
#define __forceinline__ inline
#define __shared__ static

static void sim_thread_main() {
    (*sim_body)();
    sim_threads[sim_current].state = SIM_DONE;  // (then uc_link returns to the scheduler)
}

static bool sim_may_go(int t) {
    // a thread at a barrier goes on once every thread it waits for has arrived there (or returned)
    const SimThread& me = sim_threads[t];
    int n = (int)sim_threads.size();
    if (me.state == SIM_AT_WARP_BARRIER) {
        for (int u = t / 32 * 32; u < t / 32 * 32 + 32; u++)
            if (sim_threads[u].state != SIM_DONE && sim_threads[u].warp_barriers < me.warp_barriers) return false;
    } else if (me.state == SIM_AT_BLOCK_BARRIER) {
        for (int u = 0; u < n; u++)
            if (sim_threads[u].state != SIM_DONE && sim_threads[u].block_barriers < me.block_barriers) return false;
    }
    return true;
}

static void sim_run_grid(unsigned gx, unsigned gy, unsigned bx, unsigned by, long long smem, std::function<void()> body) {
    unsigned nthreads = bx * by;
    if (nthreads == 0 || nthreads > 1024 || nthreads % 32 != 0) { fprintf(stderr, "bad block %u\n", nthreads); abort(); }
    if (smem > 48 * 1024) { fprintf(stderr, "too much shared memory %lld\n", smem); abort(); }
    gridDim = {gx, gy, 1};
    blockDim = {bx, by, 1};
    std::vector<float> dynamic_shared(smem / 4 + 1);
    sim_dynamic_shared = dynamic_shared.data();
    sim_body = &body;
    if (sim_threads.size() != nthreads) sim_threads.resize(nthreads);  // (kept from launch to launch)
    for (auto& th : sim_threads)
        if (th.stack.empty()) th.stack.resize(64 * 1024);  // the kernels keep little on the stack
    for (unsigned y = 0; y < gy; y++)
        for (unsigned x = 0; x < gx; x++) {
            blockIdx = {x, y, 0};
            for (auto& f : dynamic_shared) f = nanf("");  // uninitialized shared memory
            for (auto& th : sim_threads) {
                getcontext(&th.context);
                th.context.uc_stack.ss_sp = th.stack.data();
                th.context.uc_stack.ss_size = th.stack.size();
                th.context.uc_link = &sim_scheduler;
                makecontext(&th.context, sim_thread_main, 0);
                th.state = SIM_READY;
                th.warp_barriers = th.block_barriers = 0;
            }
            // round after round, run every thread that may go on, until its next barrier or its end
            for (bool all_done = false; !all_done;) {
                all_done = true;
                bool progress = false;
                for (unsigned t = 0; t < nthreads; t++) {
                    if (sim_threads[t].state == SIM_DONE) continue;
                    all_done = false;
                    if (!sim_may_go(t)) continue;
                    sim_threads[t].state = SIM_READY;
                    sim_current = t;
                    threadIdx = {t % bx, t / bx, 0};
                    swapcontext(&sim_scheduler, &sim_threads[t].context);
                    progress = true;
                }
                if (!all_done && !progress) { fprintf(stderr, "deadlock: threads wait at barriers others never reach\n"); abort(); }
            }
        }
}
