"""
What the GPU modules share: the settings cuda_layers.configure chooses, the CUDA helpers every
kernel source starts with, and how a kernel is compiled for the activations' dtype.

Imported by llmc/flash_attention.py and llmc/cuda_layers.py; it imports neither.
"""

import functools

import cupy
import numpy as np

# ----------------------------------------------------------------------------
# the settings, chosen once by cuda_layers.configure

_tf32 = True  # TF32 tensor cores for float32 matrix products
_floatX = np.dtype(np.float32)  # the activations' dtype: float32 or bfloat16
_attention = "blocked"  # the fused attention's form: "blocked" or "flash"


def set_tf32(enabled):
    # TF32 (as llm.c's CUDA trainers) or full fp32, for our GEMMs
    # and for CuPy's `@`, whose setting is global and off by default
    global _tf32
    from cupy._core import _routines_linalg  # CuPy's matmul settings (its tests use the same)
    enabled = bool(enabled) and int(cupy.cuda.Device().compute_capability) >= 80  # Ampere and later
    compute = _routines_linalg.COMPUTE_TYPE_TF32 if enabled else _routines_linalg.COMPUTE_TYPE_DEFAULT
    _routines_linalg.set_compute_type(cupy.float32, compute)
    _tf32 = enabled


def tf32_enabled():
    return _tf32


def set_dtype(dtype):
    # float32, or ml_dtypes' bfloat16 (CuPy's). Layers take their
    # inputs' dtype; crossentropy_softmax_backward (float32 probs
    # in, floatX dlogits out) must be told
    global _floatX
    _floatX = np.dtype(dtype)
    assert _floatX.name in _FLOATX, _floatX


def floatX():
    return _floatX


def set_attention(form):
    # "blocked" (cuBLAS products by row blocks) or "flash" (one pass, WMMA)
    global _attention
    assert form in ("blocked", "flash"), form
    _attention = form


def attention_form():
    return _attention


def _first_line(e, word=""):
    # an exception in one line: the first with `word` (NVRTC's
    # log may start with warnings), else the first, else its class
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    return next((line for line in lines if word in line), lines[0] if lines else type(e).__name__)


# ----------------------------------------------------------------------------
# CUDA helpers: sums and maxima across a warp (32 threads that
# exchange registers with shuffles)

_CUDA_COMMON = r"""
#define WARP_SIZE 32
#define NEG_FLT_MAX (-3.402823466e+38f)  // a running max's start: -inf gives inf - inf = nan

// the sum of v over the 32 lanes of a warp, returned to every lane
__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = WARP_SIZE / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffff, v, offset);
    return v;
}

// this thread's warp, counted over the whole grid (a warp per row)
__device__ __forceinline__ int warp_index() {
    return blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int offset = WARP_SIZE / 2; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, offset));
    return v;
}
"""

WARP_SIZE = 32

# each kernel's floatX (llm.c's name), by dtype name
_FLOATX = {
    "float32": "typedef float floatX;\n#define FLOATX_IS_FLOAT 1\n",
    # (float)x reads a bfloat16 exactly; (floatX)f rounds to nearest
    "bfloat16": "#include <cuda_bf16.h>\ntypedef __nv_bfloat16 floatX;\n#define FLOATX_IS_FLOAT 0\n",
}


def _ceil_div(a, b):
    return -(-a // b)


def _kernel(source, name, dtype, options=()):
    # RawKernel `name` of `source` for arrays of dtype; CuPy
    # compiles it at its first launch, NVRTC `options` added
    return _raw_kernel(source, name, np.dtype(dtype).name, options)


@functools.cache  # (by the dtype's name: np.float32 and np.dtype("float32") are one kernel)
def _raw_kernel(source, name, dtype_name, options):
    return cupy.RawKernel(_FLOATX[dtype_name] + source, name, options=options)
