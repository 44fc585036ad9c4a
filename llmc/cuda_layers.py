"""
Fused GPU forms of train_gpt2.py's layers, for --device cuda: llm.c's llmc/ folder, for CuPy.

With xp = cupy, every layer of train_gpt2.py already runs on the GPU as written, but a layer such
as layernorm is a chain of a dozen array operations, each one a kernel launch and a pass over
memory. Here the layers that profiling showed to matter are written again as one (or a few) CUDA
kernels each, with CuPy's own tools: RawKernels, and an ElementwiseKernel for AdamW, whose formula
is a few lines per element. Attention's matrix products call cuBLAS's strided-batched GEMM directly, with
TF32 tensor cores (CuPy's 3-D `@` does not use them), by blocks of rows; or, with --attention flash,
attention is one pass of our own on the tensor cores (WMMA), FlashAttention's way. The GPU's
encoder backward adds in a fixed order (no atomics), so that a GPU run is bit-for-bit reproducible.

The contract: every function here has exactly the signature and the semantics of the plain layer
of the same name in train_gpt2.py (the same arguments, results and shapes, the same in-place writes
into the gradient buffers it is given), so use_device can put it in the plain layer's place with
globals().update(FUSED_LAYERS). Only a fused forward's cache is its own: its fused backward is the
only reader. tests/test_cuda_layers.py checks each one against its plain layer.

Precision. With --dtype fp32 (the default) everything is float32, as in train_gpt2.py: stored in
float32 and computed in float32 (statistics, softmax, AdamW included). The one exception is TF32 in
matrix products (set_tf32), which rounds their *inputs* to 10 mantissa bits and accumulates in
float32, as llm.c's fp32 CUDA trainer does. With --dtype bf16 (set_dtype) the activations, and the
weights the layers compute with, are bfloat16 (8 bits of mantissa, float32's range), as llm.c's
train_gpt2.cu keeps its floatX tensors; every kernel still computes in float32 (it reads bfloat16,
converts, and rounds once when it stores), the matrix products multiply bfloat16 on the tensor cores
and add in float32, and the numerically touchy values stay float32 in memory too: LayerNorm's mean
and rstd, attention's scores before the softmax, the probabilities and the loss, and every gradient
of a parameter (see train_gpt2.py, "mixed precision"). Each kernel is written once, over a type
floatX (float or __nv_bfloat16, llm.c's name), and compiled for the dtype of the arrays it is given;
except AdamW's and sampling's (cached attention), which only ever see float32 (the parameters).
CuPy compiles every kernel with -ftz=true: results below 1e-38 flush to zero.

Nothing here touches the GPU when the module is imported: CuPy compiles each kernel at its first
launch (and caches the binary on disk, in ~/.cupy/kernel_cache). Without a GPU, the tests run these
kernels on a CPU simulation of CuPy (tests/cudasim, CUDASIM=1).
"""

import functools
import math
import os
import re
import shutil

import cupy
import numpy as np

# ----------------------------------------------------------------------------
# matrix products: cuBLAS strided-batched GEMM, TF32 by default

_tf32 = True  # TF32 tensor cores for the GEMMs here (attention, matmul's dweight); set_tf32 also sets CuPy's
floatX = np.dtype(np.float32)  # the activations' dtype (set_dtype): float32, or bfloat16 with --dtype bf16


def set_tf32(enabled):
    # Whether matrix products use TF32 tensor cores (as llm.c's CUDA trainers do) or full fp32:
    # for the GEMMs of this module, and for CuPy's own matmul (the linear layers' `@`), whose
    # setting is global in CuPy and off by default. Call it once when choosing the GPU.
    global _tf32
    from cupy._core import _routines_linalg  # CuPy's matmul settings (its tests use the same)
    enabled = bool(enabled) and int(cupy.cuda.Device().compute_capability) >= 80  # Ampere and later
    compute = _routines_linalg.COMPUTE_TYPE_TF32 if enabled else _routines_linalg.COMPUTE_TYPE_DEFAULT
    _routines_linalg.set_compute_type(cupy.float32, compute)
    _tf32 = enabled


def tf32_enabled():
    return _tf32


def set_dtype(dtype):
    # the dtype of the activations, chosen once with the GPU: float32, or ml_dtypes' bfloat16 (the
    # dtype CuPy uses for bf16). The layers take the dtype of the arrays they are given; this one
    # setting is for the one layer whose input does not say it: crossentropy_softmax_backward reads
    # float32 probabilities and writes dlogits, the input of the classifier's bf16 matmul_backward.
    global floatX
    floatX = np.dtype(dtype)
    assert floatX.name in _FLOATX, floatX


def _first_line(e, word=""):
    # an exception's message in one line: its first line with `word` in it (NVRTC's log may start with
    # warnings), else its first line, else its class name
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    return next((line for line in lines if word in line), lines[0] if lines else type(e).__name__)


def bfloat16():
    # the dtype of --dtype bf16, ml_dtypes' bfloat16 (which CuPy uses), once this GPU and this CuPy are
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
    except Exception as e:  # noqa: BLE001 (whatever an older CuPy raises: its reason goes in the message)
        reason = _first_line(e)
        raise RuntimeError(f"CuPy {cupy.__version__} cannot make bfloat16 arrays here ({reason}): it needs CuPy 14 or "
                           f"later, with NumPy 2.1.2 or later") from None
    return bfloat16


# how cuBLAS names each dtype, and each kernel's definition of floatX for it
_CUDA_TYPES = {"float32": cupy.cuda.runtime.CUDA_R_32F, "bfloat16": getattr(cupy.cuda.runtime, "CUDA_R_16BF", 14)}
_FLOATX = {
    "float32": "typedef float floatX;\n#define FLOATX_IS_FLOAT 1\n",
    # (conversions: (float)x reads a bfloat16 exactly; (floatX)f rounds a float to the nearest bfloat16)
    "bfloat16": "#include <cuda_bf16.h>\ntypedef __nv_bfloat16 floatX;\n#define FLOATX_IS_FLOAT 0\n",
}

# alpha = 1 and beta = 0 of every GEMM here, passed to cuBLAS as pointers to host memory. That is
# the handle's default pointer mode, and CuPy puts it back after any call of its own that changes
# it; we set it anyway before each call, since the handle is CuPy's, shared with everything else.
_ONE = np.array(1.0, dtype=np.float32)
_ZERO = np.array(0.0, dtype=np.float32)


def _matrix(x):
    # how cuBLAS finds a (batch, rows, cols) float32 or bfloat16 array whose rows are contiguous, a
    # C-contiguous array or a block of one (att[:, s:e, :e]): its pointer, the distance from one row to
    # the next (the leading dimension) and from one matrix of the batch to the next, in elements
    batch, rows, cols = x.shape
    size = x.itemsize
    assert x.dtype.name in _CUDA_TYPES and (x.strides[2] == size or cols == 1) and x.strides[1] % size == 0
    ld = x.strides[1] // size if rows > 1 else cols
    assert ld >= cols
    return x.data.ptr, ld, x.strides[0] // size if batch > 1 else rows * ld


def _batched_matmul(a, b, out, transpose_a=False, transpose_b=False, tf32=None):
    # out[i] = op(a[i]) @ op(b[i]) for each i of the first (batch) axis, where op(x) is x.T if asked.
    # All three are (batch, rows, cols) arrays with contiguous rows (see _matrix); out is (batch, M, N).
    # a and b are both float32 (then TF32 as set_tf32 chose, unless tf32 says otherwise; out float32)
    # or both bfloat16 (then the tensor cores multiply bfloat16 and add in float32; out float32 or
    # bfloat16: cuBLAS rounds the float32 sums to out's dtype once, at the end).
    batch, M, N = out.shape
    K = a.shape[1] if transpose_a else a.shape[2]
    assert a.shape[0] == b.shape[0] == batch and (b.shape[2] if transpose_b else b.shape[1]) == K
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    (a_ptr, lda, a_stride), (b_ptr, ldb, b_stride), (out_ptr, ldo, out_stride) = (_matrix(x) for x in (a, b, out))
    cublas = cupy.cuda.cublas  # (CuPy loads cuBLAS on first use)
    handle = cupy.cuda.device.get_cublas_handle()
    cublas.setPointerMode(handle, cublas.CUBLAS_POINTER_MODE_HOST)
    tf32 = (_tf32 if tf32 is None else tf32) and a.dtype == np.float32
    compute = cublas.CUBLAS_COMPUTE_32F_FAST_TF32 if tf32 else cublas.CUBLAS_COMPUTE_32F
    # cuBLAS is column-major: it reads a row-major (r, c) matrix as its (c, r) transpose. So we ask it
    # for out^T = op(b)^T @ op(a)^T, which it writes column-major: exactly out, row-major. The
    # leading dimension of each row-major matrix is its row stride, whether it is transposed or not.
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
# CUDA helpers for the RawKernels below: sums and maxima across a warp (32 threads that exchange
# registers with shuffles) and across a block (the warps' results meet in shared memory)

_CUDA_COMMON = r"""
#define WARP_SIZE 32
#define NEG_FLT_MAX (-3.402823466e+38f)  // the start of a running max: -inf would give inf - inf = nan

// the sum of v over the 32 lanes of a warp, returned to every lane
__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = WARP_SIZE / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffff, v, offset);
    return v;
}

// which warp of the whole grid this thread belongs to (kernels with a warp per row)
__device__ __forceinline__ int warp_index() {
    return blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int offset = WARP_SIZE / 2; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, offset));
    return v;
}
"""

# the same over a whole block, for kernels with one block per row
_CUDA_BLOCK_REDUCE = r"""
// the sum of v over all threads of a block (blockDim.x a multiple of 32), returned to every thread
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

WARP_SIZE = 32


def _ceil_div(a, b):
    return -(-a // b)


def _kernel(source, name, dtype, options=()):
    # the RawKernel `name` of `source`, with floatX defined as the dtype of the arrays it will be given
    # (float32 or bfloat16); CuPy compiles it at its first launch, with NVRTC's `options` added to its own
    return _raw_kernel(source, name, np.dtype(dtype).name, options)


@functools.cache  # (by the dtype's name: np.float32 and np.dtype("float32") are one kernel)
def _raw_kernel(source, name, dtype_name, options):
    return cupy.RawKernel(_FLOATX[dtype_name] + source, name, options=options)


# ----------------------------------------------------------------------------
# Encoder backward
# plain layer: xp.add.at(dwte, inp, dout), dwpe[:T] = dout.sum(axis=0), dwpe[T:] = 0. On a GPU, CuPy's
# add.at adds the rows of a repeated token with atomics, in whatever order the threads arrive: the
# sum's float32 rounding, and so every later step, changes from run to run. Here the positions are
# sorted by token first, and a row of blocks adds up each token's rows in that fixed order (llm.c's
# deterministic encoder_backward buckets them the same way): the same bits every run, so a resumed
# run continues exactly as the uninterrupted one would have.

_ENCODER_SRC = r"""
// dwte[tokens[r]] += the sum of dout[order[j]] over the run of j = r, r + 1, ... with tokens[j] == tokens[r]:
// tokens are the sorted positions' tokens, so each token's positions are one run, and block (r, ...)
// adds up the run that starts at r (the blocks of other r return at once), a thread per channel, in order
extern "C" __global__ void encoder_backward_wte_kernel(
        float* dwte, const floatX* dout, const long long* order, const long long* tokens, int n, int C) {
    int r = blockIdx.x, c = blockIdx.y * blockDim.x + threadIdx.x;
    if (c >= C || (r > 0 && tokens[r] == tokens[r - 1])) return;  // not the first position of its token
    float sum = 0.0f;
    for (int j = r; j < n && tokens[j] == tokens[r]; j++) sum += (float)dout[order[j] * C + c];
    dwte[tokens[r] * C + c] += sum;
}

// dwpe[t, c] = sum over b of dout[b, t, c], b in order; one thread per (t, c)
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
    # replaces train_gpt2.encoder_backward: dout (B,T,C); *adds* into dwte (Vp,C), *overwrites* dwpe (maxT,C)
    inp = cache
    B, T = inp.shape
    C = dout.shape[-1]
    dout = cupy.ascontiguousarray(dout)
    assert dwte.flags.c_contiguous and dwpe.flags.c_contiguous and dwte.dtype == dwpe.dtype == np.float32
    # the positions sorted by (token, position): a unique key each, so every sort gives this one order
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
# plain layer: out = inp @ weight^T + bias. For a batch of rows CuPy's `@` (cuBLAS) is the fast
# form, and it stays. Sampling with the KV cache sends one row at a time, and then the time goes to
# launching two kernels (the product and the bias) from Python, 49 times per token for GPT-2: one
# kernel of our own does both, a warp per output channel reading its weight row.

_MATVEC_SRC = _CUDA_COMMON + r"""
// out[o] = sum over c of weight[o, c] * inp[c] + bias[o] (+ 0 without a bias); one warp per o
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
    # replaces train_gpt2.matmul_forward: inp (B,T,C), weight (OC,C), bias (OC,) or None -> out
    # (B,T,OC) and the cache (inp, weight). One row: one kernel; more: the plain layer's `@`.
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
# plain layer: dinp = dout @ weight; dweight = dout^T @ inp; dbias = dout.sum(axis=(0, 1)). All three
# are cuBLAS products, dinp through CuPy's `@`, dinp and dweight with TF32 as chosen. dweight is
# written by a GEMM of our own, straight into the float32 gradient buffer whatever the activations'
# dtype (with bf16 inputs, CuPy's matmul would round it to bf16 first). The bias gradient as a
# product: CuPy sums a (B*T, OC) array over its first axis by walking down its columns, which reads
# memory with a large stride; as the product ones (1, B*T) @ dout (B*T, OC), cuBLAS reads dout row
# by row instead, several times faster. It is computed in full fp32 (no TF32): a sum should not
# round its terms to 10 bits.

@functools.cache
def _ones(n, dtype):
    # a (1,1,n) vector of ones, made once for each length and dtype asked for
    return cupy.ones((1, 1, n), dtype=dtype)


def _into_gradients(gradients, write):
    # write(*targets) writes the parameters' gradients: each straight into the model's float32 buffer
    # when it is contiguous (a slice of grads_memory always is), else into a scratch array, copied over
    targets = [g if g.flags.c_contiguous and g.dtype == np.float32 else cupy.empty(g.shape, dtype=np.float32)
               for g in gradients]
    write(*targets)
    for gradient, target in zip(gradients, targets):
        if target is not gradient:
            gradient[...] = target


def matmul_backward(dout, cache, dweight, dbias):
    # replaces train_gpt2.matmul_backward: returns dinp (B,T,C), *overwrites* dweight (OC,C) and dbias (OC,)
    inp, weight = cache
    B, T, C = inp.shape
    OC = weight.shape[0]
    dout2d = cupy.ascontiguousarray(dout).reshape(B * T, OC)  # (B*T,OC)
    dinp = dout2d @ weight  # (B*T,OC) @ (OC,C) -> (B*T,C)
    # dweight = dout^T @ inp: (OC,B*T) @ (B*T,C) -> (OC,C)
    _into_gradients([dweight], lambda target: _batched_matmul(
        dout2d.reshape(1, B * T, OC), cupy.ascontiguousarray(inp).reshape(1, B * T, C), target.reshape(1, OC, C),
        transpose_a=True))
    if dbias is not None:
        _into_gradients([dbias], lambda target: _batched_matmul(
            _ones(B * T, dout.dtype), dout2d.reshape(1, B * T, OC), target.reshape(1, 1, OC), tf32=False))
    return dinp.reshape(B, T, C)


# ----------------------------------------------------------------------------
# LayerNorm
# plain layer: mean = inp.mean(-1); var = ((inp - mean)**2).mean(-1); rstd = 1 / sqrt(var + eps);
# out = (inp - mean) * rstd * weight + bias. One warp per row (b,t): its 32 lanes stride across the
# C channels, and shuffles add up their partial sums.

_LAYERNORM_SRC = _CUDA_COMMON + r"""
// (mean and rstd are float32 whatever floatX is: the statistics are computed and kept in float32)
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
    // var = (xshift * xshift).mean(axis=-1), xshift = inp - mean: a second pass over the row, which
    // the first one left in the cache (more exact than E[x^2] - mean^2)
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

// dinp, as the plain layer: dnorm = dout * weight,
//   dinp = (dnorm - mean(dnorm) - norm * mean(dnorm * norm)) * rstd,
// and the parameters' gradients dbias = sum over (b,t) of dout, dweight = sum of dout * norm.
// Block b takes rows [b * rows_per_block, ...), one warp per row at a time. Each warp adds its rows'
// dout and dout * norm into its own (2, C) sums in shared memory, lane i owning channels i, i+32, ...:
// no two threads ever write the same float, so no atomics, and the sums come out identical on every
// run (llm.c adds with atomics, in an order that varies). At the end the block adds up its warps'
// sums in a fixed order into its row of partial (nblocks, 2C); layernorm_param_sums_kernel adds those.
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
        // norm is recomputed from inp (see llm.c's layernorm.md); the two means dinp needs:
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

// dbias[c] = sum over b of partial[b, c], dweight[c] = sum over b of partial[b, C + c]: the column
// sums of partial (nblocks, 2C). Block (32, 32): threadIdx.x picks a column, the 32 threadIdx.y walk
// down the rows in step, then one thread per column adds their 32 sums, in order.
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
LAYERNORM_ROWS_PER_WARP = 4  # rows each warp of the backward takes: more means fewer partial sums to add
SHARED_MEMORY_BYTES = 48 * 1024  # what a block may use without asking the driver for more


def layernorm_forward(inp, weight, bias):
    # replaces train_gpt2.layernorm_forward: out = (inp - mean) / sqrt(var + 1e-5) * weight + bias,
    # over the last axis of inp (B,T,C); returns out and (inp, weight, mean, rstd), mean and rstd (B,T,1)
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
    # replaces train_gpt2.layernorm_backward: returns dinp (B,T,C) and *overwrites* dweight and dbias (C,)
    inp, weight, mean, rstd = cache
    B, T, C = inp.shape
    N = B * T
    dout = cupy.ascontiguousarray(dout)
    assert dout.dtype == inp.dtype == weight.dtype, (dout.dtype, inp.dtype, weight.dtype)
    warps = min(LAYERNORM_WARPS, SHARED_MEMORY_BYTES // (2 * C * 4))  # each warp's (2, C) float32 sums
    if warps == 0:
        raise ValueError(f"layernorm_backward: C = {C} channels is more than this kernel's shared memory holds")
    rows_per_block = warps * LAYERNORM_ROWS_PER_WARP
    nblocks = max(1, _ceil_div(N, rows_per_block))
    dinp = cupy.empty((B, T, C), dtype=inp.dtype)
    partial = cupy.empty((nblocks, 2 * C), dtype=cupy.float32)  # each block's dbias and dweight sums
    _kernel(_LAYERNORM_SRC, "layernorm_backward_kernel", inp.dtype)(
        (nblocks,), (warps * WARP_SIZE,),
        (dinp, partial, dout, inp, weight, mean, rstd, np.int32(N), np.int32(C), np.int32(rows_per_block)),
        shared_mem=warps * 2 * C * 4)
    _into_gradients([dbias, dweight], lambda db, dw: _kernel(_LAYERNORM_SRC, "layernorm_param_sums_kernel", inp.dtype)(
        (_ceil_div(2 * C, WARP_SIZE),), (WARP_SIZE, WARP_SIZE), (db, dw, partial, np.int32(nblocks), np.int32(C))))
    return dinp


# ----------------------------------------------------------------------------
# Attention
# plain layer, per (b, head): preatt = q @ k^T / sqrt(hs); att = softmax(preatt) over t2 <= t
# (the causal mask), out = att @ v. The products are cuBLAS GEMMs over all B*NH heads at once;
# the softmax and its backward are one warp per row (b, h, t), up to the end of its block of rows.
#
# Memory: att is (B,NH,T,T), 400 MB per layer at B=8, T=1024, NH=12, and the plain layer keeps it
# for the backward pass: 4.8 GB for GPT-2's 12 layers. The fused forward keeps only q, k, v and each
# row's log-sum-exp lse (B,NH,T); the backward recomputes preatt = q @ k^T with one more GEMM and
# att = exp(scale * preatt - lse), as FlashAttention does. Only one or two (B,NH,T,T) arrays then
# exist at any time: the current layer's.
#
# Precision: the scores preatt = q @ k^T are float32 in memory whatever floatX is (cuBLAS writes the
# float32 sums of bf16 products as they are): rounded to bf16, a score of 10 would move by 0.04, and
# its attention weight by 4%. att, the input of the products with v, is floatX; with float32 it is
# written over the scores, in place. (PyTorch's flash attention never stores the scores at all.)

_ATTENTION_SRC = _CUDA_COMMON + r"""
// the products go by blocks of query rows (see ATTENTION_BLOCK): row t of the (T,T) matrices is read
// up to the end of its block, so the kernels write it that far (zeros after t)
__device__ __forceinline__ int block_end(int t, int T, int block) {
    int end = (t / block + 1) * block;
    return end < T ? end : T;
}

// att = softmax(scale * preatt) over t2 <= t, 0 beyond (the causal mask); att may be preatt itself
// (float32: in place). Also writes lse = log(sum over t2 <= t of exp(scale * preatt)), all the
// backward pass needs to rebuild att. One warp per row; row = (b * NH + h) * T + t.
extern "C" __global__ void attention_softmax_kernel(
        floatX* att, float* lse, const float* preatt, int rows, int T, float scale, int block) {
    int row = warp_index();
    int lane = threadIdx.x % WARP_SIZE;
    if (row >= rows) return;
    int t = row % T;  // the query's position: it sees keys t2 = 0..t
    int end = block_end(t, T, block);
    const float* p = preatt + (long long)row * T;
    floatX* a = att + (long long)row * T;
    // the max and the sum of exp(x - max) in one pass: when the max grows, rescale the sum so far
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
    // att = exp(preatt - max) / sum, where t2 <= t (each entry read, then written, by one thread)
    for (int t2 = lane; t2 < end; t2 += WARP_SIZE)
        a[t2] = (floatX)(t2 <= t ? expf(scale * p[t2] - row_max) / row_sum : 0.0f);
    if (lane == 0) lse[row] = row_max + logf(row_sum);
}

// the backward pass's att, rebuilt from preatt = q @ k^T and the forward's lse (att may be preatt):
// att = exp(scale * preatt - lse) = exp(scale * preatt - max) / sum, where t2 <= t. One warp per row.
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

// dpreatt = att * (datt - sum over t2 of att * datt), the softmax's backward, times scale (from
// preatt = scale * q @ k^T, folded in here once instead of into both dq and dk), written over att,
// in place (each entry is read, then written, by one thread). Masked entries (att = 0) get 0. One
// warp per row.
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
# The causal mask leaves the upper right triangle of every (T,T) matrix empty. The products below go
# by blocks of ATTENTION_BLOCK query rows, and block [s, e) of rows takes keys 0..e only: for
# T = 1024, 4 blocks compute and move 10/16 of the full (T,T) matrices. The kernels write each row up
# to its block's end, zeros after position t; nothing reads beyond.
ATTENTION_BLOCK = 256  # measured on an H100, GPT-2 124M at B=8, T=1024: 63.9 ms a step; 1024 (no blocks) 67.8, 512 64.7, 128 67.0


def _row_blocks(T):
    # the blocks [s, e) of query rows, and of keys
    return [(s, min(s + ATTENTION_BLOCK, T)) for s in range(0, T, ATTENTION_BLOCK)]


def _attention_kernel(name, dtype, rows):
    # launches a kernel of _ATTENTION_SRC: one warp per row of the (T,T) matrices
    kernel = _kernel(_ATTENTION_SRC, name, dtype)
    return lambda *args: kernel((_ceil_div(rows, ATTENTION_WARPS),), (ATTENTION_WARPS * WARP_SIZE,), args)


def _scores(q, k, dtype):
    # preatt = q @ k^T (unscaled), float32 (BNH,T,T), rows s..e against keys 0..e of each row block;
    # and att, the softmax's (BNH,T,T) output: preatt's own memory in float32, else an array of dtype
    BNH, T, _ = q.shape
    preatt = cupy.empty((BNH, T, T), dtype=cupy.float32)
    for s, e in _row_blocks(T):
        _batched_matmul(q[:, s:e], k[:, :e], preatt[:, s:e, :e], transpose_b=True)
    att = preatt if dtype == np.float32 else cupy.empty((BNH, T, T), dtype=dtype)
    return preatt, att


def attention_forward(inp, NH):
    # replaces train_gpt2.attention_forward: inp (B,T,3C) holds q, k, v side by side; returns the
    # causal self-attention out (B,T,C) and a cache with q, k, v and lse (but no (B,NH,T,T) array)
    B, T, C3 = inp.shape
    C = C3 // 3
    hs = C // NH  # head size
    if _flash_applies(inp.dtype, T, hs):
        return _flash_attention_forward(inp, NH)
    scale = 1.0 / math.sqrt(hs)
    # q, k, v = inp.reshape(B,T,3,NH,hs).transpose(2,0,3,1,4): one copy makes them contiguous, 3 x (B*NH,T,hs)
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
    # re-assemble all head outputs side by side: (B,NH,T,hs) -> (B,T,NH,hs) -> (B,T,C)
    out = cupy.ascontiguousarray(out.reshape(B, NH, T, hs).transpose(0, 2, 1, 3)).reshape(B, T, C)
    return out, (qkv, lse, NH)


def attention_backward(dout, cache):
    # replaces train_gpt2.attention_backward: dout (B,T,C) -> dinp (B,T,3C)
    if isinstance(cache[0], str):  # ("flash", ...)
        return _flash_attention_backward(dout, cache)
    qkv, lse, NH = cache
    _, BNH, T, hs = qkv.shape
    B, C = BNH // NH, NH * hs
    scale = 1.0 / math.sqrt(hs)
    q, k, v = qkv
    assert dout.dtype == qkv.dtype, (dout.dtype, qkv.dtype)
    dout = cupy.ascontiguousarray(dout.reshape(B, T, NH, hs).transpose(0, 2, 1, 3)).reshape(BNH, T, hs)
    blocks = _row_blocks(T)
    rows = BNH * T
    # rebuild att: preatt = q @ k^T again, then att = exp(scale * preatt - lse) where t2 <= t
    preatt, att = _scores(q, k, qkv.dtype)
    _attention_kernel("attention_recompute_kernel", qkv.dtype, rows)(
        att, preatt, lse, np.int32(rows), np.int32(T), np.float32(scale), np.int32(ATTENTION_BLOCK))
    dqkv = cupy.empty((3, BNH, T, hs), dtype=qkv.dtype)  # dq, dk, dv side by side, as inp holds q, k, v
    dq, dk, dv = dqkv
    # out = att @ v, so dv = att^T @ dout: keys s..e get the gradient of the rows s..T that see them
    for s, e in blocks:
        _batched_matmul(att[:, s:, s:e], dout[:, s:], dv[:, s:e], transpose_a=True)
    # datt = dout @ v^T, float32: into preatt's memory where att has its own, else a new array
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
        _batched_matmul(dpreatt[:, s:e, :e], k[:, :e], dq[:, s:e])  # dq = dpreatt @ k: rows s..e, keys 0..e
        _batched_matmul(dpreatt[:, s:, s:e], q[:, s:], dk[:, s:e], transpose_a=True)  # dk = dpreatt^T @ q: keys s..e
    # (3,B,NH,T,hs) -> (B,T,3,NH,hs) -> (B,T,3C)
    return cupy.ascontiguousarray(dqkv.reshape(3, B, NH, T, hs).transpose(1, 3, 0, 2, 4)).reshape(B, T, 3 * C)


# ----------------------------------------------------------------------------
# Attention in one pass: flash attention on the tensor cores (not yet the default: see ATTENTION_KERNEL)
# The blocked attention above writes and reads (B,NH,T,T) matrices, and memory bandwidth bounds it.
# Here, as in FlashAttention-2, each warp takes 16 query rows and walks over the keys 64 at a time,
# keeping the scores of those 64 keys in shared memory only, with the softmax done online (a running
# max m and sum l per row, the output rescaled whenever the max grows): nothing of size (T,T) ever
# reaches global memory. The products run on the tensor cores through WMMA (warp-wide 16x16 tiles):
# bf16 inputs with float32 sums, or TF32 for float32 activations. The backward pass recomputes the
# scores from q, k and the forward's lse, and takes two kernels, one for dq (a warp per 16 queries,
# over their keys) and one for dk and dv (a warp per 16 keys, over the queries that see them), so
# that no gradient is added with atomics. q, k, v are read, and out and dqkv written, straight in
# their (B,T,3C) and (B,T,C) layouts: no transposed copies. Written for GPT-2's head size 64 and T a
# multiple of 64; anything else takes the blocked form.

FLASH_HEAD_SIZE, FLASH_ROWS, FLASH_WARPS = 64, 64, 4  # head size; query rows (or keys) per block, 16 a warp
FLASH_SCALE = 1.0 / math.sqrt(FLASH_HEAD_SIZE)  # attention's 1/sqrt(hs)
_FLASH_SRC = "#include <mma.h>\n" + _CUDA_COMMON + f"""
#define HS {FLASH_HEAD_SIZE}      // head size (every GPT-2 has 64)
#define ROWS {FLASH_ROWS}    // query rows (or keys) per block: WARPS warps of 16
#define KEYS ROWS  // keys (or queries) per step of a warp's walk (dk/dv's walk starts at its block's ROWS)
#define WARPS {FLASH_WARPS}
""" + r"""using namespace nvcuda;
#define OUT_LD (HS + 4)  // the row stride of a warp's (16, HS) output tile in shared memory: 4 floats of
                         // padding put the rows that lanes read side by side in different banks
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

// Registers. A loop over an array of tiles (acc[n], a[kk]) must be unrolled, or the array goes to
// local memory; the loops around those, and the softmax's, are left rolled (or unrolled by 4). Fully
// unrolled, the backward kernels took all 255 registers a thread may have (the forward about 180),
// 2 blocks of 128 threads per multiprocessor, and TF32's spilled to local memory; as here, NVRTC 13.5
// gives them (sm_90, forward / dq / dk,dv) 96 / 127 / 168 registers in bf16, 5 / 4 / 3 blocks per
// multiprocessor, and 128 / 166 / 255 in TF32, without spills (dev/check_kernels.py prints these;
// tests/test_nvrtc.py fails on any spill).

// out (16, HS) = a (16, K) @ b (K, HS) added to acc, a from shared memory (ldm lda), b rows of a
// (T, ...) matrix in global memory (ldm ldb): the product of a row block with 64 keys' values
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

// scores (16, KEYS) = a (16, HS, as tiles) @ rows^T, rows the KEYS rows (HS wide) at b, ldm ldb
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

// writes a warp's (16, HS) accumulator tiles, times scale, as floatX rows of dst (ldm ld), through
// scratch: each row's 64 values by the 32 lanes, two each, side by side
__device__ __forceinline__ void store_rows(floatX* dst, long long ld, tile_acc* acc, float* scratch, float scale) {
#pragma unroll
    for (int n = 0; n < HS / 16; n++) wmma::store_matrix_sync(scratch + 16 * n, acc[n], OUT_LD, wmma::mem_row_major);
    __syncwarp();
    int lane = threadIdx.x % WARP_SIZE;
    for (int r = 0; r < 16; r++)
        for (int j = lane; j < HS; j += WARP_SIZE) dst[r * ld + j] = (floatX)(scale * scratch[r * OUT_LD + j]);
    __syncwarp();
}

// the column of step i of the lanes' walks over a row of a (16, KEYS) tile in shared memory: lanes
// 2r and 2r+1 own row r, halves of its columns, each starting at a different place so that at every
// step the 32 lanes read 32 different banks
__device__ __forceinline__ int column(int i, int r, int half) {
    return half * (KEYS / 2) + (i + r + 16 * half) % (KEYS / 2);
}

// The output's rows are rescaled as the softmax's max grows, each by its own factor. The output stays
// in accumulator tiles, whose elements WMMA lays out over the lanes as the hardware likes, so we ask
// it once which row each of a lane's elements belongs to: load a tile whose elements are their row
// numbers. (Every accumulator tile of one type has the same layout.)
__device__ __forceinline__ void load_row_numbers(tile_acc& rows, float* scratch) {
    for (int i = threadIdx.x % WARP_SIZE; i < 16 * 16; i += WARP_SIZE) scratch[i] = (float)(i / 16);
    __syncwarp();
    wmma::load_matrix_sync(rows, scratch, 16, wmma::mem_row_major);
    __syncwarp();
}

// acc[n] *= row_scale[row] for each element, row as in rows (load_row_numbers)
__device__ __forceinline__ void scale_rows(tile_acc* acc, const tile_acc& rows, const float* row_scale) {
#pragma unroll
    for (int i = 0; i < rows.num_elements; i++) {
        float s = row_scale[(int)rows.x[i]];
#pragma unroll
        for (int n = 0; n < HS / 16; n++) acc[n].x[i] *= s;
    }
}

// out (B,T,C) and lse (B,NH,T) from inp (B,T,3C); grid (T / ROWS, B * NH), WARPS warps
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
    // lanes 2r and 2r+1 own row r: query t, the first and the second half of the columns
    int r = lane / 2, half = lane % 2, t = q0 + r;
    float m = NEG_FLT_MAX, l = 0.0f;
    for (int k0 = 0; k0 <= q0 + 15; k0 += KEYS) {  // (then k0 <= q0 <= t: every row sees key k0)
        tiles_times_rows_t(scores, qt, k + k0 * ld, ld);  // q @ k^T for keys k0 .. k0 + KEYS
        __syncwarp();
        // the online softmax: the new max, the old sum rescaled, the new weights P
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
    // out = o / l, through shared memory so that each row is written by the 32 lanes side by side
    if (half == 0) row_scale[r] = 1.0f / l;
    __syncwarp();
    scale_rows(o, rows, row_scale);
    store_rows(out + ((long long)b * T + q0) * C + h * HS, C, o, scores, 1.0f);
    if (half == 0) lse[(long long)bh * T + t] = m + logf(l);
}

// delta (B,NH,T) = the sum over a head's channels of dout * out, the softmax backward's row term
// (sum over keys of P * dP, which is that); a thread per (b, h, t)
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

// dq into dinp (B,T,3C)'s first C columns: a warp per 16 queries, over the keys they see
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

// dk and dv into dinp (B,T,3C)'s second and third C columns: a warp per 16 keys, over the queries
// that see them (from the block's first key on)
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
# "blocked" (the cuBLAS products by blocks above, measured) or "flash" (this one: tested against the
# plain layer, here and in the CPU simulation, but not yet timed on a GPU). dev/bench.py --attention
# flash times it.
ATTENTION_KERNEL = "blocked"


FLASH_KERNELS = ("flash_attention_forward_kernel", "flash_attention_delta_kernel", "flash_attention_backward_dq_kernel",
                 "flash_attention_backward_dkdv_kernel")


# NVRTC options of the flash kernels: () or, where CuPy's CUDA headers lack WMMA's, a toolkit's (below)
_flash_options = ()


def _nvrtc_major():
    # the CUDA major version of the NVRTC that CuPy compiles with
    try:
        return cupy.cuda.nvrtc.getVersion()[0]
    except Exception:  # noqa: BLE001 (no NVRTC binding: the runtime's version stands in)
        return cupy.cuda.runtime.runtimeGetVersion() // 1000


def _cuda_toolkit_include(nvrtc_major=None):
    # the include directory of an installed CUDA toolkit that has WMMA's crt/mma.h and is of the same
    # CUDA major version as NVRTC (CuPy's, unless given), or None: where CUDA_PATH or CUDA_HOME says,
    # else nvcc's, else /usr/local/cuda
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


def _compile_flash(dtype, options):
    # compiles the flash kernels for dtype, with NVRTC's options: None, or what NVRTC raised
    try:
        for name in FLASH_KERNELS:
            _kernel(_FLASH_SRC, name, dtype, options).compile()
    except Exception as e:  # noqa: BLE001 (NVRTC's errors, whatever their class)
        return e
    return None


def compile_flash_attention(dtype):
    # compiles the flash kernels for dtype now, not at their first launch, so that a missing header is
    # one clear error before any work. The likely one: WMMA's mma.h includes crt/mma.h, which CUDA 13's
    # pip wheels leave out of the runtime's headers (CuPy's first choice) and ship in nvidia-cuda-crt.
    # Where a CUDA toolkit of the same CUDA version is installed too, its headers stand in for the
    # flash kernels (NVRTC then reads them before CuPy's).
    global _flash_options
    error = _compile_flash(dtype, _flash_options)
    if error is None:
        return
    toolkit = _cuda_toolkit_include() if '"crt/mma.h"' in str(error) else None
    if toolkit:
        error = _compile_flash(dtype, (f"-I{toolkit}",))
        if error is None:
            _flash_options = (f"-I{toolkit}",)  # what the flash launches pass from now on
            return
    reason = _first_line(error, "error")
    if '"crt/mma.h"' in str(error):
        reason += "; CUDA's WMMA header: pip install nvidia-cuda-crt (CUDA 13), or a CUDA toolkit"
    raise RuntimeError(f"the flash attention kernels do not compile here ({reason})") from None


def _flash_applies(dtype, T, hs):
    # flash attention is written for head size 64 and T a multiple of 64, with bf16 or TF32 tensor cores
    return ATTENTION_KERNEL == "flash" and hs == FLASH_HEAD_SIZE and T % FLASH_ROWS == 0 and (dtype != np.float32 or _tf32)


def _tile_aligned(x):
    # x as the flash kernels read it: C-contiguous, from a 32-byte boundary (WMMA's loads need 256-bit
    # aligned addresses: a new CuPy array always is, a view from an offset into one may not be)
    x = cupy.ascontiguousarray(x)
    return x if x.data.ptr % 32 == 0 else cupy.array(x)


def _flash_attention_forward(inp, NH):
    B, T, C3 = inp.shape
    C = C3 // 3
    inp = _tile_aligned(inp)
    out = cupy.empty((B, T, C), dtype=inp.dtype)
    lse = cupy.empty((B, NH, T), dtype=cupy.float32)
    _kernel(_FLASH_SRC, "flash_attention_forward_kernel", inp.dtype, _flash_options)(
        (T // FLASH_ROWS, B * NH), (FLASH_WARPS * WARP_SIZE,),
        (out, lse, inp, np.int32(T), np.int32(NH), np.float32(FLASH_SCALE)))
    return out, ("flash", inp, out, lse, NH)


DELTA_THREADS = 256


def _flash_attention_backward(dout, cache):
    _, inp, out, lse, NH = cache
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


# ----------------------------------------------------------------------------
# Attention over a KV cache, for sampling one token at a time
# plain layer (train_gpt2.attention_forward_cached): store this position's key and value in the
# cache, then att = softmax(keys @ q / sqrt(hs)) over positions 0..pos and out = att @ values, for
# each head. As a dozen CuPy calls per layer, each a kernel of a few microseconds, sampling is bound
# by Python and launches; here it is one kernel: one block per head.

_ATTENTION_CACHED_SRC = _CUDA_COMMON + _CUDA_BLOCK_REDUCE + r"""
// qkv (3C,) holds this position's query, key and value; kv_cache (2, NH, maxlen, hs) the keys and
// values of positions 0..pos-1, to which this position's are added; out (C,) is the heads' outputs
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
    // att = keys @ q * scale: a warp per position t2, its lanes across the head's channels
    for (int t2 = warp; t2 <= pos; t2 += warps) {
        float s = 0.0f;
        for (int d = lane; d < hs; d += WARP_SIZE) s += keys[(long long)t2 * hs + d] * q[d];
        s = warp_sum(s);
        if (lane == 0) att[t2] = s * scale;
    }
    __syncthreads();
    // softmax over t2 = 0..pos (every position so far: no mask); the max only for stability
    float maxval = NEG_FLT_MAX;
    for (int t2 = threadIdx.x; t2 <= pos; t2 += blockDim.x) maxval = fmaxf(maxval, att[t2]);
    maxval = block_max(maxval);
    float sum = 0.0f;
    for (int t2 = threadIdx.x; t2 <= pos; t2 += blockDim.x) {
        att[t2] = expf(att[t2] - maxval);
        sum += att[t2];
    }
    sum = block_sum(sum);  // (its barriers also make every att[t2] above visible to all threads)
    // out = att @ values / sum: a thread per channel, reading the values row by row
    for (int d = threadIdx.x; d < hs; d += blockDim.x) {
        float acc = 0.0f;
        for (int t2 = 0; t2 <= pos; t2++) acc += att[t2] * values[(long long)t2 * hs + d];
        out[h * hs + d] = acc / sum;
    }
}
"""


def attention_forward_cached(qkv, kv_cache, pos, NH):
    # replaces train_gpt2.attention_forward_cached: qkv (1,1,3C) of position pos, kv_cache
    # (2,NH,maxlen,hs) filled for positions 0..pos-1 (and now pos); returns out (1,1,C)
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
# GeLU: elementwise, one thread per element

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
    # replaces train_gpt2.gelu_forward: out = 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))
    inp = cupy.ascontiguousarray(inp)
    out = cupy.empty(inp.shape, dtype=inp.dtype)
    _kernel(_GELU_SRC, "gelu_forward_kernel", inp.dtype)(
        (_ceil_div(inp.size, GELU_THREADS),), (GELU_THREADS,), (out, inp, np.int64(inp.size)))
    return out, inp


def gelu_backward(dout, cache):
    # replaces train_gpt2.gelu_backward: dinp = local_grad * dout, the derivative of the line above
    inp = cache
    dout = cupy.ascontiguousarray(dout)
    assert dout.dtype == inp.dtype and dout.shape == inp.shape, (dout.dtype, inp.dtype, dout.shape, inp.shape)
    dinp = cupy.empty(inp.shape, dtype=inp.dtype)
    _kernel(_GELU_SRC, "gelu_backward_kernel", inp.dtype)(
        (_ceil_div(inp.size, GELU_THREADS),), (GELU_THREADS,), (dinp, inp, dout, np.int64(inp.size)))
    return dinp


# ----------------------------------------------------------------------------
# Softmax and cross-entropy over the vocabulary
# plain layers: probs = exp(logits - max) / sum over the first V of Vp columns;
# dlogits = probs * dloss - dloss at the target column, 0 in the padded columns V..Vp.
# One block per row (b,t): 50,257 entries are too many for one warp.

_SOFTMAX_SRC = _CUDA_COMMON + _CUDA_BLOCK_REDUCE + r"""
// probs (rows, V) = softmax of logits (rows, Vp)[:, :V]; probs' rows are probs_stride floats apart.
// The probabilities are float32 whatever floatX is: the loss and its gradient come from them.
extern "C" __global__ void softmax_forward_kernel(
        float* probs, const floatX* logits, int rows, int V, int Vp, int probs_stride) {
    if (blockIdx.x >= rows) return;
    const floatX* x = logits + (long long)blockIdx.x * Vp;
    float* p = probs + (long long)blockIdx.x * probs_stride;
    // each thread's max and sum of exp(x - max) in one pass (as attention_softmax_kernel), then the block's
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

// dlogits (rows, Vp): d loss / d logit i = (probs[i] - 1[i == target]) * dloss, 0 for i >= V.
// probs' rows are probs_stride floats apart; with float32 dlogits, dlogits may be probs itself (each
// thread reads its entries before it writes them)
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
    # replaces train_gpt2.softmax_forward: logits (B,T,Vp) -> probs (B,T,V), float32 whatever the
    # logits' dtype. Memory: probs is a view of the first V columns of a new (B,T,Vp) buffer, so that
    # crossentropy_softmax_backward can write float32 dlogits (B,T,Vp) over it, in place: the backward
    # pass then needs no other array of that size (1.6 GB for GPT-2 at B=8, T=1024).
    B, T, Vp = logits.shape
    logits = cupy.ascontiguousarray(logits)
    buffer = cupy.empty((B, T, Vp), dtype=cupy.float32)
    _kernel(_SOFTMAX_SRC, "softmax_forward_kernel", logits.dtype)(
        (B * T,), (SOFTMAX_THREADS,), (buffer, logits, np.int32(B * T), np.int32(V), np.int32(Vp), np.int32(Vp)))
    return buffer[..., :V]


def crossentropy_softmax_backward(dlosses, probs, targets, Vp):
    # replaces train_gpt2.crossentropy_softmax_backward: dlosses (B,T), probs (B,T,V), targets (B,T)
    # token ids -> dlogits (B,T,Vp) of the activations' dtype (set_dtype), zero in the padded columns.
    # When dlogits is float32 and probs is softmax_forward's view of a (B,T,Vp) buffer, dlogits is
    # written over that buffer: probs is used up (nothing reads it after the backward pass; the plain
    # layer leaves it alone)
    B, T, V = probs.shape
    dlosses = cupy.ascontiguousarray(cupy.asarray(dlosses), dtype=cupy.float32)
    targets = cupy.ascontiguousarray(cupy.asarray(targets), dtype=cupy.int32)  # token ids fit in int32
    base = probs.base
    in_buffer = isinstance(base, cupy.ndarray) and base.shape == (B, T, Vp) and base.flags.c_contiguous \
        and probs.data.ptr == base.data.ptr and probs.strides == base.strides
    if in_buffer:
        probs, stride = base, Vp  # read probs from the buffer's first V columns
    else:
        probs, stride = cupy.ascontiguousarray(probs, dtype=cupy.float32), V
    # float32 dlogits go over the buffer, in place; bf16 ones need an array of their own
    dlogits = base if in_buffer and floatX == np.float32 else cupy.empty((B, T, Vp), dtype=floatX)
    _kernel(_SOFTMAX_SRC, "crossentropy_softmax_backward_kernel", floatX)(
        (B * T,), (SOFTMAX_THREADS,),
        (dlogits, dlosses, probs, targets, np.int32(B * T), np.int32(V), np.int32(Vp), np.int32(stride)))
    return dlogits


# ----------------------------------------------------------------------------
# AdamW
# plain layer (train_gpt2.adamw_plain): m = beta1 m + (1 - beta1) g; v = beta2 v + (1 - beta2) g^2;
# param -= lr * (m_hat / (sqrt(v_hat) + eps) + weight_decay * param). adamw_plain makes a dozen
# temporary arrays the size of the parameters; here each value is loaded once and stored once.
# float32 throughout, like the plain layer on float32 arrays; the bias corrections are computed on
# the host in Python floats, then rounded to float32 as NumPy does. --fmad=false keeps the compiler
# from fusing a * b + c into one rounding, so the arithmetic is the plain layer's, step for step.

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
    # replaces train_gpt2's adamw (adamw_plain): updates param, m and v in place, any shape
    f32 = np.float32
    _adamw_kernel(grad, f32(learning_rate), f32(beta1), f32(beta2), f32(1.0 - beta1), f32(1.0 - beta2),
                  f32(1.0 - beta1 ** t), f32(1.0 - beta2 ** t), f32(eps), f32(weight_decay),
                  param, m, v)


# ----------------------------------------------------------------------------
# what runs where


def device_description():
    # one line: the GPU, its compute capability and memory, and the CuPy and CUDA versions
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    runtime, driver = (_cuda_version(v) for v in (cupy.cuda.runtime.runtimeGetVersion(),
                                                   cupy.cuda.runtime.driverGetVersion()))
    return (f"{name} (compute capability {props['major']}.{props['minor']}, "
            f"{props['totalGlobalMem'] / 2**30:.1f} GiB), CuPy {cupy.__version__}, "
            f"CUDA runtime {runtime}, driver {driver}")


def _cuda_version(v):
    return f"{v // 1000}.{v % 1000 // 10}"  # CUDA writes 13.0 as 13000


# the plain layers of train_gpt2.py that these replace, by name (train_gpt2.use_device installs them)
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
