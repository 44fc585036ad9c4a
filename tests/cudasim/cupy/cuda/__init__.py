"""cupy.cuda: the runtime's device queries, and cuBLAS's strided-batched GEMM done in NumPy."""

import ctypes
import types

import numpy as np
from numpy.lib.stride_tricks import as_strided

from .. import _sim

_CUDA_DTYPES = {0: np.dtype(np.float32), 14: _sim.BFLOAT16}  # CUDA_R_32F, CUDA_R_16BF


def _tf32(x):
    # TF32 keeps 10 of float32's 23 mantissa bits: round to nearest even there
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x0FFF + ((bits >> 13) & 1)) & ~np.uint64(0x1FFF)
    return bits.astype(np.uint32).view(np.float32)


def _matrix(ptr, rows, cols, ld, what, dtype):
    # the column-major (rows, cols) matrix at ptr with leading dimension ld, as a NumPy view
    assert ld >= max(1, rows), (what, "ld", ld, rows)
    count = ld * (cols - 1) + rows
    _sim.check_range(ptr, count * dtype.itemsize, what)
    buffer = np.frombuffer((ctypes.c_char * (count * dtype.itemsize)).from_address(ptr), dtype=dtype)
    return as_strided(buffer, (rows, cols), (dtype.itemsize, ld * dtype.itemsize))


def gemmStridedBatchedEx(handle, transa, transb, m, n, k, alpha, A, Atype, lda, strideA, B, Btype, ldb, strideB,
                         beta, C, Ctype, ldc, strideC, batchCount, computeType, algo):
    # C[p] = alpha op(A[p]) op(B[p]) + beta C[p], column-major, as cuBLAS; alpha and beta float32 on the host
    args = (handle, transa, transb, m, n, k, alpha, A, Atype, lda, strideA, B, Btype, ldb, strideB, beta, C, Ctype,
            ldc, strideC, batchCount, computeType, algo)
    assert all(type(x) is int for x in args), [type(x) for x in args]
    assert Atype == Btype and Atype in _CUDA_DTYPES and Ctype in _CUDA_DTYPES, (Atype, Btype, Ctype)
    assert computeType in (cublas.CUBLAS_COMPUTE_32F, cublas.CUBLAS_COMPUTE_32F_FAST_TF32)
    assert Atype == runtime.CUDA_R_32F or computeType == cublas.CUBLAS_COMPUTE_32F, "TF32 is for float32 inputs"
    assert algo == cublas.CUBLAS_GEMM_DEFAULT and cublas.mode == cublas.CUBLAS_POINTER_MODE_HOST
    a_value, b_value = ctypes.c_float.from_address(alpha).value, ctypes.c_float.from_address(beta).value
    in_type, out_type = _CUDA_DTYPES[Atype], _CUDA_DTYPES[Ctype]
    for p in range(batchCount):
        a = _matrix(A + in_type.itemsize * p * strideA, *((m, k) if transa == 0 else (k, m)), lda, "A", in_type)
        b = _matrix(B + in_type.itemsize * p * strideB, *((k, n) if transb == 0 else (n, k)), ldb, "B", in_type)
        c = _matrix(C + out_type.itemsize * p * strideC, m, n, ldc, "C", out_type)
        a, b = (a if transa == 0 else a.T), (b if transb == 0 else b.T)
        if computeType == cublas.CUBLAS_COMPUTE_32F_FAST_TF32:
            a, b = _tf32(a), _tf32(b)
        result = a_value * (a.astype(np.float64) @ b.astype(np.float64))
        if b_value != 0:
            result += b_value * c.astype(np.float64)
        c[...] = result.astype(np.float32).astype(out_type)  # float32 sums, rounded once to C's type


def _set_pointer_mode(handle, mode):
    assert type(handle) is int and mode in (0, 1)
    cublas.mode = mode


cublas = types.SimpleNamespace(
    CUBLAS_OP_N=0, CUBLAS_OP_T=1, CUBLAS_POINTER_MODE_HOST=0, CUBLAS_POINTER_MODE_DEVICE=1,
    CUBLAS_GEMM_DEFAULT=-1, CUBLAS_COMPUTE_32F=68, CUBLAS_COMPUTE_32F_FAST_TF32=77, mode=0,
    gemmStridedBatchedEx=gemmStridedBatchedEx, setPointerMode=_set_pointer_mode)
device = types.SimpleNamespace(get_cublas_handle=lambda: 12345)
runtime = types.SimpleNamespace(
    CUDA_R_32F=0, CUDA_R_16BF=14, getDeviceCount=lambda: 1, memGetInfo=lambda: (70 * 2**30, 80 * 2**30),
    runtimeGetVersion=lambda: 13000, driverGetVersion=lambda: 13000,
    getDeviceProperties=lambda dev: {"name": b"CPU simulation of an H100", "major": 9, "minor": 0,
                                     "totalGlobalMem": 80 * 2**30, "multiProcessorCount": 132})


class Device:
    compute_capability = "90"

    def __init__(self, id=0):
        self.id = id

    def synchronize(self):
        pass

    def use(self):
        pass


def get_allocator():
    return None
