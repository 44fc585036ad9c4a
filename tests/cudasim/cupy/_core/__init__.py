"""cupy._core: only the matmul compute-type setting that cuda_common.set_tf32 uses."""
from . import _routines_linalg  # noqa: F401
from ._routines_linalg import get_compute_type, set_compute_type  # noqa: F401
