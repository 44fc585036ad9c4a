"""
Converts a Hugging Face GPT-2 checkpoint (model.safetensors + config.json) into an llm.c checkpoint,
without PyTorch: the same bytes llm.c's own export (its train_gpt2.py) writes for those weights.

    python dev/convert_hf.py path/to/gpt2 -o gpt2_124M.bin      # gpt2, gpt2-medium, -large, -xl

Needs the safetensors package (pip install safetensors; its NumPy API only). Hugging Face stores the
projections as Conv1D, (in, out): llm.c, like nn.Linear, wants (out, in), so those are transposed.
"""

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from llmc.formats import checkpoint_header  # noqa: E402
from llmc.utils import atomic_write  # noqa: E402
from train_gpt2 import GPT2Config, padded_vocab, parameter_shapes  # noqa: E402

# llm.c's 16 tensors in file order, and the Hugging Face key of each (per layer: {l}), transposed?
LAYOUT = [
    ("wte", "wte.weight", False), ("wpe", "wpe.weight", False),
    ("ln1w", "h.{l}.ln_1.weight", False), ("ln1b", "h.{l}.ln_1.bias", False),
    ("qkvw", "h.{l}.attn.c_attn.weight", True), ("qkvb", "h.{l}.attn.c_attn.bias", False),
    ("attprojw", "h.{l}.attn.c_proj.weight", True), ("attprojb", "h.{l}.attn.c_proj.bias", False),
    ("ln2w", "h.{l}.ln_2.weight", False), ("ln2b", "h.{l}.ln_2.bias", False),
    ("fcw", "h.{l}.mlp.c_fc.weight", True), ("fcb", "h.{l}.mlp.c_fc.bias", False),
    ("fcprojw", "h.{l}.mlp.c_proj.weight", True), ("fcprojb", "h.{l}.mlp.c_proj.bias", False),
    ("lnfw", "ln_f.weight", False), ("lnfb", "ln_f.bias", False),
]


class ConvertError(Exception):
    pass


def load_hf(hf_dir):
    # config.json and model.safetensors; keys may carry GPT2LMHeadModel's "transformer." prefix
    try:
        from safetensors.numpy import load_file
    except ImportError:
        raise ConvertError("dev/convert_hf.py needs the safetensors package: pip install safetensors") from None
    config_path, weights_path = os.path.join(hf_dir, "config.json"), os.path.join(hf_dir, "model.safetensors")
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise ConvertError(f"{path} not found: expected a Hugging Face GPT-2 folder (config.json, model.safetensors)")
    try:
        with open(config_path) as f:
            config = json.load(f)
        L, NH, C, V = (int(config[k]) for k in ("n_layer", "n_head", "n_embd", "vocab_size"))
        maxT = int(config.get("n_positions", config.get("n_ctx")))
    except (ValueError, KeyError, TypeError) as e:
        raise ConvertError(f"{config_path}: not a GPT-2 config (n_layer, n_head, n_embd, vocab_size, n_positions): {e}") from None
    try:
        tensors = load_file(weights_path)
    except Exception as e:  # safetensors' own errors, or a dtype NumPy lacks (bfloat16)
        raise ConvertError(f"{weights_path}: could not read it with safetensors' NumPy API ({e})") from None
    tensors = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    return (maxT, V, L, NH, C), tensors


def convert(hf_dir, out_path):
    (maxT, V, L, NH, C), hf = load_hf(hf_dir)
    Vp = padded_vocab(V)  # llm.c pads the vocab to a multiple of 128

    def get(key, transpose, shape):
        if key not in hf:
            raise ConvertError(f"{hf_dir}: model.safetensors has no tensor {key}")
        t = hf[key].T if transpose else hf[key]
        if t.shape != shape:
            raise ConvertError(f"{hf_dir}: {key} has shape {hf[key].shape}, expected {shape[::-1] if transpose else shape}")
        return t.astype("<f4")

    config = GPT2Config(max_seq_len=maxT, vocab_size=V, padded_vocab_size=Vp, num_layers=L, num_heads=NH, channels=C)
    shapes = parameter_shapes(config)
    with atomic_write(out_path) as f:  # complete, or not there at all (a bad tensor stops it midway)
        f.write(checkpoint_header(config))
        for name, key, transpose in LAYOUT:  # written one by one: GPT-2 XL's 6 GB are never in memory twice
            if "{l}" in key:  # per-layer tensors are stacked: (L, ...), one layer's from each key
                for l in range(L):
                    f.write(get(key.format(l=l), transpose, shapes[name][1:]).tobytes())
            elif name == "wte":  # Hugging Face's V rows, padded with zero rows up to Vp
                f.write(get(key, False, (V, C)).tobytes())
                f.write(np.zeros((Vp - V, C), "<f4").tobytes())
            else:
                f.write(get(key, transpose, shapes[name]).tobytes())
    print(f"wrote {out_path}: L={L}, NH={NH}, C={C}, V={V} (padded to {Vp}), maxT={maxT}, "
          f"{os.path.getsize(out_path):,} bytes")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Convert a Hugging Face GPT-2 (safetensors) into an llm.c checkpoint.")
    parser.add_argument("hf_dir", help="folder with config.json and model.safetensors")
    parser.add_argument("-o", "--output", required=True, help="the llm.c checkpoint to write, e.g. gpt2_124M.bin")
    args = parser.parse_args()
    try:
        convert(args.hf_dir, args.output)
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
