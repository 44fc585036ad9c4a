"""CuPy's per-dtype compute type of its matmul (recorded only: the simulation's `@` is NumPy's)."""
import numpy

COMPUTE_TYPE_DEFAULT, COMPUTE_TYPE_TF32 = 1, 7  # (CuPy's values; the two cuda_common.set_tf32 uses)
_types = {}


def set_compute_type(dtype, compute_type):
    assert compute_type in (COMPUTE_TYPE_DEFAULT, COMPUTE_TYPE_TF32)
    _types[numpy.dtype(dtype).name] = compute_type


def get_compute_type(dtype):
    return _types.get(numpy.dtype(dtype).name, COMPUTE_TYPE_DEFAULT)
