"""Shared test set-up: import the top-level scripts and tests/helpers.py, and let tiktoken work offline."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))  # helpers.py, whatever pytest's --import-mode

# CUDASIM=1: `import cupy` finds tests/cudasim, a CPU simulation of what cuda_layers.py uses of CuPy
# (its CUDA kernels compiled with g++), so that the GPU tests run without a GPU; the scripts the tests
# start find it too
if os.environ.get("CUDASIM") == "1":
    _sim = os.path.join(ROOT, "tests", "cudasim")
    sys.path.insert(0, _sim)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_sim, os.environ.get("PYTHONPATH")) if p)
    # asked for by name, so a simulation that cannot load (no ml_dtypes, say) stops the run here, where
    # the GPU tests would otherwise all skip and the run pass
    import cupy  # noqa: E402,F401

# tiktoken can't download its GPT-2 files without internet; the workplace keeps a copy beside the repo
_cache = os.path.join(os.path.dirname(ROOT), "shared", "tiktoken_cache")
if os.path.isdir(_cache):
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", _cache)
