"""The fused GPU layers of cuda_layers.py against the plain layers of train_gpt2.py they replace.

A fused function must be a drop-in for the plain layer of the same name: the same results, shapes
and in-place writes. Each test runs the plain layer with NumPy on the CPU and the fused one with
CuPy on the GPU, on the same random float32 inputs, on awkward shapes: T = 1, T and C that are not
multiples of any block size, odd head sizes. Matrix products use full fp32 here (no TF32),
so the two may differ only by float32 rounding in another order: we measure the error against the
size of the whole tensor (its norm). One attention test runs with TF32, at a TF32 tolerance.

Skipped, with the reason, where CuPy is not installed or no GPU is usable.
"""

import inspect
import os

import numpy as np
import pytest

from helpers import usable_bf16, usable_gpu

_gpu, _why = usable_gpu()
if not _gpu:
    pytest.skip(_why, allow_module_level=True)

import cupy  # noqa: E402 (only with a GPU)
from llmc import cuda_common as cc  # noqa: E402
from llmc import cuda_layers as cl  # noqa: E402
from llmc import flash_attention as fa  # noqa: E402
import train_gpt2 as tg  # noqa: E402

RTOL = 1e-5  # float32 reassociation: the sums add the same terms in another order
RTOL_TF32 = 2e-3  # TF32 rounds the matrix products' inputs to 10 mantissa bits (2^-11 = 5e-4 each)

# (B, T, C, NH): T = 1; T and C not multiples of 8, 32 or 256; head sizes 12, 12, 12, 9 (odd), 32
SHAPES = [(2, 37, 48, 4), (1, 1, 24, 2), (3, 65, 60, 5), (3, 65, 45, 5), (2, 130, 96, 3)]
SHAPE_IDS = [f"B{B}-T{T}-C{C}-NH{NH}" for B, T, C, NH in SHAPES]


def plain(name):
    # the plain layer of train_gpt2.py, even where use_device has put a fused one in its place
    return getattr(tg, "PLAIN_LAYERS", {}).get(name) or getattr(tg, name)


@pytest.fixture(autouse=True)
def numpy_plain_layers_and_fp32_matmuls(monkeypatch):
    monkeypatch.setattr(tg, "xp", np, raising=False)  # the plain layers compute with NumPy, on the CPU
    was = cc.tf32_enabled(), cc.floatX(), cc.attention_form()
    cc.set_tf32(False)
    cc.set_dtype(np.float32)  # (a bf16 run before, in this process, may have left bfloat16)
    cc.set_attention("blocked")
    yield
    cc.set_tf32(was[0])
    cc.set_dtype(was[1])
    cc.set_attention(was[2])


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def randn(rng, *shape, scale=1.0, shift=0.0):
    return (rng.standard_normal(shape) * scale + shift).astype(np.float32)


def assert_close(actual, expected, rtol=RTOL, dtype=np.float32):
    # actual from the GPU (CuPy), of the dtype it is stored in; expected from the plain layer (NumPy);
    # rtol relative to the tensor's norm
    assert isinstance(actual, cupy.ndarray), type(actual)
    assert actual.dtype == np.dtype(dtype), actual.dtype
    actual = actual.get().astype(np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert np.isfinite(actual).all()
    err = np.linalg.norm(actual - expected) / max(np.linalg.norm(expected.astype(np.float64)), 1e-30)
    assert err <= rtol, f"relative error {err:.2e} > {rtol:.1e}"


def test_the_fused_layers_stand_in_for_the_plain_ones():
    # every fused form has its plain layer, kept by train_gpt2 to be put back, with the same parameters
    assert set(cl.FUSED_LAYERS) == set(tg.PLAIN_LAYERS)
    for name, fused in cl.FUSED_LAYERS.items():
        reference = tg.adamw_plain if name == "adamw" else plain(name)
        assert list(inspect.signature(fused).parameters) == list(inspect.signature(reference).parameters), name


# ----------------------------------------------------------------------------
# Encoder backward


def encoder_case(rng, B, T, C, V, maxT):
    # token ids with repeats (within a row and across rows), a gradient, and dwte already holding the
    # classifier's part (the encoder adds to it)
    inp = rng.integers(0, V, size=(B, T))
    inp[:, ::3] = inp[0, 0]
    dout = randn(rng, B, T, C)
    dwte = randn(rng, V + 5, C)
    return inp, dout, dwte, maxT


@pytest.mark.parametrize("B, T, C, V", [(4, 37, 48, 50), (1, 1, 24, 7), (3, 64, 300, 1000)])
def test_encoder_backward(rng, B, T, C, V):
    inp, dout, dwte, maxT = encoder_case(rng, B, T, C, V, T + 3)
    dwpe = np.full((maxT, C), np.nan, np.float32)
    expected_dwte = dwte.copy()
    plain("encoder_backward")(dout, inp, expected_dwte, dwpe)
    grads = cupy.asarray(np.concatenate([dwte.ravel(), np.full(maxT * C, np.nan, np.float32)]))  # as grads_memory
    dwte_gpu, dwpe_gpu = grads[:dwte.size].reshape(dwte.shape), grads[dwte.size:].reshape(maxT, C)
    cl.encoder_backward(cupy.asarray(dout), cupy.asarray(inp), dwte_gpu, dwpe_gpu)
    assert_close(dwte_gpu, expected_dwte)
    assert_close(dwpe_gpu, dwpe)


def test_encoder_backward_is_deterministic(rng):
    # the same bits every time: the sums run in a fixed order (CuPy's add.at's atomics would not)
    inp, dout, dwte, _ = encoder_case(rng, 8, 64, 96, 30, 64)
    results = []
    for _ in range(3):
        dwte_gpu, dwpe_gpu = cupy.asarray(dwte), cupy.zeros((64, 96), dtype=cupy.float32)
        cl.encoder_backward(cupy.asarray(dout), cupy.asarray(inp), dwte_gpu, dwpe_gpu)
        results.append(dwte_gpu.get().view(np.uint32))
    assert all((r == results[0]).all() for r in results)


# ----------------------------------------------------------------------------
# GeLU


@pytest.mark.parametrize("B, T, C, NH", SHAPES, ids=SHAPE_IDS)
def test_gelu(rng, B, T, C, NH):
    inp, dout = randn(rng, B, T, 4 * C, scale=2.0), randn(rng, B, T, 4 * C)
    out, cache = plain("gelu_forward")(inp)
    dinp = plain("gelu_backward")(dout, cache)
    out_gpu, cache_gpu = cl.gelu_forward(cupy.asarray(inp))
    assert_close(out_gpu, out)
    assert_close(cl.gelu_backward(cupy.asarray(dout), cache_gpu), dinp)


def test_gelu_on_a_view(rng):
    big, dout = randn(rng, 2, 5, 64, scale=3.0), randn(rng, 2, 5, 32)
    inp = big[..., ::2]  # not contiguous
    out, cache = plain("gelu_forward")(inp)
    out_gpu, cache_gpu = cl.gelu_forward(cupy.asarray(big)[..., ::2])
    assert_close(out_gpu, out)
    assert_close(cl.gelu_backward(cupy.asarray(dout), cache_gpu), plain("gelu_backward")(dout, cache))


# ----------------------------------------------------------------------------
# LayerNorm

# beyond SHAPES: many rows (several blocks of the backward), odd C, GPT-2 XL's C = 1600, C = 1
LAYERNORM_SHAPES = [(B, T, C) for B, T, C, _ in SHAPES] + [(4, 300, 37), (2, 7, 1600), (1, 3, 3)]


@pytest.mark.parametrize("B, T, C", LAYERNORM_SHAPES, ids=[f"B{B}-T{T}-C{C}" for B, T, C in LAYERNORM_SHAPES])
def test_layernorm(rng, B, T, C):
    inp, dout = randn(rng, B, T, C, scale=2.0, shift=0.5), randn(rng, B, T, C)
    weight, bias = randn(rng, C), randn(rng, C)
    out, cache = plain("layernorm_forward")(inp, weight, bias)
    dweight, dbias = np.empty(C, np.float32), np.empty(C, np.float32)
    dinp = plain("layernorm_backward")(dout, cache, dweight, dbias)

    out_gpu, cache_gpu = cl.layernorm_forward(cupy.asarray(inp), cupy.asarray(weight), cupy.asarray(bias))
    assert_close(out_gpu, out)
    # mean and rstd are (B,T,1), as the plain layer's
    assert_close(cache_gpu[2], cache[2])
    assert_close(cache_gpu[3], cache[3])
    # the gradients go into slices of one buffer, as into the model's grads_memory: overwritten, the rest untouched
    grads = cupy.full((3, C), np.nan, dtype=cupy.float32)
    dinp_gpu = cl.layernorm_backward(cupy.asarray(dout), cache_gpu, grads[1], grads[2])
    assert_close(dinp_gpu, dinp)
    assert_close(grads[1], dweight)
    assert_close(grads[2], dbias)
    assert cupy.isnan(grads[0]).all()


def test_layernorm_on_views(rng):
    # a non-contiguous input, and gradient buffers with a stride
    B, T, C = 3, 17, 40
    big, dout = randn(rng, B, T, C + 8), randn(rng, B, T, C)
    weight, bias = randn(rng, C), randn(rng, C)
    out, cache = plain("layernorm_forward")(big[..., :C], weight, bias)
    dweight, dbias = np.empty(C, np.float32), np.empty(C, np.float32)
    dinp = plain("layernorm_backward")(dout, cache, dweight, dbias)
    out_gpu, cache_gpu = cl.layernorm_forward(cupy.asarray(big)[..., :C], cupy.asarray(weight), cupy.asarray(bias))
    assert_close(out_gpu, out)
    grads = cupy.full((C, 2), np.nan, dtype=cupy.float32)
    assert_close(cl.layernorm_backward(cupy.asarray(dout), cache_gpu, grads[:, 0], grads[:, 1]), dinp)
    assert_close(grads[:, 0], dweight)
    assert_close(grads[:, 1], dbias)


# ----------------------------------------------------------------------------
# Attention


def check_attention(rng, B, T, C, NH, rtol):
    inp, dout = randn(rng, B, T, 3 * C), randn(rng, B, T, C)
    out, cache = plain("attention_forward")(inp, NH)
    dinp = plain("attention_backward")(dout, cache)
    out_gpu, cache_gpu = cl.attention_forward(cupy.asarray(inp), NH)
    assert_close(out_gpu, out, rtol)
    assert_close(cl.attention_backward(cupy.asarray(dout), cache_gpu), dinp, rtol)
    return cache_gpu


@pytest.mark.parametrize("B, T, C, NH", SHAPES, ids=SHAPE_IDS)
def test_attention(rng, B, T, C, NH):
    check_attention(rng, B, T, C, NH, RTOL)


@pytest.mark.parametrize("block", [16, 32, 64])
@pytest.mark.parametrize("B, T, C, NH", [(2, 130, 96, 3), (3, 65, 45, 5), (1, 1, 24, 2), (2, 64, 32, 2)],
                         ids=["T130", "T65", "T1", "T64"])
def test_attention_in_blocks(rng, monkeypatch, block, B, T, C, NH):
    # the products go by blocks of query rows (skipping the masked upper blocks): T a multiple of
    # the block or not, one block or many, the same attention as the plain layer
    monkeypatch.setattr(cl, "ATTENTION_BLOCK", block)
    check_attention(rng, B, T, C, NH, RTOL)


@pytest.fixture
def tf32():
    # TF32 tensor cores for the matrix products (the autouse fixture puts the setting back after)
    cc.set_tf32(True)
    if not cc.tf32_enabled():
        pytest.skip("this GPU has no TF32 tensor cores (compute capability below 8.0)")


def test_attention_tf32(rng, tf32):
    check_attention(rng, 2, 130, 96, 3, RTOL_TF32)


def test_attention_on_a_view(rng):
    B, T, C, NH = 2, 19, 32, 2
    big, dout = randn(rng, B, T, 3 * C + 5), randn(rng, B, T, C)
    out, cache = plain("attention_forward")(big[..., :3 * C], NH)
    out_gpu, cache_gpu = cl.attention_forward(cupy.asarray(big)[..., :3 * C], NH)
    assert_close(out_gpu, out)
    assert_close(cl.attention_backward(cupy.asarray(dout), cache_gpu), plain("attention_backward")(dout, cache))


def arrays_in(cache):
    # every CuPy array in a cache of nested tuples, lists and dicts
    if isinstance(cache, cupy.ndarray):
        return [cache]
    if isinstance(cache, dict):
        cache = list(cache.values())
    if isinstance(cache, (tuple, list)):
        return [a for item in cache for a in arrays_in(item)]
    return []


def test_attention_cache_keeps_no_attention_matrix(rng):
    # the fused forward keeps q, k, v and one number per row, not att (B,NH,T,T): the backward recomputes it
    B, T, C, NH = 2, 130, 96, 3
    _, cache = cl.attention_forward(cupy.asarray(randn(rng, B, T, 3 * C)), NH)
    arrays = arrays_in(cache)
    assert arrays
    assert not any(a.ndim >= 2 and a.shape[-2:] == (T, T) for a in arrays)
    assert sum(a.size for a in arrays) <= B * T * 3 * C + B * NH * T < B * NH * T * T


# ----------------------------------------------------------------------------
# softmax and cross-entropy over the vocabulary

# (B, T, V, Vp): V odd and padded; GPT-2's vocabulary; V = 1; V = Vp (as the sampler calls it)
VOCAB_SHAPES = [(2, 3, 97, 128), (1, 2, 50257, 50304), (3, 5, 1, 8), (2, 7, 333, 333)]
VOCAB_IDS = [f"B{B}-T{T}-V{V}-Vp{Vp}" for B, T, V, Vp in VOCAB_SHAPES]


@pytest.mark.parametrize("B, T, V, Vp", VOCAB_SHAPES, ids=VOCAB_IDS)
def test_softmax(rng, B, T, V, Vp):
    logits = randn(rng, B, T, Vp, scale=3.0)
    logits[..., V:] = 1e4  # the padding must not take part
    assert_close(cl.softmax_forward(cupy.asarray(logits), V), plain("softmax_forward")(logits, V))


def test_softmax_with_excluded_tokens(rng):
    # top-k sampling sets the logits of the tokens it excludes to -inf: they get probability 0
    V = 1000
    logits = randn(rng, 1, 1, V, scale=3.0)
    logits[..., rng.permutation(V)[:990]] = -np.inf
    expected = plain("softmax_forward")(logits, V)
    probs = cl.softmax_forward(cupy.asarray(logits), V)
    assert_close(probs, expected)
    assert ((probs.get() == 0) == (expected == 0)).all()


@pytest.mark.parametrize("B, T, V, Vp", VOCAB_SHAPES, ids=VOCAB_IDS)
def test_crossentropy_softmax_backward(rng, B, T, V, Vp):
    probs = plain("softmax_forward")(randn(rng, B, T, Vp, scale=3.0), V)
    dlosses = randn(rng, B, T)
    targets = rng.integers(0, V, size=(B, T))  # int64, as NumPy makes them
    targets.flat[0], targets.flat[-1] = 0, V - 1  # the first and the last column
    expected = plain("crossentropy_softmax_backward")(dlosses, probs, targets, Vp)
    dlogits = cl.crossentropy_softmax_backward(cupy.asarray(dlosses), cupy.asarray(probs), cupy.asarray(targets), Vp)
    assert_close(dlogits, expected)
    assert (dlogits[..., V:] == 0).all()


# ----------------------------------------------------------------------------
# AdamW


@pytest.mark.parametrize("shape", [(1001,), (3, 37)])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw(rng, shape, weight_decay):
    param = randn(rng, *shape)
    m, v = np.zeros_like(param), np.zeros_like(param)
    param_gpu, m_gpu, v_gpu = cupy.asarray(param), cupy.asarray(m), cupy.asarray(v)
    for t in range(1, 4):
        grad = randn(rng, *shape)
        tg.adamw_plain(param, grad, m, v, 1e-2, 0.9, 0.999, 1e-8, weight_decay, t)
        cl.adamw_fused(param_gpu, cupy.asarray(grad), m_gpu, v_gpu, 1e-2, 0.9, 0.999, 1e-8, weight_decay, t)
        # the same float32 operations in the same order (no fused multiply-adds): equal up to an ulp
        assert_close(m_gpu, m, 1e-6)
        assert_close(v_gpu, v, 1e-6)
        assert_close(param_gpu, param, 1e-6)


# ----------------------------------------------------------------------------
# the module's settings


def test_set_tf32_sets_cupys_matmul_too():
    from cupy._core import _routines_linalg
    cc.set_tf32(True)
    if cc.tf32_enabled():  # (compute capability 8.0 or later)
        assert cupy._core.get_compute_type(cupy.float32) == _routines_linalg.COMPUTE_TYPE_TF32
    cc.set_tf32(False)
    assert not cc.tf32_enabled()
    assert cupy._core.get_compute_type(cupy.float32) == _routines_linalg.COMPUTE_TYPE_DEFAULT


def test_device_description():
    line = cl.device_description()
    assert "\n" not in line and "compute capability" in line and f"CuPy {cupy.__version__}" in line


def test_configure_chooses_the_settings_that_describe_and_attention_bytes_report():
    assert cl.configure(tf32=False) == np.float32
    assert (cc.tf32_enabled(), cc.floatX(), cc.attention_form()) == (False, np.float32, "blocked")
    assert cl.describe(True) == f"{cl.device_description()}; fused kernels; fp32, fp32 matmuls"
    assert cl.describe(False) == f"{cl.device_description()}; plain layers; fp32, fp32 matmuls"
    assert cl.attention_bytes(8, 12, 1024) == 4 * 2 * 8 * 12 * 1024 * 1024  # the blocked form's preatt and datt
    cl.configure(tf32=True)
    if cc.tf32_enabled():
        assert cl.describe(True).endswith("; fused kernels; fp32, TF32 matmuls")


def test_configure_flash_compiles_the_flash_kernels_first(monkeypatch):
    compiled = []
    monkeypatch.setattr(cl, "compile_flash_attention", compiled.append)
    assert cl.configure(attention="flash") == np.float32
    assert compiled == [np.float32] and cc.attention_form() == "flash"
    assert cl.describe(True).split("; ")[-2] == "fused kernels (flash attention where it applies)"
    assert cl.attention_bytes(8, 12, 1024) == 0  # (flash keeps its tiles on chip)


def test_configure_errors_name_the_option(monkeypatch):
    # the whole error line, as train_gpt2 prints it
    def fail(*args):
        raise RuntimeError("the flash attention kernels do not compile here (mma.h: no such file)")
    monkeypatch.setattr(cl, "compile_flash_attention", fail)
    with pytest.raises(RuntimeError, match=r"^--attention flash: the flash attention kernels do not compile here "
                                           r"\(mma.h: no such file\); use --attention blocked$"):
        cl.configure(attention="flash")
    monkeypatch.setattr(cl, "bfloat16", fail)
    with pytest.raises(RuntimeError, match=r"^--dtype bf16: the flash attention kernels do not compile here"):
        cl.configure(dtype="bf16")


def test_free_memory_and_synchronize():
    assert cl.free_memory() > 0
    cl.synchronize()


# ----------------------------------------------------------------------------
# Matmul backward (only the bias gradient is computed differently)


# (B, T, C, OC, bias): with and without the bias, T = 1, sizes of no block's multiple
MATMUL_CASES = [(2, 37, 48, 144, True), (1, 1, 24, 7, True), (3, 65, 45, 180, False)]


@pytest.mark.parametrize("B, T, C, OC, bias", MATMUL_CASES)
def test_matmul_backward(rng, B, T, C, OC, bias):
    cc.set_tf32(False)
    inp, weight, dout = randn(rng, B, T, C), randn(rng, OC, C), randn(rng, B, T, OC)
    b = randn(rng, OC) if bias else None
    _, cache = tg.matmul_forward(inp, weight, b)
    dweight, dbias = np.empty((OC, C), np.float32), np.empty(OC, np.float32) if bias else None
    dinp = plain("matmul_backward")(dout, cache, dweight, dbias)
    grads = cupy.full((2, OC * C + OC), np.nan, dtype=cupy.float32)  # slices of one buffer, as grads_memory
    dweight_gpu = grads[0, :OC * C].reshape(OC, C)
    dbias_gpu = grads[1, :OC] if bias else None
    dinp_gpu = cl.matmul_backward(cupy.asarray(dout), (cupy.asarray(inp), cupy.asarray(weight)), dweight_gpu, dbias_gpu)
    assert_close(dinp_gpu, dinp)
    assert_close(dweight_gpu, dweight)
    if bias:
        assert_close(dbias_gpu, dbias)
        assert bool(cupy.isnan(grads[1, OC:]).all())  # nothing written beyond dbias


# ----------------------------------------------------------------------------
# Attention over a KV cache


@pytest.mark.parametrize("C, NH, maxlen", [(48, 4, 9), (45, 5, 40), (768, 12, 1024)])
def test_attention_forward_cached(rng, C, NH, maxlen):
    hs = C // NH
    cache = np.zeros((2, NH, maxlen, hs), np.float32)
    cache_gpu = cupy.zeros((2, NH, maxlen, hs), dtype=cupy.float32)
    for pos in list(range(min(maxlen, 6))) + [maxlen - 1]:
        qkv = randn(rng, 1, 1, 3 * C)
        if pos == maxlen - 1 and maxlen > 6:  # fill the positions skipped, as the plain layer would have
            cache[:, :, 6:pos] = randn(rng, 2, NH, pos - 6, hs)
            cache_gpu[:, :, 6:pos] = cupy.asarray(cache[:, :, 6:pos])
        out = plain("attention_forward_cached")(qkv, cache, pos, NH)
        out_gpu = cl.attention_forward_cached(cupy.asarray(qkv), cache_gpu, pos, NH)
        assert_close(out_gpu, out)
        assert_close(cache_gpu, cache)  # this position's key and value were stored


# ----------------------------------------------------------------------------
# softmax's buffer reused for dlogits


def test_crossentropy_backward_in_place_over_softmax(rng):
    B, T, V, Vp = 2, 5, 333, 384
    logits = randn(rng, B, T, Vp, scale=3.0)
    dlosses, targets = randn(rng, B, T), rng.integers(0, V, size=(B, T))
    probs = plain("softmax_forward")(logits, V)
    expected = plain("crossentropy_softmax_backward")(dlosses, probs, targets, Vp)
    probs_gpu = cl.softmax_forward(cupy.asarray(logits), V)
    assert_close(probs_gpu, probs)
    dlogits = cl.crossentropy_softmax_backward(cupy.asarray(dlosses), probs_gpu, cupy.asarray(targets), Vp)
    assert dlogits.data.ptr == probs_gpu.data.ptr  # written over softmax's buffer: no new (B,T,Vp) array
    assert_close(dlogits, expected)
    assert (dlogits[..., V:] == 0).all()


@pytest.mark.parametrize("C, OC, bias", [(48, 144, True), (45, 7, True), (768, 2304, True), (64, 896, False)])
def test_matmul_forward_one_row(rng, C, OC, bias):
    # sampling's single row goes through the fused kernel; more rows through CuPy's `@`
    inp, weight = randn(rng, 1, 1, C), randn(rng, OC, C)
    b = randn(rng, OC) if bias else None
    out, _ = plain("matmul_forward")(inp, weight, b)
    out_gpu, cache = cl.matmul_forward(cupy.asarray(inp), cupy.asarray(weight), cupy.asarray(b) if bias else None)
    assert_close(out_gpu, out)
    assert len(cache) == 2


# ----------------------------------------------------------------------------
# bfloat16 (--dtype bf16): the same kernels compiled with floatX = __nv_bfloat16
# The oracle is still the plain layer, run in float64 on the very values the GPU sees: the inputs
# are rounded to bfloat16 first, on both sides. What is left is the GPU's own rounding, which the
# mixed-precision recipe fixes: an output stored in bfloat16 is off by at most 2^-8 of itself (to
# nearest, 8 significant bits); float32 outputs (statistics, probabilities, the gradients of the
# parameters) must stay at float32's accuracy, since bfloat16 products are exact in float32.

BF16, _bf16_why = usable_bf16()
bf16_only = pytest.mark.skipif(not BF16, reason=_bf16_why)
bfloat16 = cl.bfloat16() if BF16 else None
RTOL_BF16 = 2.0 ** -8  # one rounding to bfloat16: at most 2^-8 per element, about 2^-8/sqrt(3) norm-wise
RTOL_BF16_CHAIN = 1.5e-2  # attention: att and dpreatt are rounded to bfloat16 on the way, then multiplied


def round_bf16(x):
    # float32 values that bfloat16 holds exactly: the inputs both sides share
    return np.asarray(x, np.float32).astype(bfloat16).astype(np.float32)


def to_gpu_bf16(x):
    return cupy.asarray(np.asarray(x, np.float32).astype(bfloat16))


def assert_close_bf16(actual, expected, rtol=RTOL_BF16):
    # assert_close for what the recipe stores in bfloat16; expected from the plain layer in float64
    assert_close(actual, expected, rtol, bfloat16)


def f64(x):
    # the plain layer's float64 input (None stays None: no bias)
    return None if x is None else x.astype(np.float64)


BF16_SHAPES = [(2, 37, 48, 4), (3, 65, 45, 5), (1, 1, 24, 2)]
BF16_IDS = [f"B{B}-T{T}-C{C}-NH{NH}" for B, T, C, NH in BF16_SHAPES]


@bf16_only
@pytest.mark.parametrize("B, T, C", [shape[:3] for shape in BF16_SHAPES], ids=BF16_IDS)
def test_gelu_bf16(rng, B, T, C):
    inp, dout = round_bf16(randn(rng, B, T, 4 * C, scale=2.0)), round_bf16(randn(rng, B, T, 4 * C))
    out, cache = plain("gelu_forward")(inp.astype(np.float64))
    out_gpu, cache_gpu = cl.gelu_forward(to_gpu_bf16(inp))
    assert_close_bf16(out_gpu, out)
    assert_close_bf16(cl.gelu_backward(to_gpu_bf16(dout), cache_gpu), plain("gelu_backward")(dout.astype(np.float64), cache))


@bf16_only
def test_encoder_backward_bf16(rng):
    # a bfloat16 gradient in, float32 sums into the float32 gradients of wte and wpe
    inp, dout, dwte, maxT = encoder_case(rng, 3, 40, 48, 50, 45)
    dout = round_bf16(dout)
    expected_dwte, expected_dwpe = dwte.astype(np.float64), np.empty((maxT, 48))
    plain("encoder_backward")(dout.astype(np.float64), inp, expected_dwte, expected_dwpe)
    dwte_gpu, dwpe_gpu = cupy.asarray(dwte), cupy.zeros((maxT, 48), dtype=cupy.float32)
    cl.encoder_backward(to_gpu_bf16(dout), cupy.asarray(inp), dwte_gpu, dwpe_gpu)
    assert_close(dwte_gpu, expected_dwte)
    assert_close(dwpe_gpu, expected_dwpe)


@bf16_only
@pytest.mark.parametrize("B, T, C", [(2, 37, 48), (4, 300, 37), (1, 1, 24)])
def test_layernorm_bf16(rng, B, T, C):
    inp, dout = round_bf16(randn(rng, B, T, C, scale=2.0, shift=0.5)), round_bf16(randn(rng, B, T, C))
    weight, bias = round_bf16(randn(rng, C)), round_bf16(randn(rng, C))
    out, cache = plain("layernorm_forward")(f64(inp), f64(weight), f64(bias))
    dweight, dbias = np.empty(C), np.empty(C)
    dinp = plain("layernorm_backward")(f64(dout), cache, dweight, dbias)
    out_gpu, cache_gpu = cl.layernorm_forward(to_gpu_bf16(inp), to_gpu_bf16(weight), to_gpu_bf16(bias))
    assert_close_bf16(out_gpu, out)
    assert_close(cache_gpu[2], cache[2])  # mean and rstd: float32, as float32 computes them
    assert_close(cache_gpu[3], cache[3])
    grads = cupy.full((3, C), np.nan, dtype=cupy.float32)  # the parameters' gradients: float32 buffers
    dinp_gpu = cl.layernorm_backward(to_gpu_bf16(dout), cache_gpu, grads[1], grads[2])
    assert_close_bf16(dinp_gpu, dinp)
    assert_close(grads[1], dweight)
    assert_close(grads[2], dbias)
    assert cupy.isnan(grads[0]).all()


@bf16_only
@pytest.mark.parametrize("B, T, C, OC, bias", MATMUL_CASES)
def test_matmul_bf16(rng, B, T, C, OC, bias):
    inp, weight, dout = (round_bf16(randn(rng, *shape)) for shape in ((B, T, C), (OC, C), (B, T, OC)))
    b = round_bf16(randn(rng, OC)) if bias else None
    out, cache = plain("matmul_forward")(f64(inp), f64(weight), f64(b))
    dweight, dbias = np.empty((OC, C)), np.empty(OC) if bias else None
    dinp = plain("matmul_backward")(f64(dout), cache, dweight, dbias)
    out_gpu, cache_gpu = cl.matmul_forward(to_gpu_bf16(inp), to_gpu_bf16(weight), to_gpu_bf16(b) if bias else None)
    # (the bias is added to the bfloat16 product: two roundings)
    assert_close_bf16(out_gpu, out, 2 * RTOL_BF16 if bias else RTOL_BF16)
    grads = cupy.full((2, OC * C + OC), np.nan, dtype=cupy.float32)  # slices of one float32 buffer, as grads_memory
    dweight_gpu = grads[0, :OC * C].reshape(OC, C)
    dbias_gpu = grads[1, :OC] if bias else None
    assert_close_bf16(cl.matmul_backward(to_gpu_bf16(dout), cache_gpu, dweight_gpu, dbias_gpu), dinp)
    # bfloat16 products are exact in float32, and cuBLAS adds them in float32: float32's accuracy
    assert_close(dweight_gpu, dweight)
    if bias:
        assert_close(dbias_gpu, dbias)
        assert bool(cupy.isnan(grads[1, OC:]).all())


@bf16_only
@pytest.mark.parametrize("B, T, C, NH", BF16_SHAPES + [(2, 130, 96, 3)], ids=BF16_IDS + ["B2-T130-C96-NH3"])
def test_attention_bf16(rng, B, T, C, NH):
    assert check_attention_bf16(rng, B, T, C, NH)[1].dtype == np.float32  # lse


def check_attention_bf16(rng, B, T, C, NH):
    # check_attention in bfloat16 (against the plain layer in float64 on the same rounded inputs)
    inp, dout = round_bf16(randn(rng, B, T, 3 * C)), round_bf16(randn(rng, B, T, C))
    out, cache = plain("attention_forward")(inp.astype(np.float64), NH)
    dinp = plain("attention_backward")(dout.astype(np.float64), cache)
    out_gpu, cache_gpu = cl.attention_forward(to_gpu_bf16(inp), NH)
    assert_close_bf16(out_gpu, out, RTOL_BF16_CHAIN)
    assert_close_bf16(cl.attention_backward(to_gpu_bf16(dout), cache_gpu), dinp, RTOL_BF16_CHAIN)
    return cache_gpu


@bf16_only
def test_softmax_and_crossentropy_bf16(rng):
    # bfloat16 logits in, float32 probabilities out; dlogits (the classifier's matmul_backward input) bfloat16
    cc.set_dtype(bfloat16)  # (the autouse fixture puts float32 back)
    B, T, V, Vp = 2, 5, 333, 384
    logits = round_bf16(randn(rng, B, T, Vp, scale=3.0))
    dlosses, targets = randn(rng, B, T), rng.integers(0, V, size=(B, T))
    probs = plain("softmax_forward")(logits.astype(np.float64), V)
    expected = plain("crossentropy_softmax_backward")(dlosses.astype(np.float64), probs, targets, Vp)
    probs_gpu = cl.softmax_forward(to_gpu_bf16(logits), V)
    assert_close(probs_gpu, probs)
    dlogits = cl.crossentropy_softmax_backward(cupy.asarray(dlosses), probs_gpu, cupy.asarray(targets), Vp)
    assert_close_bf16(dlogits, expected)
    assert (dlogits[..., V:].get().astype(np.float32) == 0).all()


# ----------------------------------------------------------------------------
# flash attention (configure(attention="flash")): head size 64, T a multiple of 64, tensor cores

FLASH_SHAPES = [(2, 64, 128, 2), (1, 192, 192, 3), (2, 128, 64, 1)]
FLASH_IDS = [f"B{B}-T{T}-C{C}-NH{NH}" for B, T, C, NH in FLASH_SHAPES]


@pytest.fixture
def flash():
    cc.set_attention("flash")  # (the autouse fixture puts the blocked form back)


@pytest.mark.parametrize("B, T, C, NH", FLASH_SHAPES, ids=FLASH_IDS)
def test_flash_attention_tf32(rng, flash, tf32, B, T, C, NH):
    assert isinstance(check_attention(rng, B, T, C, NH, RTOL_TF32), fa.FlashCache)  # (not the blocked form)


@bf16_only
@pytest.mark.parametrize("B, T, C, NH", FLASH_SHAPES, ids=FLASH_IDS)
def test_flash_attention_bf16(rng, flash, B, T, C, NH):
    assert isinstance(check_attention_bf16(rng, B, T, C, NH), fa.FlashCache)


def test_flash_attention_falls_back_to_the_blocked_form(rng, flash):
    # a head size other than 64, T not a multiple of 64, or full fp32 (no TF32): the blocked form
    for B, T, C, NH, tf32 in [(2, 65, 128, 2, True), (2, 64, 96, 3, True), (2, 64, 128, 2, False)]:
        cc.set_tf32(tf32)
        inp = randn(rng, B, T, 3 * C)
        out_gpu, cache_gpu = cl.attention_forward(cupy.asarray(inp), NH)
        assert isinstance(cache_gpu, cl.BlockedCache)
        assert_close(out_gpu, plain("attention_forward")(inp, NH)[0], RTOL_TF32)


class _FlashKernel:
    # stands in for a flash RawKernel: compile() fails as NVRTC does where CuPy's headers (CUDA 13's
    # wheels) have mma.h but not the crt/mma.h it includes, unless an include directory is given
    compiled = []

    def __init__(self, options):
        self.options = options

    def compile(self):
        _FlashKernel.compiled.append(self.options)
        if not self.options:
            raise RuntimeError('/site-packages/nvidia/cu13/include/mma.h(55): catastrophic error: cannot open '
                               'source file "crt/mma.h"')


def fake_toolkit(root, version):
    # a CUDA toolkit's include directory, as far as _cuda_toolkit_include looks: crt/mma.h, cuda.h's version
    (root / "include" / "crt").mkdir(parents=True)
    (root / "include" / "crt" / "mma.h").write_text("")
    (root / "include" / "cuda.h").write_text(f"#define CUDA_VERSION {version}\n")


def test_flash_kernels_take_a_cuda_toolkits_headers_where_cupys_lack_wmmas(monkeypatch, tmp_path):
    fake_toolkit(tmp_path, 13000)
    monkeypatch.setenv("CUDA_PATH", str(tmp_path))
    monkeypatch.setattr(fa, "_nvrtc_major", lambda: 13)
    monkeypatch.setattr(fa, "_kernel", lambda source, name, dtype, options=(): _FlashKernel(options))
    monkeypatch.setattr(fa, "_flash_options", ())
    monkeypatch.setattr(_FlashKernel, "compiled", [])
    fa.compile_flash_attention(np.float32)
    include = f"-I{tmp_path / 'include'}"
    assert fa._flash_options == (include,)  # what the flash launches pass from now on
    assert _FlashKernel.compiled == [()] + [(include,)] * len(fa.FLASH_KERNELS)


def test_a_cuda_toolkit_of_another_version_is_not_taken(monkeypatch, tmp_path):
    # CUDA 12's headers under CUDA 13's NVRTC: no (the same error line as without a toolkit)
    fake_toolkit(tmp_path / "cuda-12", 12080)
    monkeypatch.setenv("CUDA_PATH", str(tmp_path / "cuda-12"))
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.setattr(fa.shutil, "which", lambda name: None)
    monkeypatch.setattr(fa.os.path, "exists", lambda path, exists=os.path.exists: exists(path) and
                        not path.startswith("/usr/local/cuda"))
    monkeypatch.setattr(fa, "_nvrtc_major", lambda: 13)
    assert fa._cuda_toolkit_include() is None
    monkeypatch.setattr(fa, "_nvrtc_major", lambda: 12)
    assert fa._cuda_toolkit_include() == str(tmp_path / "cuda-12" / "include")


def test_flash_kernels_without_wmmas_header_are_one_error_that_names_the_wheel(monkeypatch):
    monkeypatch.setattr(fa, "_kernel", lambda source, name, dtype, options=(): _FlashKernel(options))
    monkeypatch.setattr(fa, "_crt_include", lambda: None)  # no CUDA toolkit or CUDA 12 nvcc wheel
    monkeypatch.setattr(fa, "_flash_options", ())
    with pytest.raises(RuntimeError, match=r'^the flash attention kernels do not compile here \(.*error.*"crt/mma.h"; '
                                           r".*pip install nvidia-cuda-crt"):
        fa.compile_flash_attention(np.float32)
    assert fa._flash_options == ()


def fake_nvcc_wheel(site, major):
    # CUDA's nvcc wheel as pip installs it for CUDA 12: crt/mma.h in nvidia/cuda_nvcc/include (no
    # cuda.h there), the wheel's name, with its major version, beside
    (site / "nvidia" / "cuda_nvcc" / "include" / "crt").mkdir(parents=True)
    (site / "nvidia" / "cuda_nvcc" / "include" / "crt" / "mma.h").write_text("")
    (site / f"nvidia_cuda_nvcc_cu{major}-{major}.9.86.dist-info").mkdir()
    return str(site / "nvidia" / "cuda_nvcc" / "include")


def test_flash_kernels_take_cuda_12s_nvcc_wheel_where_cupys_headers_lack_wmmas(monkeypatch, tmp_path):
    include = fake_nvcc_wheel(tmp_path, 12)
    monkeypatch.setattr(fa.sys, "path", [str(tmp_path)] + fa.sys.path)
    monkeypatch.setattr(fa, "_cuda_toolkit_include", lambda nvrtc_major=None: None)  # no toolkit
    monkeypatch.setattr(fa, "_nvrtc_major", lambda: 12)
    monkeypatch.setattr(fa, "_kernel", lambda source, name, dtype, options=(): _FlashKernel(options))
    monkeypatch.setattr(fa, "_flash_options", ())
    monkeypatch.setattr(_FlashKernel, "compiled", [])
    fa.compile_flash_attention(np.float32)
    assert fa._flash_options == (f"-I{include}",)
    assert fa._nvcc_wheel_include(13) is None  # (CUDA 12's header, not for CUDA 13's NVRTC)


@pytest.mark.parametrize("major, wheel", [(12, "nvidia-cuda-nvcc-cu12"), (13, "nvidia-cuda-crt")])
def test_the_missing_wmma_header_names_the_wheel_of_nvrtcs_cuda_version(monkeypatch, major, wheel):
    monkeypatch.setattr(fa, "_kernel", lambda source, name, dtype, options=(): _FlashKernel(options))
    monkeypatch.setattr(fa, "_crt_include", lambda: None)
    monkeypatch.setattr(fa, "_nvrtc_major", lambda: major)
    monkeypatch.setattr(fa, "_flash_options", ())
    with pytest.raises(RuntimeError) as error:
        fa.compile_flash_attention(np.float32)
    assert "\n" not in str(error.value)
    assert str(error.value).endswith(f"; CUDA {major}'s WMMA header: pip install {wheel}, or a CUDA {major} toolkit)")


def test_flash_attention_below_compute_capability_8_is_one_line_before_compiling(monkeypatch):
    # a T4 or V100 (7.5, 7.0): no TF32 or bf16 WMMA tiles, so NVRTC would fail; say so instead
    compiled = []
    monkeypatch.setattr(fa, "_compute_capability", lambda: 75)
    monkeypatch.setattr(fa, "_kernel", lambda source, name, dtype, options=(): compiled.append(name))
    with pytest.raises(RuntimeError, match=r"^--attention flash: needs compute capability 8.0 or later \(.*\); "
                                           r"this GPU's is 7.5; use --attention blocked$"):
        cl.configure(attention="flash")
    assert compiled == []


def test_flash_attention_reads_a_misaligned_view_through_an_aligned_copy(rng, flash, tf32):
    # WMMA's loads need 32-byte aligned addresses: q, k, v and dout that start 16 bytes into an array
    # (a view CuPy's ascontiguousarray returns as it is) must give what the same values aligned give
    B, T, C, NH = 1, 64, 128, 2
    inp, dout = randn(rng, B, T, 3 * C), randn(rng, B, T, C)
    inp_view = cupy.empty(inp.size + 4, dtype=np.float32)[4:].reshape(inp.shape)
    dout_view = cupy.empty(dout.size + 4, dtype=np.float32)[4:].reshape(dout.shape)
    inp_view[...], dout_view[...] = cupy.asarray(inp), cupy.asarray(dout)
    assert inp_view.data.ptr % 32 == 16 and dout_view.data.ptr % 32 == 16
    out, cache = cl.attention_forward(cupy.asarray(inp), NH)
    out_view, cache_view = cl.attention_forward(inp_view, NH)
    assert isinstance(cache_view, fa.FlashCache)
    assert (out_view.get() == out.get()).all()
    dinp = cl.attention_backward(cupy.asarray(dout), cache)
    assert (cl.attention_backward(dout_view, cache_view).get() == dinp.get()).all()
