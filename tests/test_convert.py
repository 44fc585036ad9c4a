"""dev/convert_hf.py: a GPT-2 in Hugging Face's layout (Conv1D weights, safetensors) into llm.c's checkpoint."""

import json
import os

import numpy as np
import pytest

import train_gpt2 as tg
from helpers import LOSSES, MODEL, STATE, TIGHT, run

safetensors_numpy = pytest.importorskip("safetensors.numpy", reason="dev/convert_hf.py needs safetensors")


def write_hf(folder, model, prefix="", extras=True):
    # the fixture's model (written by PyTorch, in llm.c's layout) in Hugging Face's GPT-2 layout:
    # Conv1D weights are (in, out), so the four projection matrices are stored transposed
    c, p = model.config, model.params
    t = {"wte.weight": p["wte"][:c.vocab_size], "wpe.weight": p["wpe"], "ln_f.weight": p["lnfw"], "ln_f.bias": p["lnfb"]}
    for l in range(c.num_layers):
        t.update({f"h.{l}.ln_1.weight": p["ln1w"][l], f"h.{l}.ln_1.bias": p["ln1b"][l],
                  f"h.{l}.attn.c_attn.weight": p["qkvw"][l].T, f"h.{l}.attn.c_attn.bias": p["qkvb"][l],
                  f"h.{l}.attn.c_proj.weight": p["attprojw"][l].T, f"h.{l}.attn.c_proj.bias": p["attprojb"][l],
                  f"h.{l}.ln_2.weight": p["ln2w"][l], f"h.{l}.ln_2.bias": p["ln2b"][l],
                  f"h.{l}.mlp.c_fc.weight": p["fcw"][l].T, f"h.{l}.mlp.c_fc.bias": p["fcb"][l],
                  f"h.{l}.mlp.c_proj.weight": p["fcprojw"][l].T, f"h.{l}.mlp.c_proj.bias": p["fcprojb"][l]})
        if extras:  # the causal-mask buffers older checkpoints carry
            t[f"h.{l}.attn.bias"] = np.tril(np.ones((c.max_seq_len, c.max_seq_len), np.float32))[None, None]
    t = {prefix + k: np.ascontiguousarray(v) for k, v in t.items()}
    if prefix:  # GPT2LMHeadModel also saves the (tied) classifier
        t["lm_head.weight"] = np.ascontiguousarray(p["wte"][:c.vocab_size])
    os.makedirs(folder, exist_ok=True)
    safetensors_numpy.save_file(t, os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"model_type": "gpt2", "n_layer": c.num_layers, "n_head": c.num_heads, "n_embd": c.channels,
                   "vocab_size": c.vocab_size, "n_positions": c.max_seq_len, "n_ctx": c.max_seq_len}, f)


def convert(*args):
    return run(os.path.join("dev", "convert_hf.py"), *args)


@pytest.mark.parametrize("prefix, extras", [("", True), ("transformer.", False)])
def test_convert_gives_the_pytorch_export_byte_for_byte(tmp_path, prefix, extras):
    write_hf(tmp_path / "hf", tg.gpt2_build_from_checkpoint(MODEL), prefix, extras)
    result = convert(str(tmp_path / "hf"), "-o", str(tmp_path / "out.bin"))
    assert result.returncode == 0, result.stderr
    # the fixture was written from PyTorch the way llm.c's export writes: same weights, same bytes
    assert (tmp_path / "out.bin").read_bytes() == open(MODEL, "rb").read()


def test_converted_model_computes_pytorchs_logits(tmp_path):
    write_hf(tmp_path / "hf", tg.gpt2_build_from_checkpoint(MODEL))
    assert convert(str(tmp_path / "hf"), "-o", str(tmp_path / "out.bin")).returncode == 0
    result = run("test_gpt2.py", "--checkpoint", str(tmp_path / "out.bin"), "--state", STATE, "--expected-losses", LOSSES,
                 *TIGHT)
    assert result.returncode == 0 and "overall okay: 1" in result.stdout, result.stdout[-2000:]


def test_a_transposition_mistake_would_show(tmp_path):
    # the check above can fail: a square matrix stored the wrong way round converts to other bytes
    model = tg.gpt2_build_from_checkpoint(MODEL)
    model.params["attprojw"][0] = model.params["attprojw"][0].T.copy()
    write_hf(tmp_path / "hf", model)
    assert convert(str(tmp_path / "hf"), "-o", str(tmp_path / "out.bin")).returncode == 0
    assert (tmp_path / "out.bin").read_bytes() != open(MODEL, "rb").read()


@pytest.mark.parametrize("damage, fragment", [
    (lambda d: os.remove(d / "config.json"), "config.json not found"),
    (lambda d: (d / "config.json").write_text("{}"), "not a GPT-2 config"),
    (lambda d: (d / "model.safetensors").write_bytes(b"garbage"), "could not read it"),
])
def test_bad_input(tmp_path, damage, fragment):
    write_hf(tmp_path / "hf", tg.gpt2_build_from_checkpoint(MODEL))
    damage(tmp_path / "hf")
    result = convert(str(tmp_path / "hf"), "-o", str(tmp_path / "out.bin"))
    assert result.returncode == 2 and result.stderr.startswith("error: ") and fragment in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out.bin").exists()


def test_missing_tensor(tmp_path):
    model = tg.gpt2_build_from_checkpoint(MODEL)
    write_hf(tmp_path / "hf", model)
    t = safetensors_numpy.load_file(str(tmp_path / "hf" / "model.safetensors"))
    del t["h.1.mlp.c_fc.bias"]
    safetensors_numpy.save_file(t, str(tmp_path / "hf" / "model.safetensors"))
    result = convert(str(tmp_path / "hf"), "-o", str(tmp_path / "out.bin"))
    assert result.returncode == 2 and "no tensor h.1.mlp.c_fc.bias" in result.stderr and not (tmp_path / "out.bin").exists()
