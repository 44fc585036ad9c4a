"""
Fused GPU forms of train_gpt2.py's layers, for --device cuda: llm.c's llmc/ folder, for CuPy.

With xp = cupy every layer of train_gpt2.py already runs on the GPU as written, but a layer such as
layernorm is a chain of a dozen array operations, each a kernel launch and a pass over memory.
Here such layers are one CUDA kernel (or a few) each: RawKernels, and an ElementwiseKernel for
AdamW. Attention's products call cuBLAS's strided-batched GEMM by blocks of rows (the blocked
attention), or, with --attention flash, attention is one pass on the tensor cores
(llmc/flash_attention.py). The encoder backward adds in a fixed order (no atomics), so a GPU run
is bit-for-bit reproducible.

The contract: every layer here has the signature and semantics of the plain layer of the same name
in train_gpt2.py (the same arguments, results, shapes and in-place writes into the gradient
buffers it is given). train_gpt2.use_device calls configure(), then installs FUSED_LAYERS in the
plain layers' place. Only a fused forward's cache is its own: its fused backward alone reads it.
tests/test_cuda_layers.py checks each one against its plain layer.

Precision: the recipe is written once, at the top of llmc/device.py. Here it means that with
--dtype fp32 everything is float32 except that matrix products round their inputs to TF32
(configure(tf32=True), as llm.c's fp32 CUDA trainer); and that each kernel is written once over
floatX (llm.c's name), compiled for its arrays' dtype, computes in float32 and rounds once when it
stores. CuPy compiles with -ftz=true: results below 1e-38 flush to zero.

Importing touches no GPU: CuPy compiles each kernel at its first launch (cached in
~/.cupy/kernel_cache). Without a GPU the tests run on a CPU simulation of CuPy (tests/cudasim).

Modules: llmc/cuda_common.py (settings, shared CUDA helpers) <- llmc/flash_attention.py <- this.
"""

import functools
import math
from typing import NamedTuple

import cupy
import numpy as np

# defines: the settings, the CUDA helpers and kernel compilation the GPU modules share
from llmc.cuda_common import (
    WARP_SIZE, _CUDA_COMMON, _ceil_div, _first_line, _kernel, attention_form, floatX, set_attention, set_dtype,
    set_tf32, tf32_enabled)
# defines: the one-pass attention, for --attention flash
from llmc.flash_attention import (
    FlashCache, compile_flash_attention, flash_applies, flash_attention_backward, flash_attention_forward)

# ----------------------------------------------------------------------------
# matrix products: cuBLAS strided-batched GEMM

# how cuBLAS names each dtype
_CUDA_TYPES = {"float32": cupy.cuda.runtime.CUDA_R_32F, "bfloat16": getattr(cupy.cuda.runtime, "CUDA_R_16BF", 14)}

# every GEMM's alpha = 1 and beta = 0, as host pointers: set
# each call, since the cuBLAS handle is CuPy's, shared with
# everything else
_ONE = np.array(1.0, dtype=np.float32)
_ZERO = np.array(0.0, dtype=np.float32)


def _cublas_layout(x):
    # (pointer, leading dimension, batch stride), in elements, of a
    # (batch, rows, cols) array with contiguous rows: C-contiguous,
    # or a block of one (att[:, s:e, :e])
    batch, rows, cols = x.shape
    size = x.itemsize
    assert x.dtype.name in _CUDA_TYPES and (x.strides[2] == size or cols == 1) and x.strides[1] % size == 0
    ld = x.strides[1] // size if rows > 1 else cols
    assert ld >= cols
    return x.data.ptr, ld, x.strides[0] // size if batch > 1 else rows * ld


def _batched_matmul(a, b, out, transpose_a=False, transpose_b=False, tf32=None):
    # out[i] = op(a[i]) @ op(b[i]) over the batch axis,
    # op(x) = x.T if asked; (batch, rows, cols) arrays with
    # contiguous rows, out (batch, M, N).
    # float32 a, b: TF32 as configured unless tf32 says.
    # bfloat16 a, b: the tensor cores add in float32, rounded
    # once to out's dtype at the end.
    batch, M, N = out.shape
    K = a.shape[1] if transpose_a else a.shape[2]
    assert a.shape[0] == b.shape[0] == batch and (b.shape[2] if transpose_b else b.shape[1]) == K
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    (a_ptr, lda, a_stride), (b_ptr, ldb, b_stride), (out_ptr, ldo, out_stride) = (_cublas_layout(x) for x in (a, b, out))
    cublas = cupy.cuda.cublas  # (CuPy loads cuBLAS on first use)
    handle = cupy.cuda.device.get_cublas_handle()
    cublas.setPointerMode(handle, cublas.CUBLAS_POINTER_MODE_HOST)
    tf32 = (tf32_enabled() if tf32 is None else tf32) and a.dtype == np.float32
    compute = cublas.CUBLAS_COMPUTE_32F_FAST_TF32 if tf32 else cublas.CUBLAS_COMPUTE_32F
    # cuBLAS is column-major: it reads row-major (r, c) as its
    # (c, r) transpose. So we ask for out^T = op(b)^T @ op(a)^T,
    # which it writes column-major: out, row-major. Each leading
    # dimension is a row stride.
    cublas.gemmStridedBatchedEx(
        handle,
        cublas.CUBLAS_OP_T if transpose_b else cublas.CUBLAS_OP_N,  # op of the first operand, b
        cublas.CUBLAS_OP_T if transpose_a else cublas.CUBLAS_OP_N,  # op of the second operand, a
        N, M, K,  # m, n, k of the column-major product out^T (N, M) = (N, K) @ (K, M)
        _ONE.ctypes.data,
        b_ptr, _CUDA_TYPES[b.dtype.name], ldb, b_stride,
        a_ptr, _CUDA_TYPES[a.dtype.name], lda, a_stride,
        _ZERO.ctypes.data,
        out_ptr, _CUDA_TYPES[out.dtype.name], ldo, out_stride,
        batch, compute, cublas.CUBLAS_GEMM_DEFAULT)


# ----------------------------------------------------------------------------
# CUDA helpers: sums and maxima across a block (the warps'
# results meet in shared memory), for kernels with a block per
# row

_CUDA_BLOCK_REDUCE = r"""
// the sum of v over a block's threads, returned to all
// (blockDim.x a multiple of 32)
__device__ float block_sum(float v) {
    __shared__ float warp_results[WARP_SIZE];
    int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE, warps = blockDim.x / WARP_SIZE;
    v = warp_sum(v);
    __syncthreads();  // an earlier call may still be reading warp_results
    if (lane == 0) warp_results[warp] = v;
    __syncthreads();
    return warp_sum(lane < warps ? warp_results[lane] : 0.0f);
}

__device__ float block_max(float v) {
    __shared__ float warp_results[WARP_SIZE];
    int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE, warps = blockDim.x / WARP_SIZE;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) warp_results[warp] = v;
    __syncthreads();
    return warp_max(lane < warps ? warp_results[lane] : NEG_FLT_MAX);
}
"""

# ----------------------------------------------------------------------------
# Encoder backward
# plain layer: xp.add.at(dwte, inp, dout);
# dwpe[:T] = dout.sum(axis=0); dwpe[T:] = 0
# CuPy's add.at adds a repeated token's rows with atomics, in
# any order: the rounding, and every later step, would change
# from run to run. Here the positions are sorted by token and
# each token's rows added in that order (as llm.c's
# deterministic encoder_backward): the same bits every run, so a
# resumed run continues exactly as the uninterrupted one.

_ENCODER_SRC = r"""
// dwte[tokens[r]] += sum of dout[order[j]] over the run j = r,
// r+1, ... of tokens[j] == tokens[r] (tokens sorted: a token's
// positions are one run). Block (r, ...) adds the run that
// starts at r, in order, a thread per channel; the blocks of
// other r return at once
extern "C" __global__ void encoder_backward_wte_kernel(
        float* dwte, const floatX* dout, const long long* order, const long long* tokens, int n, int C) {
    int r = blockIdx.x, c = blockIdx.y * blockDim.x + threadIdx.x;
    if (c >= C || (r > 0 && tokens[r] == tokens[r - 1])) return;  // not the first position of its token
    float sum = 0.0f;
    for (int j = r; j < n && tokens[j] == tokens[r]; j++) sum += (float)dout[order[j] * C + c];
    dwte[tokens[r] * C + c] += sum;
}

// dwpe[t, c] = sum over b of dout[b, t, c], in order; a thread per (t, c)
extern "C" __global__ void encoder_backward_wpe_kernel(float* dwpe, const floatX* dout, int B, int T, int C) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;  // t * C + c
    if (i >= (long long)T * C) return;
    float sum = 0.0f;
    for (int b = 0; b < B; b++) sum += (float)dout[b * (long long)T * C + i];
    dwpe[i] = sum;
}
"""
ENCODER_THREADS = 128


def encoder_backward(dout, cache, dwte, dwpe):
    # replaces train_gpt2.encoder_backward: dout (B,T,C); *adds*
    # into dwte (Vp,C), *overwrites* dwpe (maxT,C)
    inp = cache
    B, T = inp.shape
    C = dout.shape[-1]
    dout = cupy.ascontiguousarray(dout)
    assert dwte.flags.c_contiguous and dwpe.flags.c_contiguous and dwte.dtype == dwpe.dtype == np.float32
    # positions sorted by (token, position): unique keys, so one order
    flat = cupy.asarray(inp).ravel().astype(cupy.int64)
    order = cupy.argsort(flat * (B * T) + cupy.arange(B * T, dtype=cupy.int64))
    tokens = flat[order]  # (each token's positions now one run)
    _kernel(_ENCODER_SRC, "encoder_backward_wte_kernel", dout.dtype)(
        (B * T, _ceil_div(C, ENCODER_THREADS)), (ENCODER_THREADS,),
        (dwte, dout, order, tokens, np.int32(B * T), np.int32(C)))
    _kernel(_ENCODER_SRC, "encoder_backward_wpe_kernel", dout.dtype)(
        (_ceil_div(T * C, ENCODER_THREADS),), (ENCODER_THREADS,), (dwpe, dout, np.int32(B), np.int32(T), np.int32(C)))
    dwpe[T:] = 0.0  # positions beyond T were not used


# ----------------------------------------------------------------------------
# Matmul forward, for one row
# plain layer: out = inp @ weight^T + bias
# For many rows CuPy's `@` (cuBLAS) stays. Sampling sends one
# row at a time, and two launches (product, bias) per matmul, 49
# per token for GPT-2, become one kernel: a warp per output
# channel, reading its weight row.

_MATVEC_SRC = _CUDA_COMMON + r"""
// out[o] = sum over c of weight[o, c] * inp[c] + bias[o]; a warp per o
extern "C" __global__ void matvec_forward_kernel(
        floatX* out, const floatX* inp, const floatX* weight, const floatX* bias, int C, int OC, int has_bias) {
    int o = warp_index();
    int lane = threadIdx.x % WARP_SIZE;
    if (o >= OC) return;
    const floatX* w = weight + (long long)o * C;
    float sum = 0.0f;
    for (int c = lane; c < C; c += WARP_SIZE) sum += (float)w[c] * (float)inp[c];
    sum = warp_sum(sum);
    if (lane == 0) out[o] = (floatX)(has_bias ? sum + (float)bias[o] : sum);
}
"""
MATVEC_WARPS = 8  # output channels per block


def matmul_forward(inp, weight, bias):
    # replaces train_gpt2.matmul_forward: inp (B,T,C),
    # weight (OC,C), bias (OC,) or None -> out (B,T,OC),
    # cache (inp, weight). One row: our kernel; more: `@`
    B, T, C = inp.shape
    OC = weight.shape[0]
    if B * T != 1:
        out = inp.reshape(B * T, C) @ weight.T  # (B*T,C) @ (C,OC) -> (B*T,OC)
        if bias is not None:
            out += bias
        return out.reshape(B, T, OC), (inp, weight)
    x = cupy.ascontiguousarray(inp)
    w = cupy.ascontiguousarray(weight)
    b = cupy.ascontiguousarray(bias) if bias is not None else None
    out = cupy.empty((1, 1, OC), dtype=inp.dtype)
    _kernel(_MATVEC_SRC, "matvec_forward_kernel", inp.dtype)(
        (_ceil_div(OC, MATVEC_WARPS),), (MATVEC_WARPS * WARP_SIZE,),
        (out, x, w, b if b is not None else w, np.int32(C), np.int32(OC), np.int32(b is not None)))
    return out, (inp, weight)


# ----------------------------------------------------------------------------
# Matmul backward
# plain layer: dinp = dout @ weight; dweight = dout^T @ inp;
# dbias = dout.sum(axis=(0, 1))
# All three are cuBLAS products. dinp is CuPy's `@` and dweight
# our GEMM, both TF32 as configured; dweight goes straight into
# the float32 gradient buffer (CuPy's matmul of bf16 inputs would
# round it to bf16). dbias = ones (1, B*T) @ dout (B*T, OC):
# cuBLAS reads dout row by row, where CuPy's sum walks down its
# columns; in full fp32, since a sum should not round its terms
# to 10 bits.

@functools.cache
def _ones(n, dtype):
    # a (1,1,n) vector of ones, made once per length and dtype
    return cupy.ones((1, 1, n), dtype=dtype)


def _write_via_contiguous(gradients, write):
    # calls write(*targets), each target the gradient itself where
    # it is C-contiguous float32 (grads_memory's slices are), else a
    # scratch array, then copied into the gradient
    targets = [g if g.flags.c_contiguous and g.dtype == np.float32 else cupy.empty(g.shape, dtype=np.float32)
               for g in gradients]
    write(*targets)
    for gradient, target in zip(gradients, targets):
        if target is not gradient:
            gradient[...] = target


def matmul_backward(dout, cache, dweight, dbias):
    # replaces train_gpt2.matmul_backward: returns dinp (B,T,C);
    # *overwrites* dweight (OC,C) and dbias (OC,)
    inp, weight = cache
    B, T, C = inp.shape
    OC = weight.shape[0]
    dout2d = cupy.ascontiguousarray(dout).reshape(B * T, OC)  # (B*T,OC)
    dinp2d = dout2d @ weight  # (B*T,OC) @ (OC,C) -> (B*T,C)
    # dweight = dout^T @ inp: (OC,B*T) @ (B*T,C) -> (OC,C)
    _write_via_contiguous([dweight], lambda target: _batched_matmul(
        dout2d.reshape(1, B * T, OC), cupy.ascontiguousarray(inp).reshape(1, B * T, C), target.reshape(1, OC, C),
        transpose_a=True))
    if dbias is not None:
        _write_via_contiguous([dbias], lambda target: _batched_matmul(
            _ones(B * T, dout.dtype), dout2d.reshape(1, B * T, OC), target.reshape(1, 1, OC), tf32=False))
    return dinp2d.reshape(B, T, C)


# ----------------------------------------------------------------------------
# LayerNorm
# plain layer: mean = inp.mean(-1);
# var = ((inp - mean)**2).mean(-1); rstd = 1 / sqrt(var + eps);
# out = (inp - mean) * rstd * weight + bias
# A warp per row (b,t): lanes stride across C, shuffles add up.

_LAYERNORM_SRC = _CUDA_COMMON + r"""
// mean and rstd are float32 whatever floatX is: statistics stay float32
extern "C" __global__ void layernorm_forward_kernel(
        floatX* out, float* mean, float* rstd,
        const floatX* inp, const floatX* weight, const floatX* bias, int N, int C) {
    int row = warp_index();  // (b,t), of N = B*T
    int lane = threadIdx.x % WARP_SIZE;
    if (row >= N) return;  // (the whole warp leaves together: its shuffles stay complete)
    const floatX* x = inp + (long long)row * C;
    // mean = inp.mean(axis=-1)
    float sum = 0.0f;
    for (int i = lane; i < C; i += WARP_SIZE) sum += (float)x[i];
    float m = warp_sum(sum) / C;
    // var = (xshift * xshift).mean(axis=-1), xshift = inp - mean:
    // a second pass, over a row now in cache (more exact than
    // E[x^2] - mean^2)
    float sumsq = 0.0f;
    for (int i = lane; i < C; i += WARP_SIZE) {
        float xshift = (float)x[i] - m;
        sumsq += xshift * xshift;
    }
    float var = warp_sum(sumsq) / C;
    // rstd = 1.0 / sqrt(var + eps)
    float s = 1.0f / sqrtf(var + 1e-5f);
    // out = norm * weight + bias, norm = xshift * rstd
    floatX* o = out + (long long)row * C;
    for (int i = lane; i < C; i += WARP_SIZE) {
        float norm = ((float)x[i] - m) * s;
        o[i] = (floatX)(norm * (float)weight[i] + (float)bias[i]);
    }
    if (lane == 0) {
        mean[row] = m;
        rstd[row] = s;
    }
}

// plain layer: dnorm = dout * weight;
//   dinp = (dnorm - mean(dnorm) - norm * mean(dnorm * norm)) * rstd;
//   dbias = sum over (b,t) of dout; dweight = sum of dout * norm.
// Block b takes rows [b * rows_per_block, ...), a warp per row.
// Each warp adds dout and dout * norm into its own (2, C) sums
// in shared memory, lane i owning channels i, i+32, ...: no
// float is written by two threads, so no atomics, and the same
// sums every run (llm.c's atomics vary). The block then adds its
// warps' sums, in order, into its row of partial (nblocks, 2C).
extern "C" __global__ void layernorm_backward_kernel(
        floatX* dinp, float* partial,
        const floatX* dout, const floatX* inp, const floatX* weight, const float* mean, const float* rstd,
        int N, int C, int rows_per_block) {
    extern __shared__ float sums[];  // (warps, 2, C): each warp's dbias sums, then its dweight sums
    int warps = blockDim.x / WARP_SIZE, warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE;
    float* dbias_sum = sums + (long long)warp * 2 * C;
    float* dweight_sum = dbias_sum + C;
    for (int i = lane; i < 2 * C; i += WARP_SIZE) dbias_sum[i] = 0.0f;  // (both halves)
    __syncwarp();  // lane i zeroed dweight_sum[i] only if 32 divides C: wait for the others
    int first = blockIdx.x * rows_per_block;
    int last = first + rows_per_block < N ? first + rows_per_block : N;
    for (int row = first + warp; row < last; row += warps) {
        const floatX* x = inp + (long long)row * C;
        const floatX* dy = dout + (long long)row * C;
        float m = mean[row], s = rstd[row];
        // norm recomputed from inp (llm.c's layernorm.md); dinp's two means:
        float sum_dnorm = 0.0f, sum_dnorm_norm = 0.0f;
        for (int i = lane; i < C; i += WARP_SIZE) {
            float norm = ((float)x[i] - m) * s;
            float dyi = (float)dy[i];
            float dnorm = dyi * (float)weight[i];
            sum_dnorm += dnorm;
            sum_dnorm_norm += dnorm * norm;
            dbias_sum[i] += dyi;
            dweight_sum[i] += dyi * norm;
        }
        float mean_dnorm = warp_sum(sum_dnorm) / C;
        float mean_dnorm_norm = warp_sum(sum_dnorm_norm) / C;
        floatX* dx = dinp + (long long)row * C;
        for (int i = lane; i < C; i += WARP_SIZE) {
            float norm = ((float)x[i] - m) * s;
            float dnorm = (float)dy[i] * (float)weight[i];
            dx[i] = (floatX)((dnorm - mean_dnorm - norm * mean_dnorm_norm) * s);
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < 2 * C; i += blockDim.x) {
        float total = 0.0f;
        for (int w = 0; w < warps; w++) total += sums[(long long)w * 2 * C + i];
        partial[(long long)blockIdx.x * 2 * C + i] = total;
    }
}

// dbias[c] = sum over b of partial[b, c];
// dweight[c] = sum over b of partial[b, C + c].
// Block (32, 32): threadIdx.x picks a column, the 32 threadIdx.y
// walk down its rows in step, then a thread per column adds
// their 32 sums, in order.
extern "C" __global__ void layernorm_param_sums_kernel(
        float* dbias, float* dweight, const float* partial, int nblocks, int C) {
    __shared__ float column_sums[WARP_SIZE][WARP_SIZE + 1];  // (+1: no shared-memory bank conflicts)
    int col = blockIdx.x * WARP_SIZE + threadIdx.x;
    float total = 0.0f;
    if (col < 2 * C)
        for (int b = threadIdx.y; b < nblocks; b += blockDim.y) total += partial[(long long)b * 2 * C + col];
    column_sums[threadIdx.y][threadIdx.x] = total;
    __syncthreads();
    if (threadIdx.y == 0 && col < 2 * C) {
        total = 0.0f;
        for (int y = 0; y < blockDim.y; y++) total += column_sums[y][threadIdx.x];
        if (col < C) dbias[col] = total; else dweight[col - C] = total;
    }
}
"""

LAYERNORM_WARPS = 8  # rows (warps) in flight per block of the forward
LAYERNORM_ROWS_PER_WARP = 4  # rows per warp of the backward: more, fewer partial sums
SHARED_MEMORY_BYTES = 48 * 1024  # what a block may use without asking the driver for more


def layernorm_forward(inp, weight, bias):
    # replaces train_gpt2.layernorm_forward: inp (B,T,C) ->
    # out (B,T,C), cache (inp, weight, mean, rstd), mean and rstd
    # float32 (B,T,1)
    B, T, C = inp.shape
    N = B * T
    inp, weight, bias = (cupy.ascontiguousarray(x) for x in (inp, weight, bias))
    assert inp.dtype == weight.dtype == bias.dtype, (inp.dtype, weight.dtype, bias.dtype)
    out = cupy.empty((B, T, C), dtype=inp.dtype)
    mean = cupy.empty((B, T, 1), dtype=cupy.float32)
    rstd = cupy.empty((B, T, 1), dtype=cupy.float32)
    _kernel(_LAYERNORM_SRC, "layernorm_forward_kernel", inp.dtype)(
        (_ceil_div(N, LAYERNORM_WARPS),), (LAYERNORM_WARPS * WARP_SIZE,),
        (out, mean, rstd, inp, weight, bias, np.int32(N), np.int32(C)))
    return out, (inp, weight, mean, rstd)


def layernorm_backward(dout, cache, dweight, dbias):
    # replaces train_gpt2.layernorm_backward: returns dinp (B,T,C);
    # *overwrites* dweight and dbias (C,)
    inp, weight, mean, rstd = cache
    B, T, C = inp.shape
    N = B * T
    dout = cupy.ascontiguousarray(dout)
    assert dout.dtype == inp.dtype == weight.dtype, (dout.dtype, inp.dtype, weight.dtype)
    # each warp keeps (2, C) float32 sums in shared memory
    warps = min(LAYERNORM_WARPS, SHARED_MEMORY_BYTES // (2 * C * 4))
    if warps == 0:
        raise ValueError(f"layernorm_backward: C = {C} channels is more than this kernel's shared memory holds")
    rows_per_block = warps * LAYERNORM_ROWS_PER_WARP
    nblocks = max(1, _ceil_div(N, rows_per_block))
    dinp = cupy.empty((B, T, C), dtype=inp.dtype)
    partial = cupy.empty((nblocks, 2 * C), dtype=cupy.float32)  # each block's dbias, dweight
    _kernel(_LAYERNORM_SRC, "layernorm_backward_kernel", inp.dtype)(
        (nblocks,), (warps * WARP_SIZE,),
        (dinp, partial, dout, inp, weight, mean, rstd, np.int32(N), np.int32(C), np.int32(rows_per_block)),
        shared_mem=warps * 2 * C * 4)
    param_sums = _kernel(_LAYERNORM_SRC, "layernorm_param_sums_kernel", inp.dtype)
    _write_via_contiguous([dbias, dweight], lambda db, dw: param_sums(
        (_ceil_div(2 * C, WARP_SIZE),), (WARP_SIZE, WARP_SIZE), (db, dw, partial, np.int32(nblocks), np.int32(C))))
    return dinp


# ----------------------------------------------------------------------------
# Attention, by blocks of rows (llmc/flash_attention.py: in one pass)
# plain layer, per (b, head): preatt = q @ k^T / sqrt(hs);
# att = softmax(preatt) over t2 <= t (the causal mask); out = att @ v
# The products are cuBLAS GEMMs over all B*NH heads at once; the
# softmax and its backward are a warp per row (b, h, t).
#
# Memory: the plain layer keeps att (B,NH,T,T) for the backward
# pass, 400 MB a layer at B=8, T=1024, NH=12. Here the forward
# keeps q, k, v and each row's log-sum-exp lse (B,NH,T); the
# backward recomputes preatt = q @ k^T with one more GEMM and
# att = exp(scale * preatt - lse), as FlashAttention does: only
# the current layer's one or two (B,NH,T,T) arrays exist.
#
# Precision: the scores preatt are float32 whatever floatX is
# (in bf16 a score of 10 would move by 0.04, its weight by 4%).
# att, the input of the products with v, is floatX; in float32
# it is written over the scores.

_ATTENTION_SRC = _CUDA_COMMON + r"""
// the products go by blocks of query rows (ATTENTION_BLOCK): row
// t is read up to its block's end, so the kernels write it that
// far (zeros after t)
__device__ __forceinline__ int block_end(int t, int T, int block) {
    int end = (t / block + 1) * block;
    return end < T ? end : T;
}

// att = softmax(scale * preatt) over t2 <= t, 0 beyond (the
// causal mask); att may be preatt (float32: in place). Also
// lse = log(sum over t2 <= t of exp(scale * preatt)), all the
// backward needs to rebuild att. A warp per row,
// row = (b * NH + h) * T + t.
extern "C" __global__ void attention_softmax_kernel(
        floatX* att, float* lse, const float* preatt, int rows, int T, float scale, int block) {
    int row = warp_index();
    int lane = threadIdx.x % WARP_SIZE;
    if (row >= rows) return;
    int t = row % T;  // the query's position: it sees keys t2 = 0..t
    int end = block_end(t, T, block);
    const float* p = preatt + (long long)row * T;
    floatX* a = att + (long long)row * T;
    // max and sum of exp(x - max) in one pass: a new max rescales the sum
    float maxval = NEG_FLT_MAX, sumval = 0.0f;
    for (int t2 = lane; t2 <= t; t2 += WARP_SIZE) {
        float x = scale * p[t2];  // preatt = (q @ k^T) * scale
        if (x > maxval) {
            sumval *= expf(maxval - x);
            maxval = x;
        }
        sumval += expf(x - maxval);
    }
    float row_max = warp_max(maxval);
    float row_sum = warp_sum(sumval * expf(maxval - row_max));
    // att = exp(preatt - max) / sum where t2 <= t (one thread reads, writes)
    for (int t2 = lane; t2 < end; t2 += WARP_SIZE)
        a[t2] = (floatX)(t2 <= t ? expf(scale * p[t2] - row_max) / row_sum : 0.0f);
    if (lane == 0) lse[row] = row_max + logf(row_sum);
}

// the backward's att, from preatt = q @ k^T and the forward's
// lse (att may be preatt): att = exp(scale * preatt - lse) where
// t2 <= t. A warp per row.
extern "C" __global__ void attention_recompute_kernel(
        floatX* att, const float* preatt, const float* lse, int rows, int T, float scale, int block) {
    int row = warp_index();
    int lane = threadIdx.x % WARP_SIZE;
    if (row >= rows) return;
    int t = row % T;
    int end = block_end(t, T, block);
    const float* p = preatt + (long long)row * T;
    floatX* a = att + (long long)row * T;
    float row_lse = lse[row];
    for (int t2 = lane; t2 < end; t2 += WARP_SIZE) a[t2] = (floatX)(t2 <= t ? expf(scale * p[t2] - row_lse) : 0.0f);
}

// plain layer: dpreatt = att * (datt - sum over t2 of att * datt)
// The softmax's backward, times scale (folded in here once, not
// into both dq and dk), written over att (one thread reads, then
// writes each entry). Masked entries get 0. A warp per row.
extern "C" __global__ void attention_softmax_backward_kernel(
        floatX* att, const float* datt, int rows, int T, float scale, int block) {
    int row = warp_index();
    int lane = threadIdx.x % WARP_SIZE;
    if (row >= rows) return;
    int t = row % T;
    int end = block_end(t, T, block);
    const float* d = datt + (long long)row * T;
    floatX* a = att + (long long)row * T;
    float sum = 0.0f;
    for (int t2 = lane; t2 <= t; t2 += WARP_SIZE) sum += (float)a[t2] * d[t2];
    sum = warp_sum(sum);
    for (int t2 = lane; t2 < end; t2 += WARP_SIZE)
        a[t2] = (floatX)(t2 <= t ? scale * ((float)a[t2] * (d[t2] - sum)) : 0.0f);
}
"""

ATTENTION_WARPS = 8  # rows (warps) per block of the kernels above
# The causal mask leaves each (T,T) matrix's upper right
# triangle empty: the products go by blocks of query rows
# [s, e), against keys 0..e only. For T = 1024, 4 blocks
# compute and move 10/16 of the (T,T) matrices.
ATTENTION_BLOCK = 256  # query rows per block


def _row_blocks(T):
    # the blocks [s, e) of query rows, and of keys
    return [(s, min(s + ATTENTION_BLOCK, T)) for s in range(0, T, ATTENTION_BLOCK)]


def _attention_kernel(name, dtype, rows):
    # a launcher of an _ATTENTION_SRC kernel: a warp per (T,T) matrix row
    kernel = _kernel(_ATTENTION_SRC, name, dtype)
    return lambda *args: kernel((_ceil_div(rows, ATTENTION_WARPS),), (ATTENTION_WARPS * WARP_SIZE,), args)


def _scores(q, k, dtype):
    # preatt = q @ k^T unscaled, float32 (BNH,T,T), by row blocks;
    # and att for the softmax's output: preatt itself in float32
    BNH, T, _ = q.shape
    preatt = cupy.empty((BNH, T, T), dtype=cupy.float32)
    for s, e in _row_blocks(T):
        _batched_matmul(q[:, s:e], k[:, :e], preatt[:, s:e, :e], transpose_b=True)
    att = preatt if dtype == np.float32 else cupy.empty((BNH, T, T), dtype=dtype)
    return preatt, att


class BlockedCache(NamedTuple):
    # what the blocked attention_backward reads (no (T,T) array)
    qkv: object  # (3, B*NH, T, hs): q, k, v, contiguous
    lse: object  # (B,NH,T) float32: each row's log-sum-exp
    NH: int


def attention_forward(inp, NH):
    # replaces train_gpt2.attention_forward: inp (B,T,3C), q, k, v
    # side by side -> out (B,T,C), a BlockedCache or a FlashCache
    B, T, C3 = inp.shape
    C = C3 // 3
    hs = C // NH  # head size
    if flash_applies(inp.dtype, T, hs):
        return flash_attention_forward(inp, NH)
    scale = 1.0 / math.sqrt(hs)
    # q, k, v = inp.reshape(B,T,3,NH,hs).transpose(2,0,3,1,4),
    # one contiguous copy: 3 x (B*NH,T,hs)
    qkv = cupy.ascontiguousarray(inp.reshape(B, T, 3, NH, hs).transpose(2, 0, 3, 1, 4)).reshape(3, B * NH, T, hs)
    q, k, v = qkv
    preatt, att = _scores(q, k, inp.dtype)
    lse = cupy.empty((B, NH, T), dtype=cupy.float32)
    rows = B * NH * T
    _attention_kernel("attention_softmax_kernel", inp.dtype, rows)(
        att, lse, preatt, np.int32(rows), np.int32(T), np.float32(scale), np.int32(ATTENTION_BLOCK))
    del preatt
    out = cupy.empty((B * NH, T, hs), dtype=inp.dtype)
    for s, e in _row_blocks(T):  # out = att @ v: (T,T) @ (T,hs), rows s..e
        _batched_matmul(att[:, s:e, :e], v[:, :e], out[:, s:e])
    # re-assemble all head outputs side by side: (B,NH,T,hs) -> (B,T,C)
    out = cupy.ascontiguousarray(out.reshape(B, NH, T, hs).transpose(0, 2, 1, 3)).reshape(B, T, C)
    return out, BlockedCache(qkv, lse, NH)


def attention_backward(dout, cache):
    # replaces train_gpt2.attention_backward: dout (B,T,C) -> dinp (B,T,3C)
    if isinstance(cache, FlashCache):
        return flash_attention_backward(dout, cache)
    qkv, lse, NH = cache
    _, BNH, T, hs = qkv.shape
    B, C = BNH // NH, NH * hs
    scale = 1.0 / math.sqrt(hs)
    q, k, v = qkv
    assert dout.dtype == qkv.dtype, (dout.dtype, qkv.dtype)
    dout = cupy.ascontiguousarray(dout.reshape(B, T, NH, hs).transpose(0, 2, 1, 3)).reshape(BNH, T, hs)
    blocks = _row_blocks(T)
    rows = BNH * T
    # rebuild att: preatt = q @ k^T, then att = exp(scale * preatt - lse)
    preatt, att = _scores(q, k, qkv.dtype)
    _attention_kernel("attention_recompute_kernel", qkv.dtype, rows)(
        att, preatt, lse, np.int32(rows), np.int32(T), np.float32(scale), np.int32(ATTENTION_BLOCK))
    # dq, dk, dv side by side, as inp holds q, k, v
    dqkv = cupy.empty((3, BNH, T, hs), dtype=qkv.dtype)
    dq, dk, dv = dqkv
    # out = att @ v, so dv = att^T @ dout: keys s..e from the rows s..T
    for s, e in blocks:
        _batched_matmul(att[:, s:, s:e], dout[:, s:], dv[:, s:e], transpose_a=True)
    # datt = dout @ v^T, float32: in preatt's memory if att has its own
    datt = preatt if att is not preatt else cupy.empty((BNH, T, T), dtype=cupy.float32)
    del preatt
    for s, e in blocks:  # (T,hs) @ (hs,T), rows s..e against keys 0..e
        _batched_matmul(dout[:, s:e], v[:, :e], datt[:, s:e, :e], transpose_b=True)
    # att = softmax(preatt): att becomes scale * dpreatt, in place
    _attention_kernel("attention_softmax_backward_kernel", qkv.dtype, rows)(
        att, datt, np.int32(rows), np.int32(T), np.float32(scale), np.int32(ATTENTION_BLOCK))
    del datt
    dpreatt = att
    # preatt = scale * q @ k^T, so (scale already in dpreatt):
    for s, e in blocks:
        # dq = dpreatt @ k: rows s..e, keys 0..e; dk = dpreatt^T @ q: keys s..e
        _batched_matmul(dpreatt[:, s:e, :e], k[:, :e], dq[:, s:e])
        _batched_matmul(dpreatt[:, s:, s:e], q[:, s:], dk[:, s:e], transpose_a=True)
    # (3,B,NH,T,hs) -> (B,T,3,NH,hs) -> (B,T,3C)
    return cupy.ascontiguousarray(dqkv.reshape(3, B, NH, T, hs).transpose(1, 3, 0, 2, 4)).reshape(B, T, 3 * C)


# ----------------------------------------------------------------------------
# Attention over a KV cache, for sampling one token at a time
# plain layer (train_gpt2.attention_forward_cached), per head:
# store this position's key and value in the cache;
# att = softmax(keys @ q / sqrt(hs)) over positions 0..pos;
# out = att @ values
# One kernel, a block per head, for a dozen launches a layer.

_ATTENTION_CACHED_SRC = _CUDA_COMMON + _CUDA_BLOCK_REDUCE + r"""
// qkv (3C,): this position's q, k, v;
// kv_cache (2, NH, maxlen, hs): positions 0..pos-1's keys and
// values, and now pos's; out (C,): the heads' outputs
extern "C" __global__ void attention_cached_kernel(
        float* out, float* kv_cache, const float* qkv, int NH, int hs, int maxlen, int pos, float scale) {
    extern __shared__ float att[];  // (pos + 1,) this head's attention scores, then their exp
    int h = blockIdx.x, C = NH * hs;
    int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE, warps = blockDim.x / WARP_SIZE;
    const float* q = qkv + h * hs;
    float* keys = kv_cache + (long long)h * maxlen * hs;  // kv_cache[0, h]: (maxlen, hs)
    float* values = kv_cache + ((long long)NH + h) * maxlen * hs;  // kv_cache[1, h]
    // kv_cache[0, h, pos], kv_cache[1, h, pos] = k, v
    for (int d = threadIdx.x; d < hs; d += blockDim.x) {
        keys[(long long)pos * hs + d] = qkv[C + h * hs + d];
        values[(long long)pos * hs + d] = qkv[2 * C + h * hs + d];
    }
    __syncthreads();
    // att = keys @ q * scale: a warp per position t2, lanes across hs
    for (int t2 = warp; t2 <= pos; t2 += warps) {
        float s = 0.0f;
        for (int d = lane; d < hs; d += WARP_SIZE) s += keys[(long long)t2 * hs + d] * q[d];
        s = warp_sum(s);
        if (lane == 0) att[t2] = s * scale;
    }
    __syncthreads();
    // softmax over t2 = 0..pos (no mask); the max for stability
    float maxval = NEG_FLT_MAX;
    for (int t2 = threadIdx.x; t2 <= pos; t2 += blockDim.x) maxval = fmaxf(maxval, att[t2]);
    maxval = block_max(maxval);
    float sum = 0.0f;
    for (int t2 = threadIdx.x; t2 <= pos; t2 += blockDim.x) {
        att[t2] = expf(att[t2] - maxval);
        sum += att[t2];
    }
    sum = block_sum(sum);  // (its barriers also make every att[t2] above visible to all threads)
    // out = att @ values / sum: a thread per channel
    for (int d = threadIdx.x; d < hs; d += blockDim.x) {
        float acc = 0.0f;
        for (int t2 = 0; t2 <= pos; t2++) acc += att[t2] * values[(long long)t2 * hs + d];
        out[h * hs + d] = acc / sum;
    }
}
"""


def attention_forward_cached(qkv, kv_cache, pos, NH):
    # replaces train_gpt2.attention_forward_cached: qkv (1,1,3C) of
    # position pos, kv_cache (2,NH,maxlen,hs) filled to pos - 1
    # (now pos) -> out (1,1,C)
    C = qkv.shape[-1] // 3
    hs = C // NH
    maxlen = kv_cache.shape[2]
    assert kv_cache.flags.c_contiguous and kv_cache.dtype == cupy.float32 and 0 <= pos < maxlen
    qkv = cupy.ascontiguousarray(qkv)
    out = cupy.empty((1, 1, C), dtype=cupy.float32)
    _kernel(_ATTENTION_CACHED_SRC, "attention_cached_kernel", np.float32)(
        (NH,), (128,), (out, kv_cache, qkv, np.int32(NH), np.int32(hs), np.int32(maxlen), np.int32(pos),
                        np.float32(1.0 / math.sqrt(hs))), shared_mem=(pos + 1) * 4)
    return out


# ----------------------------------------------------------------------------
# GeLU
# plain layer: out = 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))
# Elementwise: a thread per element.

_GELU_SRC = r"""
#define GELU_SCALING_FACTOR 0.7978845608028654f  // sqrt(2 / pi), rounded to float32

extern "C" __global__ void gelu_forward_kernel(floatX* out, const floatX* inp, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float x = (float)inp[i];
    float cube = 0.044715f * x * x * x;
    out[i] = (floatX)(0.5f * x * (1.0f + tanhf(GELU_SCALING_FACTOR * (x + cube))));
}

extern "C" __global__ void gelu_backward_kernel(floatX* dinp, const floatX* inp, const floatX* dout, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float x = (float)inp[i];
    float cube = 0.044715f * x * x * x;
    float tanh_out = tanhf(GELU_SCALING_FACTOR * (x + cube));
    float sech2 = 1.0f - tanh_out * tanh_out;  // sech^2 = 1 / cosh^2 = 1 - tanh^2
    // d/dx of 0.5 * x * (1 + tanh(s * (x + 0.044715 x^3))):
    float local_grad = 0.5f * (1.0f + tanh_out) + x * 0.5f * sech2 * GELU_SCALING_FACTOR * (1.0f + 3.0f * 0.044715f * x * x);
    dinp[i] = (floatX)(local_grad * (float)dout[i]);
}
"""
GELU_THREADS = 256


def gelu_forward(inp):
    # replaces train_gpt2.gelu_forward: inp (B,T,4C) -> out, cache inp
    inp = cupy.ascontiguousarray(inp)
    out = cupy.empty(inp.shape, dtype=inp.dtype)
    _kernel(_GELU_SRC, "gelu_forward_kernel", inp.dtype)(
        (_ceil_div(inp.size, GELU_THREADS),), (GELU_THREADS,), (out, inp, np.int64(inp.size)))
    return out, inp


def gelu_backward(dout, cache):
    # replaces train_gpt2.gelu_backward: dinp = local_grad * dout
    inp = cache
    dout = cupy.ascontiguousarray(dout)
    assert dout.dtype == inp.dtype and dout.shape == inp.shape, (dout.dtype, inp.dtype, dout.shape, inp.shape)
    dinp = cupy.empty(inp.shape, dtype=inp.dtype)
    _kernel(_GELU_SRC, "gelu_backward_kernel", inp.dtype)(
        (_ceil_div(inp.size, GELU_THREADS),), (GELU_THREADS,), (dinp, inp, dout, np.int64(inp.size)))
    return dinp


# ----------------------------------------------------------------------------
# Softmax and cross-entropy over the vocabulary
# plain layers: probs = exp(logits - max) / sum over the first V
# of Vp columns; dlogits = probs * dloss - dloss at the target,
# 0 in the padded columns V..Vp
# A block per row (b,t): 50,257 entries are too many for a warp.

_SOFTMAX_SRC = _CUDA_COMMON + _CUDA_BLOCK_REDUCE + r"""
// probs (rows, V) = softmax of logits (rows, Vp)[:, :V], rows
// probs_stride apart; float32 whatever floatX is: the loss and
// its gradient read them
extern "C" __global__ void softmax_forward_kernel(
        float* probs, const floatX* logits, int rows, int V, int Vp, int probs_stride) {
    if (blockIdx.x >= rows) return;
    const floatX* x = logits + (long long)blockIdx.x * Vp;
    float* p = probs + (long long)blockIdx.x * probs_stride;
    // each thread's max and sum of exp(x - max), then the block's
    float maxval = NEG_FLT_MAX, sumval = 0.0f;
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
        float xi = (float)x[i];
        if (xi > maxval) {
            sumval *= expf(maxval - xi);
            maxval = xi;
        }
        sumval += expf(xi - maxval);  // (a logit of -inf, as top-k sampling makes, adds 0)
    }
    float row_max = block_max(maxval);
    float row_sum = block_sum(sumval * expf(maxval - row_max));
    // probs = exp(logits - max) / sum
    for (int i = threadIdx.x; i < V; i += blockDim.x) p[i] = expf((float)x[i] - row_max) / row_sum;
}

// dlogits (rows, Vp) = (probs[i] - 1[i == target]) * dloss,
// 0 for i >= V; probs' rows probs_stride apart. float32 dlogits
// may be probs itself (each thread reads an entry, then writes)
extern "C" __global__ void crossentropy_softmax_backward_kernel(
        floatX* dlogits, const float* dlosses, const float* probs, const int* targets, int rows, int V, int Vp,
        int probs_stride) {
    if (blockIdx.x >= rows) return;
    float dloss = dlosses[blockIdx.x];
    int target = targets[blockIdx.x];
    const float* p = probs + (long long)blockIdx.x * probs_stride;
    floatX* d = dlogits + (long long)blockIdx.x * Vp;
    for (int i = threadIdx.x; i < Vp; i += blockDim.x) {
        float g = 0.0f;  // the padded columns never entered the softmax
        if (i < V) {
            g = p[i] * dloss;
            if (i == target) g -= dloss;
        }
        d[i] = (floatX)g;
    }
}
"""

SOFTMAX_THREADS = 512  # per row: about 100 of GPT-2's 50,257 logits each


def softmax_forward(logits, V):
    # replaces train_gpt2.softmax_forward: logits (B,T,Vp) ->
    # probs (B,T,V) float32, a view of a new (B,T,Vp) buffer's
    # first V columns, so that float32 dlogits can go over it: no
    # other array that size (1.6 GB for GPT-2 at B=8, T=1024)
    B, T, Vp = logits.shape
    logits = cupy.ascontiguousarray(logits)
    buffer = cupy.empty((B, T, Vp), dtype=cupy.float32)
    _kernel(_SOFTMAX_SRC, "softmax_forward_kernel", logits.dtype)(
        (B * T,), (SOFTMAX_THREADS,), (buffer, logits, np.int32(B * T), np.int32(V), np.int32(Vp), np.int32(Vp)))
    return buffer[..., :V]


def crossentropy_softmax_backward(dlosses, probs, targets, Vp):
    # replaces train_gpt2.crossentropy_softmax_backward:
    # dlosses (B,T), probs (B,T,V), targets (B,T) -> dlogits
    # (B,T,Vp) of the configured floatX, 0 in the padding.
    # float32 dlogits go over softmax_forward's buffer: probs is
    # used up (nothing reads it after; the plain layer keeps it)
    B, T, V = probs.shape
    dlosses = cupy.ascontiguousarray(cupy.asarray(dlosses), dtype=cupy.float32)
    targets = cupy.ascontiguousarray(cupy.asarray(targets), dtype=cupy.int32)  # ids fit int32
    base = probs.base
    in_buffer = isinstance(base, cupy.ndarray) and base.shape == (B, T, Vp) and base.flags.c_contiguous \
        and probs.data.ptr == base.data.ptr and probs.strides == base.strides
    if in_buffer:
        probs, stride = base, Vp  # read probs from the buffer's first V columns
    else:
        probs, stride = cupy.ascontiguousarray(probs, dtype=cupy.float32), V
    # float32 dlogits go over the buffer; bf16 ones need their own
    dlogits = base if in_buffer and floatX() == np.float32 else cupy.empty((B, T, Vp), dtype=floatX())
    _kernel(_SOFTMAX_SRC, "crossentropy_softmax_backward_kernel", floatX())(
        (B * T,), (SOFTMAX_THREADS,),
        (dlogits, dlosses, probs, targets, np.int32(B * T), np.int32(V), np.int32(Vp), np.int32(stride)))
    return dlogits


# ----------------------------------------------------------------------------
# AdamW
# plain layer (train_gpt2.adamw_plain): m = beta1 m + (1 - beta1) g;
# v = beta2 v + (1 - beta2) g^2;
# param -= lr * (m_hat / (sqrt(v_hat) + eps) + weight_decay * param)
# Each value loaded and stored once, where adamw_plain makes a
# dozen temporary arrays. float32 throughout; bias corrections
# are Python floats rounded to float32, as NumPy does them.
# --fmad=false: no fused a * b + c, so the plain layer's roundings.

_adamw_kernel = cupy.ElementwiseKernel(
    "float32 grad, float32 learning_rate, float32 beta1, float32 beta2, float32 one_minus_beta1, "
    "float32 one_minus_beta2, float32 beta1_correction, float32 beta2_correction, float32 eps, "
    "float32 weight_decay",
    "float32 param, float32 m, float32 v",
    """
    m = beta1 * m + one_minus_beta1 * grad;
    v = beta2 * v + one_minus_beta2 * (grad * grad);
    float m_hat = m / beta1_correction;
    float v_hat = v / beta2_correction;
    param -= learning_rate * (m_hat / (sqrtf(v_hat) + eps) + weight_decay * param);
    """,
    "adamw_kernel", options=("--fmad=false",))


def adamw_fused(param, grad, m, v, learning_rate, beta1, beta2, eps, weight_decay, t):
    # replaces train_gpt2's adamw (adamw_plain): param, m, v in place
    f32 = np.float32
    _adamw_kernel(grad, f32(learning_rate), f32(beta1), f32(beta2), f32(1.0 - beta1), f32(1.0 - beta2),
                  f32(1.0 - beta1 ** t), f32(1.0 - beta2 ** t), f32(eps), f32(weight_decay),
                  param, m, v)


# ----------------------------------------------------------------------------
# the interface: what train_gpt2.use_device and its helpers call


def bfloat16():
    # ml_dtypes' bfloat16 (CuPy's), once this GPU and this CuPy are
    # checked to compute with it; else RuntimeError, saying why
    try:
        from ml_dtypes import bfloat16
    except ImportError:
        raise RuntimeError("needs the ml_dtypes package, which gives CuPy its bfloat16 dtype: pip install ml_dtypes") from None
    capability = int(cupy.cuda.Device().compute_capability)
    if capability < 80:
        raise RuntimeError(f"needs a GPU with bfloat16 tensor cores (compute capability 8.0, Ampere, or later); "
                           f"this one is {capability / 10:.1f}: use --dtype fp32")
    try:  # what we ask of CuPy's own bfloat16 code: fill, add, a 2-D product (cuBLAS), conversion
        a = cupy.ones((2, 2), dtype=bfloat16)
        ((a + a) @ a).astype(np.float32)
    except Exception as e:  # noqa: BLE001 (whatever an older CuPy raises: its reason is said)
        reason = _first_line(e)
        raise RuntimeError(f"CuPy {cupy.__version__} cannot make bfloat16 arrays here ({reason}): it needs CuPy 14 or "
                           f"later, with NumPy 2.1.2 or later") from None
    return bfloat16


def configure(tf32=True, dtype="fp32", attention="blocked"):
    # chooses, once with the GPU: TF32 matmuls or not, the
    # activations' dtype ("fp32" or "bf16") and the attention's
    # form ("blocked" or "flash"). Returns floatX; where this GPU
    # cannot, RuntimeError, its message naming the option
    assert dtype in ("fp32", "bf16") and attention in ("blocked", "flash"), (dtype, attention)
    try:
        floatX_dtype = bfloat16() if dtype == "bf16" else np.dtype(np.float32)
    except RuntimeError as e:
        raise RuntimeError(f"--dtype bf16: {e}") from None
    set_tf32(tf32)
    set_dtype(floatX_dtype)
    set_attention(attention)
    if attention == "flash":
        try:
            compile_flash_attention(floatX_dtype)  # now, not at the first step
        except RuntimeError as e:
            raise RuntimeError(f"--attention flash: {e}; use --attention blocked") from None
    return floatX_dtype


def device_description():
    # the GPU, its compute capability and memory, CuPy and CUDA
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    runtime, driver = (_cuda_version(v) for v in (cupy.cuda.runtime.runtimeGetVersion(),
                                                   cupy.cuda.runtime.driverGetVersion()))
    return (f"{name} (compute capability {props['major']}.{props['minor']}, "
            f"{props['totalGlobalMem'] / 2**30:.1f} GiB), CuPy {cupy.__version__}, "
            f"CUDA runtime {runtime}, driver {driver}")


def _cuda_version(v):
    return f"{v // 1000}.{v % 1000 // 10}"  # CUDA writes 13.0 as 13000


def describe(fused):
    # the device line after "cuda: ": the GPU, the layers, the precision
    layers = "fused kernels" if fused else "plain layers"
    if fused and attention_form() == "flash":
        layers += " (flash attention where it applies)"
    if floatX() != np.float32:
        precision = "bf16 activations and matmuls, fp32 parameters and gradients"
    else:
        precision = "fp32, TF32 matmuls" if tf32_enabled() else "fp32, fp32 matmuls"
    return f"{device_description()}; {layers}; {precision}"


def attention_bytes(B, NH, T):
    # bytes of (B,NH,T,T) arrays the fused attention needs at
    # once: the blocked form's two float32 ones (preatt, datt);
    # flash keeps its tiles on chip
    return 0 if attention_form() == "flash" else 4 * 2 * B * NH * T * T


def free_memory():
    # bytes free on the GPU, with those CuPy's memory pool holds unused
    free, _ = cupy.cuda.runtime.memGetInfo()
    return free + cupy.get_default_memory_pool().free_bytes()


def synchronize():
    # waits for the GPU's work so far (for timings)
    cupy.cuda.Device().synchronize()


# the plain layers of train_gpt2.py these replace, by name
FUSED_LAYERS = {
    "encoder_backward": encoder_backward,
    "matmul_forward": matmul_forward,
    "matmul_backward": matmul_backward,
    "attention_forward_cached": attention_forward_cached,
    "layernorm_forward": layernorm_forward,
    "layernorm_backward": layernorm_backward,
    "attention_forward": attention_forward,
    "attention_backward": attention_backward,
    "gelu_forward": gelu_forward,
    "gelu_backward": gelu_backward,
    "softmax_forward": softmax_forward,
    "crossentropy_softmax_backward": crossentropy_softmax_backward,
    "adamw": adamw_fused,
}
