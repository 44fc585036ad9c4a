"""The CPU simulation of CuPy (tests/cudasim) itself: that its strict mode (CUDASIM_STRICT=1, the
layouts and orders drawn from CUDASIM_SEED) makes a kernel fail that relies on what a GPU does not
promise: where a WMMA fragment's elements sit, the order in which lanes run, what static shared
memory holds at a block's start. Each test has a kernel that relies on it and one that does not.

The simulation is loaded under a name of its own, so that `import cupy` in this process is untouched.
Skipped without g++ or ml_dtypes, which the simulation needs."""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import ROOT

_SIM = os.path.join(ROOT, "tests", "cudasim", "cupy")
try:
    _spec = importlib.util.spec_from_file_location("cudasim_cupy", os.path.join(_SIM, "__init__.py"),
                                                   submodule_search_locations=[_SIM])
    sim = importlib.util.module_from_spec(_spec)
    sys.modules["cudasim_cupy"] = sim
    _spec.loader.exec_module(sim)
except ImportError as e:
    pytest.skip(f"the CUDA simulation cannot load here: {e}", allow_module_level=True)

SEEDS = [1, 2, 3]


def strict(monkeypatch, seed):
    monkeypatch.setenv("CUDASIM_STRICT", "1")
    monkeypatch.setenv("CUDASIM_SEED", str(seed))


def launch(source, name, grid, block, *args):
    sim.RawKernel(source, name)(grid, block, args)
    return args


# ----------------------------------------------------------------------------
# WMMA fragments: in strict mode a lane holds its share, in an order of the simulation's

_TILES = r"""
#include <mma.h>
using namespace nvcuda;
typedef wmma::fragment<wmma::accumulator, 16, 16, 8, float> tile_acc;
typedef wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major> tile_a;
typedef wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::col_major> tile_bt;

// which element of a (16, 16) tile each lane's x[j] is: out[lane][j], and how many a lane holds
extern "C" __global__ void layout(float* out, int* count, const float* numbers) {
    tile_acc acc;
    wmma::load_matrix_sync(acc, numbers, 16, wmma::mem_row_major);
    for (int j = 0; j < acc.num_elements; j++) out[threadIdx.x * 256 + j] = acc.x[j];
    count[0] = acc.num_elements;
}

// out = diag(row_scale) @ in, assuming that element i of a fragment is in row i / 16 (row-major)
extern "C" __global__ void scale_rows_row_major(float* out, const float* in, const float* row_scale) {
    tile_acc acc;
    wmma::load_matrix_sync(acc, in, 16, wmma::mem_row_major);
    for (int i = 0; i < acc.num_elements; i++) acc.x[i] *= row_scale[i / 16];
    wmma::store_matrix_sync(out, acc, 16, wmma::mem_row_major);
}

// the same, learning each element's row from a tile of row numbers (as flash attention does)
extern "C" __global__ void scale_rows_learned(float* out, const float* in, const float* row_scale) {
    __shared__ __align__(32) float numbers[256];
    for (int i = threadIdx.x; i < 256; i += 32) numbers[i] = (float)(i / 16);
    __syncwarp();
    tile_acc acc, rows;
    wmma::load_matrix_sync(rows, numbers, 16, wmma::mem_row_major);
    wmma::load_matrix_sync(acc, in, 16, wmma::mem_row_major);
    for (int i = 0; i < acc.num_elements; i++) acc.x[i] *= row_scale[(int)rows.x[i]];
    wmma::store_matrix_sync(out, acc, 16, wmma::mem_row_major);
}

// d = a @ b + c: a (16, 8) row-major, b (8, 16) read as rows of b^T, c and d (16, 16)
extern "C" __global__ void product(float* d, const float* a, const float* bt, const float* c) {
    tile_a at;
    tile_bt btt;
    tile_acc acc;
    wmma::load_matrix_sync(at, a, 8);
    wmma::load_matrix_sync(btt, bt, 8);
    wmma::load_matrix_sync(acc, c, 16, wmma::mem_row_major);
    wmma::mma_sync(acc, at, btt, acc);
    wmma::store_matrix_sync(d, acc, 16, wmma::mem_row_major);
}
"""


def fragment_layout():
    out, count = sim.empty((32, 256)), sim.zeros(1, dtype=np.int32)
    launch(_TILES, "layout", (1,), (32,), out, count, sim.asarray(np.arange(256, dtype=np.float32)))
    return out.get()[:, :int(count.get()[0])].astype(int)


def test_strict_fragments_are_a_share_per_lane_in_a_seeded_order(monkeypatch):
    assert (fragment_layout() == np.arange(256)).all()  # (by default each lane has all, row-major)
    strict(monkeypatch, 1)
    first = fragment_layout()
    assert first.shape == (32, 8) and sorted(first.ravel()) == list(range(256))  # each in one lane
    assert not (first.ravel() == np.arange(256)).all()  # not row-major
    assert (fragment_layout() == first).all()  # the same seed, the same layout
    strict(monkeypatch, 2)
    assert not (fragment_layout() == first).all()


@pytest.mark.parametrize("kernel, fails", [("scale_rows_row_major", True), ("scale_rows_learned", False)])
def test_a_kernel_that_assumes_row_major_fragments_fails_in_strict_mode(monkeypatch, kernel, fails):
    rng = np.random.default_rng(0)
    x, row_scale = rng.standard_normal((16, 16)).astype(np.float32), rng.standard_normal(16).astype(np.float32)
    expected = x * row_scale[:, None]

    def right():
        out = sim.empty((16, 16))
        launch(_TILES, kernel, (1,), (32,), out, sim.asarray(x), sim.asarray(row_scale))
        return (out.get() == expected).all()
    assert right()  # without strict mode, both pass
    for seed in SEEDS:
        strict(monkeypatch, seed)
        assert right() != fails, seed


def test_mma_sync_sums_the_same_in_strict_mode(monkeypatch):
    # the lanes hold other elements, but each sum is the same, bit for bit, and a @ b + c
    rng = np.random.default_rng(0)
    a, bt, c = (rng.integers(-4, 5, shape).astype(np.float32) for shape in [(16, 8), (16, 8), (16, 16)])

    def product(a, bt, c):
        d = sim.empty((16, 16))
        launch(_TILES, "product", (1,), (32,), d, sim.asarray(a), sim.asarray(bt), sim.asarray(c))
        return d.get()
    assert (product(a, bt, c) == a @ bt.T + c).all()  # (small integers: exact)
    a, bt, c = (rng.standard_normal(x.shape).astype(np.float32) for x in (a, bt, c))
    plain = product(a, bt, c)
    for seed in SEEDS:
        strict(monkeypatch, seed)
        assert (product(a, bt, c) == plain).all(), seed


# ----------------------------------------------------------------------------
# barriers and shared memory: in strict mode lanes run in changing orders, and static shared memory
# starts as NaN

_NEIGHBOURS = r"""
// each lane puts its number in shared memory, then reads its neighbours' (after __syncwarp or not)
extern "C" __global__ void neighbours(float* out) {
    __shared__ float numbers[32];
    int lane = threadIdx.x;
    numbers[lane] = (float)lane;
#if BARRIER
    __syncwarp();
#endif
    out[(blockIdx.x * 32 + lane) * 2] = numbers[(lane + 31) % 32];  // the lane before
    out[(blockIdx.x * 32 + lane) * 2 + 1] = numbers[(lane + 1) % 32];  // the lane after
}

// what static shared memory holds at a block's start
extern "C" __global__ void first_read(float* out) {
    __shared__ float numbers[32];
    out[blockIdx.x * 32 + threadIdx.x] = numbers[threadIdx.x];
    numbers[threadIdx.x] = 1.0f;
}
"""


def neighbours(barrier, blocks=8):
    # whether lanes 1..31 read the lane before's number, and whether all read the lane after's
    out = sim.empty((blocks, 32, 2))
    launch(f"#define BARRIER {int(barrier)}\n" + _NEIGHBOURS, "neighbours", (blocks,), (32,), out)
    lanes = np.arange(32)
    return (out.get()[:, 1:, 0] == lanes[1:] - 1).all(), (out.get()[..., 1] == (lanes + 1) % 32).all()


@pytest.mark.parametrize("seed", SEEDS)
def test_a_missing_barrier_fails_in_strict_mode(monkeypatch, seed):
    # (without strict mode the lanes run in order, so that reading the lane before's works anyway)
    assert neighbours(barrier=False)[0]
    strict(monkeypatch, seed)
    assert neighbours(barrier=False) == (False, False)  # either way, some round reads too early
    assert neighbours(barrier=True) == (True, True)


def test_static_shared_memory_is_nan_at_each_blocks_start_in_strict_mode(monkeypatch):
    strict(monkeypatch, 1)
    out = sim.zeros((3, 32), dtype=np.float32)
    launch(_NEIGHBOURS.replace("#if BARRIER", "#if 0"), "first_read", (3,), (32,), out)
    assert np.isnan(out.get()).all()


# ----------------------------------------------------------------------------
# flash attention's own kernel, planted with such faults: the strict simulation sees them

_PLANTS = {
    "row-major": ("row_scale[(int)rows.x[i]]", "row_scale[i / 16]"),
    "no barrier": ("if (half == 0) row_scale[r] = alpha;\n        __syncwarp();\n",
                   "if (half == 0) row_scale[r] = alpha;\n"),
}
_FLASH_SCRIPT = r"""
import os, sys
import numpy as np
import cupy
from llmc import cuda_common, flash_attention as fa
original, planted = sys.argv[1:3]
source = fa._FLASH_SRC
assert source.count(original) == 1, original
cuda_common.set_attention("flash")
inp = cupy.asarray(np.random.default_rng(0).standard_normal((1, 64, 3 * 64)).astype(np.float32))
for strict in ("0", "1"):
    os.environ["CUDASIM_STRICT"] = strict
    outs = []
    for fa._FLASH_SRC in (source, source.replace(original, planted)):
        outs.append(fa.flash_attention_forward(inp, 1)[0].get())
    print(strict, (outs[0] == outs[1]).all())
"""


@pytest.mark.parametrize("plant", list(_PLANTS))
def test_a_fault_planted_in_flash_attention_fails_only_in_strict_mode(plant):
    # (in a process of its own, where `import cupy` is the simulation, as under CUDASIM=1)
    env = dict(os.environ, CUDASIM="1", CUDASIM_SEED="1",
               PYTHONPATH=os.pathsep.join(p for p in (os.path.dirname(_SIM), ROOT, os.environ.get("PYTHONPATH")) if p))
    result = subprocess.run([sys.executable, "-c", _FLASH_SCRIPT, *_PLANTS[plant]], capture_output=True, text=True,
                            env=env, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr
    # the kernel's own output, until strict mode
    assert result.stdout.split() == ["0", "True", "1", "False"]
