"""
Trains GPT-2 in NumPy: a port of llm.c's CPU reference, train_gpt2.c, that reads top to bottom.

Every layer has a hand-written forward pass and, right below it, its backward pass. The model
chains them into a forward pass, a backward pass and an AdamW update, exactly as llm.c does, and
the main loop at the bottom fine-tunes GPT-2 on Tiny Shakespeare and samples from it.

    python prepro_tinyshakespeare.py      # writes data/tiny_shakespeare_{train,val}.bin
    python train_gpt2.py --download       # fetches gpt2_124M.bin (llm.c's starter pack), fine-tunes it
    python train_gpt2.py --init d6        # or: trains a small GPT-2 from scratch, nothing downloaded

    python train_gpt2.py --device cuda --init d12 -b 8 -t 1024   # the same layers on an NVIDIA GPU (CuPy)
    mpiexec -n 2 python train_gpt2.py -b 2   # 2 processes, each with half of every batch (distributed.py)

What is deliberately left out, as in llm.c's reference: autograd, module classes, mixed precision.
What is added beyond llm.c's CPU loop comes after its core, each part in its own section: sampling
with a KV cache, the training options of llm.c's GPU trainer (gradient accumulation, clipping, a
learning-rate schedule, a loss log), checkpoints with exact resume, running on a GPU, and argument
parsing; main calls distributed.py at its edges to train on several processes. The defaults are
llm.c's. Everything is float32, like the checkpoint (on a GPU, --dtype bf16 computes in bfloat16
over float32 weights: "mixed precision", near the end); the files are llm.c's formats, byte for byte.
"""

import argparse
import codecs
import contextlib
import ctypes
import functools
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from llmc import distributed  # several processes under mpiexec (it imports MPI only then)

# The array module the layers compute with: NumPy, or CuPy on an NVIDIA GPU. It is chosen once, by
# use_device (in the section "running on a GPU" near the end), before any array is made; every layer
# below is written against xp, so the same lines of math run on both. Files are read and written
# with NumPy on the host whatever the device.
xp = np
# The dtype of the activations, and of the weights the layers compute with: float32, or bfloat16 on a
# GPU with --dtype bf16 (llm.c's name for it; see "mixed precision" near the end). Chosen by use_device.
floatX = np.float32

# ----------------------------------------------------------------------------
# all the individual layers' forward and backward passes
# B = batch_size, T = sequence_length, C = channels, V = vocab_size, Vp = padded vocab size,
# L = num_layers, NH = num_heads, hs = head size (C // NH), OC = output channels of a matmul
#
# Each forward returns (out, cache); the cache holds what its backward needs. Each backward takes
# (dout, cache), writes the gradients of the layer's *parameters* into the buffers it is given
# (the model's grads, like llm.c's dweight pointers), and returns the gradient of its *input*.


def encoder_forward(inp, wte, wpe):
    # inp is (B,T) token ids; wte is (Vp,C) token embeddings, wpe is (maxT,C) position embeddings
    T = inp.shape[1]
    out = wte[inp] + wpe[:T]  # (B,T,C) + (T,C) -> (B,T,C)
    return out, inp


def encoder_backward(dout, cache, dwte, dwpe):
    # dout is (B,T,C). Unlike every other backward, this one *adds* into dwte: wte is tied to
    # the classifier, whose matmul_backward has already written its part of the gradient there.
    inp = cache
    T = inp.shape[1]
    # a token id can repeat in a batch: xp.add.at adds every occurrence, dwte[inp] += dout would not
    xp.add.at(dwte, inp, dout)  # (Vp,C)
    dwpe[:T] = dout.sum(axis=0)  # (T,C): each position's gradient, summed over the batch
    dwpe[T:] = 0.0  # positions beyond T were not used


def layernorm_forward(inp, weight, bias):
    # inp is (B,T,C), weight and bias are (C,). Normalize each (b,t) vector, then scale and shift.
    eps = 1e-5
    mean = inp.mean(axis=-1, keepdims=True)  # (B,T,1)
    xshift = inp - mean  # (B,T,C)
    var = (xshift * xshift).mean(axis=-1, keepdims=True)  # (B,T,1), no bias correction
    rstd = 1.0 / xp.sqrt(var + eps)  # (B,T,1) reciprocal standard deviation
    norm = xshift * rstd  # (B,T,C)
    out = norm * weight + bias  # (B,T,C)
    # keep only the cheap statistics; backward recomputes norm from inp (see llm.c's layernorm.md)
    return out, (inp, weight, mean, rstd)


def layernorm_backward(dout, cache, dweight, dbias):
    inp, weight, mean, rstd = cache
    norm = (inp - mean) * rstd  # (B,T,C), recomputed
    # out = norm * weight + bias, so:
    dout.sum(axis=(0, 1), out=dbias)  # (C,)
    (dout * norm).sum(axis=(0, 1), out=dweight)  # (C,)
    dnorm = dout * weight  # (B,T,C)
    # norm = (inp - mean) * rstd, where mean and rstd depend on every inp[b,t,:] too. Through
    # them the gradient loses its mean and its component along norm (see llm.c's layernorm.md):
    dinp = dnorm - dnorm.mean(axis=-1, keepdims=True) - norm * (dnorm * norm).mean(axis=-1, keepdims=True)
    dinp *= rstd  # (B,T,C)
    return dinp


def matmul_forward(inp, weight, bias):
    # inp is (B,T,C), weight is (OC,C) as in PyTorch's nn.Linear, bias is (OC,) or None
    B, T, C = inp.shape
    OC = weight.shape[0]
    # flattening (B,T) into rows makes this one large matrix product, which BLAS does at full speed
    out = inp.reshape(B * T, C) @ weight.T  # (B*T,C) @ (C,OC) -> (B*T,OC)
    if bias is not None:
        out += bias
    return out.reshape(B, T, OC), (inp, weight)


def matmul_backward(dout, cache, dweight, dbias):
    # dout is (B,T,OC); writes dweight (OC,C) and dbias (OC,) unless it is None
    inp, weight = cache
    B, T, C = inp.shape
    OC = weight.shape[0]
    dout2d = dout.reshape(B * T, OC)  # (B*T,OC)
    # out = inp @ weight.T + bias, so:
    dinp = dout2d @ weight  # (B*T,OC) @ (OC,C) -> (B*T,C)
    xp.matmul(dout2d.T, inp.reshape(B * T, C), out=dweight)  # (OC,B*T) @ (B*T,C) -> (OC,C)
    if dbias is not None:
        dout2d.sum(axis=0, out=dbias)  # (OC,)
    return dinp.reshape(B, T, C)


def attention_forward(inp, NH):
    # inp is (B,T,3C): the query, key and value vectors of every position, side by side.
    # Attention is the only layer that mixes information across time (never across the batch).
    B, T, C3 = inp.shape
    C = C3 // 3
    hs = C // NH  # head size
    q, k, v = inp.reshape(B, T, 3, NH, hs).transpose(2, 0, 3, 1, 4)  # (B,T,3C) -> 3 x (B,NH,T,hs)
    preatt = (q @ k.swapaxes(-1, -2)) * (1.0 / math.sqrt(hs))  # (B,NH,T,hs) @ (B,NH,hs,T) -> (B,NH,T,T)
    # causal mask: position t may only look at positions t2 <= t
    causal = xp.tri(T, dtype=bool)  # (T,T), True on and below the diagonal
    preatt = xp.where(causal, preatt, -xp.inf)  # (B,NH,T,T)
    # softmax over t2; the max is subtracted only for numerical stability
    att = xp.exp(preatt - preatt.max(axis=-1, keepdims=True))  # (B,NH,T,T), exp(-inf) = 0
    att /= att.sum(axis=-1, keepdims=True)
    out = att @ v  # (B,NH,T,T) @ (B,NH,T,hs) -> (B,NH,T,hs)
    out = out.transpose(0, 2, 1, 3).reshape(B, T, C)  # re-assemble all head outputs side by side
    return out, (inp, att, NH)


def attention_backward(dout, cache):
    # dout is (B,T,C); returns dinp (B,T,3C)
    inp, att, NH = cache
    B, T, C3 = inp.shape
    C = C3 // 3
    hs = C // NH
    scale = 1.0 / math.sqrt(hs)
    q, k, v = inp.reshape(B, T, 3, NH, hs).transpose(2, 0, 3, 1, 4)  # 3 x (B,NH,T,hs)
    dout = dout.reshape(B, T, NH, hs).transpose(0, 2, 1, 3)  # (B,T,C) -> (B,NH,T,hs)
    # in the forward pass this was: out = att @ v, so now we have:
    datt = dout @ v.swapaxes(-1, -2)  # (B,NH,T,hs) @ (B,NH,hs,T) -> (B,NH,T,T)
    dv = att.swapaxes(-1, -2) @ dout  # (B,NH,T,T) @ (B,NH,T,hs) -> (B,NH,T,hs)
    # att = softmax(preatt): d preatt[t3] = sum_t2 att[t2] * (1[t2==t3] - att[t3]) * datt[t2].
    # Masked entries have att = 0, so they get no gradient, as they should.
    dpreatt = att * (datt - (datt * att).sum(axis=-1, keepdims=True))  # (B,NH,T,T)
    # preatt = (q @ k^T) * scale, so:
    dq = (dpreatt @ k) * scale  # (B,NH,T,T) @ (B,NH,T,hs) -> (B,NH,T,hs)
    dk = (dpreatt.swapaxes(-1, -2) @ q) * scale  # (B,NH,T,T) @ (B,NH,T,hs) -> (B,NH,T,hs)
    dinp = xp.stack([dq, dk, dv])  # (3,B,NH,T,hs)
    return dinp.transpose(1, 3, 0, 2, 4).reshape(B, T, C3)  # (3,B,NH,T,hs) -> (B,T,3C)


GELU_SCALING_FACTOR = math.sqrt(2.0 / math.pi)  # a Python float: it keeps float32 arrays float32


def gelu_forward(inp):
    # the tanh approximation of GeLU that GPT-2 uses, elementwise on (B,T,4C)
    cube = 0.044715 * inp * inp * inp
    out = 0.5 * inp * (1.0 + xp.tanh(GELU_SCALING_FACTOR * (inp + cube)))
    return out, inp


def gelu_backward(dout, cache):
    x = cache
    cube = 0.044715 * x * x * x
    tanh_out = xp.tanh(GELU_SCALING_FACTOR * (x + cube))
    sech2 = 1.0 - tanh_out * tanh_out  # sech^2 = 1 / cosh^2 = 1 - tanh^2
    # d/dx of 0.5 * x * (1 + tanh(s * (x + 0.044715 x^3))):
    local_grad = 0.5 * (1.0 + tanh_out) + x * 0.5 * sech2 * GELU_SCALING_FACTOR * (1.0 + 3.0 * 0.044715 * x * x)
    return local_grad * dout


def residual_forward(inp1, inp2):
    return inp1 + inp2, None


def residual_backward(dout, cache):
    # an addition passes its gradient to both inputs unchanged
    return dout, dout


def softmax_forward(logits, V):
    # logits is (B,T,Vp); only the first V columns are real tokens, the rest are padding.
    # Returns probs (B,T,V): the padded columns have zero probability, so we don't store them.
    logits = logits[..., :V]  # (B,T,V) view
    # the max is subtracted only for numerical stability; exp and divide then work in place
    probs = logits - logits.max(axis=-1, keepdims=True)  # (B,T,V)
    xp.exp(probs, out=probs)
    probs /= probs.sum(axis=-1, keepdims=True)
    return probs


def crossentropy_forward(probs, targets):
    # probs is (B,T,V), targets is (B,T) token ids; the loss at each position is -log p(target)
    return -xp.log(xp.take_along_axis(probs, targets[..., None], axis=-1)[..., 0])  # (B,T)


def crossentropy_softmax_backward(dlosses, probs, targets, Vp):
    # backward through both the crossentropy and the softmax, fused: for logit i at (b,t),
    # d loss / d logit = (probs[i] - 1[i == target]) * dloss. The padded columns V..Vp get no
    # gradient, since they never entered the softmax.
    B, T, V = probs.shape
    dlogits = xp.empty((B, T, Vp), dtype=probs.dtype)  # (B,T,Vp)
    xp.multiply(probs, dlosses[..., None], out=dlogits[..., :V])
    dlogits[..., V:] = 0.0
    b, t = xp.indices((B, T))
    dlogits[b, t, targets] -= dlosses
    return dlogits


# ----------------------------------------------------------------------------
# GPT-2 model definition


@dataclass
class GPT2Config:
    max_seq_len: int  # max sequence length, e.g. 1024
    vocab_size: int  # vocab size, e.g. 50257
    padded_vocab_size: int  # vocab size padded to a multiple of 128, e.g. 50304
    num_layers: int  # number of layers, e.g. 12
    num_heads: int  # number of heads in attention, e.g. 12
    channels: int  # number of channels, e.g. 768

    def __str__(self):
        return (f"max_seq_len: {self.max_seq_len}, vocab_size: {self.vocab_size}, padded_vocab_size: "
                f"{self.padded_vocab_size}, num_layers: {self.num_layers}, num_heads: {self.num_heads}, "
                f"channels: {self.channels}")


def parameter_shapes(config):
    # the 16 parameter tensors, in the order of llm.c's checkpoint file
    Vp, C, maxT, L = config.padded_vocab_size, config.channels, config.max_seq_len, config.num_layers
    return {
        "wte": (Vp, C),  # token embeddings, also the classifier (weight tying)
        "wpe": (maxT, C),  # position embeddings
        "ln1w": (L, C),
        "ln1b": (L, C),
        "qkvw": (L, 3 * C, C),
        "qkvb": (L, 3 * C),
        "attprojw": (L, C, C),
        "attprojb": (L, C),
        "ln2w": (L, C),
        "ln2b": (L, C),
        "fcw": (L, 4 * C, C),
        "fcb": (L, 4 * C),
        "fcprojw": (L, C, 4 * C),
        "fcprojb": (L, C),
        "lnfw": (C,),
        "lnfb": (C,),
    }


def point_parameters(memory, config):
    # like llm.c's malloc_and_point_parameters: one flat array, and a named view into it per tensor
    params, offset = {}, 0
    for name, shape in parameter_shapes(config).items():
        size = math.prod(shape)
        params[name] = memory[offset:offset + size].reshape(shape)
        offset += size
    return params


def padded_vocab(V):
    return (V + 127) // 128 * 128  # round up to a multiple of 128, as llm.c does


def num_parameters(config):
    return sum(math.prod(shape) for shape in parameter_shapes(config).values())


class GPT2:
    """The model's state, as llm.c's GPT2 struct: config, parameters, gradients, AdamW buffers."""

    def __init__(self, config, params_memory):
        self.config = config
        # (num_parameters,) all weights, in checkpoint order, on the device: xp.asarray copies a
        # NumPy array to the GPU when xp is CuPy, and is a no-op when xp is NumPy
        self.params_memory = xp.asarray(params_memory)
        self.params = point_parameters(self.params_memory, config)
        self.weights_memory = self.weights = None  # what the layers compute with: params, or a bfloat16 copy
        copy_weights(self)
        self.grads_memory = None  # allocated on the first backward pass
        self.grads = None
        self.m_memory = None  # AdamW's first and second moments, allocated on the first update
        self.v_memory = None
        self.acts = None  # what the last forward pass saved for the backward pass


def copy_weights(model):
    # the weights the forward and backward passes read: the parameters themselves when they compute in
    # float32, else (--dtype bf16) a copy of all of them in floatX, each rounded to the nearest value,
    # made again after every update (gpt2_update calls this). Where the parameters change in any other
    # way, call it too.
    if floatX == np.float32:  # (the parameters' own dtype: float64 too, as the gradient checks use)
        model.weights_memory, model.weights = model.params_memory, model.params
        return
    if model.weights_memory is None or model.weights_memory.dtype != floatX:
        model.weights_memory = xp.empty(model.params_memory.shape, dtype=floatX)
        model.weights = point_parameters(model.weights_memory, model.config)
    model.weights_memory[...] = model.params_memory  # (a cast: float32 to floatX)


class InputError(Exception):
    """Bad input from the user (a missing or malformed file, a bad option): the scripts report
    it as one line 'error: ...' and exit with status 2, never with a traceback."""


CHECKPOINT_MAGIC, CHECKPOINT_VERSION = 20240326, 3
HEADER_INTS = 256  # every llm.c file starts with a header of 256 int32
CHECKPOINT_HINT = ("fetch llm.c's starter pack with --download (GPT-2 124M), convert Hugging Face weights with "
                   "dev/convert_hf.py, or train from scratch with --init d6")


def read_header(path, f, what):
    header = np.fromfile(f, dtype="<i4", count=HEADER_INTS)
    if header.size != HEADER_INTS:
        raise InputError(f"{path}: file too short for a {what} (expected a {HEADER_INTS * 4}-byte header)")
    return header


def check_file(path, what, hint):
    # the first thing every loader does: say clearly when there is no file to read
    if os.path.isdir(path):
        raise InputError(f"{what} {path} is a directory, not a file")
    if not os.path.isfile(path):
        raise InputError(f"{what} {path} not found: {hint}")


def read_checkpoint_config(checkpoint_path, hint=CHECKPOINT_HINT):
    # reads and checks the 256-int32 header of llm.c's checkpoint; returns the model's config. This is
    # cheap, so the options can be checked against the model before its weights are read.
    check_file(checkpoint_path, "checkpoint", hint)
    with open(checkpoint_path, "rb") as f:
        header = read_header(checkpoint_path, f, "GPT-2 checkpoint")
        actual_size = os.fstat(f.fileno()).st_size
    if header[0] != CHECKPOINT_MAGIC:
        raise InputError(f"{checkpoint_path}: bad magic {header[0]}, expected {CHECKPOINT_MAGIC} (an llm.c GPT-2 checkpoint)")
    version = int(header[1])
    if version not in (1, 3):
        raise InputError(f"{checkpoint_path}: unsupported checkpoint version {version}; versions 3 (fp32, "
                         f"padded vocab) and 1 (fp32) are supported: re-run llm.c's train_gpt2.py to regenerate it")
    maxT, V, L, NH, C = (int(x) for x in header[2:7])
    Vp = int(header[7]) if version == 3 else V  # version 1 had no padding
    config = GPT2Config(max_seq_len=maxT, vocab_size=V, padded_vocab_size=Vp,
                        num_layers=L, num_heads=NH, channels=C)
    if min(maxT, V, L, NH, C) <= 0 or C % NH != 0 or Vp < V:
        raise InputError(f"{checkpoint_path}: nonsensical header ({config}): sizes must be positive, "
                         f"channels divisible by num_heads, padded_vocab_size >= vocab_size")
    # the file must hold exactly what the header announces (this also keeps absurd headers from
    # asking for more memory than the file itself holds)
    expected_size = HEADER_INTS * 4 + num_parameters(config) * 4
    if actual_size != expected_size:
        raise InputError(f"{checkpoint_path}: file is {actual_size:,} bytes, but its header ({config}) "
                         f"implies {expected_size:,}: truncated, or not what the header says")
    return config


def gpt2_build_from_checkpoint(checkpoint_path, hint=CHECKPOINT_HINT):
    # reads llm.c's checkpoint: a 256-int32 header, then all parameters as float32
    config = read_checkpoint_config(checkpoint_path, hint)
    params_memory = np.fromfile(checkpoint_path, dtype="<f4", offset=HEADER_INTS * 4)
    return GPT2(config, params_memory)


DEPTHS = {"d6": (6, 384, 6), "d12": (12, 768, 12), "d24": (24, 1024, 16),  # L, C, NH, as llm.c's
          "d36": (36, 1280, 20), "d48": (48, 1600, 25)}


def random_config(depth):
    # the shape of a GPT-2 of llm.c's depths, with GPT-2's vocabulary and context length
    L, C, NH = DEPTHS[depth]
    V = 50257
    return GPT2Config(max_seq_len=1024, vocab_size=V, padded_vocab_size=padded_vocab(V),
                      num_layers=L, num_heads=NH, channels=C)


def gpt2_build_from_random(depth, seed):
    # a randomly initialized GPT-2 of llm.c's depths, initialized as GPT-2 is
    # (this is what llm.c's train_gpt2.py does for --model d12 etc.); drawn with NumPy on the host,
    # so a seed gives the same model on every device
    config = random_config(depth)
    memory = np.zeros(num_parameters(config), dtype=np.float32)
    p = point_parameters(memory, config)
    rng = np.random.default_rng(seed)
    residual_std = 0.02 / math.sqrt(2 * config.num_layers)  # the projections into the residual stream are scaled down
    for name, std in [("wte", 0.02), ("wpe", 0.02), ("qkvw", 0.02), ("attprojw", residual_std),
                      ("fcw", 0.02), ("fcprojw", residual_std)]:
        tensor = p[name][:config.vocab_size] if name == "wte" else p[name]  # the padded rows of wte stay zero
        rng.standard_normal(out=tensor, dtype=np.float32)
        tensor *= std
    for name in ("ln1w", "ln2w", "lnfw"):
        p[name][...] = 1.0  # LayerNorm starts as the identity; all biases start at zero
    return GPT2(config, memory)


def gpt2_forward(model, inputs, targets=None):
    # inputs and targets are (B,T) token ids, T at most max_seq_len; returns the mean loss (None
    # without targets) and saves every layer's cache in model.acts for gpt2_backward
    p, L, NH, V = model.weights, model.config.num_layers, model.config.num_heads, model.config.vocab_size
    model.acts = None  # let go of the previous pass's activations before making new ones
    inputs = xp.asarray(inputs)  # token ids come from the host: to the device
    residual, encoder_cache = encoder_forward(inputs, p["wte"], p["wpe"])  # (B,T,C)
    layer_caches = []
    for l in range(L):
        ln1, ln1_cache = layernorm_forward(residual, p["ln1w"][l], p["ln1b"][l])  # (B,T,C)
        qkv, qkv_cache = matmul_forward(ln1, p["qkvw"][l], p["qkvb"][l])  # (B,T,3C)
        atty, att_cache = attention_forward(qkv, NH)  # (B,T,C)
        attproj, attproj_cache = matmul_forward(atty, p["attprojw"][l], p["attprojb"][l])  # (B,T,C)
        residual2, _ = residual_forward(residual, attproj)  # (B,T,C)
        ln2, ln2_cache = layernorm_forward(residual2, p["ln2w"][l], p["ln2b"][l])  # (B,T,C)
        fch, fc_cache = matmul_forward(ln2, p["fcw"][l], p["fcb"][l])  # (B,T,4C)
        fch_gelu, gelu_cache = gelu_forward(fch)  # (B,T,4C)
        fcproj, fcproj_cache = matmul_forward(fch_gelu, p["fcprojw"][l], p["fcprojb"][l])  # (B,T,C)
        residual3, _ = residual_forward(residual2, fcproj)  # (B,T,C)
        layer_caches.append((ln1_cache, qkv_cache, att_cache, attproj_cache,
                             ln2_cache, fc_cache, gelu_cache, fcproj_cache))
        residual = residual3
    lnf, lnf_cache = layernorm_forward(residual, p["lnfw"], p["lnfb"])  # (B,T,C)
    logits, logits_cache = matmul_forward(lnf, p["wte"], None)  # (B,T,C) @ (C,Vp) -> (B,T,Vp)
    probs = softmax_forward(logits, V)  # (B,T,V)
    targets = None if targets is None else xp.asarray(targets)
    model.acts = dict(encoder=encoder_cache, layers=layer_caches, lnf=lnf_cache,
                      logits_cache=logits_cache, logits=logits, probs=probs, targets=targets)
    if targets is None:
        return None
    losses = crossentropy_forward(probs, targets)  # (B,T)
    return float(losses.mean())  # (on a GPU, float() waits for the device to finish the pass)


def gpt2_backward(model):
    # go through the forward pass in reverse, calling each layer's backward. Each cache is let go
    # of as soon as its backward is done (as PyTorch frees its graph), so the activations shrink
    # while the gradients' temporaries come and go; only the logits stay readable in model.acts.
    acts = model.acts
    if acts is None or acts.get("targets") is None:
        raise RuntimeError("gpt2_backward needs a forward pass with targets first")
    model.acts = dict(logits=acts["logits"])
    if model.grads_memory is None:
        model.grads_memory = xp.zeros_like(model.params_memory)
        model.grads = point_parameters(model.grads_memory, model.config)
    g, L = model.grads, model.config.num_layers
    targets = acts["targets"]
    B, T = targets.shape
    # the chain rule starts at the mean loss over all B*T positions: d mean / d losses[b,t] = 1/(B*T)
    dlosses = xp.full((B, T), 1.0 / (B * T), dtype=xp.float32)  # (B,T)
    dlogits = crossentropy_softmax_backward(dlosses, acts.pop("probs"), targets, model.config.padded_vocab_size)  # (B,T,Vp)
    dlnf = matmul_backward(dlogits, acts.pop("logits_cache"), g["wte"], None)  # (B,T,C); writes the classifier's dwte
    del dlogits  # the largest array of the backward pass: let go of it at once
    dresidual = layernorm_backward(dlnf, acts["lnf"], g["lnfw"], g["lnfb"])  # (B,T,C)
    for l in reversed(range(L)):
        (ln1_cache, qkv_cache, att_cache, attproj_cache,
         ln2_cache, fc_cache, gelu_cache, fcproj_cache) = acts["layers"].pop()  # layer l's, the last left
        # residual3 = residual2 + fcproj
        dresidual2, dfcproj = residual_backward(dresidual, None)
        dfch_gelu = matmul_backward(dfcproj, fcproj_cache, g["fcprojw"][l], g["fcprojb"][l])  # (B,T,4C)
        dfch = gelu_backward(dfch_gelu, gelu_cache)  # (B,T,4C)
        dln2 = matmul_backward(dfch, fc_cache, g["fcw"][l], g["fcb"][l])  # (B,T,C)
        # residual2 feeds both ln2 and the skip connection: its gradient is the sum of both
        dresidual2 = dresidual2 + layernorm_backward(dln2, ln2_cache, g["ln2w"][l], g["ln2b"][l])
        # residual2 = residual + attproj
        dresidual, dattproj = residual_backward(dresidual2, None)
        datty = matmul_backward(dattproj, attproj_cache, g["attprojw"][l], g["attprojb"][l])  # (B,T,C)
        dqkv = attention_backward(datty, att_cache)  # (B,T,3C)
        dln1 = matmul_backward(dqkv, qkv_cache, g["qkvw"][l], g["qkvb"][l])  # (B,T,C)
        # the layer's input feeds both ln1 and the skip connection
        dresidual = dresidual + layernorm_backward(dln1, ln1_cache, g["ln1w"][l], g["ln1b"][l])
    # wte gets a second gradient here, from its use as the token embedding (encoder_backward adds it)
    encoder_backward(dresidual, acts["encoder"], g["wte"], g["wpe"])


def adamw_plain(param, grad, m, v, learning_rate, beta1, beta2, eps, weight_decay, t):
    # AdamW, as llm.c's gpt2_update writes it (reference: PyTorch's torch.optim.AdamW), on whole arrays.
    # update the first moment (momentum) and the second moment (RMSprop), in place
    m *= beta1
    m += (1.0 - beta1) * grad
    v *= beta2
    v += (1.0 - beta2) * (grad * grad)
    # bias-correct both moments (t counts from 1)
    m_hat = m / (1.0 - beta1 ** t)
    v_hat = v / (1.0 - beta2 ** t)
    # update, with weight decay decoupled from the gradient
    param -= learning_rate * (m_hat / (xp.sqrt(v_hat) + eps) + weight_decay * param)


ADAMW_CHUNK = 1 << 17  # 128K floats: big enough that the Python loop costs nothing, small enough to stay in cache


def adamw_inplace(param, grad, m, v, learning_rate, beta1, beta2, eps, weight_decay, t):
    # The same AdamW as adamw_plain, for 1-D NumPy arrays of any length. On 124M floats, adamw_plain
    # would create a dozen temporary arrays of 500 MB each and stream every one through memory.
    # Here we walk the arrays in cache-sized chunks and do the same arithmetic in place, in one
    # small scratch buffer, so each value is loaded from memory once and stored once.
    beta1_correction = 1.0 - beta1 ** t
    beta2_correction = 1.0 - beta2 ** t
    scratch = np.empty(ADAMW_CHUNK, dtype=param.dtype)
    for start in range(0, param.size, ADAMW_CHUNK):
        chunk = slice(start, start + ADAMW_CHUNK)
        p, g, m_, v_ = param[chunk], grad[chunk], m[chunk], v[chunk]
        tmp = scratch[:p.size]
        # m = beta1 * m + (1 - beta1) * grad
        m_ *= beta1
        np.multiply(g, 1.0 - beta1, out=tmp)
        m_ += tmp
        # v = beta2 * v + (1 - beta2) * grad^2
        v_ *= beta2
        np.multiply(g, g, out=tmp)
        tmp *= 1.0 - beta2
        v_ += tmp
        # param -= lr * (m_hat / (sqrt(v_hat) + eps) + weight_decay * param)
        np.multiply(v_, 1.0 / beta2_correction, out=tmp)  # v_hat
        np.sqrt(tmp, out=tmp)
        tmp += eps
        np.divide(m_, tmp, out=tmp)
        tmp *= learning_rate / beta1_correction  # lr * m_hat / (sqrt(v_hat) + eps)
        if weight_decay != 0.0:
            p *= 1.0 - learning_rate * weight_decay  # the same as subtracting lr * wd * param
        p -= tmp


def usable_cpus():
    # the cores this process may run on (its affinity, which container limits set), not all the machine's
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


ADAMW_POOL = None  # the threads of adamw_threaded, started on first use and kept for the whole run


def adamw_threaded(param, grad, m, v, learning_rate, beta1, beta2, eps, weight_decay, t):
    # adamw_inplace on the CPU's cores: NumPy lets go of Python's lock (the GIL) inside its loops,
    # so threads can update disjoint parts of the 1-D arrays at the same time. They are cut into one
    # part per core, but never into parts smaller than a chunk (a LayerNorm's 768 floats stay whole).
    global ADAMW_POOL
    num_parts = max(1, min(usable_cpus(), param.size // ADAMW_CHUNK))
    if num_parts == 1:
        return adamw_inplace(param, grad, m, v, learning_rate, beta1, beta2, eps, weight_decay, t)
    if ADAMW_POOL is None:
        ADAMW_POOL = ThreadPoolExecutor(usable_cpus())
    bounds = [param.size * i // num_parts for i in range(num_parts + 1)]
    jobs = [ADAMW_POOL.submit(adamw_inplace, param[lo:hi], grad[lo:hi], m[lo:hi], v[lo:hi],
                              learning_rate, beta1, beta2, eps, weight_decay, t)
            for lo, hi in zip(bounds[:-1], bounds[1:])]
    for job in jobs:
        job.result()  # (re-raises an exception from the thread, if any)


adamw = adamw_threaded  # the form gpt2_update uses; on a GPU, use_device puts a fused kernel here


def gpt2_update(model, learning_rate, beta1, beta2, eps, weight_decay, t, decayed=None):
    # AdamW over all parameters, with weight decay on every tensor as llm.c's CPU code does, or only
    # on the tensors named in decayed. The two moments are allocated on the first update.
    if model.m_memory is None:
        model.m_memory = xp.zeros_like(model.params_memory)
        model.v_memory = xp.zeros_like(model.params_memory)
    memories = (model.params_memory, model.grads_memory, model.m_memory, model.v_memory)
    if decayed is None:  # as llm.c: one loop over all the parameters, in their flat arrays
        adamw(*memories, learning_rate, beta1, beta2, eps, weight_decay, t)
    else:  # tensor by tensor, each a slice of the flat arrays
        offset = 0
        for name, shape in parameter_shapes(model.config).items():
            part = slice(offset, offset + math.prod(shape))
            offset = part.stop
            wd = weight_decay if name in decayed else 0.0
            adamw(*(memory[part] for memory in memories), learning_rate, beta1, beta2, eps, wd, t)
    copy_weights(model)  # (--dtype bf16: the new weights' bfloat16 copy)


@contextlib.contextmanager
def atomic_write(path):
    # with atomic_write(path) as f: write to a temporary file in the same folder, renamed to path
    # only once complete, so that a crash never leaves a half-written file under the final name
    tmp_path = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp_path, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)


def to_host(array):
    # a NumPy array of a device array (a copy from the GPU), for writing files and for the sampler
    return array if isinstance(array, np.ndarray) else xp.asnumpy(array)


def checkpoint_header(c):
    # the 1024 bytes before the weights of llm.c's checkpoint format, version 3, for config c
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:8] = [CHECKPOINT_MAGIC, CHECKPOINT_VERSION, c.max_seq_len, c.vocab_size,
                  c.num_layers, c.num_heads, c.channels, c.padded_vocab_size]
    return header.tobytes()


def gpt2_write_checkpoint(model, path):
    # llm.c's checkpoint format, version 3: readable by llm.c's C code and by this script
    with atomic_write(path) as f:
        f.write(checkpoint_header(model.config))
        f.write(to_host(model.params_memory).astype("<f4", copy=False).tobytes())


# ----------------------------------------------------------------------------
# data loader, tokenizer and sampler

TOKENS_MAGIC, TOKENS_VERSION = 20240520, 1


def read_tokens(path, vocab_size):
    # llm.c's token files: a 256-int32 header (magic, version, count), then uint16 tokens.
    # Older llm.c files have no header: just int32 tokens.
    check_file(path, "token file", "run `python prepro_tinyshakespeare.py` to make it")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        first = np.fromfile(f, dtype="<i4", count=min(HEADER_INTS, size // 4))
    if first.size > 0 and first[0] == TOKENS_MAGIC:
        if first.size < 3 or first[1] != TOKENS_VERSION:
            raise InputError(f"{path}: unsupported token file version {first[1] if first.size > 1 else '?'}, "
                             f"expected {TOKENS_VERSION}")
        ntok = int(first[2])
        expected_size = HEADER_INTS * 4 + ntok * 2
        if ntok < 0 or size != expected_size:
            raise InputError(f"{path}: file is {size:,} bytes, but its header says {ntok:,} tokens ({expected_size:,} bytes)")
        tokens = np.memmap(path, dtype="<u2", mode="r", offset=HEADER_INTS * 4, shape=(ntok,)) if ntok else np.zeros(0, np.uint16)
        if tokens.size and tokens.max() >= vocab_size:
            raise InputError(f"{path}: has token ids up to {tokens.max()}, but the model's vocab size is {vocab_size}")
        return tokens
    # no magic: perhaps the older headerless format, but only if every value is a token id
    tokens = np.memmap(path, dtype="<i4", mode="r") if size and size % 4 == 0 else None
    if tokens is None or tokens.min() < 0 or tokens.max() >= vocab_size:
        raise InputError(f"{path}: not an llm.c token file (expected magic {TOKENS_MAGIC}, or the older "
                         f"headerless int32 tokens, all below the vocab size {vocab_size})")
    return tokens


class DataLoader:
    """llm.c's data loader without shuffling: consecutive batches of B*T+1 tokens (inputs, and the
    same tokens shifted by one as targets), wrapping around to the start at the end of the file.
    With several processes (distributed.py) a batch has num_processes * B rows, and the process of
    this rank takes its B rows, as llm.c's loader: the B*T+1 tokens at offset rank * B*T."""

    def __init__(self, tokens, B, T, path="tokens", rank=0, num_processes=1):
        rows = num_processes * B  # of a batch, over all processes
        if len(tokens) < rows * T + 1:
            raise InputError(f"{path}: has {len(tokens)} tokens, fewer than one batch needs (B*T+1 = {rows * T + 1})")
        self.tokens, self.B, self.T, self.rank, self.num_processes = tokens, B, T, rank, num_processes
        self.num_batches = (len(tokens) - 1) // (rows * T)  # the +1 target token may overlap the next batch
        self.current_batch = 0

    def reset(self):
        self.current_batch = 0

    def next_batch(self):
        if self.current_batch >= self.num_batches:
            self.reset()  # start a new epoch
        B, T = self.B, self.T
        start = (self.current_batch * self.num_processes + self.rank) * B * T  # this process's rows
        buf = np.asarray(self.tokens[start:start + B * T + 1], dtype=np.int32)  # (B*T+1,)
        self.current_batch += 1
        return buf[:-1].reshape(B, T), buf[1:].reshape(B, T)  # inputs, targets: (B,T) each


TOKENIZER_MAGIC = 20240328
GPT2_EOT = 50256  # the id of <|endoftext|>, which starts every sample


def tokenizer_load(path):
    # llm.c's tokenizer file: a 256-int32 header (magic, version, vocab size, EOT id),
    # then for each token one length byte and that many bytes. Returns a list of bytes.
    with open(path, "rb") as f:
        data = f.read()
    header = np.frombuffer(data[:HEADER_INTS * 4], dtype="<i4")
    if header.size != HEADER_INTS or header[0] != TOKENIZER_MAGIC or header[1] not in (1, 2):
        raise InputError(f"{path}: not an llm.c tokenizer file (expected magic {TOKENIZER_MAGIC}, version 1 or 2)")
    table, pos = [], HEADER_INTS * 4
    for _ in range(int(header[2])):
        if pos >= len(data) or pos + 1 + data[pos] > len(data):
            raise InputError(f"{path}: truncated tokenizer file ({header[2]} tokens announced)")
        length = data[pos]
        table.append(data[pos + 1:pos + 1 + length])
        pos += 1 + length
    return table


@functools.cache
def tiktoken_gpt2():
    # tiktoken's GPT-2 tokenizer, loaded once (only to encode a prompt and decode samples), or the
    # reason it could not load: it is not installed, or it is offline without its cached files
    try:
        import tiktoken
        return tiktoken.get_encoding("gpt2")
    except Exception as e:
        return e


def make_decoder(checkpoint_path):
    # token id -> bytes: llm.c's gpt2_tokenizer.bin if it sits beside the checkpoint, else tiktoken,
    # else (offline, no tokenizer files) None, and samples are printed as token ids
    tokenizer_path = os.path.join(os.path.dirname(checkpoint_path) or ".", "gpt2_tokenizer.bin")
    if os.path.isfile(tokenizer_path):
        table = tokenizer_load(tokenizer_path)
        return lambda token: table[token] if token < len(table) else b""
    enc = tiktoken_gpt2()
    return None if isinstance(enc, Exception) else enc.decode_single_token_bytes


def random_u32(state):
    # xorshift rng, as llm.c's: https://en.wikipedia.org/wiki/Xorshift#xorshift.2A
    # state is a one-element list holding a 64-bit integer; Python ints don't wrap, so we mask
    s = state[0]
    s ^= s >> 12
    s ^= (s << 25) & 0xFFFFFFFFFFFFFFFF
    s ^= s >> 27
    state[0] = s
    return ((s * 0x2545F4914F6CDD1D) & 0xFFFFFFFFFFFFFFFF) >> 32


def random_f32(state):
    # a random float32 in [0, 1)
    return np.float32(random_u32(state) >> 8) / np.float32(16777216.0)


def sample_mult(probabilities, coin):
    # sample an index from probabilities (they must sum to 1!); coin is a random number in [0, 1).
    # llm.c walks the running sum until it exceeds the coin; cumsum adds in the same order.
    cdf = np.cumsum(probabilities)
    i = int(np.searchsorted(cdf, coin, side="right"))  # the first i with coin < cdf[i]
    return min(i, len(probabilities) - 1)  # in case of rounding errors


def sample_token(logits, V, rng_state, temperature=1.0, top_k=0):
    # draw the next token from the logits (Vp,) of the last position. With temperature 1 and no
    # top-k this is exactly llm.c's sampler: softmax over the first V logits, then the inverse CDF
    # at a random coin. A temperature below 1 sharpens the distribution, above 1 flattens it;
    # top-k keeps only the k most likely tokens (top-k 1 always takes the most likely: greedy).
    # On a GPU the softmax runs there too, and only the probabilities come to the host. The logits
    # of a --dtype bf16 forward become float32 first (CuPy 14 cannot sort, so partition, bfloat16).
    logits = logits[:V].astype(np.float32, copy=False)
    if temperature != 1.0:
        logits = logits / temperature  # (V,)
    if top_k:
        kth_largest = xp.partition(logits, V - top_k)[V - top_k]
        logits = xp.where(logits >= kth_largest, logits, -math.inf)  # (V,) the rest get probability 0
    probs = softmax_forward(logits[None, None], V)[0, 0]  # (V,)
    return sample_mult(to_host(probs), random_f32(rng_state))


def gpt2_sample(model, prompt, num_tokens, rng_state, temperature=1.0, top_k=0):
    # generate num_tokens tokens after the prompt (a list of token ids, llm.c starts from just
    # <|endoftext|>), re-running the forward pass over the whole sequence for every new token, as
    # llm.c's CPU code does: wasteful, but simple. gpt2_generate below is the fast way.
    tokens = list(prompt)
    for _ in range(num_tokens):
        gpt2_forward(model, np.array([tokens], dtype=np.int32))
        logits = model.acts["logits"][0, -1]  # (Vp,) the last position predicts the next token
        tokens.append(sample_token(logits, model.config.vocab_size, rng_state, temperature, top_k))
        yield tokens[-1]


# ----------------------------------------------------------------------------
# sampling with a KV cache (beyond llm.c's CPU loop)
# Attention is causal: once a position's keys and values are computed, later tokens never change
# them. So we keep them in a cache, and each new token needs only its own position's forward
# pass, one row through every layer, instead of the whole sequence's. Same tokens, far less work.


def attention_forward_cached(qkv, kv_cache, pos, NH):
    # qkv is (1,1,3C): the query, key and value of the position pos. kv_cache is (2,NH,maxlen,hs):
    # the keys and values of positions 0..pos-1, to which this position's are added.
    C = qkv.shape[-1] // 3
    hs = C // NH
    q, k, v = qkv.reshape(3, NH, hs)  # (1,1,3C) -> 3 x (NH,hs)
    kv_cache[0, :, pos], kv_cache[1, :, pos] = k, v
    keys, values = kv_cache[0, :, :pos + 1], kv_cache[1, :, :pos + 1]  # (NH,pos+1,hs) each
    # the newest position may look at every position so far: no mask needed
    att = (keys @ q[:, :, None])[:, :, 0] * (1.0 / math.sqrt(hs))  # (NH,pos+1,hs) @ (NH,hs,1) -> (NH,pos+1)
    att = xp.exp(att - att.max(axis=-1, keepdims=True))
    att /= att.sum(axis=-1, keepdims=True)
    out = (att[:, None, :] @ values)[:, 0]  # (NH,1,pos+1) @ (NH,pos+1,hs) -> (NH,hs)
    return out.reshape(1, 1, C)


def gpt2_forward_cached(model, token, pos, kv_cache):
    # gpt2_forward for the single token at position pos, using and filling kv_cache (L,2,NH,maxlen,hs);
    # returns the logits (Vp,) of the next token. Inference only: nothing is kept for a backward pass.
    # It computes with the float32 parameters whatever --dtype is: one row at a time is fast in float32.
    p, NH = model.params, model.config.num_heads
    residual, _ = encoder_forward(xp.asarray([[token]]), p["wte"], p["wpe"][pos:pos + 1])  # (1,1,C)
    for l in range(model.config.num_layers):
        ln1, _ = layernorm_forward(residual, p["ln1w"][l], p["ln1b"][l])
        qkv, _ = matmul_forward(ln1, p["qkvw"][l], p["qkvb"][l])  # (1,1,3C)
        atty = attention_forward_cached(qkv, kv_cache[l], pos, NH)  # (1,1,C)
        attproj, _ = matmul_forward(atty, p["attprojw"][l], p["attprojb"][l])
        residual2, _ = residual_forward(residual, attproj)
        ln2, _ = layernorm_forward(residual2, p["ln2w"][l], p["ln2b"][l])
        fch, _ = matmul_forward(ln2, p["fcw"][l], p["fcb"][l])  # (1,1,4C)
        fch_gelu, _ = gelu_forward(fch)
        fcproj, _ = matmul_forward(fch_gelu, p["fcprojw"][l], p["fcprojb"][l])  # (1,1,C)
        residual, _ = residual_forward(residual2, fcproj)
    lnf, _ = layernorm_forward(residual, p["lnfw"], p["lnfb"])
    logits, _ = matmul_forward(lnf, p["wte"], None)  # (1,1,Vp)
    return logits[0, 0]


def gpt2_generate(model, prompt, num_tokens, rng_state, temperature=1.0, top_k=0):
    # the same tokens as gpt2_sample, at one position's forward pass per token (with --dtype bf16,
    # gpt2_sample computes with the bfloat16 weights, and this with the float32 ones: close, not equal)
    c = model.config
    # the last token sampled is never fed back, so the positions used are 0 .. len(prompt)+num_tokens-2
    kv_cache = xp.zeros((c.num_layers, 2, c.num_heads, len(prompt) + num_tokens - 1, c.channels // c.num_heads),
                        dtype=model.params_memory.dtype)  # (L,2,NH,maxlen,hs)
    for pos, token in enumerate(prompt[:-1]):
        gpt2_forward_cached(model, token, pos, kv_cache)  # the prompt fills the cache
    token = prompt[-1]
    for pos in range(len(prompt) - 1, len(prompt) - 1 + num_tokens):
        logits = gpt2_forward_cached(model, token, pos, kv_cache)  # (Vp,)
        token = sample_token(logits, c.vocab_size, rng_state, temperature, top_k)
        yield token


# ----------------------------------------------------------------------------
# training options of llm.c's GPU trainer (beyond its CPU loop, whose defaults leave them off)


def accumulate_gradients(model, loader, grad_accum):
    # forward and backward passes over grad_accum consecutive batches: the gradients end up as
    # their mean, exactly as if the batches had been one batch of grad_accum * B rows (the loss is
    # a mean over all positions). Returns the mean loss. With grad_accum = 1, llm.c's plain step.
    grad_sum, loss_sum = None, 0.0
    for _ in range(grad_accum):
        inputs, targets = loader.next_batch()
        loss_sum += gpt2_forward(model, inputs, targets)
        gpt2_backward(model)  # writes model.grads_memory
        if grad_accum > 1 and grad_sum is None:
            grad_sum = model.grads_memory.copy()
        elif grad_accum > 1:
            grad_sum += model.grads_memory
    if grad_accum > 1:
        xp.multiply(grad_sum, 1.0 / grad_accum, out=model.grads_memory)
    return loss_sum / grad_accum


def grad_norm(grads_memory):
    # the global norm of all gradients, sqrt(sum g^2): float32 sums of 1M-float chunks, added up in
    # float64 (on the device: one float() at the end, so a GPU is waited for once, not per chunk)
    total = xp.zeros((), dtype=xp.float64)
    for start in range(0, grads_memory.size, 1 << 20):
        g = grads_memory[start:start + (1 << 20)]
        total += xp.dot(g, g)
    return math.sqrt(float(total))


def clip_gradients(model, max_norm):
    # scale all gradients down together if their global norm exceeds max_norm; returns the norm before
    norm = grad_norm(model.grads_memory)
    if norm > max_norm:
        model.grads_memory *= max_norm / norm
    return norm


def get_lr(step, args):
    # the learning rate at a training step (from 0): linear warmup over --warmup-steps, then cosine
    # decay to --lr-min-frac of --lr at the last step. The defaults (no warmup, min frac 1) keep
    # llm.c's constant learning rate.
    min_lr = args.lr * args.lr_min_frac
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    decay_steps = args.steps - 1 - args.warmup_steps
    decay_ratio = (step - args.warmup_steps) / decay_steps if decay_steps > 0 else 1.0
    coeff = 0.5 * (1.0 + math.cos(math.pi * min(decay_ratio, 1.0)))  # from 1 down to 0
    return min_lr + coeff * (args.lr - min_lr)


# which tensors AdamW decays with --decay-2d-only: the weight matrices, not biases or LayerNorms
MATRICES = ("wte", "wpe", "qkvw", "attprojw", "fcw", "fcprojw")


# ----------------------------------------------------------------------------
# checkpoints and resume (beyond llm.c's CPU loop)
# Every --save-every steps, a run writes model_<steps done>.bin, an llm.c checkpoint that llm.c's
# C code can read too, and then state_<steps done>.bin: everything else the run needs to continue
# exactly where it stopped. Both are written atomically, the state last, so a pair whose state
# exists is complete.

RUN_STATE_MAGIC, RUN_STATE_VERSION = 20261122, 1
RUN_STATE_HEADER = 128  # uint64 values: 1024 bytes, like llm.c's headers


def write_run_state(path, model, steps_done, train_loader, rng_state):
    # header: magic, version, steps done, number of parameters, B, T, the train loader's next batch,
    # the sampler's RNG state, the number of processes (0 in older files: 1); then AdamW's m and v
    # (num_parameters float32 each). B counts the rows of all processes: N processes with -b B/N
    # read the data as one process with -b B does, so either can resume the other's run.
    header = np.zeros(RUN_STATE_HEADER, dtype="<u8")
    header[:9] = [RUN_STATE_MAGIC, RUN_STATE_VERSION, steps_done, model.params_memory.size,
                  train_loader.num_processes * train_loader.B, train_loader.T, train_loader.current_batch,
                  rng_state[0], train_loader.num_processes]
    zeros = np.zeros(model.params_memory.size, dtype=np.float32)  # no update yet: the moments are still zero
    with atomic_write(path) as f:
        f.write(header.tobytes())
        for moment in (model.m_memory, model.v_memory):
            f.write(zeros.tobytes() if moment is None else to_host(moment).astype("<f4", copy=False).tobytes())


def read_run_state(path, model):
    # the reverse: fills in model's AdamW moments; returns (steps done, B, T, next batch, RNG state)
    check_file(path, "run state", "it is written next to model_<step>.bin by --output-dir")
    n = model.params_memory.size
    expected_size = RUN_STATE_HEADER * 8 + 2 * n * 4
    with open(path, "rb") as f:
        header = np.fromfile(f, dtype="<u8", count=RUN_STATE_HEADER)
        if header.size != RUN_STATE_HEADER or header[0] != RUN_STATE_MAGIC or header[1] != RUN_STATE_VERSION:
            raise InputError(f"{path}: not a run state of this trainer (expected magic {RUN_STATE_MAGIC}, version {RUN_STATE_VERSION})")
        actual_size = os.fstat(f.fileno()).st_size
        if header[3] != n or actual_size != expected_size:
            raise InputError(f"{path}: holds {header[3]:,} parameters in {actual_size:,} bytes, but its model has {n:,} "
                             f"({expected_size:,} bytes expected)")
        model.m_memory = xp.asarray(np.fromfile(f, dtype="<f4", count=n))
        model.v_memory = xp.asarray(np.fromfile(f, dtype="<f4", count=n))
    steps_done, _, B, T, next_batch, rng = (int(x) for x in header[2:8])
    return steps_done, B, T, next_batch, rng


def save_checkpoint(out_dir, model, steps_done, train_loader, rng_state):
    os.makedirs(out_dir, exist_ok=True)
    gpt2_write_checkpoint(model, os.path.join(out_dir, f"model_{steps_done}.bin"))
    write_run_state(os.path.join(out_dir, f"state_{steps_done}.bin"), model, steps_done, train_loader, rng_state)
    print(f"saved model_{steps_done}.bin and state_{steps_done}.bin to {out_dir}")


def latest_checkpoint(run_dir):
    # the most steps for which both model_<steps>.bin and state_<steps>.bin exist (or None);
    # temporary files of an interrupted write end in .tmp.<pid> and don't match
    if not os.path.isdir(run_dir):
        raise InputError(f"--resume {run_dir}: not a directory")
    names = set(os.listdir(run_dir))
    steps = [int(name[6:-4]) for name in names
             if name.startswith("state_") and name.endswith(".bin") and name[6:-4].isdigit()
             and f"model_{int(name[6:-4])}.bin" in names]
    return max(steps, default=None)


# ----------------------------------------------------------------------------
# running on a GPU (beyond llm.c's CPU loop; llm.c's GPU trainer is train_gpt2.cu)
# CuPy implements NumPy's interface on NVIDIA GPUs, so with xp = cupy every layer above runs on the
# GPU as written. A few layers are chains of many small array operations, each one a pass over
# memory; on a GPU they run much faster as one fused kernel. cuda_layers.py holds those fused forms,
# each written beside (and tested against) the plain layer here that it stands in for, as llm.c
# keeps matmul_forward_naive beside its fast matmul.

# the layers as written above, kept by name so that use_device can put them back
PLAIN_LAYERS = {name: globals()[name] for name in (
    "encoder_backward", "layernorm_forward", "layernorm_backward", "matmul_forward", "matmul_backward",
    "attention_forward", "attention_backward", "gelu_forward", "gelu_backward", "softmax_forward",
    "crossentropy_softmax_backward", "attention_forward_cached", "adamw")}
CUPY_INSTALL = "pip install cupy-cuda12x (for a CUDA 12 driver) or cupy-cuda13x (CUDA 13); nvidia-smi shows the driver's"

# Mixed precision (--dtype bf16, on a GPU), as llm.c's train_gpt2.cu does it:
# - The parameters stay float32: the master weights, what AdamW updates (its two moments float32 too)
#   and what checkpoints hold. After each update they are copied to bfloat16 (copy_weights), rounded
#   to nearest, and the forward and backward passes read only that copy: half the bytes to move.
# - Activations and their gradients are bfloat16 in memory. Each fused kernel reads bfloat16, computes
#   in float32 and rounds once when it stores. Matrix products multiply bfloat16 on the tensor cores
#   (twice TF32's rate) and add their products in float32.
# - Kept in float32, where bfloat16's 8 bits of mantissa (2 to 3 decimal digits) would hurt: LayerNorm's
#   mean and rstd, attention's scores q @ k^T before the softmax, the probabilities, the loss.
# - The gradients of the parameters are float32 (llm.c keeps them in bfloat16). cuBLAS writes the
#   float32 sums of the weight gradients' products as they are, so this costs no pass of its own, and
#   with float32 gradients everything after the backward pass is unchanged: accumulation over
#   --grad-accum batches (bfloat16 would round away small contributions to a large sum), the gradient
#   norm and clipping, the average over processes, AdamW. The price is their memory, 2 bytes a
#   parameter more (250 MB for GPT-2 124M), next to activations of several GB.
# - No loss scaling: bfloat16 has float32's exponent range, so small gradients do not underflow as they
#   would in float16. A loss that is not finite still stops the run before the update.
# - Sampling computes with the float32 parameters (one row at a time, where bfloat16 would gain nothing).


def use_device(device, tf32=True, fused=True, dtype="fp32", attention="blocked"):
    # choose the array module, once, before any model is built: "cpu" (NumPy) or "cuda" (CuPy).
    # On the GPU, matmuls use TF32 tensor cores unless tf32 is False (as llm.c's CUDA trainers do),
    # and the fused kernels of cuda_layers.py take the place of the plain layers unless fused is False.
    # dtype "bf16" (GPU and fused kernels only): bfloat16 activations over float32 parameters.
    # attention: the fused attention's form, "blocked" (cuBLAS products) or "flash" (cuda_layers.py).
    global xp, floatX
    if dtype not in ("fp32", "bf16"):
        raise InputError(f"--dtype {dtype}: expected fp32 or bf16")
    if dtype == "bf16" and device != "cuda":
        raise InputError("--dtype bf16 needs --device cuda: bfloat16 pays on a GPU's tensor cores, while NumPy "
                         "has no fast bfloat16 matrix product (on the CPU, use --dtype fp32)")
    if dtype == "bf16" and not fused:
        raise InputError("--dtype bf16 runs on the fused GPU kernels only: the plain layers are the float32 reference")
    if attention not in ("blocked", "flash") or (attention == "flash" and (device != "cuda" or not fused)):
        raise InputError(f"--attention {attention}: expected blocked, or flash (with --device cuda)")
    if device == "cpu":
        xp, floatX = np, np.float32
        globals().update(PLAIN_LAYERS)
        return
    try:
        import cupy
    except ImportError:
        raise InputError(f"--device cuda needs CuPy, which is not installed: {CUPY_INSTALL}") from None
    try:
        if cupy.cuda.runtime.getDeviceCount() == 0:
            raise RuntimeError("no GPU found")
        a = cupy.ones((2, 2), dtype=cupy.float32)
        float((a @ a).sum())  # compiles a kernel and calls cuBLAS: the driver, NVRTC and cuBLAS all work
    except Exception as e:  # no GPU, no driver, or a CuPy wheel for another CUDA version than the driver's
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"--device cuda: CuPy {cupy.__version__} cannot use a GPU here ({reason}); "
                         f"check the GPU with nvidia-smi, and that CuPy matches its driver: {CUPY_INSTALL}") from None
    from llmc import cuda_layers
    try:
        floatX = cuda_layers.bfloat16() if dtype == "bf16" else np.float32
    except RuntimeError as e:  # this GPU, or this CuPy, cannot compute in bfloat16: why, in one line
        raise InputError(f"--dtype bf16: {e}") from None
    cuda_layers.set_tf32(tf32)
    cuda_layers.set_dtype(floatX)
    cuda_layers.ATTENTION_KERNEL = attention
    if attention == "flash":
        try:
            cuda_layers.compile_flash_attention(floatX)
        except RuntimeError as e:
            raise InputError(f"--attention flash: {e}; use --attention blocked") from None
    xp = cupy
    # (the plain layers' AdamW for a GPU is adamw_plain: adamw_threaded is NumPy's, for CPU cores)
    globals().update(cuda_layers.FUSED_LAYERS if fused else dict(PLAIN_LAYERS, adamw=adamw_plain))


def describe_device():
    # one line: what computes, with which versions
    if xp is np:
        return f"cpu: NumPy {np.__version__}, {usable_cpus()} cores"
    from llmc import cuda_layers
    fused = attention_forward is not PLAIN_LAYERS["attention_forward"]
    layers = "fused kernels" if fused else "plain layers"
    if fused and cuda_layers.ATTENTION_KERNEL == "flash":
        layers += " (flash attention where it applies)"
    if floatX != np.float32:
        precision = "bf16 activations and matmuls, fp32 parameters and gradients"
    else:
        precision = "fp32, TF32 matmuls" if cuda_layers.tf32_enabled() else "fp32, fp32 matmuls"
    return f"cuda: {cuda_layers.device_description()}; {layers}; {precision}"


def available_memory():
    # bytes the arrays of a run can still take: free GPU memory, or the host's available memory
    # (None where the system does not say)
    if xp is not np:
        free, _ = xp.cuda.runtime.memGetInfo()
        return free + xp.get_default_memory_pool().free_bytes()
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def training_memory(config, B, T):
    # about how many bytes a training step needs: the model's four float32 arrays (parameters,
    # gradients and AdamW's two moments; with bf16, the weights' copy too), what gpt2_forward keeps of
    # each layer for the backward pass (17 arrays the size of (B,T,C) and attention's (B,NH,T,T),
    # which the fused GPU attention recomputes instead of keeping: it only needs two at a time, and
    # flash attention none), and the logits, probabilities and their gradient (B,T,Vp), the largest of
    # all for GPT-2's 50,257 tokens.
    C, L, NH, Vp = config.channels, config.num_layers, config.num_heads, config.padded_vocab_size
    N, x = num_parameters(config), np.dtype(floatX).itemsize  # x: bytes per activation, 4 or 2 (bf16)
    if attention_forward is PLAIN_LAYERS["attention_forward"]:
        kept_attention = L
    else:
        from llmc import cuda_layers
        kept_attention = 0 if cuda_layers.ATTENTION_KERNEL == "flash" else 2  # (flash keeps its tiles on chip)
    weights = 4 * 4 * N + (x * N if floatX != np.float32 else 0)
    activations = x * L * 17 * B * T * C + 4 * kept_attention * B * NH * T * T
    logits = (x + 4 + x) * B * T * Vp  # the logits and their gradient in floatX, the probabilities in float32
    return weights + activations + logits


# ----------------------------------------------------------------------------
# main training loop


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        # a bad option is bad input like any other: one line, exit status 2
        raise InputError(f"{message} (see --help)")


def add_device_arguments(parser):
    # where and in which precision to compute: the same options for train_gpt2.py and test_gpt2.py
    group = parser.add_argument_group("running on a GPU (NVIDIA, through CuPy)")
    group.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                       help="where to compute: cpu (NumPy) or cuda (CuPy, an optional dependency: " + CUPY_INSTALL + ")")
    group.add_argument("--tf32", type=int, choices=[0, 1], default=1,
                       help="on the GPU, TF32 tensor cores for the matmuls (0: full fp32), as llm.c's CUDA trainers")
    group.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                       help="bf16 (GPU only): bfloat16 activations and matmuls over float32 parameters, gradients "
                            "and checkpoints, as llm.c's train_gpt2.cu")
    group.add_argument("--attention", choices=["blocked", "flash"], default="blocked",
                       help="on the GPU, attention's kernels: blocked (cuBLAS products, by blocks of rows) or flash "
                            "(tensor-core FlashAttention kernels, for head size 64 and -t a multiple of 64; with "
                            "TF32 or bf16; new, not yet timed)")


def parse_args(argv=None):
    parser = ArgumentParser(description="Train GPT-2 in NumPy, as llm.c's train_gpt2.c does "
                                        "(defaults are llm.c's).", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--checkpoint", default="gpt2_124M.bin", help="llm.c GPT-2 checkpoint to start from")
    add("--init", choices=list(DEPTHS), help="instead of a checkpoint, start from a randomly initialized GPT-2 of this depth")
    add("--train-data", default="data/tiny_shakespeare_train.bin", help="training tokens")
    add("--val-data", default="data/tiny_shakespeare_val.bin", help="validation tokens")
    add("-b", "--batch-size", type=int, default=4, help="batch size B")
    add("-t", "--seq-len", type=int, default=64, help="sequence length T (at most the model's maxT)")
    add("--steps", type=int, default=40, help="number of training steps (0: just evaluate and sample)")
    add("--lr", type=float, default=1e-4, help="AdamW learning rate")
    add("--weight-decay", type=float, default=0.0, help="AdamW weight decay, on every tensor as llm.c's CPU code does")
    add("--val-every", type=int, default=10, help="evaluate the validation loss every N steps (0 = never)")
    add("--val-batches", type=int, default=5, help="validation batches per evaluation")
    add("--seed", type=int, default=1337, help="seed of the sampler (and of --init)")
    add("--output", help="write the trained model here, as an llm.c checkpoint")
    group = parser.add_argument_group("sampling")
    group.add_argument("--sample-every", type=int, default=20, help="sample every N steps and at the end (0 = never)")
    group.add_argument("--gen-tokens", type=int, default=64, help="tokens to generate per sample")
    group.add_argument("--prompt", help="text to continue (default: start from <|endoftext|>); needs tiktoken")
    group.add_argument("--temperature", type=float, default=1.0, help="below 1: more predictable, above 1: more random")
    group.add_argument("--top-k", type=int, default=0, help="sample only from the k most likely tokens (0 = all)")
    group = parser.add_argument_group("training options of llm.c's GPU trainer (off by default)")
    group.add_argument("--grad-accum", type=int, default=1, help="accumulate the gradients of K batches per step, as one batch of K*B rows")
    group.add_argument("--grad-clip", type=float, default=0.0, help="clip the gradients' global norm to X (0 = off)")
    group.add_argument("--warmup-steps", type=int, default=0, help="linear learning rate warmup over W steps")
    group.add_argument("--lr-min-frac", type=float, default=1.0,
                       help="cosine decay of the learning rate to this fraction of --lr at the last step (1 = no decay)")
    group.add_argument("--decay-2d-only", action="store_true",
                       help="weight decay only on the weight matrices, as nanoGPT and llm.c's GPU trainer do")
    group.add_argument("--log", metavar="FILE", help="write llm.c's main.log format: s:STEP trl:LOSS / s:STEP tel:LOSS")
    group = parser.add_argument_group("getting GPT-2's weights")
    group.add_argument("--download", action="store_true",
                       help="first fetch what is missing of llm.c's starter pack (gpt2_124M.bin, its debug state, "
                            "gpt2_tokenizer.bin) into the --checkpoint's folder")
    group.add_argument("--download-data", action="store_true",
                       help="first fetch the Tiny Shakespeare token files into the --train-data's folder")
    group.add_argument("--download-url", metavar="BASE", default="https://huggingface.co/datasets/karpathy/llmc-starter-pack/resolve/main",
                       help="where the starter pack's files are (a mirror)")
    group = parser.add_argument_group("checkpoints")
    group.add_argument("--output-dir", help="write model_<step>.bin and state_<step>.bin here (see --save-every)")
    group.add_argument("--save-every", type=int, default=0, help="with --output-dir: save every N steps, and at the end (0 = only at the end)")
    group.add_argument("--resume", metavar="DIR", help="continue from the newest model/state pair in DIR, up to --steps in total "
                                                       "(saving there too, unless --output-dir says otherwise)")
    add_device_arguments(parser)
    args = parser.parse_args(argv)
    for name in ("batch_size", "seq_len", "val_batches", "gen_tokens", "grad_accum", "temperature"):
        if getattr(args, name) <= 0:
            raise InputError(f"--{name.replace('_', '-')} must be positive, not {getattr(args, name)}")
    for name in ("steps", "val_every", "sample_every", "save_every", "top_k", "grad_clip", "warmup_steps"):
        if getattr(args, name) < 0:
            raise InputError(f"--{name.replace('_', '-')} must not be negative, not {getattr(args, name)}")
    if not 0.0 <= args.lr_min_frac <= 1.0:
        raise InputError(f"--lr-min-frac must be between 0 and 1, not {args.lr_min_frac}")
    if args.save_every and not (args.output_dir or args.resume):
        raise InputError("--save-every needs --output-dir (where to save)")
    return args


def evaluate(model, val_loader, num_batches):
    # the mean loss over the first num_batches batches of the validation set
    val_loader.reset()
    val_loss = 0.0
    for _ in range(num_batches):
        inputs, targets = val_loader.next_batch()
        val_loss += gpt2_forward(model, inputs, targets)
    return val_loss / num_batches


def encode_prompt(text, vocab_size):
    # the prompt's tokens, after <|endoftext|> as at the start of any document
    eot = min(GPT2_EOT, vocab_size - 1)
    if eot != GPT2_EOT:
        print(f"note: the model's vocabulary ({vocab_size} tokens) has no GPT-2 <|endoftext|> ({GPT2_EOT}): "
              f"samples start from its last token, {eot}, instead")
    if text is None:
        return [eot]
    enc = tiktoken_gpt2()
    if isinstance(enc, Exception):
        raise InputError(f"--prompt needs tiktoken's GPT-2 tokenizer, which could not load ({type(enc).__name__})")
    tokens = enc.encode_ordinary(text)
    if max(tokens, default=0) >= vocab_size:
        raise InputError(f"--prompt has tokens beyond the model's vocab size {vocab_size}")
    return [eot] + tokens


def print_sample(model, args, prompt, rng_state, decode):
    print("generating:\n---")
    # tokens are byte strings, and a character can be split across two tokens:
    # an incremental decoder holds the partial bytes until the character is complete
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    if decode is None:  # no tokenizer: print the ids
        show = lambda token: print(token, end=" ", flush=True)  # noqa: E731
    else:
        show = lambda token: print(utf8.decode(decode(token)), end="", flush=True)  # noqa: E731
    for token in prompt[1:]:
        show(token)
    t0 = time.perf_counter()
    for token in gpt2_generate(model, prompt, args.gen_tokens, rng_state, args.temperature, args.top_k):
        show(token)
    print(f"\n---\ngenerated {args.gen_tokens} tokens in {(time.perf_counter() - t0) * 1000:.0f} ms")


def keep_freed_memory():
    # NumPy gets its arrays from C's malloc. On Linux, glibc's malloc hands big blocks back to the
    # operating system as soon as they are freed, so every step's activations and temporaries
    # (about 500 MB for GPT-2 124M) come back as fresh pages, each one a page fault: about 10% of
    # a step. Asking malloc to keep freed memory for reuse removes that, at no cost in peak memory.
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc (macOS, Windows): nothing to tune
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from glibc's malloc.h
    libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)  # take blocks up to 1 GB from the reusable heap
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)  # and don't give the heap's free memory back


class NonFiniteLossError(Exception):
    """The loss became inf or nan: training stops before the update would spoil the weights."""


class Interrupted(Exception):
    """Ctrl-C: the run stops with one line saying where, and how to go on."""


def check_output_path(option, path, folder=False):
    # an output must be writable before any work is done, not found unwritable after it: the path
    # must be of the right kind if it exists, and the nearest folder on its way must be one we may
    # write into (missing folders are created when the file is written)
    if folder and os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f"{option} {path} is a file, not a folder")
    if not folder and os.path.isdir(path):
        raise InputError(f"{option} {path} is a directory; give a file name, such as {os.path.join(path, 'model.bin')}")
    existing = os.path.abspath(path if folder else os.path.dirname(os.path.abspath(path)))
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise InputError(f"{option} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK) or (os.path.isfile(path) and not os.access(path, os.W_OK)):
        raise InputError(f"{option} {path}: no permission to write there")


def check_options(args):
    # every path option, before anything is downloaded, built or trained: outputs must be writable,
    # inputs must be there (their contents are checked when read, still before the first step)
    for option, path, folder in [("--output", args.output, False), ("--log", args.log, False),
                                 ("--output-dir", args.output_dir, True)]:
        if path:
            check_output_path(option, path, folder)
    if args.download:
        check_output_path("--checkpoint", os.path.dirname(args.checkpoint) or ".", folder=True)
    if args.download_data:
        check_output_path("--train-data", os.path.dirname(args.train_data) or ".", folder=True)
    if args.resume and not os.path.isdir(args.resume):
        raise InputError(f"--resume {args.resume}: not a folder")


def check_run_fits(config, args, steps_done):
    # the options against the model's shape, and the run against the memory there is, before the
    # model's weights are read
    B, T = args.batch_size, args.seq_len
    if T > config.max_seq_len:
        raise InputError(f"--seq-len {T} exceeds the model's max_seq_len {config.max_seq_len}")
    if args.top_k > config.vocab_size:
        raise InputError(f"--top-k {args.top_k} exceeds the vocab size {config.vocab_size}")
    if steps_done > args.steps:
        raise InputError(f"--resume {args.resume}: already {steps_done} steps done, more than --steps {args.steps}")
    need, have = training_memory(config, B, T), available_memory()
    if have is not None and need > have:
        where = "free on the GPU" if xp is not np else "available"
        raise InputError(f"-b {B} -t {T} needs about {need / 1e9:.1f} GB for the model and its activations, but only "
                         f"{have / 1e9:.1f} GB is {where}: use a smaller --batch-size or --seq-len "
                         f"(--grad-accum makes a larger batch out of smaller ones)")


def main(args):
    # under mpiexec, this process's place among several (one otherwise): it takes its own GPU or its
    # share of the cores before any array is made, and only rank 0 prints (see distributed.py)
    procs = distributed.init(args.device)
    keep_freed_memory()
    use_device(args.device, tf32=bool(args.tf32), dtype=args.dtype, attention=args.attention)
    print(f"device: {describe_device()}")
    B, T = args.batch_size, args.seq_len
    if args.resume:
        args.init = None
        args.output_dir = args.output_dir or args.resume
    check_options(args)
    if (args.download or args.download_data) and procs.size > 1:
        raise InputError("--download needs one process: fetch the files first (python download_starter_pack.py, "
                         "--data for the token files), then start mpiexec")
    if args.download or args.download_data:
        from download_starter_pack import DownloadError, download_starter_pack  # standard library only
        try:
            download_starter_pack(os.path.dirname(args.checkpoint) if args.download else None,
                                  os.path.dirname(args.train_data) if args.download_data else None, args.download_url)
        except DownloadError as e:
            sys.exit(f"error: {e}")  # a network failure: one line, exit status 1

    # where the run starts: a random model, a checkpoint, or the newest checkpoint of a run to resume
    steps_done = 0
    checkpoint = args.checkpoint
    if args.resume:
        steps_done = latest_checkpoint(args.resume)
        if steps_done is None:
            raise InputError(f"--resume {args.resume}: no model_<step>.bin with its state_<step>.bin in it")
        checkpoint = os.path.join(args.resume, f"model_{steps_done}.bin")
    c = random_config(args.init) if args.init else read_checkpoint_config(checkpoint)
    print(f"[GPT-2] {c}")
    print(f"num_parameters: {num_parameters(c)}")
    check_run_fits(c, args, steps_done)
    # the last sampled token is never fed back: a prompt of P tokens and N new ones use P+N-1 positions
    prompt = encode_prompt(args.prompt, c.vocab_size) if args.sample_every else []
    if prompt and len(prompt) + args.gen_tokens - 1 > c.max_seq_len:
        raise InputError(f"the prompt ({len(prompt)} tokens with <|endoftext|>) and --gen-tokens {args.gen_tokens} "
                         f"exceed the model's max_seq_len {c.max_seq_len}")
    if args.steps > steps_done:  # --steps 0 only evaluates and samples: no training data needed
        train_loader = DataLoader(read_tokens(args.train_data, c.vocab_size), B, T, args.train_data,
                                  procs.rank, procs.size)
        print(f"train dataset num_batches: {train_loader.num_batches}")
    if args.val_every:
        val_loader = DataLoader(read_tokens(args.val_data, c.vocab_size), B, T, args.val_data, procs.rank, procs.size)
        print(f"val dataset num_batches: {val_loader.num_batches}")

    model = gpt2_build_from_random(args.init, args.seed) if args.init else gpt2_build_from_checkpoint(checkpoint)
    rng_state = [args.seed]  # the sampler's xorshift state
    if args.resume:
        state_steps, state_B, state_T, next_batch, rng_state[0] = read_run_state(
            os.path.join(args.resume, f"state_{steps_done}.bin"), model)
        if (state_B, state_T) != (B * procs.size, T):  # B: the rows of all processes, so N may change with it
            raise InputError(f"--resume {args.resume}: the run used -b {state_B} -t {state_T} (-b times the number of "
                             f"processes; here {B} x {procs.size}): resume it with the same")
        if args.steps > steps_done:
            train_loader.current_batch = next_batch
        print(f"resuming from {args.resume} after {steps_done} steps")
    decode = make_decoder(checkpoint)
    if args.log:
        os.makedirs(os.path.dirname(args.log) or ".", exist_ok=True)
    # llm.c's logger appends on resume; with several processes, rank 0 alone writes
    log = open(args.log, "a" if args.resume else "w") if args.log and procs.is_main else None
    decayed = MATRICES if args.decay_2d_only else None  # None: every tensor, as llm.c's CPU code
    procs.start_together()  # every process is ready, or all stop here with one error line

    step, saved = steps_done, steps_done if args.resume else None
    t_start = time.perf_counter()
    try:
        # a non-finite loss is caught below, with a clearer message than NumPy's warnings
        with np.errstate(all="ignore"):
            for step in range(steps_done, args.steps + 1):
                last_step = step == args.steps
                # once in a while estimate the validation loss
                if args.val_every > 0 and (step % args.val_every == 0 or last_step):
                    val_loss = procs.mean(evaluate(model, val_loader, args.val_batches))  # over all processes
                    print(f"val loss {val_loss:f}")
                    if log:
                        print(f"s:{step} tel:{val_loss:.4f}", file=log, flush=True)
                # once in a while print a sample from the model (rank 0 alone: the others go on to the next step)
                if args.sample_every > 0 and procs.is_main and ((step > 0 and step % args.sample_every == 0) or last_step):
                    print_sample(model, args, prompt, rng_state, decode)
                if last_step:
                    break
                # do a training step
                t0 = time.perf_counter()
                loss = accumulate_gradients(model, train_loader, args.grad_accum)  # forward and backward
                # several processes: each had its own rows of the batch; average their gradients, in place
                procs.allreduce_mean(model.grads_memory)
                loss = procs.mean(loss)
                if not math.isfinite(loss):
                    raise NonFiniteLossError(f"step {step}: train loss is {loss}; stopped before the update touched "
                                             f"the weights (a lower --lr may help)")
                norm = clip_gradients(model, args.grad_clip) if args.grad_clip else None
                lr = get_lr(step, args)
                gpt2_update(model, lr, 0.9, 0.999, 1e-8, args.weight_decay, step + 1, decayed)
                if xp is not np:
                    xp.cuda.Device().synchronize()  # the GPU runs behind Python: wait for the update, then time
                t1 = time.perf_counter()
                # llm.c's line, then throughput and progress
                elapsed, done = t1 - t_start, step + 1 - steps_done
                eta = elapsed / done * (args.steps - step - 1)
                extra = f", norm {norm:.4f}" if norm is not None else ""
                print(f"step {step}: train loss {loss:f} (took {(t1 - t0) * 1000:f} ms) "
                      f"{procs.size * args.grad_accum * B * T / (t1 - t0):.0f} tokens/s{extra}, {elapsed:.0f} s elapsed, ETA {eta:.0f} s")
                if log:
                    print(f"s:{step} trl:{loss:.4f} lr:{lr:.6f}" + (f" norm:{norm:.2f}" if norm is not None else ""),
                          file=log, flush=True)
                if args.output_dir and ((args.save_every and (step + 1) % args.save_every == 0) or step + 1 == args.steps):
                    if procs.is_main:  # one writer: the other processes hold the same weights
                        save_checkpoint(args.output_dir, model, step + 1, train_loader, rng_state)
                    saved = step + 1
    except KeyboardInterrupt:
        if saved is not None:
            how = (f"the newest checkpoint is after step {saved}: continue with --resume {args.output_dir} "
                   f"and the same options")
        elif args.output_dir:
            how = "no checkpoint was written yet"
        else:
            how = "no checkpoints were being written (--output-dir DIR --save-every N make a run resumable)"
        raise Interrupted(f"interrupted at step {step} of {args.steps}; {how}") from None
    finally:
        if log:
            log.close()
    procs.check_same_weights(model.params_memory)  # several processes: rank 0 prints each one's checksum
    if args.output and procs.is_main:
        os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
        gpt2_write_checkpoint(model, args.output)
        print(f"wrote {args.output}")


if __name__ == "__main__":
    # each error: one line "error: ...", then this exit status (with several processes, every one
    # exits, and the line is printed once: distributed.exit)
    try:
        main(parse_args())
    except InputError as e:
        distributed.exit(2, e)
    except NonFiniteLossError as e:
        distributed.exit(1, e)
    except Interrupted as e:
        distributed.exit(130, e)  # the shell's status for a program stopped by Ctrl-C
    except KeyboardInterrupt:
        distributed.exit(130, "interrupted before training started; nothing was written")
