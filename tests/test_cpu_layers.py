"""The faster CPU layers of llmc/cpu.py against train_gpt2.py's plain layers, on awkward shapes."""

import numpy as np
import pytest

import train_gpt2 as tg
from llmc import cpu

PLAIN = tg.PLAIN_LAYERS  # the plain layers, whatever use_device has installed in train_gpt2
# (B,T,C): odd C, T=1, rows that end inside a chunk, and more rows than one chunk holds
SHAPES = [(2, 5, 7), (1, 1, 12), (3, 1, 33), (2, 37, 65)]


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    # chunks of 100 floats: boundaries fall inside rows, and the threads get several parts
    monkeypatch.setattr(cpu, "LAYER_CHUNK", 100)
    monkeypatch.setattr(cpu, "usable_cpus", lambda: 3)


def close(ours, plain, rtol=1e-6, atol=1e-7):
    assert ours.dtype == plain.dtype and ours.shape == plain.shape
    np.testing.assert_allclose(ours, plain, rtol=rtol, atol=atol)


def randn(rng, *shape):
    return rng.standard_normal(shape, dtype=np.float32)


@pytest.mark.parametrize("B, T, C", SHAPES + [(3, 41, 53)])
def test_gelu(B, T, C):
    rng = np.random.default_rng(0)
    inp, dout = 3 * randn(rng, B, T, 4 * C), randn(rng, B, T, 4 * C)
    inp_before = inp.copy()
    out, cache = cpu.gelu_forward(inp)
    out_plain, cache_plain = PLAIN["gelu_forward"](inp)
    close(out, out_plain)
    assert cache is inp  # the cache is the input, which the backward pass still needs
    close(cpu.gelu_backward(dout, cache), PLAIN["gelu_backward"](dout, cache_plain))
    np.testing.assert_array_equal(inp, inp_before)


def test_gelu_of_a_strided_input():
    # a view that is not contiguous (the forms copy it once, the plain layer reads it as it is)
    rng = np.random.default_rng(5)
    inp, dout = randn(rng, 28, 2, 9).transpose(1, 2, 0), randn(rng, 2, 9, 28)
    out, cache = cpu.gelu_forward(inp)
    close(out, PLAIN["gelu_forward"](inp)[0])
    close(cpu.gelu_backward(dout, cache), PLAIN["gelu_backward"](dout, inp))


@pytest.mark.parametrize("B, T, C", SHAPES)
def test_layernorm(B, T, C):
    rng = np.random.default_rng(1)
    inp, dout = 2 + randn(rng, B, T, C), randn(rng, B, T, C)
    weight, bias = randn(rng, C), randn(rng, C)
    out, cache = cpu.layernorm_forward(inp, weight, bias)
    out_plain, cache_plain = PLAIN["layernorm_forward"](inp, weight, bias)
    close(out, out_plain)
    for ours, plain in zip(cache[1:], cache_plain[1:]):  # weight, mean, rstd
        close(ours, plain)
    # dweight and dbias are written into the buffers given; each part of the rows sums its own
    dweight, dbias = np.full(C, np.nan, np.float32), np.full(C, np.nan, np.float32)
    dweight_plain, dbias_plain = np.empty(C, np.float32), np.empty(C, np.float32)
    dinp = cpu.layernorm_backward(dout, cache, dweight, dbias)
    dinp_plain = PLAIN["layernorm_backward"](dout, cache_plain, dweight_plain, dbias_plain)
    close(dinp, dinp_plain, atol=1e-6)
    close(dweight, dweight_plain, rtol=1e-5, atol=1e-5)
    close(dbias, dbias_plain, rtol=1e-5, atol=1e-5)


SOFTMAX_SHAPES = [(2, 5, 7, 8), (1, 1, 50, 64), (3, 7, 130, 256), (2, 3, 29, 29)]  # (B,T,V,Vp)


@pytest.mark.parametrize("B, T, V, Vp", SOFTMAX_SHAPES)
def test_softmax(B, T, V, Vp):
    rng = np.random.default_rng(2)
    logits = 5 * randn(rng, B, T, Vp)
    close(cpu.softmax_forward(logits, V), PLAIN["softmax_forward"](logits, V))


@pytest.mark.parametrize("B, T, C, NH", [(2, 5, 12, 3), (1, 1, 8, 2), (3, 1, 6, 1), (2, 13, 12, 4)])
def test_attention(B, T, C, NH):
    rng = np.random.default_rng(3)
    inp, dout = randn(rng, B, T, 3 * C), randn(rng, B, T, C)
    out, cache = cpu.attention_forward(inp, NH)
    out_plain, cache_plain = PLAIN["attention_forward"](inp, NH)
    close(out, out_plain)
    close(cache[1], cache_plain[1])  # att, which the plain backward reads
    close(PLAIN["attention_backward"](dout, cache), PLAIN["attention_backward"](dout, cache_plain))


def test_installed_by_use_device():
    tg.use_device("cpu")
    for name, layer in cpu.FASTER_LAYERS.items():
        assert getattr(tg, name) is layer and PLAIN[name] is not layer


def test_a_training_step_matches_the_plain_layers(monkeypatch):
    # forward, backward and update of a small GPT-2 in float32, with the faster layers and with the
    # plain ones; chunks smaller than the real ones, so that threads share every layer's rows
    monkeypatch.setattr(cpu, "LAYER_CHUNK", 1 << 12)
    rng = np.random.default_rng(4)
    config = tg.GPT2Config(max_seq_len=64, vocab_size=1000, padded_vocab_size=1024, num_layers=2,
                           num_heads=4, channels=64)
    memory = (0.05 * randn(rng, tg.num_parameters(config))).astype(np.float32)
    x, y = rng.integers(0, 1000, (4, 64)), rng.integers(0, 1000, (4, 64))
    results = []
    for layers in (PLAIN, {**PLAIN, **cpu.FASTER_LAYERS}):
        for name, layer in layers.items():
            monkeypatch.setattr(tg, name, layer)
        model = tg.GPT2(config, memory.copy())
        loss = tg.gpt2_forward(model, x, y)
        tg.gpt2_backward(model)
        grads = model.grads_memory.copy()
        tg.gpt2_update(model, 1e-3, 0.9, 0.999, 1e-8, 0.0, 1)
        results.append((loss, grads, model.params_memory))
    (loss_plain, grads_plain, params_plain), (loss, grads, params) = results
    assert abs(loss - loss_plain) <= 1e-6 * abs(loss_plain)
    np.testing.assert_allclose(grads, grads_plain, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(params, params_plain, rtol=1e-5, atol=1e-6)
