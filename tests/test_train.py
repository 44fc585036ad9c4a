"""End to end: test_gpt2.py against the PyTorch fixtures, and train_gpt2.py training from scratch."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import test_gpt2
import train_gpt2 as tg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
SHAKESPEARE = os.path.join(os.path.dirname(ROOT), "shared", "data", "tinyshakespeare.txt")

FIXTURE_ARGS = ["--checkpoint", os.path.join(FIXTURES, "tiny_gpt2.bin"),
                "--state", os.path.join(FIXTURES, "tiny_gpt2_debug_state.bin"),
                "--expected-losses", os.path.join(FIXTURES, "tiny_gpt2_expected_losses.json")]
# far tighter than llm.c's 1e-2 / 2e-2: fp32 NumPy agrees with fp32 PyTorch to a few ulps
TIGHT = ["--logits-tol", "1e-5", "--grad-tol", "1e-6", "--loss-tol", "1e-5"]


def run(script, *args, cwd=ROOT):
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, text=True, cwd=cwd)


def test_matches_pytorch_on_the_fixture():
    result = run("test_gpt2.py", *FIXTURE_ARGS, *TIGHT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    assert "overall okay: 1" in result.stdout
    assert result.stdout.count("TENSOR OK") == 17  # the logits and 16 gradients
    assert len(re.findall(r"step \d: loss [\d.]+ .* OK = 1", result.stdout)) == 10


@pytest.mark.parametrize("layer", ["gelu_backward", "layernorm_backward", "attention_backward", "encoder_backward"])
def test_a_broken_gradient_fails(monkeypatch, capsys, layer):
    # the check must be able to fail: make one backward pass slightly wrong and run test_gpt2 in-process
    original = getattr(tg, layer)

    def broken(*args):
        out = original(*args)
        if out is None:  # encoder_backward writes its gradients: disturb dwpe instead
            args[-1][0] *= 1.01
            return out
        return out * 1.01

    monkeypatch.setattr(tg, layer, broken)
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
def shakespeare_tokens(tmp_path_factory):
    if not os.path.isfile(SHAKESPEARE):
        pytest.skip(f"{SHAKESPEARE} not present")
    out = tmp_path_factory.mktemp("data")
    result = run("prepro_tinyshakespeare.py", "--input", SHAKESPEARE, "--output-dir", str(out))
    if result.returncode != 0:
        pytest.skip(f"tokenizing needs tiktoken's GPT-2 files: {result.stderr.strip()}")
    return out


def test_training_from_scratch_lowers_the_loss(shakespeare_tokens, tmp_path):
    output = tmp_path / "trained.bin"
    result = run("train_gpt2.py", "--init", "d6", "--steps", "12", "-b", "4", "-t", "32", "--lr", "1e-3",
                 "--val-every", "6", "--sample-every", "12", "--gen-tokens", "8",
                 "--train-data", str(shakespeare_tokens / "tiny_shakespeare_train.bin"),
                 "--val-data", str(shakespeare_tokens / "tiny_shakespeare_val.bin"),
                 "--output", str(output), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    val = [float(v) for v in re.findall(r"^val loss ([\d.]+)$", result.stdout, re.M)]
    train = [float(v) for v in re.findall(r"^step \d+: train loss ([\d.]+) \(took [\d.]+ ms\)", result.stdout, re.M)]
    assert len(val) == 3 and len(train) == 12
    assert val[0] > 10.5  # a random GPT-2 starts near ln(50257) = 10.8
    assert val[2] < val[0] - 1.5 and np.mean(train[-3:]) < np.mean(train[:3]) - 1.5
    assert "generating:" in result.stdout
    # the trained model is an llm.c checkpoint that loads again and gives the same validation loss
    model = tg.gpt2_build_from_checkpoint(str(output))
    val_loader = tg.DataLoader(tg.read_tokens(str(shakespeare_tokens / "tiny_shakespeare_val.bin"), 50257), 4, 32)
    assert tg.evaluate(model, val_loader, 5) == pytest.approx(val[-1], abs=1e-6)
