"""What several test files share: the fixtures' paths, a way to run the scripts, and llm.c's file
headers built by hand (one builder each, independent of the loaders they test)."""

import os
import struct
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
# written by dev/make_reference.py: a random GPT-2 with V = 777 (padded to 896), maxT = 64, L = 2, NH = 4, C = 64,
# its debug state (one batch, its logits, loss and gradients, by PyTorch) and the losses of 10 AdamW steps
MODEL = os.path.join(FIXTURES, "tiny_gpt2.bin")
STATE = os.path.join(FIXTURES, "tiny_gpt2_debug_state.bin")
LOSSES = os.path.join(FIXTURES, "tiny_gpt2_expected_losses.json")
FIXTURE_ARGS = ["--checkpoint", MODEL, "--state", STATE, "--expected-losses", LOSSES]  # test_gpt2.py's options
# test_gpt2.py's tolerances in the suite, far tighter than its defaults (llm.c's 1e-2 / 2e-2, and 1e-2 relative):
# fp32 NumPy against PyTorch's float64 reference. On the fixture the largest absolute differences are about
# 3e-7 (logits), 1.2e-7 (gradients), 5e-7 (losses); the largest norm-wise relative error of a tensor is 7.5e-7
# (6e-7 to 9e-7 with OpenBLAS's other kernels), while a GeLU derivative off in the fourth digit of its constant
# gives 2e-6 to 3.4e-6 in most gradients: hence 1.5e-6
TIGHT = ["--logits-tol", "1e-5", "--grad-tol", "1e-6", "--loss-tol", "1e-5", "--rel-tol", "1.5e-6"]

# llm.c's magic numbers
CHECKPOINT_MAGIC, STATE_MAGIC, TOKENIZER_MAGIC, TOKENS_MAGIC = 20240326, 20240327, 20240328, 20240520


def usable_gpu():
    # (True, "") where CuPy (or, with CUDASIM=1, its simulation) sees a GPU, else (False, why not)
    try:
        import cupy
    except ImportError as e:
        return False, f"CuPy is not installed (pip install cupy-cuda12x or cupy-cuda13x): {e}"
    try:
        if cupy.cuda.runtime.getDeviceCount() > 0:
            return True, ""
        return False, "CUDA sees no GPU"
    except Exception as e:  # no driver, or a CuPy built for another CUDA version than the driver's
        return False, f"no usable GPU for CuPy ({type(e).__name__}: {e})"


def usable_bf16():
    # (True, "") where --dtype bf16 can run, else (False, why not): what use_device checks (ml_dtypes,
    # compute capability 8.0, CuPy 14 with NumPy 2.1.2 or later), through cuda_layers.bfloat16
    gpu, why = usable_gpu()
    if not gpu:
        return False, why
    try:
        from llmc import cuda_layers
        cuda_layers.bfloat16()
        return True, ""
    except (ImportError, RuntimeError) as e:
        return False, f"--dtype bf16: {e}"


def header(*values):
    # llm.c's 1024-byte header: 256 little-endian int32, these values first, zeros after
    return struct.pack("<256i", *values, *([0] * (256 - len(values))))


def token_bytes(tokens):
    # an llm.c token file's bytes: the header (magic, version 1, count), then the tokens as uint16
    tokens = np.asarray(tokens)
    return header(TOKENS_MAGIC, 1, tokens.size) + tokens.astype("<u2").tobytes()


def write_tokens(path, tokens):
    # writes an llm.c token file; returns its path as a string, as the scripts' options take it
    with open(path, "wb") as f:
        f.write(token_bytes(tokens))
    return str(path)


def run(script, *args, cwd=ROOT, env=None):
    # one of the repository's scripts in a fresh interpreter, its output captured as text
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, text=True,
                          cwd=cwd, env=env)


def assert_one_error_line(result, *fragments, status=2):
    # bad input's promise: exit status 2 (or status), one line "error: ..." naming what was wrong, no traceback
    assert result.returncode == status, result.stdout[-2000:] + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert "Traceback" not in result.stderr


def gpt2_encoding():
    # GPT-2's tokenizer, to compute expected tokens independently of the scripts; skip without it
    import pytest
    try:
        import tiktoken
        return tiktoken.get_encoding("gpt2")
    except Exception as e:
        pytest.skip(f"tiktoken cannot load the gpt2 encoding (offline without TIKTOKEN_CACHE_DIR?): "
                    f"{type(e).__name__}")
