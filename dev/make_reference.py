"""
The independent oracle: a GPT-2 in PyTorch that writes a model, its debug state and the losses of
10 AdamW steps in llm.c's formats, for test_gpt2.py to check train_gpt2.py against.

Dev only: it needs PyTorch (`pip install torch==2.13.0`, the CPU build); the scripts it checks don't.

    python dev/make_reference.py                 # the small fixture in tests/fixtures/ (committed)
    python dev/make_reference.py --depth d12 --out-dir /tmp/ref   # a GPT-2 124M-shaped random model
    python test_gpt2.py --checkpoint /tmp/ref/gpt2_d12.bin --state /tmp/ref/gpt2_d12_debug_state.bin \\
        --expected-losses /tmp/ref/gpt2_d12_expected_losses.json

The model is written from scratch in the style of nanoGPT's model.py (autograd does the backward
pass), and shares no code with train_gpt2.py. Its weights start as GPT-2's do, and then every
LayerNorm weight and bias and every Linear bias is randomized too, so that none of the 16 gradients
is trivial. Two things make the check sharper than a freshly initialized GPT-2 would:
- the query/key/value and MLP-input weights have std 1/sqrt(C), so their outputs are of unit scale,
  as in a trained model (GPT-2's 0.02 leaves attention nearly uniform and GeLU nearly linear, where
  errors in their backward passes hide);
- the batch repeats tokens, as text does: every fourth position holds the same token, and the second
  row starts with the first row's opening tokens, so the gradients of repeated rows of wte must add up.
PyTorch computes in float64 (the weights are float32 values, so both sides use the same model), and
the results are written as float32: what test_gpt2.py then measures is train_gpt2.py's own float32
error, not the sum of two implementations' (--dtype float32 gives a state like llm.c's).
"""

import argparse
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------
# GPT-2 in PyTorch


class Block(nn.Module):
    def __init__(self, C, NH):
        super().__init__()
        self.NH = NH
        self.ln_1 = nn.LayerNorm(C, eps=1e-5)
        self.c_attn = nn.Linear(C, 3 * C)  # query, key, value projections of all heads at once
        self.attn_proj = nn.Linear(C, C)
        self.ln_2 = nn.LayerNorm(C, eps=1e-5)
        self.c_fc = nn.Linear(C, 4 * C)
        self.mlp_proj = nn.Linear(4 * C, C)

    def attention(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.NH, C // self.NH).transpose(1, 2) for t in (q, k, v))  # (B,NH,T,hs)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(C // self.NH))  # (B,NH,T,T)
        att = att.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        att = F.softmax(att, dim=-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, C)  # re-assemble the heads side by side
        return self.attn_proj(y)

    def mlp(self, x):
        return self.mlp_proj(F.gelu(self.c_fc(x), approximate="tanh"))

    def forward(self, x):
        x = x + self.attention(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, V, maxT, L, NH, C):
        super().__init__()
        self.wte = nn.Embedding(V, C)  # also the classifier's weight (tied)
        self.wpe = nn.Embedding(maxT, C)
        self.h = nn.ModuleList(Block(C, NH) for _ in range(L))
        self.ln_f = nn.LayerNorm(C, eps=1e-5)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))  # (B,T,C)
        for block in self.h:
            x = block(x)
        logits = self.ln_f(x) @ self.wte.weight.T  # (B,T,V)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss


# llm.c's 16 tensors, in file order: (name, how to get the per-layer tensor from a Block, or None)
LLMC_LAYOUT = [
    ("wte", None), ("wpe", None),
    ("ln1w", lambda b: b.ln_1.weight), ("ln1b", lambda b: b.ln_1.bias),
    ("qkvw", lambda b: b.c_attn.weight), ("qkvb", lambda b: b.c_attn.bias),
    ("attprojw", lambda b: b.attn_proj.weight), ("attprojb", lambda b: b.attn_proj.bias),
    ("ln2w", lambda b: b.ln_2.weight), ("ln2b", lambda b: b.ln_2.bias),
    ("fcw", lambda b: b.c_fc.weight), ("fcb", lambda b: b.c_fc.bias),
    ("fcprojw", lambda b: b.mlp_proj.weight), ("fcprojb", lambda b: b.mlp_proj.bias),
    ("lnfw", None), ("lnfb", None),
]


def llmc_tensors(model, Vp, grad=False):
    # the model's parameters (or their gradients) as llm.c's 16 tensors, per-layer ones stacked on (L, ...)
    get = (lambda t: t.grad) if grad else (lambda t: t)
    out = {}
    for name, of_block in LLMC_LAYOUT:
        if of_block is not None:
            out[name] = torch.stack([get(of_block(b)) for b in model.h])
    wte = get(model.wte.weight)
    out["wte"] = F.pad(wte, (0, 0, 0, Vp - wte.shape[0]))  # zero rows up to the padded vocab size
    out["wpe"] = get(model.wpe.weight)
    out["lnfw"], out["lnfb"] = get(model.ln_f.weight), get(model.ln_f.bias)
    return {name: out[name].detach().float().contiguous() for name, _ in LLMC_LAYOUT}


@torch.no_grad()
def load_llmc_params(model, params):
    # the reverse: copy llm.c-layout numpy arrays (as train_gpt2.py holds them) into the model
    V = model.wte.weight.shape[0]
    model.wte.weight.copy_(torch.from_numpy(np.asarray(params["wte"][:V])))
    model.wpe.weight.copy_(torch.from_numpy(np.asarray(params["wpe"])))
    model.ln_f.weight.copy_(torch.from_numpy(np.asarray(params["lnfw"])))
    model.ln_f.bias.copy_(torch.from_numpy(np.asarray(params["lnfb"])))
    for name, of_block in LLMC_LAYOUT:
        if of_block is not None:
            for l, block in enumerate(model.h):
                of_block(block).copy_(torch.from_numpy(np.asarray(params[name][l])))


# ----------------------------------------------------------------------------
# writing llm.c's files

def header(*values):
    h = np.zeros(256, dtype="<i4")
    h[:len(values)] = values
    return h.tobytes()


def write_checkpoint(path, model, V, maxT, L, NH, C, Vp):
    with open(path, "wb") as f:
        f.write(header(20240326, 3, maxT, V, L, NH, C, Vp))  # magic, version 3: fp32 with padded vocab
        for t in llmc_tensors(model, Vp).values():
            f.write(t.numpy().astype("<f4").tobytes())


def write_debug_state(path, model, x, y, logits, loss, Vp):
    with open(path, "wb") as f:
        f.write(header(20240327, 2, *x.shape))  # magic, version 2, B, T
        f.write(x.numpy().astype("<i4").tobytes())
        f.write(y.numpy().astype("<i4").tobytes())
        f.write(logits.detach().numpy().astype("<f4").tobytes())  # (B,T,V), not padded
        f.write(np.float32(loss.item()).tobytes())
        for g in llmc_tensors(model, Vp, grad=True).values():  # gradients in the checkpoint's layout
            f.write(g.numpy().astype("<f4").tobytes())


# ----------------------------------------------------------------------------

SHAPES = {  # V, maxT, L, NH, C, and the default T
    "tiny": (777, 64, 2, 4, 64, 16),  # V = 777 pads to 896: the padded rows get exercised
    "d6": (50257, 1024, 6, 6, 384, 64),
    "d12": (50257, 1024, 12, 12, 768, 64),
    "d24": (50257, 1024, 24, 16, 1024, 64),
}


def main():
    parser = argparse.ArgumentParser(description="Write a random GPT-2, its debug state and 10 AdamW losses in llm.c's formats.")
    parser.add_argument("--depth", choices=list(SHAPES), default="tiny")
    parser.add_argument("-B", type=int, default=4, help="batch size of the debug state")
    parser.add_argument("-T", type=int, help="sequence length of the debug state (default 16 for tiny, else 64)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--dtype", choices=["float64", "float32"], default="float64",
                        help="PyTorch's arithmetic: float64 (default) gives references exact to float32's rounding, "
                             "so what test_gpt2.py measures is train_gpt2.py's own error; float32 as llm.c's state")
    parser.add_argument("--out-dir", help="default: tests/fixtures for tiny, else the current folder")
    parser.add_argument("--name", help="file name stem (default: tiny_gpt2, or gpt2_<depth>)")
    args = parser.parse_args()
    V, maxT, L, NH, C, default_T = SHAPES[args.depth]
    B, T = args.B, args.T or default_T
    Vp = (V + 127) // 128 * 128
    out_dir = args.out_dir or (os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures")
                               if args.depth == "tiny" else ".")
    name = args.name or ("tiny_gpt2" if args.depth == "tiny" else f"gpt2_{args.depth}")
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.time()

    # GPT-2's initialization (normal 0.02; the projections into the residual stream 0.02/sqrt(2L)),
    # but 1/sqrt(C) for the qkv and MLP-input weights (outputs of unit scale, as in a trained model: sharp
    # attention, GeLU in its curved part), then random LayerNorm and bias parameters so their gradients
    # are exercised too
    torch.manual_seed(args.seed)
    model = GPT(V, maxT, L, NH, C)
    with torch.no_grad():
        for p in (model.wte.weight, model.wpe.weight):
            p.normal_(0.0, 0.02)
        for block in model.h:
            for linear, std in [(block.c_attn, 1 / math.sqrt(C)), (block.attn_proj, 0.02 / math.sqrt(2 * L)),
                                (block.c_fc, 1 / math.sqrt(C)), (block.mlp_proj, 0.02 / math.sqrt(2 * L))]:
                linear.weight.normal_(0.0, std)
                linear.bias.normal_(0.0, 0.02)
        for ln in [m for m in model.modules() if isinstance(m, nn.LayerNorm)]:
            ln.weight.copy_(1.0 + 0.1 * torch.randn_like(ln.weight))
            ln.bias.normal_(0.0, 0.1)
    x = torch.randint(0, V, (B, T))
    y = torch.randint(0, V, (B, T))  # any ids will do: the test feeds exactly these
    # but repeated ones, as in text: a frequent token at every fourth position, and a repeated phrase
    # (an embedding row used several times gets the sum of its gradients; a bug there shows only so)
    x[:, ::4] = x[0, 0]
    if B > 1:
        x[1, :T // 2] = x[0, :T // 2]
    if args.dtype == "float64":
        model.double()  # the weights are float32 values, written exactly; the arithmetic is float64

    # AdamW as test_gpt2 runs it (llm.c's test_gpt2.c): weight decay 0.01 on every tensor
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=0.01, foreach=False)
    losses = []
    for step in range(10):
        optimizer.zero_grad()
        logits, loss = model(x, y)
        loss.backward()
        if step == 0:
            # the debug state: the model as it is before any update, this batch, its logits, loss, grads
            write_checkpoint(os.path.join(out_dir, f"{name}.bin"), model, V, maxT, L, NH, C, Vp)
            write_debug_state(os.path.join(out_dir, f"{name}_debug_state.bin"), model, x, y, logits, loss, Vp)
        optimizer.step()
        losses.append(float(np.float32(loss.item())))
        print(f"step {step}: loss {losses[-1]:.6f}")
    with open(os.path.join(out_dir, f"{name}_expected_losses.json"), "w") as f:
        json.dump({"losses": losses}, f, indent=1)
        f.write("\n")
    for suffix in (".bin", "_debug_state.bin", "_expected_losses.json"):
        path = os.path.join(out_dir, name + suffix)
        print(f"wrote {path} ({os.path.getsize(path):,} bytes)")
    print(f"took {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
