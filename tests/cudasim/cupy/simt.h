// simt.h: the CUDA execution model on the CPU, as much of it as cuda_layers.py's kernels use (see
// tests/cudasim/cupy/__init__.py). A grid runs block after block. Each CUDA thread of a block is a
// fiber (ucontext) of one host thread: it runs until it reaches a barrier (__syncthreads, __syncwarp,
// or either half of a warp shuffle), and waits there until every thread of its block (or of its warp)
// has arrived at that barrier or has returned, as on a GPU. So the barriers are real meeting points,
// in a deterministic order, at the cost of a context switch each.
//
// SIM_STRICT (CUDASIM_STRICT=1) takes away what a GPU does not promise, so that code relying on it
// fails here too: each lane holds only its share of a WMMA fragment, in an order drawn for each
// fragment type from sim_seed (CUDASIM_SEED); the threads of a block run in order, reversed or
// shuffled, drawn anew each round; static __shared__ arrays are NaN at each block's start.
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

// the strict mode's random numbers (splitmix64), from sim_seed, which the launcher sets
extern "C" { unsigned long long sim_seed = 0; }
static unsigned long long sim_random(unsigned long long& state) {
    unsigned long long z = (state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
static unsigned long long sim_hash(const char* s) {  // FNV-1a
    unsigned long long h = 0xcbf29ce484222325ull;
    for (; *s; s++) h = (h ^ (unsigned char)*s) * 0x100000001b3ull;
    return h;
}

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

// nvcuda::wmma, the tensor cores' warp-wide matrix products, as far as the kernels use them. A GPU
// spreads a tile over the 32 lanes, in an order of its own. Without SIM_STRICT every lane of the
// simulation holds the whole tile, row-major, which is all the same to code that only loads,
// multiplies, stores and changes every element alike. With SIM_STRICT a lane holds rows*cols/32
// elements, in a random order drawn for each fragment type, and mma_sync moves values between
// the lanes: code that assumes where an element sits gets wrong answers. Loads and stores check
// the GPU's rules: a 32-byte aligned pointer, ldm a multiple of 16 bytes.
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
#ifdef SIM_STRICT
    static const int num_elements = rows * cols / 32;  // this lane's share (sim_element says which)
#else
    static const int num_elements = rows * cols;  // the tile, row-major
#endif
    element_type x[num_elements];
};
#ifdef SIM_STRICT
// the tile elements (r * cols + c) the lanes hold: lane l's x[j] is element layout[l * num_elements
// + j], a permutation drawn from sim_seed and the fragment's type (__PRETTY_FUNCTION__ names it)
template <typename F> static const int* sim_layout() {
    static int layout[F::rows * F::cols];
    static unsigned long long drawn_for = 0;
    static bool drawn = false;
    if (!drawn || drawn_for != sim_seed) {
        unsigned long long state = sim_seed ^ sim_hash(__PRETTY_FUNCTION__);
        for (int e = 0; e < F::rows * F::cols; e++) layout[e] = e;
        for (int e = F::rows * F::cols - 1; e > 0; e--) {
            int o = (int)(sim_random(state) % (unsigned long long)(e + 1)), swap = layout[e];
            layout[e] = layout[o], layout[o] = swap;
        }
        drawn = true, drawn_for = sim_seed;
    }
    return layout;
}
template <typename F> static inline int sim_element(const F&, int j) {
    return sim_layout<F>()[sim_current % 32 * F::num_elements + j];
}
#else
template <typename F> static inline int sim_element(const F&, int j) { return j; }
#endif
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
    for (int j = 0; j < f.num_elements; j++) {
        int r = sim_element(f, j) / f.cols, c = sim_element(f, j) % f.cols;
        f.x[j] = col ? p[(long)c * ldm + r] : p[(long)r * ldm + c];
    }
}
template <int M, int N, int K, typename T>
static inline void load_matrix_sync(fragment<accumulator, M, N, K, T>& f, const T* p, unsigned ldm, layout_t layout) {
    sim_check_tile(p, ldm, sizeof(T), "load_matrix_sync");
    for (int j = 0; j < f.num_elements; j++) {
        int r = sim_element(f, j) / f.cols, c = sim_element(f, j) % f.cols;
        f.x[j] = layout == mem_col_major ? p[(long)c * ldm + r] : p[(long)r * ldm + c];
    }
}
template <int M, int N, int K, typename T>
static inline void store_matrix_sync(T* p, const fragment<accumulator, M, N, K, T>& f, unsigned ldm, layout_t layout) {
    sim_check_tile(p, ldm, sizeof(T), "store_matrix_sync");
    for (int j = 0; j < f.num_elements; j++) {
        int r = sim_element(f, j) / f.cols, c = sim_element(f, j) % f.cols;
        (layout == mem_col_major ? p[(long)c * ldm + r] : p[(long)r * ldm + c]) = f.x[j];
    }
}
template <typename Use, int M, int N, int K, typename T, typename L, typename V>
static inline void fill_fragment(fragment<Use, M, N, K, T, L>& f, const V& v) {
    for (int i = 0; i < f.num_elements; i++) f.x[i] = (typename fragment<Use, M, N, K, T, L>::element_type)v;
}
// d = a @ b + c, each sum in float from c's element, k in order (the same in either mode)
#ifdef SIM_STRICT
static float sim_mma_tiles[32][3][256];  // each warp's a, b and c, whole, while its lanes multiply
#endif
template <int M, int N, int K, typename T, typename LA, typename LB>
static inline void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
                            const fragment<matrix_b, M, N, K, T, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
#ifdef SIM_STRICT
    // every lane puts its elements of a, b and c in its warp's tiles, then computes its own of d
    float (*tiles)[256] = sim_mma_tiles[sim_current / 32];
    for (int j = 0; j < a.num_elements; j++) tiles[0][sim_element(a, j)] = (float)a.x[j];
    for (int j = 0; j < b.num_elements; j++) tiles[1][sim_element(b, j)] = (float)b.x[j];
    for (int j = 0; j < c.num_elements; j++) tiles[2][sim_element(c, j)] = c.x[j];
    sim_arrive(SIM_AT_WARP_BARRIER);  // every lane has put its elements
    static_assert(M * N <= 256 && M * K <= 256 && K * N <= 256, "tiles of at most 256 elements");
    float out[M * N / 32];
    for (int j = 0; j < d.num_elements; j++) {
        int r = sim_element(d, j) / N, n = sim_element(d, j) % N;
        float sum = tiles[2][r * N + n];
        for (int k = 0; k < K; k++) sum += tiles[0][r * K + k] * tiles[1][k * N + n];
        out[j] = sum;
    }
    sim_arrive(SIM_AT_WARP_BARRIER);  // every lane has read them (the next mma_sync refills them)
#else
    float out[M * N];
    for (int r = 0; r < M; r++)
        for (int n = 0; n < N; n++) {
            float sum = c.x[r * N + n];
            for (int k = 0; k < K; k++) sum += (float)a.x[r * K + k] * (float)b.x[k * N + n];
            out[r * N + n] = sum;
        }
#endif
    for (int i = 0; i < d.num_elements; i++) d.x[i] = out[i];
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
#ifdef SIM_STRICT
// static shared memory in a section of its own, which each block's start fills with NaN
#define __shared__ static __attribute__((section("sim_shared")))
extern char __start_sim_shared[] __attribute__((weak, visibility("hidden")));
extern char __stop_sim_shared[] __attribute__((weak, visibility("hidden")));
#else
#define __shared__ static
#endif

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
    std::vector<unsigned> order(nthreads);  // the order of a round
    for (unsigned t = 0; t < nthreads; t++) order[t] = t;
#ifdef SIM_STRICT
    static unsigned long long rounds_seed = ~0ull, rounds_state;  // (one stream of orders per seed)
    if (rounds_seed != sim_seed) rounds_seed = sim_seed, rounds_state = sim_seed ^ 0x5eedull;
#endif
    for (unsigned y = 0; y < gy; y++)
        for (unsigned x = 0; x < gx; x++) {
            blockIdx = {x, y, 0};
            for (auto& f : dynamic_shared) f = nanf("");  // uninitialized shared memory
#ifdef SIM_STRICT
            if (__stop_sim_shared != __start_sim_shared)  // (all bytes 0xff: NaN in float and bf16)
                memset(__start_sim_shared, 0xff, __stop_sim_shared - __start_sim_shared);
#endif
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
#ifdef SIM_STRICT
                // this round's order: as numbered, reversed, or shuffled: nothing may rely on it
                unsigned long long how = sim_random(rounds_state) % 3;
                for (unsigned t = 0; t < nthreads; t++) order[t] = how == 1 ? nthreads - 1 - t : t;
                for (unsigned t = nthreads - 1; how == 2 && t > 0; t--) {
                    unsigned o = (unsigned)(sim_random(rounds_state) % (t + 1)), swap = order[t];
                    order[t] = order[o], order[o] = swap;
                }
#endif
                for (unsigned t : order) {
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
