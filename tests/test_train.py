"""End to end: test_gpt2.py against the PyTorch fixtures, and train_gpt2.py training from scratch."""

import json
import re

import numpy as np
import pytest

import test_gpt2
import train_gpt2 as tg
from llmc import cpu, formats
from helpers import FIXTURE_ARGS, TIGHT, run, write_tokens


def test_matches_pytorch_on_the_fixture():
    result = run("test_gpt2.py", *FIXTURE_ARGS, *TIGHT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    assert "overall okay: 1" in result.stdout
    assert len(re.findall(r"^TENSOR OK, maxdiff = \S+, rel err = \S+$", result.stdout, re.M)) == 17  # logits, 16 gradients
    assert len(re.findall(r"step \d: loss [\d.]+ .* OK = 1", result.stdout)) == 10
    # the summary says what was compared, and against what
    assert re.search(r"^max abs differences: logits .* \(tol 1e-05\), .* gradients .* \(tol 1e-06\)", result.stdout, re.M)
    assert re.search(r"^norm-wise relative errors \|\|ours - PyTorch\|\| / \|\|PyTorch\|\| per tensor: logits \S+, "
                     r"gradients \S+ in d\w+ \(tol 1.5e-06\)$", result.stdout, re.M)


def one_percent_off(original):
    # the layer's gradient 1% too large (encoder_backward writes its gradients: there, dwpe's first row)
    def broken(*args):
        out = original(*args)
        if out is None:
            args[-1][0] *= 1.01
            return out
        return out * 1.01
    return broken


def dk_off(original):
    # attention_backward with the keys' gradient 0.1% too large
    def broken(dout, cache):
        dinp = original(dout, cache)
        C = dinp.shape[-1] // 3
        dinp[..., C:2 * C] *= 1.001
        return dinp
    return broken


def gelu_constant_off(original):
    # gelu_backward with GeLU's constant 0.044715 off in its fourth digit (the forward pass stays right)
    def broken(dout, cache):
        x = cache
        tanh_out = np.tanh(tg.GELU_SCALING_FACTOR * (x + 0.04472 * x * x * x))
        sech2 = 1.0 - tanh_out * tanh_out
        return (0.5 * (1.0 + tanh_out) + x * 0.5 * sech2 * tg.GELU_SCALING_FACTOR * (1.0 + 3.0 * 0.04472 * x * x)) * dout
    return broken


def without_add_at(original):
    # encoder_backward with the classic bug: a token that repeats in the batch gets only one of its gradients
    def broken(dout, cache, dwte, dwpe):
        inp = cache
        dwte[inp] += dout
        dwpe[:inp.shape[1]] = dout.sum(axis=0)
        dwpe[inp.shape[1]:] = 0.0
    return broken


@pytest.mark.parametrize("layer, breaking", [
    ("gelu_backward", one_percent_off), ("layernorm_backward", one_percent_off),
    ("attention_backward", one_percent_off), ("encoder_backward", one_percent_off),
    # these two pass llm.c's absolute tolerances, and the GeLU one the suite's too: the relative errors show them
    ("attention_backward", dk_off), ("gelu_backward", gelu_constant_off),
    ("encoder_backward", without_add_at),  # shows because the fixture's batch repeats tokens
])
def test_a_broken_gradient_fails(monkeypatch, capsys, layer, breaking):
    # the check must be able to fail: make one backward pass slightly wrong and run test_gpt2 in-process
    broken = breaking(getattr(tg, layer))
    monkeypatch.setattr(tg, layer, broken)
    if layer in tg.PLAIN_LAYERS:  # what use_device("cpu") puts in place
        monkeypatch.setitem(tg.PLAIN_LAYERS, layer, broken)
    if layer in cpu.FASTER_LAYERS:  # and its faster form, which use_device("cpu") puts over it
        monkeypatch.setitem(cpu.FASTER_LAYERS, layer, breaking(cpu.FASTER_LAYERS[layer]))
    assert test_gpt2.main(test_gpt2.parse_args(FIXTURE_ARGS + TIGHT)) == 1
    assert "overall okay: 0" in capsys.readouterr().out


def test_expected_losses_file_is_checked(tmp_path):
    bad = tmp_path / "losses.json"
    bad.write_text(json.dumps({"losses": [1.0, 2.0]}))
    result = run("test_gpt2.py", *FIXTURE_ARGS[:4], "--expected-losses", str(bad))
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "losses.json" in result.stderr
    # without a losses file, llm.c's values for GPT-2 124M are used: wrong for this model, so it fails
    result = run("test_gpt2.py", *FIXTURE_ARGS[:4])
    assert result.returncode == 1 and "overall okay: 0" in result.stdout


@pytest.fixture(scope="module")
def made_up_text(tmp_path_factory):
    # token files of a made-up language with GPT-2's vocabulary: 300 "words" of 1 to 4 tokens, spelled
    # with 400 token ids spread over the whole vocabulary, strung together with Zipf-like frequencies.
    # Something to learn in a few steps (which ids occur at all, which follows which), and no text or
    # tokenizer needed, so the test runs in any clone
    rng = np.random.default_rng(0)
    ids = rng.choice(50257, 400, replace=False)
    words = [ids[rng.integers(0, 400, rng.integers(1, 5))] for _ in range(300)]
    frequency = 1 / np.arange(1, 301)
    tokens = np.concatenate([words[i] for i in rng.choice(300, 12000, p=frequency / frequency.sum())])
    out = tmp_path_factory.mktemp("data")
    return write_tokens(out / "train.bin", tokens[:-3000]), write_tokens(out / "val.bin", tokens[-3000:])


def test_training_from_scratch_lowers_the_loss(made_up_text, tmp_path):
    train_data, val_data = made_up_text
    output = tmp_path / "trained.bin"
    result = run("train_gpt2.py", "--init", "d6", "--steps", "12", "-b", "4", "-t", "32", "--lr", "1e-3",
                 "--val-every", "6", "--sample-every", "12", "--gen-tokens", "8",
                 "--train-data", train_data, "--val-data", val_data, "--output", str(output), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    val = [float(v) for v in re.findall(r"^val loss ([\d.]+)$", result.stdout, re.M)]
    train = [float(v) for v in re.findall(r"^step \d+: train loss ([\d.]+) \(took [\d.]+ ms\)", result.stdout, re.M)]
    assert len(val) == 3 and len(train) == 12
    assert val[0] > 10.5  # a random GPT-2 starts near ln(50257) = 10.8
    assert val[2] < val[0] - 1.5 and np.mean(train[-3:]) < np.mean(train[:3]) - 1.5
    assert "generating:" in result.stdout
    # the trained model is an llm.c checkpoint that loads again and gives the same validation loss
    model = tg.gpt2_build_from_checkpoint(str(output))
    val_loader = tg.DataLoader(formats.read_tokens(val_data, 50257), 4, 32)
    assert tg.evaluate(model, val_loader, 5) == pytest.approx(val[-1], abs=1e-6)
