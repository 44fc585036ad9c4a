"""Every bad input gets one line 'error: ...' naming the file and what was expected, exit status 2,
no traceback, and no output written. Each malformed file is built here."""

import json
import os
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import test_gpt2
import train_gpt2 as tg
from llmc import cli, formats
from llmc.run import NonFiniteLossError
from helpers import (CHECKPOINT_MAGIC, LOSSES, MODEL, STATE, STATE_MAGIC, TOKENS_MAGIC, assert_one_error_line, header,
                     run, write_tokens)

# MODEL is the tiny fixture: V = 777, maxT = 64


def checkpoint_with(path, **fields):
    # the tiny fixture with some header fields replaced
    data = bytearray(open(MODEL, "rb").read())
    names = ["magic", "version", "maxT", "V", "L", "NH", "C", "Vp"]
    for name, value in fields.items():
        struct.pack_into("<i", data, 4 * names.index(name), value)
    path.write_bytes(bytes(data))
    return str(path)


@pytest.fixture
def data(tmp_path):
    rng = np.random.default_rng(0)
    return (write_tokens(tmp_path / "train.bin", rng.integers(0, 777, 2000)),
            write_tokens(tmp_path / "val.bin", rng.integers(0, 777, 500)))


def train(tmp_path, data, *args, checkpoint=MODEL):
    # a run that would write output: on bad input nothing may appear
    out = tmp_path / "out"
    result = run("train_gpt2.py", "--checkpoint", checkpoint, "--train-data", data[0], "--val-data", data[1],
                 "-b", "2", "-t", "8", "--steps", "2", "--sample-every", "0",
                 "--output", str(out / "final.bin"), "--output-dir", str(out), *args, cwd=tmp_path)
    assert not out.exists() or os.listdir(out) == [], "output written despite the error"
    return result


@pytest.mark.parametrize("fields, fragment", [
    (dict(magic=20240327), "bad magic 20240327, expected 20240326"),
    (dict(version=2), "unsupported checkpoint version 2; versions 3"),
    (dict(L=0), "nonsensical header"),
    (dict(NH=-4), "nonsensical header"),
    (dict(NH=5), "divisible by num_heads"),
    (dict(Vp=700), "padded_vocab_size >= vocab_size"),
    (dict(L=1 << 30), "implies"),  # a header asking for terabytes: refused, never allocated
    (dict(C=1 << 30, NH=1), "implies"),
    (dict(Vp=1024), "implies"),
])
def test_bad_checkpoint_header(tmp_path, data, fields, fragment):
    path = checkpoint_with(tmp_path / "model.bin", **fields)
    assert_one_error_line(train(tmp_path, data, checkpoint=path), path, fragment)


@pytest.mark.parametrize("make, fragment", [
    (lambda p: None, "not found"),
    (lambda p: p.mkdir(), "is a directory"),
    (lambda p: p.write_bytes(b""), "too short"),
    (lambda p: p.write_bytes(open(MODEL, "rb").read()[:-8]), "truncated"),
    (lambda p: p.write_bytes(open(MODEL, "rb").read() + b"\0" * 4), "implies"),
])
def test_bad_checkpoint_file(tmp_path, data, make, fragment):
    path = tmp_path / "model.bin"
    make(path)
    assert_one_error_line(train(tmp_path, data, checkpoint=str(path)), str(path), fragment)


@pytest.mark.parametrize("make, fragment", [
    (lambda p: p.write_bytes(open(MODEL, "rb").read()), "not an llm.c token file"),  # a checkpoint is not tokens
    (lambda p: p.write_bytes(header(TOKENS_MAGIC, 2, 10) + b"\0" * 20), "unsupported token file version 2"),
    (lambda p: p.write_bytes(header(TOKENS_MAGIC, 1, 10) + b"\0" * 18), "header says 10 tokens"),
    (lambda p: p.write_bytes(header(TOKENS_MAGIC, 1, 10) + b"\0" * 22), "header says 10 tokens"),
    (lambda p: write_tokens(p, [1, 2, 3]), "fewer than one batch"),
    (lambda p: write_tokens(p, [5] * 100 + [777]), "up to 777, but the model's vocab size is 777"),
    (lambda p: p.write_bytes(np.array([5] * 100 + [900], dtype="<i4").tobytes()), "not an llm.c token file"),
    (lambda p: p.write_bytes(b"hello"), "not an llm.c token file"),
])
def test_bad_token_file(tmp_path, data, make, fragment):
    path = tmp_path / "bad.bin"
    make(path)
    assert_one_error_line(train(tmp_path, (data[0], str(path))), str(path), fragment)


@pytest.mark.parametrize("args, fragment", [
    (["-b", "0"], "--batch-size must be positive"),
    (["-t", "-3"], "--seq-len must be positive"),
    (["--steps", "-1"], "--steps must not be negative"),
    (["-t", "65"], "exceeds the model's max_seq_len 64"),
    (["--init", "d7"], "invalid choice: 'd7'"),
    (["--steps", "many"], "invalid int value"),
    (["--val-batches", "0"], "--val-batches must be positive"),
    (["--output", "."], "--output . is a directory"),
])
def test_bad_options(tmp_path, data, args, fragment):
    assert_one_error_line(train(tmp_path, data, *args), fragment)


def test_save_every_needs_a_place(tmp_path, data):
    result = run("train_gpt2.py", "--checkpoint", MODEL, "--save-every", "1", cwd=tmp_path)
    assert_one_error_line(result, "--save-every needs --output-dir")


def test_non_finite_loss_stops_before_the_update(tmp_path, data):
    # a checkpoint whose final LayerNorm weights are finite but huge (inf or nan is refused on
    # load): the logits overflow, and the very first loss is nan
    model = tg.gpt2_build_from_checkpoint(MODEL)
    model.params["lnfw"][:] = 3e38
    path = str(tmp_path / "inf.bin")
    tg.gpt2_write_checkpoint(model, path)
    assert_one_error_line(train(tmp_path, data, "--val-every", "0", checkpoint=path), "step 0: train loss is nan",
                          "before the update", status=1)


def test_non_finite_loss_leaves_the_weights_alone(tmp_path, data, monkeypatch):
    model = tg.gpt2_build_from_checkpoint(MODEL)
    model.params["lnfw"][:] = 3e38  # finite, but the logits overflow
    path = str(tmp_path / "inf.bin")
    tg.gpt2_write_checkpoint(model, path)
    before = model.params_memory.copy()
    monkeypatch.setattr(tg, "gpt2_build_from_checkpoint", lambda *args, **kwargs: model)  # this very model, to look at
    args = cli.parse_args(tg.DEPTHS, ["--checkpoint", path, "--train-data", data[0], "--val-data", data[1], "-b", "2", "-t", "8",
                          "--val-every", "0", "--sample-every", "0"])
    with pytest.raises(NonFiniteLossError, match="step 0"):
        tg.main(args)
    np.testing.assert_array_equal(model.params_memory, before)
    assert model.m_memory is None  # AdamW never ran


# test_gpt2.py's inputs

def check(tmp_path, *args):
    return run("test_gpt2.py", "--checkpoint", MODEL, *args, cwd=tmp_path)


@pytest.mark.parametrize("make, fragment", [
    (lambda p: None, "not found"),
    (lambda p: p.write_bytes(header(CHECKPOINT_MAGIC, 2, 4, 16)), "bad magic 20240326, expected 20240327"),
    (lambda p: p.write_bytes(header(STATE_MAGIC, 1, 4, 16)), "unsupported debug state version 1"),
    (lambda p: p.write_bytes(open(STATE, "rb").read()[:-4]), "is it the debug state of this checkpoint"),
    (lambda p: p.write_bytes(header(STATE_MAGIC, 2, 4, 17) + open(STATE, "rb").read()[1024:]), "B=4, T=17"),
])
def test_bad_debug_state(tmp_path, make, fragment):
    path = tmp_path / "state.bin"
    make(path)
    assert_one_error_line(check(tmp_path, "--state", str(path), "--expected-losses", LOSSES), str(path), fragment)


def test_debug_state_of_another_model(tmp_path):
    other = tmp_path / "other.bin"
    checkpoint_with(other)
    data = bytearray(open(MODEL, "rb").read())
    struct.pack_into("<i", data, 4 * 4, 1)  # one layer instead of two: a different model
    cut = 1024 + tg.num_parameters(tg.GPT2Config(64, 777, 896, 1, 4, 64)) * 4
    other.write_bytes(bytes(data[:cut]))
    result = run("test_gpt2.py", "--checkpoint", str(other), "--state", STATE, "--expected-losses", LOSSES, cwd=tmp_path)
    assert_one_error_line(result, STATE, "is it the debug state of this checkpoint")


@pytest.mark.parametrize("content", [None, "not json", json.dumps({"loss": [1.0] * 10}),
                                     json.dumps({"losses": [1.0] * 9}), json.dumps({"losses": ["a"] * 10})])
def test_bad_expected_losses(tmp_path, content):
    path = tmp_path / "losses.json"
    if content is not None:
        path.write_text(content)
    assert_one_error_line(check(tmp_path, "--state", STATE, "--expected-losses", str(path)), str(path), "expected a JSON file")


# property-based: whatever the header says, the loaders load or raise InputError, nothing else

@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fields=st.lists(st.integers(-2**31, 2**31 - 1) | st.integers(-3, 3000), min_size=6, max_size=6),
       version=st.sampled_from([1, 3, 0, 2, -1]), extra=st.integers(0, 3000))
def test_any_checkpoint_header(tmp_path, fields, version, extra):
    path = tmp_path / "fuzz.bin"
    path.write_bytes(header(CHECKPOINT_MAGIC, version, *fields) + b"\0" * 4 * extra)
    try:
        model = tg.gpt2_build_from_checkpoint(str(path))
    except tg.InputError as e:
        assert str(path) in str(e)
        return
    # it loaded: then the file held exactly that model
    assert 1024 + 4 * model.params_memory.size == os.path.getsize(path)
    c = model.config
    assert min(c.max_seq_len, c.vocab_size, c.num_layers, c.num_heads, c.channels) > 0 and c.channels % c.num_heads == 0


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(first=st.lists(st.integers(-2**31, 2**31 - 1) | st.integers(-3, 300) | st.just(TOKENS_MAGIC), min_size=0, max_size=4),
       body=st.binary(max_size=400))
def test_any_token_file(tmp_path, first, body):
    path = tmp_path / "fuzz.bin"
    path.write_bytes(struct.pack(f"<{len(first)}i", *first) + body)
    try:
        tokens = formats.read_tokens(str(path), 300)
    except tg.InputError as e:
        assert str(path) in str(e)
        return
    assert tokens.size == 0 or (0 <= tokens.min() and tokens.max() < 300)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fields=st.lists(st.integers(-2**31, 2**31 - 1) | st.integers(-3, 40), min_size=2, max_size=2),
       cut=st.integers(0, 1000))
def test_any_debug_state_header(tmp_path, fields, cut):
    path = tmp_path / "fuzz.bin"
    path.write_bytes(header(STATE_MAGIC, 2, *fields) + open(STATE, "rb").read()[1024 + cut:])
    config = tg.gpt2_build_from_checkpoint(MODEL).config
    try:
        x, y, logits, loss, grads = test_gpt2.read_debug_state(str(path), config)
    except tg.InputError as e:
        assert str(path) in str(e)
        return
    assert x.shape == y.shape == tuple(fields) and logits.shape == (*fields, 777)
