"""
Flash attention: the fused attention of cuda_layers.py in one pass, on the tensor cores, as
FlashAttention-2 does it (--attention flash).

The blocked attention writes and reads (B,NH,T,T) matrices, and memory bandwidth bounds it. Here
each warp takes 16 query rows and walks over the keys 64 at a time, their scores in shared memory
only, with an online softmax (a running max m and sum l per row; the output rescaled when the max
grows): nothing of size (T,T) reaches global memory. The products are WMMA tiles (16x16): bf16
with float32 sums, or TF32 for float32 activations. The backward pass recomputes the scores from
q, k and the forward's lse, in two kernels (dq: a warp per 16 queries; dk, dv: a warp per 16 keys)
so that no gradient is added with atomics. q, k, v, out and dqkv stay in their (B,T,3C) and
(B,T,C) layouts: no transposed copies. Written for head size 64 and T a multiple of 64.

Imports llmc/cuda_common.py; imported by llmc/cuda_layers.py, whose attention_forward and
attention_backward call this module's forms where flash_applies.
"""

import glob
import math
import os
import re
import shutil
import sys
from typing import NamedTuple

import cupy
import numpy as np

# defines: the settings, the CUDA helpers and kernel compilation the GPU modules share
from llmc.cuda_common import WARP_SIZE, _CUDA_COMMON, _ceil_div, _first_line, _kernel, attention_form, tf32_enabled

# ----------------------------------------------------------------------------
# CUDA kernels
# plain layers (train_gpt2.attention_forward, _backward),
# per (b, head): preatt = q @ k^T * scale;
# att = softmax(preatt) over t2 <= t; out = att @ v;
# dv = att^T @ dout; datt = dout @ v^T;
# dpreatt = att * (datt - sum(datt * att));
# dq = dpreatt @ k * scale; dk = dpreatt^T @ q * scale

# head size; query rows (or keys) per block, 16 a warp; warps per block
FLASH_HEAD_SIZE, FLASH_ROWS, FLASH_WARPS = 64, 64, 4
FLASH_SCALE = 1.0 / math.sqrt(FLASH_HEAD_SIZE)  # attention's 1/sqrt(hs)
_FLASH_SRC = "#include <mma.h>\n" + _CUDA_COMMON + f"""
#define HS {FLASH_HEAD_SIZE}      // head size (every GPT-2 has 64)
#define ROWS {FLASH_ROWS}    // query rows (or keys) per block: WARPS warps of 16
#define KEYS ROWS  // keys (or queries) per step of a warp's walk
#define WARPS {FLASH_WARPS}
""" + r"""using namespace nvcuda;
#define OUT_LD (HS + 4)  // row stride of a (16, HS) tile in shared memory: the 4
                         // floats of padding put rows read side by side in different banks
#if FLOATX_IS_FLOAT
#define WMMA_K 8   // TF32 tiles are 16x16x8, loaded from float and rounded to TF32
typedef wmma::precision::tf32 wmma_in;
#else
#define WMMA_K 16  // bf16 tiles are 16x16x16
typedef __nv_bfloat16 wmma_in;
#endif
typedef wmma::fragment<wmma::matrix_a, 16, 16, WMMA_K, wmma_in, wmma::row_major> tile_a;
typedef wmma::fragment<wmma::matrix_b, 16, 16, WMMA_K, wmma_in, wmma::row_major> tile_b;
typedef wmma::fragment<wmma::matrix_b, 16, 16, WMMA_K, wmma_in, wmma::col_major> tile_bt;  // B read as rows of B^T
typedef wmma::fragment<wmma::accumulator, 16, 16, WMMA_K, float> tile_acc;

template <typename Tile> __device__ __forceinline__ void load_tile(Tile& tile, const floatX* p, unsigned ldm) {
    wmma::load_matrix_sync(tile, p, ldm);
#if FLOATX_IS_FLOAT
#pragma unroll
    for (int i = 0; i < tile.num_elements; i++) tile.x[i] = wmma::__float_to_tf32(tile.x[i]);
#endif
}

// Registers. A loop over an array of tiles (acc[n], a[kk]) is
// unrolled, or the array goes to local memory; the loops around
// those, and the softmax's, stay rolled (or unrolled by 4):
// fully unrolled, the kernels run out of registers and spill
// (tests/test_nvrtc.py fails on a spill).

// acc (16, HS) += a (16, KEYS) @ b (KEYS, HS), e.g. P @ v: a in
// shared memory (ldm lda), b rows of a (T, ...) matrix in global
// memory (ldm ldb)
__device__ __forceinline__ void tiles_times_rows(tile_acc* acc, const floatX* a, int lda, const floatX* b, long long ldb) {
#pragma unroll 1
    for (int kk = 0; kk < KEYS / WMMA_K; kk++) {
        tile_a at;
        load_tile(at, a + kk * WMMA_K, lda);
#pragma unroll
        for (int n = 0; n < HS / 16; n++) {
            tile_b bt;
            load_tile(bt, b + kk * WMMA_K * ldb + 16 * n, ldb);
            wmma::mma_sync(acc[n], at, bt, acc[n]);
        }
    }
}

// scores (16, KEYS) = a (16, HS, as tiles) @ b^T, e.g. q @ k^T:
// b the KEYS rows (HS wide) at b, ldm ldb
__device__ __forceinline__ void tiles_times_rows_t(float* scores, const tile_a* a, const floatX* b, long long ldb) {
#pragma unroll 1
    for (int n = 0; n < KEYS / 16; n++) {
        tile_acc acc;
        wmma::fill_fragment(acc, 0.0f);
#pragma unroll
        for (int kk = 0; kk < HS / WMMA_K; kk++) {
            tile_bt bt; load_tile(bt, b + 16 * n * ldb + kk * WMMA_K, ldb);
            wmma::mma_sync(acc, a[kk], bt, acc);
        }
        wmma::store_matrix_sync(scores + 16 * n, acc, KEYS, wmma::mem_row_major);
    }
}

// dst (16, HS, ldm ld) = scale * acc as floatX, via scratch:
// a row's 64 values by the 32 lanes side by side, two each
__device__ __forceinline__ void store_rows(floatX* dst, long long ld, tile_acc* acc, float* scratch, float scale) {
#pragma unroll
    for (int n = 0; n < HS / 16; n++) wmma::store_matrix_sync(scratch + 16 * n, acc[n], OUT_LD, wmma::mem_row_major);
    __syncwarp();
    int lane = threadIdx.x % WARP_SIZE;
    for (int r = 0; r < 16; r++)
        for (int j = lane; j < HS; j += WARP_SIZE) dst[r * ld + j] = (floatX)(scale * scratch[r * OUT_LD + j]);
    __syncwarp();
}

// the column at step i of a lane's walk over row r of a
// (16, KEYS) tile: lanes 2r and 2r+1 take half of it each, from
// different places, so that at every step the 32 lanes read 32
// different banks
__device__ __forceinline__ int column(int i, int r, int half) {
    return half * (KEYS / 2) + (i + r + 16 * half) % (KEYS / 2);
}

// Each output row is rescaled by its own factor as the max
// grows, but WMMA spreads a tile over the lanes as the hardware
// likes: so we load, once, a tile whose elements are their row
// numbers, to learn each element's row (every accumulator tile
// of one type has the same layout)
__device__ __forceinline__ void load_row_numbers(tile_acc& rows, float* scratch) {
    for (int i = threadIdx.x % WARP_SIZE; i < 16 * 16; i += WARP_SIZE) scratch[i] = (float)(i / 16);
    __syncwarp();
    wmma::load_matrix_sync(rows, scratch, 16, wmma::mem_row_major);
    __syncwarp();
}

// acc[n] *= row_scale[row], row as load_row_numbers says
__device__ __forceinline__ void scale_rows(tile_acc* acc, const tile_acc& rows, const float* row_scale) {
#pragma unroll
    for (int i = 0; i < rows.num_elements; i++) {
        float s = row_scale[(int)rows.x[i]];
#pragma unroll
        for (int n = 0; n < HS / 16; n++) acc[n].x[i] *= s;
    }
}

// out (B,T,C), lse (B,NH,T) from inp (B,T,3C); grid (T / ROWS, B * NH)
extern "C" __global__ void flash_attention_forward_kernel(
        floatX* out, float* lse, const floatX* inp, int T, int NH, float scale) {
    __shared__ __align__(32) float scores_all[WARPS][16 * OUT_LD];  // the scores, at last the output
    __shared__ __align__(32) floatX probs_all[WARPS][16 * KEYS];  // P
    __shared__ float row_scale_all[WARPS][16];  // each row's factor for the output: alpha, at last 1 / l
    int warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE;
    int bh = blockIdx.y, b = bh / NH, h = bh % NH, C = NH * HS;
    long long ld = 3LL * C;  // from one position's q (or k, v) to the next's
    int q0 = blockIdx.x * ROWS + warp * 16;  // this warp's queries: q0 .. q0 + 15
    const floatX* q = inp + ((long long)b * T + q0) * ld + h * HS;
    const floatX* k = inp + (long long)b * T * ld + C + h * HS;  // key 0's
    const floatX* v = k + C;
    float* scores = scores_all[warp];
    floatX* probs = probs_all[warp];
    float* row_scale = row_scale_all[warp];
    tile_a qt[HS / WMMA_K];
#pragma unroll
    for (int kk = 0; kk < HS / WMMA_K; kk++) load_tile(qt[kk], q + kk * WMMA_K, ld);
    tile_acc rows, o[HS / 16];  // the output: (16, HS) as 4 tiles
    load_row_numbers(rows, scores);
#pragma unroll
    for (int n = 0; n < HS / 16; n++) wmma::fill_fragment(o[n], 0.0f);
    // lanes 2r and 2r+1 own row r (query t), half of its columns each
    int r = lane / 2, half = lane % 2, t = q0 + r;
    float m = NEG_FLT_MAX, l = 0.0f;
    for (int k0 = 0; k0 <= q0 + 15; k0 += KEYS) {  // (then k0 <= q0 <= t: every row sees key k0)
        tiles_times_rows_t(scores, qt, k + k0 * ld, ld);  // q @ k^T for keys k0 .. k0 + KEYS
        __syncwarp();
        // online softmax: new max, old sum rescaled, new weights P
        float mx = NEG_FLT_MAX;
#pragma unroll 4
        for (int i = 0; i < KEYS / 2; i++) {
            int c = column(i, r, half);
            if (k0 + c <= t) mx = fmaxf(mx, scale * scores[r * KEYS + c]);
        }
        float m_new = fmaxf(m, fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1)));
        float alpha = expf(m - m_new), sum = 0.0f;
#pragma unroll 4
        for (int i = 0; i < KEYS / 2; i++) {
            int c = column(i, r, half);
            float p = k0 + c <= t ? expf(scale * scores[r * KEYS + c] - m_new) : 0.0f;
            probs[r * KEYS + c] = (floatX)p;
            sum += p;
        }
        l = l * alpha + sum + __shfl_xor_sync(0xffffffff, sum, 1);
        m = m_new;
        if (half == 0) row_scale[r] = alpha;
        __syncwarp();
        // o = alpha o + P @ v
        scale_rows(o, rows, row_scale);
        tiles_times_rows(o, probs, KEYS, v + k0 * ld, ld);
        __syncwarp();
    }
    // out = o / l, written row by row through shared memory
    if (half == 0) row_scale[r] = 1.0f / l;
    __syncwarp();
    scale_rows(o, rows, row_scale);
    store_rows(out + ((long long)b * T + q0) * C + h * HS, C, o, scores, 1.0f);
    if (half == 0) lse[(long long)bh * T + t] = m + logf(l);
}

// delta (B,NH,T) = sum over a head's channels of dout * out,
// which is the softmax backward's row term sum(P * dP); a thread
// per (b, h, t)
extern "C" __global__ void flash_attention_delta_kernel(
        float* delta, const floatX* dout, const floatX* out, int B, int T, int NH) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;  // (b * NH + h) * T + t
    if (i >= (long long)B * NH * T) return;
    int t = i % T, h = (i / T) % NH;
    long long b = i / T / NH, offset = (b * T + t) * NH * HS + h * HS;
    float sum = 0.0f;
    for (int d = 0; d < HS; d++) sum += (float)dout[offset + d] * (float)out[offset + d];
    delta[i] = sum;
}

// dq, dinp's first C columns: a warp per 16 queries, over their keys
extern "C" __global__ void flash_attention_backward_dq_kernel(
        floatX* dinp, const floatX* inp, const floatX* dout, const float* lse, const float* delta,
        int T, int NH, float scale) {
    __shared__ __align__(32) float scores_all[WARPS][16 * OUT_LD];  // the scores, then dP, at last dq
    __shared__ __align__(32) floatX probs_all[WARPS][16 * KEYS];  // P, then dS
    int warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE;
    int bh = blockIdx.y, b = bh / NH, h = bh % NH, C = NH * HS;
    long long ld = 3LL * C;
    int q0 = blockIdx.x * ROWS + warp * 16;
    const floatX* q = inp + ((long long)b * T + q0) * ld + h * HS;
    const floatX* k = inp + (long long)b * T * ld + C + h * HS;
    const floatX* v = k + C;
    const floatX* dy = dout + ((long long)b * T + q0) * C + h * HS;
    float* scores = scores_all[warp];
    floatX* probs = probs_all[warp];
    tile_a qt[HS / WMMA_K], dyt[HS / WMMA_K];
#pragma unroll
    for (int kk = 0; kk < HS / WMMA_K; kk++) {
        load_tile(qt[kk], q + kk * WMMA_K, ld);
        load_tile(dyt[kk], dy + kk * WMMA_K, C);
    }
    tile_acc dq[HS / 16];
#pragma unroll
    for (int n = 0; n < HS / 16; n++) wmma::fill_fragment(dq[n], 0.0f);
    int r = lane / 2, half = lane % 2, t = q0 + r;
    float row_lse = lse[(long long)bh * T + t], row_delta = delta[(long long)bh * T + t];
    for (int k0 = 0; k0 <= q0 + 15; k0 += KEYS) {
        tiles_times_rows_t(scores, qt, k + k0 * ld, ld);  // q @ k^T
        __syncwarp();
#pragma unroll 4
        for (int i = 0; i < KEYS / 2; i++) {  // P = exp(scale * q @ k^T - lse)
            int c = column(i, r, half);
            probs[r * KEYS + c] = (floatX)(k0 + c <= t ? expf(scale * scores[r * KEYS + c] - row_lse) : 0.0f);
        }
        __syncwarp();
        tiles_times_rows_t(scores, dyt, v + k0 * ld, ld);  // dP = dout @ v^T
        __syncwarp();
#pragma unroll 4
        for (int i = 0; i < KEYS / 2; i++) {  // dS = P (dP - delta), over P
            int c = column(i, r, half);
            probs[r * KEYS + c] = (floatX)((float)probs[r * KEYS + c] * (scores[r * KEYS + c] - row_delta));
        }
        __syncwarp();
        tiles_times_rows(dq, probs, KEYS, k + k0 * ld, ld);  // dq += dS @ k
        __syncwarp();
    }
    store_rows(dinp + ((long long)b * T + q0) * ld + h * HS, ld, dq, scores, scale);
}

// dk and dv, dinp's second and third C columns: a warp per 16
// keys, over the queries that see them (from the block's first
// key on)
extern "C" __global__ void flash_attention_backward_dkdv_kernel(
        floatX* dinp, const floatX* inp, const floatX* dout, const float* lse, const float* delta,
        int T, int NH, float scale) {
    __shared__ __align__(32) float scores_all[WARPS][16 * OUT_LD];  // scores^T, then dP^T, at last dk, dv
    __shared__ __align__(32) floatX probs_all[WARPS][16 * KEYS];  // P^T, then dS^T
    __shared__ float lse_all[WARPS][KEYS], delta_all[WARPS][KEYS];  // the queries' lse and delta
    int warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE;
    int bh = blockIdx.y, b = bh / NH, h = bh % NH, C = NH * HS;
    long long ld = 3LL * C;
    int key0 = blockIdx.x * ROWS + warp * 16;  // this warp's keys: key0 .. key0 + 15
    const floatX* q = inp + (long long)b * T * ld + h * HS;  // query 0's
    const floatX* k = inp + ((long long)b * T + key0) * ld + C + h * HS;
    const floatX* v = k + C;
    const floatX* dy = dout + (long long)b * T * C + h * HS;  // position 0's
    float* scores = scores_all[warp];
    floatX* probs = probs_all[warp];
    float *q_lse = lse_all[warp], *q_delta = delta_all[warp];
    tile_a kt[HS / WMMA_K], vt[HS / WMMA_K];
#pragma unroll
    for (int kk = 0; kk < HS / WMMA_K; kk++) {
        load_tile(kt[kk], k + kk * WMMA_K, ld);
        load_tile(vt[kk], v + kk * WMMA_K, ld);
    }
    tile_acc dk[HS / 16], dv[HS / 16];
#pragma unroll
    for (int n = 0; n < HS / 16; n++) {
        wmma::fill_fragment(dk[n], 0.0f);
        wmma::fill_fragment(dv[n], 0.0f);
    }
    int r = lane / 2, half = lane % 2, key = key0 + r;  // lanes 2r, 2r+1: key's row of P^T, halves of its queries
    for (int q0 = blockIdx.x * ROWS; q0 < T; q0 += KEYS) {
        tiles_times_rows_t(scores, kt, q + q0 * ld, ld);  // scores^T = k @ q^T
        for (int j = lane; j < KEYS; j += WARP_SIZE) {  // the queries' lse and delta, read once
            q_lse[j] = lse[(long long)bh * T + q0 + j];
            q_delta[j] = delta[(long long)bh * T + q0 + j];
        }
        __syncwarp();
#pragma unroll 4
        for (int i = 0; i < KEYS / 2; i++) {  // P^T, where query q0 + c sees the key
            int c = column(i, r, half);
            probs[r * KEYS + c] = (floatX)(q0 + c >= key ? expf(scale * scores[r * KEYS + c] - q_lse[c]) : 0.0f);
        }
        __syncwarp();
        tiles_times_rows(dv, probs, KEYS, dy + q0 * (long long)C, C);  // dv += P^T @ dout
        tiles_times_rows_t(scores, vt, dy + q0 * (long long)C, C);  // dP^T = v @ dout^T
        __syncwarp();
#pragma unroll 4
        for (int i = 0; i < KEYS / 2; i++) {  // dS^T = P^T (dP^T - delta), over P^T
            int c = column(i, r, half);
            probs[r * KEYS + c] = (floatX)((float)probs[r * KEYS + c] * (scores[r * KEYS + c] - q_delta[c]));
        }
        __syncwarp();
        tiles_times_rows(dk, probs, KEYS, q + q0 * ld, ld);  // dk += dS^T @ q
        __syncwarp();
    }
    floatX* dk_rows = dinp + ((long long)b * T + key0) * ld + C + h * HS;
    store_rows(dk_rows, ld, dk, scores, scale);
    store_rows(dk_rows + C, ld, dv, scores, 1.0f);
}
"""

FLASH_KERNELS = ("flash_attention_forward_kernel", "flash_attention_delta_kernel", "flash_attention_backward_dq_kernel",
                 "flash_attention_backward_dkdv_kernel")
DELTA_THREADS = 256


class FlashCache(NamedTuple):
    # what flash_attention_backward reads (no (T,T) array)
    inp: object  # (B,T,3C) q, k, v, 32-byte aligned
    out: object  # (B,T,C)
    lse: object  # (B,NH,T) float32: each row's log-sum-exp
    NH: int


# ----------------------------------------------------------------------------
# compiling: WMMA's headers

# the flash kernels' NVRTC options: (), or a toolkit's headers
_flash_options = ()


def _nvrtc_major():
    # the CUDA major version of CuPy's NVRTC
    try:
        return cupy.cuda.nvrtc.getVersion()[0]
    except Exception:  # noqa: BLE001 (no NVRTC binding: the runtime's version stands in)
        return cupy.cuda.runtime.runtimeGetVersion() // 1000


def _compute_capability():
    # this GPU's, as 80 for 8.0
    return int(cupy.cuda.Device().compute_capability)


def _cuda_toolkit_include(nvrtc_major=None):
    # an installed CUDA toolkit's include directory with WMMA's
    # crt/mma.h, of NVRTC's major version (CuPy's unless given), or
    # None. Looks in CUDA_PATH, CUDA_HOME, nvcc's toolkit, then
    # /usr/local/cuda
    nvrtc_major = nvrtc_major or _nvrtc_major()
    nvcc = shutil.which("nvcc")
    for root in (os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME"),
                 nvcc and os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "/usr/local/cuda"):
        include = os.path.join(root or "", "include")
        if root and os.path.exists(os.path.join(include, "crt", "mma.h")):
            try:
                with open(os.path.join(include, "cuda.h")) as f:  # #define CUDA_VERSION 13000
                    version = int(re.search(r"#define\s+CUDA_VERSION\s+(\d+)", f.read()).group(1))
            except (OSError, AttributeError):
                continue
            if version // 1000 == nvrtc_major:
                return include
    return None


def _nvcc_wheel_include(nvrtc_major=None):
    # CUDA 12's crt/mma.h from pip: nvidia-cuda-nvcc-cu12 puts it
    # in nvidia/cuda_nvcc/include, which has no cuda.h to tell its
    # version; the wheel's name beside it does. None if not there
    nvrtc_major = nvrtc_major or _nvrtc_major()
    for entry in sys.path:
        include = os.path.join(entry or ".", "nvidia", "cuda_nvcc", "include")
        if os.path.exists(os.path.join(include, "crt", "mma.h")) and \
                glob.glob(os.path.join(entry or ".", f"nvidia_cuda_nvcc_cu{nvrtc_major}-*.dist-info")):
            return include
    return None


def _crt_include(nvrtc_major=None):
    # where crt/mma.h is, for NVRTC's major version, when CuPy's
    # headers lack it: a CUDA toolkit's headers, else the wheel's
    return _cuda_toolkit_include(nvrtc_major) or _nvcc_wheel_include(nvrtc_major)


def _crt_wheel(nvrtc_major):
    # the pip wheel with crt/mma.h, by CUDA major version
    return "nvidia-cuda-nvcc-cu12" if nvrtc_major == 12 else "nvidia-cuda-crt" if nvrtc_major >= 13 else None


def _compile_flash(dtype, options):
    # compiles the flash kernels for dtype: None, or what NVRTC raised
    try:
        for name in FLASH_KERNELS:
            _kernel(_FLASH_SRC, name, dtype, options).compile()
    except Exception as e:  # noqa: BLE001 (NVRTC's errors, whatever their class)
        return e
    return None


def compile_flash_attention(dtype):
    # compiles the flash kernels now, so that a GPU or headers
    # without what they need is one clear error before any work.
    # TF32 and bf16 WMMA tiles need compute capability 8.0. WMMA's
    # mma.h includes crt/mma.h, which CUDA's pip wheels ship apart
    # (13: nvidia-cuda-crt; 12: nvidia-cuda-nvcc-cu12): a toolkit
    # or that wheel, of NVRTC's version, lends it then (read first)
    global _flash_options
    capability = _compute_capability()
    if capability < 80:
        raise RuntimeError(f"needs compute capability 8.0 or later (TF32 and bf16 tensor-core tiles); "
                           f"this GPU's is {capability / 10:.1f}")
    error = _compile_flash(dtype, _flash_options)
    if error is None:
        return
    crt = _crt_include() if '"crt/mma.h"' in str(error) else None
    if crt:
        error = _compile_flash(dtype, (f"-I{crt}",))
        if error is None:
            _flash_options = (f"-I{crt}",)  # what the flash launches pass from now on
            return
    reason = _first_line(error, "error")
    if '"crt/mma.h"' in str(error):
        major = _nvrtc_major()
        wheel = _crt_wheel(major)
        reason += (f"; CUDA {major}'s WMMA header: pip install {wheel}, or a CUDA {major} toolkit" if wheel else
                   f"; CUDA's WMMA header: a CUDA {major} toolkit")
    raise RuntimeError(f"the flash attention kernels do not compile here ({reason})") from None


# ----------------------------------------------------------------------------
# launchers


def flash_applies(dtype, T, hs):
    # with --attention flash, for head size 64, T a multiple of 64,
    # and bf16 or TF32 tensor cores; else the blocked attention runs
    return attention_form() == "flash" and hs == FLASH_HEAD_SIZE and T % FLASH_ROWS == 0 and \
        (dtype != np.float32 or tf32_enabled())


def _tile_aligned(x):
    # x C-contiguous from a 32-byte boundary, as WMMA loads need
    # (a new array is; a view at an offset may not be)
    x = cupy.ascontiguousarray(x)
    return x if x.data.ptr % 32 == 0 else cupy.array(x)


def flash_attention_forward(inp, NH):
    # attention_forward's flash form: inp (B,T,3C) -> out (B,T,C)
    B, T, C3 = inp.shape
    C = C3 // 3
    inp = _tile_aligned(inp)
    out = cupy.empty((B, T, C), dtype=inp.dtype)
    lse = cupy.empty((B, NH, T), dtype=cupy.float32)
    _kernel(_FLASH_SRC, "flash_attention_forward_kernel", inp.dtype, _flash_options)(
        (T // FLASH_ROWS, B * NH), (FLASH_WARPS * WARP_SIZE,),
        (out, lse, inp, np.int32(T), np.int32(NH), np.float32(FLASH_SCALE)))
    return out, FlashCache(inp, out, lse, NH)


def flash_attention_backward(dout, cache):
    # attention_backward's flash form: dout (B,T,C) -> dinp (B,T,3C)
    inp, out, lse, NH = cache
    B, T, C3 = inp.shape
    dout = _tile_aligned(dout)
    delta = cupy.empty((B, NH, T), dtype=cupy.float32)
    _kernel(_FLASH_SRC, "flash_attention_delta_kernel", inp.dtype, _flash_options)(
        (_ceil_div(B * NH * T, DELTA_THREADS),), (DELTA_THREADS,), (delta, dout, out, np.int32(B), np.int32(T), np.int32(NH)))
    dinp = cupy.empty((B, T, C3), dtype=inp.dtype)
    args = (dinp, inp, dout, lse, delta, np.int32(T), np.int32(NH), np.float32(FLASH_SCALE))
    for name in ("flash_attention_backward_dq_kernel", "flash_attention_backward_dkdv_kernel"):
        _kernel(_FLASH_SRC, name, inp.dtype, _flash_options)((T // FLASH_ROWS, B * NH), (FLASH_WARPS * WARP_SIZE,), args)
    return dinp
