"""
A CPU simulation of the parts of CuPy that llmc's GPU modules use, so that their CUDA kernels can be
tested without a GPU (CI has none): `CUDASIM=1 python -m pytest tests/test_cuda_layers.py`.

tests/conftest.py puts this folder first on the module path when CUDASIM=1, so `import cupy` finds
this package instead of CuPy. What it does, as numba's CUDA simulator does for numba:
- arrays are NumPy arrays (a subclass whose .data.ptr is the host address);
- RawKernel compiles the kernel's CUDA C++ with g++ against simt.h, which gives threadIdx,
  blockIdx, __syncthreads, __syncwarp, __shfl_xor_sync, a bfloat16 type and WMMA's tiles, and runs
  the grid block after block, each CUDA thread a fiber of one host thread that runs until a barrier
  or a shuffle (so barriers and warp shuffles really meet); dynamic shared memory starts as NaN
  (static __shared__ arrays keep what the block before left), and pointer arguments must be
  contiguous arrays of the kernel's types;
- CUDASIM_STRICT=1 makes it strict about what a GPU does not promise, so that a kernel relying on
  it fails here: a lane holds only its share of a WMMA fragment, in a random order for each
  fragment type; the threads of a block run in order, reversed or shuffled, drawn anew for each
  round (every thread on to its next barrier); static shared memory starts as NaN too.
  CUDASIM_SEED=N draws other layouts and orders (CI runs the kernel tests so;
  tests/test_cudasim.py shows what it catches);
- ElementwiseKernel compiles its one-line operation into a loop;
- cuBLAS's gemmStridedBatchedEx is done in NumPy (float64 sums rounded to float32, as cuBLAS's
  float32 sums, then to the output type; TF32 rounds the inputs to 10 mantissa bits first), with
  bounds checks on every matrix it reads;
- everything else is NumPy's, called through this module, except what CuPy 14.2 cannot do with
  bfloat16 arrays, which fails here too: sorting and partitioning them, batched (3-D) matmul.
It checks the kernels' logic and their arithmetic, not CuPy itself, NVRTC or speed: the tests on a
real GPU remain the final word. Needs g++ and ml_dtypes (bfloat16); without them `import cupy`
fails, and the GPU tests skip as without CuPy.
"""

import shutil

import numpy as np

if shutil.which("g++") is None:
    raise ImportError("the CUDA simulation (tests/cudasim) compiles kernels with g++, which is not installed")
import ml_dtypes  # noqa: E402,F401 (bfloat16; an ImportError here, too, means no simulation)

from . import _core, cuda  # noqa: E402,F401
from . import _sim  # noqa: E402
from ._sim import ElementwiseKernel, RawKernel, ndarray, wrap  # noqa: E402,F401

__version__ = "14.2.0 (CPU simulation, tests/cudasim)"
float32, float64, int32, int64, uint16, uint32, inf = (np.float32, np.float64, np.int32, np.int64, np.uint16,
                                                       np.uint32, np.inf)


def empty(shape, dtype=np.float32):
    # like GPU memory, uninitialized: NaN where the dtype has it, so that reading it before writing shows
    dtype = np.dtype(dtype)
    if dtype.kind == "f" or dtype.name == "bfloat16":
        return wrap(np.full(shape, np.nan, dtype=dtype))
    return wrap(np.empty(shape, dtype))


def asarray(a, dtype=None):
    if isinstance(a, ndarray) and (dtype is None or a.dtype == dtype):
        return a
    return wrap(np.array(a, dtype=dtype))


def ascontiguousarray(a, dtype=None):
    # (an array NumPy made, a ufunc's result, may sit at an address that CuPy's pool, 256-byte aligned,
    # would never give: such an array is copied to one that is, as the tensor cores' loads need)
    assert isinstance(a, ndarray), f"cupy.ascontiguousarray takes a cupy.ndarray, not {type(a)}"
    if a.flags.c_contiguous and (dtype is None or a.dtype == dtype) and _sim.allocation_aligned(a):
        return a
    return wrap(np.array(a, dtype=dtype or a.dtype, order="C"))


def asnumpy(a):
    return np.array(a).view(np.ndarray)


def __getattr__(name):
    # everything else: NumPy's, with array results as this module's arrays (ufuncs keep the subclass themselves)
    f = getattr(np, name)
    if isinstance(f, np.ufunc) or not callable(f):
        return f

    def wrapped(*args, **kwargs):
        # (NumPy's sort, argsort, partition and argpartition call the array's own, which refuse bfloat16)
        if name == "matmul" and len(args) == 2 and not kwargs:
            return args[0] @ args[1]  # (bfloat16: as ndarray.__matmul__, CuPy's limits included)
        r = f(*args, **kwargs)
        return wrap(r) if isinstance(r, np.ndarray) else r
    return wrapped


class _MemoryPool:
    def free_bytes(self):
        return 0

    def used_bytes(self):
        return 0

    def total_bytes(self):
        return 0

    def free_all_blocks(self):
        pass


_pool = _MemoryPool()


def get_default_memory_pool():
    return _pool
