"""llm.c's file formats: each one built by hand here, read by our loaders, and written back byte for byte."""

import json

import numpy as np
import pytest

import test_gpt2
import train_gpt2 as tg
from llmc import formats, tokenizer
from helpers import (CHECKPOINT_MAGIC, LOSSES, MODEL, STATE, STATE_MAGIC, TOKENIZER_MAGIC, TOKENS_MAGIC, header, run,
                     write_tokens)

SMALL = tg.GPT2Config(max_seq_len=8, vocab_size=50, padded_vocab_size=128, num_layers=2, num_heads=2, channels=4)


def handmade_checkpoint(path, config=SMALL, version=3):
    # every tensor filled with its own index + 1, so a misplaced tensor would show
    c = config
    Vp = c.padded_vocab_size if version == 3 else c.vocab_size
    shapes = tg.parameter_shapes(tg.GPT2Config(c.max_seq_len, c.vocab_size, Vp, c.num_layers, c.num_heads, c.channels))
    fields = [CHECKPOINT_MAGIC, version, c.max_seq_len, c.vocab_size, c.num_layers, c.num_heads, c.channels]
    if version == 3:
        fields.append(Vp)
    body = b"".join(np.full(shape, i + 1, dtype="<f4").tobytes() for i, shape in enumerate(shapes.values()))
    with open(path, "wb") as f:
        f.write(header(*fields) + body)
    return list(shapes)


def test_checkpoint_read_and_write_back(tmp_path):
    path = tmp_path / "model.bin"
    names = handmade_checkpoint(path)
    model = tg.gpt2_build_from_checkpoint(str(path))
    assert model.config == SMALL
    for i, name in enumerate(names):
        assert np.all(model.params[name] == i + 1), name
    assert model.params["qkvw"].shape == (2, 12, 4) and model.params["fcprojw"].shape == (2, 4, 16)
    out = tmp_path / "written.bin"
    tg.gpt2_write_checkpoint(model, str(out))
    assert out.read_bytes() == path.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin", "written.bin"]  # no temporary file left


def test_checkpoint_version_1_is_unpadded(tmp_path):
    path = tmp_path / "v1.bin"
    handmade_checkpoint(path, version=1)
    model = tg.gpt2_build_from_checkpoint(str(path))
    assert model.config.padded_vocab_size == model.config.vocab_size == 50
    assert model.params["wte"].shape == (50, 4) and np.all(model.params["wpe"] == 2)


def test_random_init_is_gpt2s():
    model = tg.gpt2_build_from_random("d6", seed=0)
    c, p = model.config, model.params
    assert (c.num_layers, c.channels, c.num_heads, c.vocab_size, c.padded_vocab_size, c.max_seq_len) == (6, 384, 6, 50257, 50304, 1024)
    assert np.all(p["wte"][c.vocab_size:] == 0)
    assert abs(p["wte"][:c.vocab_size].std() - 0.02) < 1e-3 and abs(p["fcw"].std() - 0.02) < 1e-3
    assert abs(p["attprojw"].std() - 0.02 / np.sqrt(12)) < 1e-3 and abs(p["fcprojw"].std() - 0.02 / np.sqrt(12)) < 1e-3
    assert np.all(p["ln1w"] == 1) and np.all(p["ln1b"] == 0) and np.all(p["qkvb"] == 0) and np.all(p["lnfw"] == 1)
    assert model.params_memory.dtype == np.float32


def test_tokens_both_formats(tmp_path):
    tokens = list(range(100, 130))
    write_tokens(tmp_path / "new.bin", tokens)
    (tmp_path / "old.bin").write_bytes(np.array(tokens, dtype="<i4").tobytes())
    assert list(formats.read_tokens(str(tmp_path / "new.bin"), 200)) == tokens
    assert list(formats.read_tokens(str(tmp_path / "old.bin"), 200)) == tokens


def test_dataloader_is_consecutive_and_wraps():
    tokens = np.arange(30)
    loader = tg.DataLoader(tokens, B=2, T=3)
    assert loader.num_batches == 4  # (30 - 1) // 6
    batches = [loader.next_batch() for _ in range(5)]
    x, y = batches[0]
    assert x.tolist() == [[0, 1, 2], [3, 4, 5]] and y.tolist() == [[1, 2, 3], [4, 5, 6]]
    assert batches[3][0].tolist() == [[18, 19, 20], [21, 22, 23]] and batches[3][1][-1, -1] == 24
    assert batches[4][0].tolist() == x.tolist()  # wrapped around to the start
    loader.reset()
    assert loader.next_batch()[0].tolist() == x.tolist()


def test_tokenizer_file(tmp_path):
    table = [b"!", b"hello", b" w\xc3", b"\xa9"]
    body = b"".join(bytes([len(t)]) + t for t in table)
    path = tmp_path / "gpt2_tokenizer.bin"
    path.write_bytes(header(TOKENIZER_MAGIC, 2, len(table), 3) + body)
    assert tokenizer.tokenizer_load(str(path)) == table
    path.write_bytes(header(TOKENIZER_MAGIC, 2, len(table) + 1, 3) + body)  # one token announced too many
    with pytest.raises(tg.InputError, match="truncated"):
        tokenizer.tokenizer_load(str(path))


def test_xorshift_matches_llmc():
    # the first outputs of llm.c's random_u32 / random_f32 from state 1337, computed by its C code
    state = [1337]
    assert [tg.random_u32(state) for _ in range(3)] == [989205090, 818269915, 1335155955]
    assert [float(tg.random_f32(state)) for _ in range(3)] == pytest.approx([0.902659476, 0.684917867, 0.307830393], abs=1e-9)


def test_sample_mult_is_the_inverse_cdf():
    probs = np.array([0.1, 0.0, 0.5, 0.4], dtype=np.float32)
    assert [tg.sample_mult(probs, coin) for coin in (0.0, 0.0999, 0.11, 0.59, 0.61, 0.99999)] == [0, 0, 2, 2, 3, 3]
    assert tg.sample_mult(np.array([0.2, 0.2], dtype=np.float32), 0.9) == 1  # rounding: the last index


def test_debug_state_fixture_reads():
    model = tg.gpt2_build_from_checkpoint(MODEL)
    x, y, logits, loss, grads = test_gpt2.read_debug_state(STATE, model.config)
    B, T = x.shape
    assert logits.shape == (B, T, model.config.vocab_size) and np.isfinite(loss)
    assert set(grads) == set(model.params) and np.all(grads["wte"][model.config.vocab_size:] == 0)
    with open(LOSSES) as f:
        assert json.load(f)["losses"][0] == pytest.approx(loss, abs=1e-6)


@pytest.mark.parametrize("make, expected", [
    (lambda p: None, "not found"),
    (lambda p: p.write_bytes(b""), "too short"),
    (lambda p: p.write_bytes(header(1234, 3)), "bad magic"),
    (lambda p: p.write_bytes(header(CHECKPOINT_MAGIC, 5)), "unsupported checkpoint version 5"),
    (lambda p: (handmade_checkpoint(p), p.write_bytes(p.read_bytes()[:-4])), "implies"),
])
def test_bad_checkpoint_is_one_clear_line(tmp_path, make, expected):
    path = tmp_path / "model.bin"
    make(path)
    result = run("train_gpt2.py", "--checkpoint", str(path), "--steps", "1")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0] and str(path) in lines[0]
    assert "Traceback" not in result.stderr


def test_missing_checkpoint_names_both_routes(tmp_path):
    result = run("train_gpt2.py", "--checkpoint", str(tmp_path / "gpt2_124M.bin"))
    assert result.returncode == 2 and "starter pack" in result.stderr and "--init" in result.stderr


def test_bad_token_file_is_one_clear_line(tmp_path):
    handmade_checkpoint(tmp_path / "model.bin")
    (tmp_path / "bad.bin").write_bytes(header(TOKENS_MAGIC, 1, 1000) + b"\0\0" * 10)  # far fewer tokens than claimed
    result = run("train_gpt2.py", "--checkpoint", str(tmp_path / "model.bin"), "-t", "4", "--sample-every", "0", "--train-data", str(tmp_path / "bad.bin"))
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "bad.bin" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_bad_debug_state_is_one_clear_line(tmp_path):
    (tmp_path / "state.bin").write_bytes(header(STATE_MAGIC, 2, 4, 16) + b"\0" * 100)
    result = run("test_gpt2.py", "--checkpoint", MODEL, "--state", str(tmp_path / "state.bin"))
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "state.bin" in result.stderr
    assert "Traceback" not in result.stderr
