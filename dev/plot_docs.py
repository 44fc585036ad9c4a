"""
Draws the pictures of the backpropagation tutorial in docs/ (docs/backprop_*.md):

    python dev/plot_docs.py gelu                          # docs/gelu.png: GELU and its derivative
    python dev/plot_docs.py attention --checkpoint CKPT   # docs/attention_pattern.png

The attention picture is a trained model's `att` for a line of text, for four heads picked by what
they do. The committed one comes from a GPT-2 d6 trained from scratch on Tiny Shakespeare:

    python prepro_tinyshakespeare.py
    python train_gpt2.py --init d6 --steps 300 --lr 1e-3 --warmup-steps 20 --lr-min-frac 0.1 \\
        --grad-clip 1.0 --sample-every 0 --output model_d6.bin
    python dev/plot_docs.py attention --checkpoint model_d6.bin

Both pictures come from the trainer's own layers (gelu_forward, gelu_backward, gpt2_forward).
Dev only: needs matplotlib (pip install matplotlib), and tiktoken for the attention picture.
"""

import argparse
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train_gpt2 as tg  # noqa: E402
from llmc.tokenizer import encode_prompt, tiktoken_gpt2  # noqa: E402

DOCS = os.path.join(ROOT, "docs")
# the first line of Tiny Shakespeare, in its validation split (the first 32,768 tokens)
TEXT = "First Citizen:\nBefore we proceed any further, hear me speak."


def pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")  # no screen needed
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("error: dev/plot_docs.py needs matplotlib: pip install matplotlib")
    return plt


def plot_gelu(output):
    plt = pyplot()
    x = np.linspace(-5, 5, 1001)  # float64: the layers compute in the dtype they are given
    out, cache = tg.gelu_forward(x)
    local_grad = tg.gelu_backward(np.ones_like(x), cache)  # dout = 1 gives the derivative itself
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.plot(x, np.maximum(x, 0), color="0.7", linestyle="--", linewidth=1, label="ReLU, for comparison")
    ax.plot(x, out, color="C0", linewidth=2, label="gelu(x)   (gelu_forward)")
    ax.plot(x, local_grad, color="C3", linewidth=2, label="gelu'(x)   (gelu_backward, dout = 1)")
    ax.axhline(0, color="black", linewidth=0.5)
    ax.axvline(0, color="black", linewidth=0.5)
    ax.set_xlabel("x")
    ax.set_ylim(-0.5, 2.5)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    ax.set_title("GELU (tanh approximation) and its derivative")
    fig.tight_layout()
    fig.savefig(output, dpi=80)
    print(f"wrote {output}")


def attention_maps(checkpoint, text):
    # every layer's att (NH,T,T) for the text, and the text's tokens as strings
    model = tg.gpt2_build_from_checkpoint(checkpoint)
    tokens = encode_prompt(text, model.config.vocab_size)  # <|endoftext|>, then the text
    tg.gpt2_forward(model, np.array([tokens], dtype=np.int32))
    att = np.stack([cache[2][1][0] for cache in model.acts["layers"]])  # (L,NH,T,T), att_cache's att
    enc = tiktoken_gpt2()
    labels = [enc.decode([t]).replace("\n", "\\n") for t in tokens]
    labels[0] = "<eot>"
    return att, labels


def pick_heads(att):
    # four heads that each do one thing clearly: (layer, head, what it does)
    L, NH, T, _ = att.shape
    rows = np.arange(2, T)  # leave out the first positions, which have little choice
    scores = {
        "the previous token": att[:, :, rows, rows - 1].mean(-1),
        "itself": att[:, :, rows, rows].mean(-1),
        "the first token": att[:, :, rows, 0].mean(-1),
        # spread out: the entropy of each row over its t+1 choices, relative to the most possible
        "spread": (-(att[:, :, rows] * np.log(att[:, :, rows] + 1e-12)).sum(-1) / np.log(rows + 1)).mean(-1),
    }
    picked, used = [], set()
    for what, score in scores.items():  # (L,NH) each
        for flat in np.argsort(score, axis=None)[::-1]:
            layer, head = np.unravel_index(flat, score.shape)
            if (layer, head) not in used:
                used.add((layer, head))
                picked.append((int(layer), int(head), what, float(score[layer, head])))  # mean over rows
                break
    return picked


def plot_attention(checkpoint, text, output):
    plt = pyplot()
    att, labels = attention_maps(checkpoint, text)
    T = len(labels)
    fig, axes = plt.subplots(2, 2, figsize=(8.4, 8.4))
    for ax, (layer, head, what, score) in zip(axes.flat, pick_heads(att)):
        ax.imshow(att[layer, head], cmap="Blues", vmin=0, vmax=1)
        if what == "spread":
            title = f"layer {layer}, head {head}: the most spread out\n(entropy {score:.0%} of the most possible)"
        else:
            title = f"layer {layer}, head {head}: {score:.0%} of its weight\non {what} (the most of any head)"
        ax.set_title(title, fontsize=10)
        ax.set_xticks(range(T))
        ax.set_xticklabels(labels, rotation=90, fontsize=7)
        ax.set_yticks(range(T))
        ax.set_yticklabels(labels, fontsize=7)
        ax.set_xlabel("key position t2 (looked at)", fontsize=8)
        ax.set_ylabel("query position t (looking)", fontsize=8)
        print(f"layer {layer} head {head}: {what} ({score:.2f})")
    fig.suptitle("att of a small trained GPT-2 (d6): row t = the weights of positions 0..t", fontsize=11)
    fig.tight_layout()
    fig.savefig(output, dpi=64)
    print(f"wrote {output}")


def main():
    parser = argparse.ArgumentParser(description="Draw the pictures of docs/backprop_*.md.")
    parser.add_argument("picture", choices=["gelu", "attention"])
    parser.add_argument("--checkpoint", help="an llm.c checkpoint of a trained model (attention)")
    parser.add_argument("--text", default=TEXT, help="the text whose attention is drawn")
    parser.add_argument("-o", "--output", help="image to write (default: docs/gelu.png or docs/attention_pattern.png)")
    args = parser.parse_args()
    if args.picture == "gelu":
        plot_gelu(args.output or os.path.join(DOCS, "gelu.png"))
    else:
        if not args.checkpoint:
            parser.error("attention needs --checkpoint")
        plot_attention(args.checkpoint, args.text, args.output or os.path.join(DOCS, "attention_pattern.png"))


if __name__ == "__main__":
    main()
