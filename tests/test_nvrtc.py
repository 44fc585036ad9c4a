"""Every CUDA kernel of llmc/cuda_layers.py and llmc/flash_attention.py through NVIDIA's own compiler (NVRTC, with -arch=sm_80 and sm_90,
as CuPy compiles them on an A100 or an H100), without a GPU: dev/check_kernels.py. The CPU simulation
(tests/cudasim) checks what the kernels compute, with g++; this checks that NVRTC takes them, with
CUDA's real bfloat16 and WMMA headers, and that ptxas needs no local memory for their registers.
Skipped without NVRTC and the CUDA headers (pip install nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cuda-crt: requirements-dev.txt has them, for Linux). With each CUDA major version's NVRTC
installed, 13 and 12 (CUDA 12.9's wheels, in requirements-dev.txt too): their register counts
differ, and a GPU's CuPy compiles with its own CUDA's. Its skips say which version is missing."""

import ast
import importlib.util
import os
import re
import shutil
import subprocess
import sys

import pytest

from helpers import ROOT

sys.path.insert(0, os.path.join(ROOT, "dev"))
import check_kernels  # noqa: E402

NVRTC, INCLUDE = check_kernels.find_nvrtc(), check_kernels.find_include()
NVRTCS = check_kernels.find_nvrtcs()  # {CUDA major version: (NVRTC, headers)}
pytestmark = [
    pytest.mark.skipif(NVRTC is None or INCLUDE is None, reason="needs NVRTC and the CUDA headers: "
                       "pip install nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cuda-crt"),
    # (without CuPy, llmc's GPU modules are imported through the simulation, which needs g++ and ml_dtypes)
    pytest.mark.skipif(importlib.util.find_spec("cupy") is None and (
        shutil.which("g++") is None or importlib.util.find_spec("ml_dtypes") is None),
        reason="imports llmc's GPU modules through tests/cudasim without CuPy, which needs g++ and ml_dtypes"),
]

SCRIPT = os.path.join(ROOT, "dev", "check_kernels.py")
KERNEL_FILES = [os.path.join(ROOT, "llmc", name) for name in ("cuda_layers.py", "flash_attention.py")]


def check(*args, code=None):
    # dev/check_kernels.py in a process of its own (without CuPy it imports llmc's GPU modules through the
    # simulation, which must not leak into this one), or `code` run after importing it
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (os.path.join(ROOT, "dev"),
                                                                   os.environ.get("PYTHONPATH")) if p))
    command = [sys.executable, SCRIPT, *args] if code is None else [sys.executable, "-c", code]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


@pytest.mark.parametrize("cuda", [13, 12], ids=["cuda13", "cuda12"])
def test_every_kernel_compiles_for_a100_and_h100_in_both_dtypes_without_spills(cuda):
    # with each CUDA major version's NVRTC installed, its own headers: their register counts differ
    if cuda not in NVRTCS:
        pytest.skip(f"no NVRTC of CUDA {cuda} installed: pip install " + (
            "nvidia-cuda-nvrtc-cu12 nvidia-cuda-runtime-cu12 nvidia-cuda-nvcc-cu12" if cuda == 12 else
            "nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cuda-crt"))
    result = check("--arch", "80", "90", "--cuda", str(cuda))
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(rf"^NVRTC {cuda}\.\d+ .*^NVRTC versions checked: {cuda}\.\d+$", result.stdout, re.M | re.S)
    rows = re.findall(r"^sm_(\d+)\s+(\w+)\s+(\w+)\s+(\d+)\s+(\d+)/(\d+)", result.stdout, re.M)
    # every kernel named in a source, once per (arch, dtype): a check that found nothing would say nothing
    names = set()
    for path in KERNEL_FILES:
        with open(path) as f:
            names |= set(check_kernels.KERNEL_NAME.findall(f.read()))
    assert len(names) >= 17 and "flash_attention_backward_dkdv_kernel" in names
    for arch in ("80", "90"):
        for dtype in ("float32", "bfloat16"):
            assert {kernel for a, d, kernel, *_ in rows if (a, d) == (arch, dtype)} == names
    assert all(spill_st == spill_ld == "0" for *_, spill_st, spill_ld in rows)
    assert re.search(r"^\d+ kernels compiled, 0 errors, 0 spilling registers$", result.stdout, re.M)


def check_patched(patch, only):
    # (rows, errors) of check_kernels.check on sm_90 in float32, for the sources named like `only`, in a
    # process of its own, after `patch` (a line of Python, with cuda_layers as cl and flash_attention as
    # fa) has changed a source
    code = ("import check_kernels\n"
            "_, fa, cl = check_kernels.import_kernel_modules()\n"
            f"{patch}\n"
            f"print(repr(check_kernels.check(('90',), ('float32',), only={only!r})[1:]))\n")
    result = check(code=code)
    assert result.returncode == 0, result.stderr
    return ast.literal_eval(result.stdout.splitlines()[-1])  # (after any note of headers lent)


def test_a_kernel_that_does_not_compile_is_an_error():
    # GeLU's source with a line that is not C++: the check must fail, and say which source and why
    rows, errors = check_patched("cl._GELU_SRC += 'float gelu_constant = undeclared_name;\\n'", "gelu")
    assert rows == [] and len(errors) == 1
    assert errors[0].startswith("_GELU_SRC (float32, sm_90) does not compile") and "undeclared_name" in errors[0]


def test_spilled_registers_are_seen():
    # a kernel that needs more registers than __launch_bounds__ leaves it spills to local memory
    rows, errors = check_patched(
        "fa._FLASH_SRC = fa._FLASH_SRC.replace('void flash_attention_backward_dkdv_kernel', "
        "'void __launch_bounds__(128, 4) flash_attention_backward_dkdv_kernel')", "flash")
    assert errors == []
    assert [kernel for _, _, _, kernel, _, spill_stores, *_ in rows if spill_stores > 0] == \
        ["flash_attention_backward_dkdv_kernel"]
