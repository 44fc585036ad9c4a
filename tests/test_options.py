"""Sampling (KV cache, temperature, top-k, prompt) and the training options (grad accumulation,
clipping, LR schedule, weight decay choice, the loss log)."""

import re
from types import SimpleNamespace

import numpy as np
import pytest

import train_gpt2 as tg
from helpers import MODEL, write_tokens
from helpers import run as run_script

# MODEL is the tiny fixture: V = 777, maxT = 64


@pytest.fixture(scope="module")
def model():
    return tg.gpt2_build_from_checkpoint(MODEL)


@pytest.mark.parametrize("prompt, temperature, top_k", [([776], 1.0, 0), ([776, 5, 300, 12], 0.7, 0),
                                                         ([776, 9], 1.3, 25), ([776], 1.0, 1)])
def test_kv_cache_gives_the_same_tokens(model, prompt, temperature, top_k):
    naive = list(tg.gpt2_sample(model, prompt, 40, [1337], temperature, top_k))
    cached = list(tg.gpt2_generate(model, prompt, 40, [1337], temperature, top_k))
    assert cached == naive
    assert len(set(naive)) > (1 if top_k == 1 else 10)  # a real sequence, not one token repeated


def test_kv_cache_logits_match_the_full_forward(model):
    # every position of the model's whole context, one token at a time through the cache
    tokens = [776, 3, 100, 7, 512, 42] + list(np.random.default_rng(0).integers(0, 777, 58))
    tg.gpt2_forward(model, np.array([tokens]))
    full = model.acts["logits"][0].astype(np.float64)  # (T,Vp)
    c = model.config
    kv_cache = np.zeros((c.num_layers, 2, c.num_heads, len(tokens), c.channels // c.num_heads), np.float32)
    for pos, token in enumerate(tokens):
        cached = tg.gpt2_forward_cached(model, token, pos, kv_cache)
        # the same sums in another order: measured up to 8e-7 of the logits' norm across OpenBLAS's kernels
        # (4e-7 in absolute terms), while a 0.1% error in the cached attention's scale gives 1e-4 to 1e-3
        assert np.linalg.norm(cached - full[pos]) <= 5e-6 * np.linalg.norm(full[pos]), pos


def test_llmc_sampler_is_unchanged(model):
    # temperature 1, no top-k: the softmax of the logits and llm.c's inverse CDF at llm.c's coins
    rng = np.random.default_rng(0)
    logits = rng.standard_normal(896).astype(np.float32)
    state, expected_state = [1337], [1337]
    probs = np.exp(logits[:777] - logits[:777].max())
    probs /= probs.sum()
    for _ in range(20):
        expected = tg.sample_mult(probs.astype(np.float32), tg.random_f32(expected_state))
        assert tg.sample_token(logits, 777, state) == expected


def test_top_k_one_is_greedy(model):
    tokens = [776]
    for token in tg.gpt2_generate(model, [776], 20, [1], temperature=1.0, top_k=1):
        tg.gpt2_forward(model, np.array([tokens]))
        assert token == int(np.argmax(model.acts["logits"][0, -1, :777]))
        tokens.append(token)


def test_temperature_and_top_k_shape_the_distribution():
    logits = np.array([2.0, 1.0, 0.0, -1.0, 3.0, -5.0], dtype=np.float32)
    V = len(logits)

    def frequencies(temperature, top_k, n=4000):
        state = [7]
        counts = np.bincount([tg.sample_token(logits, V, state, temperature, top_k) for _ in range(n)], minlength=V)
        return counts / n

    def softmax(x):
        e = np.exp(x - x.max())
        return e / e.sum()

    for temperature in (0.5, 1.0, 2.0):
        np.testing.assert_allclose(frequencies(temperature, 0), softmax(logits / temperature), atol=0.03)
    # top-k: the k largest logits, renormalized among themselves
    expected = np.zeros(V)
    expected[[4, 0, 1]] = softmax(logits[[4, 0, 1]])
    np.testing.assert_allclose(frequencies(1.0, 3), expected, atol=0.03)


def test_top_k_keeps_the_k_most_likely():
    logits = np.array([2.0, 1.0, 0.0, -1.0, 3.0, -5.0], dtype=np.float32)
    state = [7]
    drawn = {tg.sample_token(logits, 6, state, 1.0, 3) for _ in range(2000)}
    assert drawn == {4, 0, 1}  # the three largest logits, each drawn at least once
    state = [7]
    assert {tg.sample_token(logits, 6, state, 1e-4, 0) for _ in range(100)} == {4}  # temperature -> 0: greedy


def token_loader(B, T, n=5000, seed=0):
    tokens = np.random.default_rng(seed).integers(0, 777, n)
    return tg.DataLoader(tokens, B, T)


def test_grad_accum_equals_one_big_batch():
    a, b = tg.gpt2_build_from_checkpoint(MODEL), tg.gpt2_build_from_checkpoint(MODEL)
    loss_a = tg.accumulate_gradients(a, token_loader(2, 16), grad_accum=3)  # 3 micro-batches of 2 rows
    loss_b = tg.accumulate_gradients(b, token_loader(6, 16), grad_accum=1)  # one batch of 6 rows, same tokens
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    np.testing.assert_allclose(a.grads_memory, b.grads_memory, rtol=1e-4, atol=1e-5 * np.abs(b.grads_memory).max())
    assert np.abs(a.grads_memory).max() > 1e-3


def test_clipping_bounds_the_norm():
    model = tg.gpt2_build_from_checkpoint(MODEL)
    tg.accumulate_gradients(model, token_loader(4, 16), 1)
    grads = model.grads_memory.copy()
    norm = np.linalg.norm(grads.astype(np.float64))
    assert tg.grad_norm(model.grads_memory) == pytest.approx(norm, rel=1e-6)
    assert tg.clip_gradients(model, 2 * norm) == pytest.approx(norm, rel=1e-6)
    np.testing.assert_array_equal(model.grads_memory, grads)  # under the limit: untouched
    assert tg.clip_gradients(model, norm / 4) == pytest.approx(norm, rel=1e-6)
    assert tg.grad_norm(model.grads_memory) == pytest.approx(norm / 4, rel=1e-5)
    np.testing.assert_allclose(model.grads_memory, grads / 4, rtol=1e-5)  # same direction


def test_lr_schedule():
    args = SimpleNamespace(lr=1e-3, lr_min_frac=0.1, warmup_steps=10, steps=100)
    lrs = [tg.get_lr(step, args) for step in range(100)]
    assert lrs[0] == pytest.approx(1e-4)  # warmup from lr / W
    assert lrs[9] == pytest.approx(1e-3)  # the end of the warmup reaches --lr
    assert lrs[10] == pytest.approx(1e-3)  # the cosine starts at --lr
    assert lrs[99] == pytest.approx(1e-4)  # and ends at lr * min_frac on the final step
    assert lrs[int(10 + 89 / 2)] == pytest.approx(5.5e-4, rel=0.02)  # halfway: the middle
    assert all(x >= y for x, y in zip(lrs[10:], lrs[11:]))
    default = SimpleNamespace(lr=1e-4, lr_min_frac=1.0, warmup_steps=0, steps=40)
    assert {tg.get_lr(step, default) for step in range(40)} == {1e-4}  # llm.c's constant rate


def test_decay_2d_only():
    model = tg.gpt2_build_from_checkpoint(MODEL)
    before = {name: p.copy() for name, p in model.params.items()}
    model.grads_memory = np.zeros_like(model.params_memory)  # no gradient: only the decay acts
    tg.gpt2_update(model, 0.1, 0.9, 0.999, 1e-8, 0.5, 1, decayed_names=tg.TENSORS_2D)
    for name, p in model.params.items():
        if name in tg.TENSORS_2D:
            np.testing.assert_allclose(p, before[name] * (1 - 0.1 * 0.5), rtol=1e-6)
        else:
            np.testing.assert_array_equal(p, before[name])


def run(*args, cwd):
    return run_script("train_gpt2.py", "--checkpoint", MODEL, *args, cwd=cwd)


@pytest.fixture
def data(tmp_path):
    rng = np.random.default_rng(0)
    train = write_tokens(tmp_path / "train.bin", rng.integers(0, 777, 5000))
    val = write_tokens(tmp_path / "val.bin", rng.integers(0, 777, 1000))
    return ["--train-data", train, "--val-data", val, "-b", "2", "-t", "16", "--gen-tokens", "8"]


def test_log_file_parses(tmp_path, data):
    result = run(*data, "--steps", "7", "--val-every", "3", "--sample-every", "0", "--grad-clip", "1.0",
                 "--warmup-steps", "2", "--lr", "1e-3", "--lr-min-frac", "0.5", "--log", str(tmp_path / "main.log"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    log = (tmp_path / "main.log").read_text().splitlines()
    train = [re.fullmatch(r"s:(\d+) trl:([\d.]+) lr:([\d.]+) norm:([\d.]+)", line) for line in log if "trl:" in line]
    val = [re.fullmatch(r"s:(\d+) tel:([\d.]+)", line) for line in log if "tel:" in line]
    assert all(train) and all(val) and len(train) + len(val) == len(log)
    assert [int(m.group(1)) for m in train] == list(range(7)) and [int(m.group(1)) for m in val] == [0, 3, 6, 7]
    printed = [float(v) for v in re.findall(r"^step \d+: train loss ([\d.]+)", result.stdout, re.M)]
    assert [float(m.group(2)) for m in train] == [round(v, 4) for v in printed]
    norms = [float(v) for v in re.findall(r"norm ([\d.]+),", result.stdout)]
    assert len(norms) == 7 and [float(m.group(4)) for m in train] == [round(v, 2) for v in norms]
    assert [float(m.group(3)) for m in train][:2] == [0.0005, 0.001] and float(train[-1].group(3)) == 0.0005
    assert re.search(r"step 6: train loss [\d.]+ \(took [\d.]+ ms\) \d+ tokens/s, norm [\d.]+, \d+ s elapsed, ETA 0 s", result.stdout)


def test_steps_zero_evaluates_and_samples_once(tmp_path, data):
    result = run(*data[2:], "--val-data", data[3], "--train-data", str(tmp_path / "absent.bin"), "--steps", "0",
                 "--gen-tokens", "10", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(re.findall(r"^val loss [\d.]+$", result.stdout, re.M)) == 1
    assert result.stdout.count("generating:") == 1 and re.search(r"^generated 10 tokens in \d+ ms$", result.stdout, re.M)
    assert "train loss" not in result.stdout


def test_prompt_is_continued(tmp_path, data):
    pytest.importorskip("tiktoken")
    result = run(*data, "--steps", "0", "--val-every", "0", "--prompt", "at a st", "--gen-tokens", "5",
                 "--top-k", "3", "--temperature", "0.8", cwd=tmp_path)
    if "could not load" in result.stderr:
        pytest.skip("tiktoken's GPT-2 files are not available offline")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("generating:\n---\n")[1].startswith("at a st")  # tokens 265, 257, 336: in the tiny vocab


@pytest.mark.parametrize("args, fragment", [(["--temperature", "0"], "--temperature must be positive"),
                                            (["--top-k", "-1"], "--top-k must not be negative"),
                                            (["--top-k", "800"], "--top-k 800 exceeds the vocab size 777"),
                                            (["--grad-accum", "0"], "--grad-accum must be positive"),
                                            (["--lr-min-frac", "2"], "--lr-min-frac must be between 0 and 1"),
                                            (["--gen-tokens", "65"], "exceed the model's max_seq_len 64"),
                                            (["--beta1", "1"], "--beta1 must be at least 0 and below 1"),
                                            (["--beta2", "nan"], "--beta2 must be at least 0 and below 1"),
                                            (["--total-batch-size", "0"], "--total-batch-size must be positive"),
                                            (["--total-batch-size", "100"], "not a multiple of B*T*processes = 2*16*1 = 32"),
                                            (["--total-batch-size", "96", "--grad-accum", "2"], "disagrees")])
def test_bad_sampling_and_training_options(tmp_path, data, args, fragment):
    result = run(*data, *args, cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and fragment in result.stderr, result.stderr


def test_total_batch_size_and_betas(tmp_path, data):
    # --total-batch-size 96 at -b 2 -t 16 is --grad-accum 3; the betas reach AdamW (other betas,
    # other losses after the first update)
    def losses(*args):
        result = run(*data, "--steps", "3", "--val-every", "0", "--sample-every", "0", "--lr", "1e-3", *args, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        return re.findall(r"^step \d+: train loss [\d.]+", result.stdout, re.M), result.stdout
    accum, _ = losses("--grad-accum", "3")
    total, out = losses("--total-batch-size", "96")
    assert total == accum and "grad_accum_steps 3" in out
    default, _ = losses()
    assert losses("--beta1", "0.9", "--beta2", "0.999")[0] == default
    betas, _ = losses("--beta2", "0.95")
    assert betas[0] == default[0] and betas[1:] != default[1:]
