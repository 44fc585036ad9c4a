"""Every layer's backward pass against float64 central finite differences, on small random shapes.

For a layer out = f(x), backward(dout) should give d/dx of the scalar sum(out * dout) for a random
dout. We compute that derivative numerically, one element at a time, and compare.
"""

import math

import numpy as np
import pytest

import train_gpt2 as tg
from llmc import cpu

RTOL, ATOL = 1e-6, 1e-8


def numerical_grad(f, x, eps=1e-6, indices=None):
    # central differences of the scalar function f() with respect to the elements of x (changed in
    # place and restored): all of them, shaped like x, or just those at the given flat indices
    flat = x.reshape(-1)
    grad = np.zeros(flat.size if indices is None else len(indices))
    for j, i in enumerate(range(flat.size) if indices is None else indices):
        old = flat[i]
        flat[i] = old + eps
        plus = f()
        flat[i] = old - eps
        minus = f()
        flat[i] = old
        grad[j] = (plus - minus) / (2 * eps)
    return grad.reshape(x.shape) if indices is None else grad


def assert_close(analytic, numeric):
    np.testing.assert_allclose(analytic, numeric, rtol=RTOL, atol=ATOL)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_encoder(rng):
    B, T, C, Vp, maxT = 2, 3, 4, 7, 5
    inp = np.array([[1, 3, 1], [6, 1, 0]])  # token 1 repeats: its gradients must add up
    wte, wpe = rng.standard_normal((Vp, C)), rng.standard_normal((maxT, C))
    dout = rng.standard_normal((B, T, C))
    loss = lambda: float(np.sum(tg.encoder_forward(inp, wte, wpe)[0] * dout))
    _, cache = tg.encoder_forward(inp, wte, wpe)
    already = rng.standard_normal((Vp, C))  # the classifier's part of dwte, already in the buffer
    dwte, dwpe = already.copy(), np.full((maxT, C), np.nan)
    tg.encoder_backward(dout, cache, dwte, dwpe)
    assert_close(dwte - already, numerical_grad(loss, wte))  # encoder_backward adds into dwte
    assert_close(dwpe, numerical_grad(loss, wpe))  # and overwrites dwpe, zero beyond T


def test_layernorm(rng):
    B, T, C = 2, 3, 8
    inp = rng.standard_normal((B, T, C)) * 2 + 0.5
    weight, bias = rng.standard_normal(C), rng.standard_normal(C)
    dout = rng.standard_normal((B, T, C))
    loss = lambda: float(np.sum(tg.layernorm_forward(inp, weight, bias)[0] * dout))
    out, cache = tg.layernorm_forward(inp, weight, bias)
    # against the textbook formula too
    expected = (inp - inp.mean(-1, keepdims=True)) / np.sqrt(inp.var(-1, keepdims=True) + 1e-5) * weight + bias
    np.testing.assert_allclose(out, expected, rtol=1e-12)
    dweight, dbias = np.empty(C), np.empty(C)
    dinp = tg.layernorm_backward(dout, cache, dweight, dbias)
    assert_close(dinp, numerical_grad(loss, inp))
    assert_close(dweight, numerical_grad(loss, weight))
    assert_close(dbias, numerical_grad(loss, bias))


@pytest.mark.parametrize("has_bias", [True, False])
def test_matmul(rng, has_bias):
    B, T, C, OC = 2, 3, 5, 4
    inp, weight = rng.standard_normal((B, T, C)), rng.standard_normal((OC, C))
    bias = rng.standard_normal(OC) if has_bias else None
    dout = rng.standard_normal((B, T, OC))
    loss = lambda: float(np.sum(tg.matmul_forward(inp, weight, bias)[0] * dout))
    out, cache = tg.matmul_forward(inp, weight, bias)
    np.testing.assert_allclose(out, np.einsum("btc,oc->bto", inp, weight) + (bias if has_bias else 0), rtol=1e-12)
    dweight = np.empty((OC, C))
    dbias = np.empty(OC) if has_bias else None
    dinp = tg.matmul_backward(dout, cache, dweight, dbias)
    assert_close(dinp, numerical_grad(loss, inp))
    assert_close(dweight, numerical_grad(loss, weight))
    if has_bias:
        assert_close(dbias, numerical_grad(loss, bias))


def attention_naive(inp, NH):
    # llm.c's loops, written out: the reference the vectorized attention_forward must agree with
    B, T, C3 = inp.shape
    C = C3 // 3
    hs = C // NH
    out = np.zeros((B, T, C))
    for b in range(B):
        for t in range(T):
            for h in range(NH):
                q = inp[b, t, h * hs:(h + 1) * hs]
                scores = np.array([q @ inp[b, t2, C + h * hs:C + (h + 1) * hs] / math.sqrt(hs) for t2 in range(t + 1)])
                w = np.exp(scores - scores.max())
                w /= w.sum()
                for t2 in range(t + 1):
                    out[b, t, h * hs:(h + 1) * hs] += w[t2] * inp[b, t2, 2 * C + h * hs:2 * C + (h + 1) * hs]
    return out


def test_attention(rng):
    B, T, C, NH = 2, 4, 6, 2
    inp = rng.standard_normal((B, T, 3 * C))
    dout = rng.standard_normal((B, T, C))
    out, cache = tg.attention_forward(inp, NH)
    np.testing.assert_allclose(out, attention_naive(inp, NH), rtol=1e-12, atol=1e-12)
    att = cache[1]
    assert np.all(np.triu(att, k=1) == 0)  # causal: nothing from the future
    loss = lambda: float(np.sum(tg.attention_forward(inp, NH)[0] * dout))
    assert_close(tg.attention_backward(dout, cache), numerical_grad(loss, inp))


def test_gelu(rng):
    x = rng.standard_normal((2, 3, 8)) * 3
    dout = rng.standard_normal(x.shape)
    out, cache = tg.gelu_forward(x)
    np.testing.assert_allclose(out, 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3))), rtol=1e-12)
    loss = lambda: float(np.sum(tg.gelu_forward(x)[0] * dout))
    assert_close(tg.gelu_backward(dout, cache), numerical_grad(loss, x))


def test_residual(rng):
    a, b = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 3, 4))
    dout = rng.standard_normal((2, 3, 4))
    out, cache = tg.residual_forward(a, b)
    da, db = tg.residual_backward(dout, cache)
    loss = lambda: float(np.sum(tg.residual_forward(a, b)[0] * dout))
    assert_close(da, numerical_grad(loss, a))
    assert_close(db, numerical_grad(loss, b))


def test_softmax_crossentropy(rng):
    B, T, V, Vp = 2, 3, 5, 8
    logits = rng.standard_normal((B, T, Vp)) * 3
    logits[..., V:] = 100.0  # padded columns must not take part, whatever they hold
    targets = rng.integers(0, V, (B, T))
    dlosses = rng.standard_normal((B, T))
    probs = tg.softmax_forward(logits, V)
    assert probs.shape == (B, T, V)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-12)
    losses = tg.crossentropy_forward(probs, targets)
    expected = -np.log(np.exp(logits[..., :V]) / np.exp(logits[..., :V]).sum(-1, keepdims=True))
    np.testing.assert_allclose(losses, np.take_along_axis(expected, targets[..., None], -1)[..., 0], rtol=1e-12)
    loss = lambda: float(np.sum(tg.crossentropy_forward(tg.softmax_forward(logits, V), targets) * dlosses))
    dlogits = tg.crossentropy_softmax_backward(dlosses, probs, targets, Vp)
    assert dlogits.shape == (B, T, Vp)
    assert np.all(dlogits[..., V:] == 0)
    assert_close(dlogits, numerical_grad(loss, logits))


def tiny_model(dtype, seed=0):
    # a tiny GPT-2 (V not a multiple of 128, so the padding is exercised) with all weights random
    config = tg.GPT2Config(max_seq_len=8, vocab_size=50, padded_vocab_size=128, num_layers=2, num_heads=2, channels=8)
    rng = np.random.default_rng(seed)
    model = tg.GPT2(config, (rng.standard_normal(tg.num_parameters(config)) * 0.3).astype(dtype))
    model.params["wte"][config.vocab_size:] = 0.0
    return model


def test_whole_model_gradient():
    model = tiny_model(np.float64)
    rng = np.random.default_rng(1)
    x, y = rng.integers(0, 50, (2, 5)), rng.integers(0, 50, (2, 5))
    x[1, 3] = x[1, 0] = x[0, 2]  # a token used three times: its row of wte gets the sum of three gradients
    tg.gpt2_forward(model, x, y)
    tg.gpt2_backward(model)
    analytic = model.grads_memory.copy()
    # every parameter tensor: a few elements of each (all of them would take a while)
    loss = lambda: tg.gpt2_forward(model, x, y)
    for name, grad in tg.point_parameters(analytic, model.config).items():
        param = model.params[name].reshape(-1)
        idx = rng.choice(param.size, size=min(20, param.size), replace=False)
        if name == "wte":
            # and every element of the rows that matter most: the input tokens' (the encoder's gradient
            # adds to the classifier's there) and the targets'
            C = model.config.channels
            rows = np.unique(np.concatenate([x.ravel(), y.ravel()]))
            idx = np.concatenate([idx, (rows[:, None] * C + np.arange(C)).ravel()])
        numeric = numerical_grad(loss, param, indices=idx)
        np.testing.assert_allclose(grad.reshape(-1)[idx], numeric, rtol=1e-5, atol=1e-9, err_msg=f"d{name}")
    # the padded rows of wte get no gradient
    assert np.all(model.grads["wte"][model.config.vocab_size:] == 0)


def test_everything_stays_float32():
    # NumPy 2 keeps float32 * Python float as float32, but a NumPy float64 scalar would silently upcast
    model = tiny_model(np.float32)
    rng = np.random.default_rng(2)
    x, y = rng.integers(0, 50, (2, 5)), rng.integers(0, 50, (2, 5))
    tg.gpt2_forward(model, x, y)
    assert model.acts["logits"].dtype == np.float32
    assert model.acts["probs"].dtype == np.float32
    for layer in model.acts["layers"]:
        for cache in layer:
            for item in cache:
                if isinstance(item, np.ndarray) and item.dtype.kind == "f":
                    assert item.dtype == np.float32
    tg.gpt2_backward(model)
    tg.gpt2_update(model, 1e-3, 0.9, 0.999, 1e-8, 0.01, 1)
    for memory in (model.params_memory, model.grads_memory, model.m_memory, model.v_memory):
        assert memory.dtype == np.float32


def adamw_reference(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, t):
    # llm.c's gpt2_update, element by element
    for i in range(param.size):
        m[i] = beta1 * m[i] + (1 - beta1) * grad[i]
        v[i] = beta2 * v[i] + (1 - beta2) * grad[i] * grad[i]
        m_hat = m[i] / (1 - beta1 ** t)
        v_hat = v[i] / (1 - beta2 ** t)
        param[i] -= lr * (m_hat / (math.sqrt(v_hat) + eps) + weight_decay * param[i])


def test_adamw_plain_matches_llmc_loop():
    rng = np.random.default_rng(3)
    n = 1000
    param = rng.standard_normal(n)
    ours, m, v, m_ref, v_ref = param.copy(), np.zeros(n), np.zeros(n), np.zeros(n), np.zeros(n)
    for t in (1, 2, 3):
        grad = rng.standard_normal(n)
        tg.adamw_plain(ours, grad, m, v, 1e-2, 0.9, 0.999, 1e-8, 0.1, t)
        adamw_reference(param, grad, m_ref, v_ref, 1e-2, 0.9, 0.999, 1e-8, 0.1, t)
        np.testing.assert_allclose(ours, param, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_gpt2_update_matches_adamw_plain(monkeypatch, weight_decay):
    # the chunked, in-place AdamW on threads (what use_device("cpu") installs) against the plain
    # one, over several chunks and a ragged last one
    monkeypatch.setattr(cpu, "ADAMW_CHUNK", 500)
    monkeypatch.setattr(tg, "adamw", cpu.FASTER_LAYERS["adamw"])
    model = tiny_model(np.float64)
    rng = np.random.default_rng(4)
    n = model.params_memory.size
    assert n % 500 != 0 and n > 2000
    param, m, v = model.params_memory.copy(), np.zeros(n), np.zeros(n)
    model.grads_memory = np.zeros(n)
    for t in (1, 2, 3):
        model.grads_memory[:] = rng.standard_normal(n)
        tg.gpt2_update(model, 1e-2, 0.9, 0.999, 1e-8, weight_decay, t)
        tg.adamw_plain(param, model.grads_memory, m, v, 1e-2, 0.9, 0.999, 1e-8, weight_decay, t)
        np.testing.assert_allclose(model.params_memory, param, rtol=1e-13, atol=1e-16)
        np.testing.assert_allclose(model.m_memory, m, rtol=1e-13)
        np.testing.assert_allclose(model.v_memory, v, rtol=1e-13)


def test_backward_lets_go_of_the_activations():
    # each layer's cache is released once its backward is done: only the logits stay readable
    model = tiny_model(np.float32)
    rng = np.random.default_rng(5)
    tg.gpt2_forward(model, rng.integers(0, 50, (2, 5)), rng.integers(0, 50, (2, 5)))
    acts = model.acts
    logits = acts["logits"]
    tg.gpt2_backward(model)
    assert list(model.acts) == ["logits"] and model.acts["logits"] is logits
    # the forward's caches were taken out one by one, each as its backward was done
    assert acts["layers"] == [] and "probs" not in acts and "logits_cache" not in acts
    with pytest.raises(RuntimeError, match="needs a forward pass with targets"):
        tg.gpt2_backward(model)
