"""
Trains GPT-2 in NumPy: a port of llm.c's CPU reference, train_gpt2.c, that reads top to bottom.

Every layer has a hand-written forward pass and, right below it, its backward pass. The model
chains them into a forward pass, a backward pass and an AdamW update, exactly as llm.c does, and
the training loop at the bottom fine-tunes GPT-2 on Tiny Shakespeare and samples from it.

    python prepro_tinyshakespeare.py      # writes data/tiny_shakespeare_{train,val}.bin
    python train_gpt2.py --download       # fetches llm.c's gpt2_124M.bin, fine-tunes it
    python train_gpt2.py --init d6        # or: trains a small GPT-2 from scratch

    python train_gpt2.py --device cuda --init d12 -b 8 -t 1024   # the same layers on an NVIDIA GPU
    mpiexec -n 2 python train_gpt2.py -b 2   # 2 processes, each with half of every batch

What is deliberately left out, as in llm.c's reference: autograd and module classes. Beside this
file, as llm.c keeps llmc/ beside train_gpt2.c, the package llmc/ holds the machinery: file formats
and their checks, the command line, the device (CuPy, fused GPU kernels, bfloat16), speed on the
CPU, several processes, and setting up a run. Each import below says what it brings; this file
reads without them. Everything here is float32, like the checkpoint, and the files are llm.c's.
"""

import math
import sys
import time
from dataclasses import dataclass

import numpy as np

# the machinery, in llmc/ beside this file (as llm.c's train_gpt2.c includes llmc/*.h)
# defines: parse_args (every option of this script, checked before any work)
from llmc.cli import parse_args
# defines: choose_device, floatX_weights
from llmc.device import choose_device, floatX_weights
# defines: HEADER_INTS, CHECKPOINT_HINT, check_checkpoint_size, checkpoint_header, describe_config,
# read_checkpoint_header
from llmc.formats import (CHECKPOINT_HINT, HEADER_INTS, check_checkpoint_size, checkpoint_header,
                          describe_config, read_checkpoint_header)
# defines: manual_seed, normal_ (llm.c's mt19937 and its Box-Muller normals, llmc/rand.h)
from llmc.rand import manual_seed, normal_
# defines: setup, errors_as_one_line
from llmc.run import errors_as_one_line, setup
# defines: InputError, atomic_write, to_host
from llmc.utils import InputError, atomic_write, to_host

# The array module the layers compute with: NumPy, or CuPy on an NVIDIA GPU, chosen once by
# use_device (at the end) before any array is made. Every layer is written against xp, so the same
# lines of math run on both. Files are read and written with NumPy on the host.
xp = np
# The dtype of the activations: float32, or bfloat16 on a GPU with --dtype bf16 (llm.c's name)
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
    # (B,NH,T,hs) @ (B,NH,hs,T) -> (B,NH,T,T)
    preatt = (q @ k.swapaxes(-1, -2)) * (1.0 / math.sqrt(hs))
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
        return describe_config(vars(self))  # "max_seq_len: 1024, vocab_size: 50257, ..."


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
        # (num_parameters,) all weights, in checkpoint order, on the device (xp.asarray copies a
        # NumPy array to the GPU when xp is CuPy, and does nothing when xp is NumPy)
        self.params_memory = xp.asarray(params_memory)
        self.params = point_parameters(self.params_memory, config)
        # what the layers compute with: params itself, or with --dtype bf16 a bfloat16 copy
        self.weights = floatX_weights(self.params, floatX)
        self.grads_memory = None  # allocated on the first backward pass
        self.grads = None
        self.m_memory = None  # AdamW's first and second moments, allocated on the first update
        self.v_memory = None
        self.acts = None  # what the last forward pass saved for the backward pass


def read_checkpoint_config(checkpoint_path, hint=CHECKPOINT_HINT):
    # the model's shape from llm.c's checkpoint header: cheap, so the options can be checked
    # against the model before its weights are read
    config = GPT2Config(**read_checkpoint_header(checkpoint_path, hint))  # magic, version, sizes
    check_checkpoint_size(checkpoint_path, config, num_parameters(config))  # all weights are there
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


def gpt2_build_from_random(depth, seed=42):
    # a randomly initialized GPT-2 of llm.c's depths, exactly as llm.c's -e dN draws it
    # (train_gpt2.cu, gpt_build_from_descriptor): weights ~N(0, 0.02) from mt19937 seeded 42, in
    # PyTorch's order (per layer l: at l = 0 wte's V rows and wpe; then that layer's qkvw, attprojw,
    # fcw, fcprojw); LayerNorm weights 1, all biases 0. Drawn on the host: the same on every device.
    config = random_config(depth)
    memory = np.zeros(num_parameters(config), dtype=np.float32)
    p = point_parameters(memory, config)
    rng = manual_seed(seed)
    # the projections into the residual stream start smaller, as GPT-2's do: 0.02 / sqrt(2L)
    residual_std = np.float32(0.02) * (np.float32(1.0) / np.sqrt(np.float32(2.0 * config.num_layers)))
    for l in range(config.num_layers):
        if l == 0:  # (the padded rows of wte stay zero)
            normal_(p["wte"][:config.vocab_size], 0.0, 0.02, rng)
            normal_(p["wpe"], 0.0, 0.02, rng)
        for name in ("qkvw", "attprojw", "fcw", "fcprojw"):
            normal_(p[name][l], 0.0, residual_std if name in ("attprojw", "fcprojw") else 0.02, rng)
    for name in ("ln1w", "ln2w", "lnfw"):
        p[name][...] = 1.0  # LayerNorm starts as the identity
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
    # the chain rule starts at the mean loss over all B*T positions: d mean / d losses = 1/(B*T)
    dlosses = xp.full((B, T), 1.0 / (B * T), dtype=xp.float32)  # (B,T)
    Vp = model.config.padded_vocab_size
    dlogits = crossentropy_softmax_backward(dlosses, acts.pop("probs"), targets, Vp)  # (B,T,Vp)
    # the classifier's part of dwte is written here
    dlnf = matmul_backward(dlogits, acts.pop("logits_cache"), g["wte"], None)  # (B,T,C)
    del dlogits  # the largest array of the backward pass: let go of it at once
    dresidual = layernorm_backward(dlnf, acts["lnf"], g["lnfw"], g["lnfb"])  # (B,T,C)
    for l in reversed(range(L)):
        (ln1_cache, qkv_cache, att_cache, attproj_cache,
         ln2_cache, fc_cache, gelu_cache, fcproj_cache) = acts["layers"].pop()  # layer l's
        # residual3 = residual2 + fcproj
        dresidual2, dfcproj = residual_backward(dresidual, None)
        dfch_gelu = matmul_backward(dfcproj, fcproj_cache, g["fcprojw"][l], g["fcprojb"][l])
        dfch = gelu_backward(dfch_gelu, gelu_cache)  # (B,T,4C)
        dln2 = matmul_backward(dfch, fc_cache, g["fcw"][l], g["fcb"][l])  # (B,T,C)
        # residual2 feeds both ln2 and the skip connection: its gradient is the sum of both
        dresidual2 = dresidual2 + layernorm_backward(dln2, ln2_cache, g["ln2w"][l], g["ln2b"][l])
        # residual2 = residual + attproj
        dresidual, dattproj = residual_backward(dresidual2, None)
        datty = matmul_backward(dattproj, attproj_cache, g["attprojw"][l], g["attprojb"][l])
        dqkv = attention_backward(datty, att_cache)  # (B,T,3C)
        dln1 = matmul_backward(dqkv, qkv_cache, g["qkvw"][l], g["qkvb"][l])  # (B,T,C)
        # the layer's input feeds both ln1 and the skip connection
        dresidual = dresidual + layernorm_backward(dln1, ln1_cache, g["ln1w"][l], g["ln1b"][l])
    # wte gets its second gradient here, as the token embedding (encoder_backward adds it)
    encoder_backward(dresidual, acts["encoder"], g["wte"], g["wpe"])


def adamw_plain(param, grad, m, v, learning_rate, beta1, beta2, eps, weight_decay, t):
    # AdamW, as llm.c's gpt2_update writes it (after PyTorch's AdamW), on whole arrays.
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


adamw = adamw_plain  # what gpt2_update calls; use_device may put a faster form here


def gpt2_update(model, learning_rate, beta1, beta2, eps, weight_decay, t, decayed_names=None):
    # AdamW over all parameters, with weight decay on every tensor as llm.c's CPU code does, or
    # only on the tensors named in decayed_names. The two moments are allocated on the first update.
    if model.m_memory is None:
        model.m_memory = xp.zeros_like(model.params_memory)
        model.v_memory = xp.zeros_like(model.params_memory)
    memories = (model.params_memory, model.grads_memory, model.m_memory, model.v_memory)
    if decayed_names is None:  # as llm.c: one loop over all the parameters, in their flat arrays
        adamw(*memories, learning_rate, beta1, beta2, eps, weight_decay, t)
    else:  # tensor by tensor, each a slice of the flat arrays
        offset = 0
        for name, shape in parameter_shapes(model.config).items():
            part = slice(offset, offset + math.prod(shape))
            offset = part.stop
            wd = weight_decay if name in decayed_names else 0.0
            adamw(*(memory[part] for memory in memories), learning_rate, beta1, beta2, eps, wd, t)
    model.weights = floatX_weights(model.params, floatX, model.weights)  # (bf16: the new copy)


def gpt2_write_checkpoint(model, path):
    # llm.c's checkpoint format, version 3: readable by llm.c's C code and by this script
    with atomic_write(path) as f:  # (a temporary file, renamed once complete)
        f.write(checkpoint_header(model.config))
        f.write(to_host(model.params_memory).astype("<f4", copy=False).tobytes())


# ----------------------------------------------------------------------------
# data loader and sampler
# The token files (llmc/formats.py read_tokens) and the tokenizer (llmc/tokenizer.py) are llm.c's.


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
        # (the +1 target token may overlap the next batch)
        self.num_batches = (len(tokens) - 1) // (rows * T)
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
        # the max first: a tiny temperature then gives 0 for the top logit and -inf for the rest
        # (greedy sampling) instead of overflowing
        logits = (logits - logits.max()) / temperature  # (V,)
    if top_k:
        kth_largest = xp.partition(logits, V - top_k)[V - top_k]
        logits = xp.where(logits >= kth_largest, logits, -math.inf)  # (V,) the rest: probability 0
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
    # (NH,pos+1,hs) @ (NH,hs,1) -> (NH,pos+1)
    att = (keys @ q[:, :, None])[:, :, 0] * (1.0 / math.sqrt(hs))
    att = xp.exp(att - att.max(axis=-1, keepdims=True))
    att /= att.sum(axis=-1, keepdims=True)
    out = (att[:, None, :] @ values)[:, 0]  # (NH,1,pos+1) @ (NH,pos+1,hs) -> (NH,hs)
    return out.reshape(1, 1, C)


def gpt2_forward_cached(model, token, pos, kv_cache):
    # gpt2_forward for the one token at position pos, using and filling kv_cache (L,2,NH,maxlen,hs);
    # returns the logits (Vp,) of the next token. Inference only: nothing is kept for a backward
    # pass. It computes with the float32 parameters whatever --dtype is: one row is fast in float32.
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
    # gpt2_sample computes with the bfloat16 weights, this with the float32 ones: close, not equal)
    c = model.config
    # the last token sampled is never fed back: positions 0 .. len(prompt)+num_tokens-2 are used
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
# the training loop, with the options of llm.c's GPU trainer (off by default)


def evaluate(model, val_loader, num_batches):
    # the mean loss over the first num_batches batches of the validation set
    val_loader.reset()
    val_loss = 0.0
    for _ in range(num_batches):
        inputs, targets = val_loader.next_batch()
        val_loss += gpt2_forward(model, inputs, targets)
    return val_loss / num_batches


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
    # scale all gradients down together if their global norm exceeds max_norm; returns the norm
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


# the tensors --decay-2d-only decays: the 2-D ones (weight matrices and embeddings)
TENSORS_2D = ("wte", "wpe", "qkvw", "attprojw", "fcw", "fcprojw")

# the layers as written above, kept by name so that use_device can put them back
PLAIN_LAYERS = {name: globals()[name] for name in (
    "encoder_backward", "layernorm_forward", "layernorm_backward", "matmul_forward", "matmul_backward",
    "attention_forward", "attention_backward", "gelu_forward", "gelu_backward", "softmax_forward",
    "crossentropy_softmax_backward", "attention_forward_cached", "adamw")}


def use_device(device, tf32=True, fused=True, dtype="fp32", attention="blocked"):
    # Choose, once and before any model is built, where the layers compute: "cpu" (NumPy) or "cuda"
    # (CuPy). Faster forms of some layers take the plain ones' places (llmc/cpu.py threads AdamW;
    # on a GPU, llmc/cuda_layers.py fuses each layer into a kernel), each tested against its plain
    # layer, as llm.c keeps matmul_forward_naive beside its fast matmul.
    global xp, floatX
    xp, floatX, faster_layers = choose_device(device, tf32, fused, dtype, attention)
    globals().update(PLAIN_LAYERS, **faster_layers)


def main(args):
    # set up as llm.c's main does: device, processes, model, data loaders, resume; every check
    # before any work (llmc/run.py; it builds the model and the loaders with this file's functions)
    run = setup(args, sys.modules[__name__])
    model, procs = run.model, run.procs
    decayed_names = TENSORS_2D if args.decay_2d_only else None  # None: all, as llm.c's CPU code
    with run.stops_cleanly():  # Ctrl-C: one line saying where to go on from; the log closed
        for step in range(run.steps_done, args.steps + 1):
            last_step = step == args.steps
            # once in a while estimate the validation loss (the mean over all processes)
            if args.val_every > 0 and (step % args.val_every == 0 or last_step):
                run.print_val_loss(step, procs.mean(evaluate(model, run.val_loader, args.val_batches)))
            # and HellaSwag's accuracy, as llm.c's -h 1 (all processes share the examples)
            if args.hellaswag and ((step > 0 and args.val_every > 0 and step % args.val_every == 0) or last_step):
                run.print_hellaswag(step)
            # once in a while print a sample from the model (rank 0 alone)
            if args.sample_every > 0 and procs.is_main and ((step > 0 and step % args.sample_every == 0)
                                                            or last_step):
                run.print_sample()
            if last_step:
                break
            # do a training step
            t0 = time.perf_counter()
            # forward and backward passes
            loss = accumulate_gradients(model, run.train_loader, args.grad_accum)
            # several processes: each had its own rows of the batch; average their gradients
            procs.allreduce_mean(model.grads_memory)
            loss = procs.mean(loss)
            run.check_finite(step, loss)  # stop before an inf or nan reaches the weights
            norm = clip_gradients(model, args.grad_clip) if args.grad_clip else None
            lr = get_lr(step, args)
            gpt2_update(model, lr, args.beta1, args.beta2, 1e-8, args.weight_decay, step + 1, decayed_names)
            run.print_step(step, loss, lr, norm, run.seconds_since(t0))
            run.save_checkpoint(step + 1)  # every --save-every steps, with --output-dir
    run.finish()  # --output, and with several processes a check that all hold the same weights


if __name__ == "__main__":
    with errors_as_one_line():  # bad input: one line "error: ...", and exit status 2
        main(parse_args(DEPTHS))
