"""
Speed on the CPU, beside the plain layers of train_gpt2.py: AdamW, GeLU, LayerNorm, the softmax and
attention's softmax, each in cache-sized chunks on all cores; and malloc tuned to keep freed memory.
use_device("cpu") installs FASTER_LAYERS. Each does its plain layer's float operations in the same
order (tests/test_cpu_layers.py checks them against the plain layers).
"""

import ctypes
import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

ADAMW_CHUNK = 1 << 17  # 128K floats: the Python loop costs nothing, a chunk stays in cache


def adamw_inplace(param, grad, m, v, learning_rate, beta1, beta2, eps, weight_decay, t):
    # train_gpt2.adamw_plain, for 1-D NumPy arrays of any length. On 124M floats adamw_plain makes a
    # dozen temporaries of 500 MB, each streamed through memory; here each chunk is updated in
    # place with one small scratch buffer, so each value is loaded once and stored once.
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
    # the cores this process may run on (its affinity, which containers limit), not the machine's
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


POOL = None  # the threads of the faster forms, started on first use and kept


def on_all_cores(fn, size, min_part):
    # fn(lo, hi) over [0, size) cut into a part per core, none smaller than min_part (a chunk:
    # a small array stays on this thread); NumPy lets go of the GIL inside its loops, so the parts
    # run at once. Returns fn's results, in order.
    global POOL
    num_parts = max(1, min(usable_cpus(), size // max(1, min_part)))
    if num_parts == 1:
        return [fn(0, size)]
    if POOL is None:
        POOL = ThreadPoolExecutor(usable_cpus())
    bounds = [size * i // num_parts for i in range(num_parts + 1)]
    errstate = np.geterr()  # NumPy's error settings are per thread: the workers take the caller's
    jobs = [POOL.submit(with_errstate, errstate, fn, lo, hi)
            for lo, hi in zip(bounds[:-1], bounds[1:])]
    return [job.result() for job in jobs]  # (re-raises an exception from a thread, if any)


def adamw_threaded(param, grad, m, v, learning_rate, beta1, beta2, eps, weight_decay, t):
    # adamw_inplace on all cores, disjoint parts at once (a LayerNorm's parameters stay whole)
    def part(lo, hi):
        adamw_inplace(param[lo:hi], grad[lo:hi], m[lo:hi], v[lo:hi], learning_rate, beta1, beta2,
                      eps, weight_decay, t)
    on_all_cores(part, param.size, ADAMW_CHUNK)


def with_errstate(errstate, fn, *args):
    with np.errstate(**errstate):
        return fn(*args)


# ----------------------------------------------------------------------------
# the elementwise layers. Each works through its arrays in chunks of rows that stay in the cache,
# with scratch buffers of a chunk, on all cores; none makes a temporary of the activations' size.

LAYER_CHUNK = 1 << 17  # 128K floats a chunk, as AdamW's (the scratch buffers are as large)
GELU_SCALING_FACTOR = math.sqrt(2.0 / math.pi)  # train_gpt2's


def rows_per_chunk(row_size):
    return max(1, LAYER_CHUNK // row_size)


def flat(a):
    # a contiguous array as (rows, last axis), without a copy
    return a.reshape(-1, a.shape[-1])


def gelu_forward(inp):
    # train_gpt2.gelu_forward, the same operations in the same order, chunk by chunk
    x_all = np.ascontiguousarray(inp).reshape(-1)
    out = np.empty(inp.shape, dtype=inp.dtype)
    out_all = out.reshape(-1)

    def part(lo, hi):
        scratch = np.empty(min(LAYER_CHUNK, hi - lo), dtype=inp.dtype)
        for start in range(lo, hi, LAYER_CHUNK):
            chunk = slice(start, min(start + LAYER_CHUNK, hi))
            x, o = x_all[chunk], out_all[chunk]
            t = scratch[:x.size]
            np.multiply(x, 0.044715, out=t)  # 0.044715 * x * x * x
            t *= x
            t *= x
            t += x
            t *= GELU_SCALING_FACTOR
            np.tanh(t, out=t)
            t += 1.0
            np.multiply(x, 0.5, out=o)  # 0.5 * x * (1 + tanh(...))
            o *= t
    on_all_cores(part, x_all.size, LAYER_CHUNK)
    return out, inp  # the cache is the input, as the plain layer's


def gelu_backward(dout, cache):
    # train_gpt2.gelu_backward, the same operations in the same order, chunk by chunk
    x_all = np.ascontiguousarray(cache).reshape(-1)
    dout_all = np.ascontiguousarray(dout).reshape(-1)
    dinp = np.empty_like(dout_all)

    def part(lo, hi):
        scratch = np.empty((2, min(LAYER_CHUNK, hi - lo)), dtype=dinp.dtype)
        for start in range(lo, hi, LAYER_CHUNK):
            chunk = slice(start, min(start + LAYER_CHUNK, hi))
            x, d, o = x_all[chunk], dout_all[chunk], dinp[chunk]
            tanh_out, t = scratch[0, :x.size], scratch[1, :x.size]
            np.multiply(x, 0.044715, out=tanh_out)  # tanh(s * (x + 0.044715 * x * x * x))
            tanh_out *= x
            tanh_out *= x
            tanh_out += x
            tanh_out *= GELU_SCALING_FACTOR
            np.tanh(tanh_out, out=tanh_out)
            np.multiply(tanh_out, tanh_out, out=t)  # sech2 = 1 - tanh_out^2
            np.subtract(1.0, t, out=t)
            np.multiply(x, 0.5, out=o)  # x * 0.5 * sech2 * s * (1 + 3 * 0.044715 * x * x)
            o *= t
            o *= GELU_SCALING_FACTOR
            np.multiply(x, 3.0 * 0.044715, out=t)
            t *= x
            t += 1.0
            o *= t
            tanh_out += 1.0  # + 0.5 * (1 + tanh_out)
            tanh_out *= 0.5
            o += tanh_out
            o *= d  # local_grad * dout
    on_all_cores(part, dinp.size, LAYER_CHUNK)
    return dinp.reshape(dout.shape)


def layernorm_forward(inp, weight, bias):
    # train_gpt2.layernorm_forward, a chunk of rows at a time, normalizing in the output's memory
    eps = 1e-5
    C = inp.shape[-1]
    x_all = flat(np.ascontiguousarray(inp))
    out = np.empty(inp.shape, dtype=inp.dtype)
    mean = np.empty(inp.shape[:-1] + (1,), dtype=inp.dtype)  # (B,T,1)
    rstd = np.empty_like(mean)  # (B,T,1)
    out_all, mean_all, rstd_all = flat(out), flat(mean), flat(rstd)
    rows = rows_per_chunk(C)

    def part(lo, hi):
        for start in range(lo, hi, rows):
            r = slice(start, min(start + rows, hi))
            x, o, m, s = x_all[r], out_all[r], mean_all[r], rstd_all[r]
            np.mean(x, axis=-1, keepdims=True, out=m)
            np.subtract(x, m, out=o)  # xshift
            np.mean(o * o, axis=-1, keepdims=True, out=s)  # var (o * o: a chunk)
            s += eps
            np.sqrt(s, out=s)
            np.divide(1.0, s, out=s)  # rstd
            o *= s  # norm
            o *= weight
            o += bias
    on_all_cores(part, x_all.shape[0], rows)
    return out, (inp, weight, mean, rstd)


def layernorm_backward(dout, cache, dweight, dbias):
    # train_gpt2.layernorm_backward, a chunk of rows at a time; each part of the rows sums its own
    # dweight and dbias, and the parts are added at the end
    inp, weight, mean, rstd = cache
    C = inp.shape[-1]
    x_all, dout_all = flat(np.ascontiguousarray(inp)), flat(np.ascontiguousarray(dout))
    mean_all, rstd_all = flat(mean), flat(rstd)
    dinp = np.empty(inp.shape, dtype=dout.dtype)
    dinp_all = flat(dinp)
    rows = rows_per_chunk(C)

    def part(lo, hi):
        sums = np.zeros((2, C), dtype=dweight.dtype)  # this part's dbias, dweight
        scratch = np.empty((2, min(rows, hi - lo), C), dtype=dinp.dtype)
        for start in range(lo, hi, rows):
            r = slice(start, min(start + rows, hi))
            x, d, o = x_all[r], dout_all[r], dinp_all[r]
            norm, dnorm = scratch[0, :x.shape[0]], scratch[1, :x.shape[0]]
            np.subtract(x, mean_all[r], out=norm)  # recomputed
            norm *= rstd_all[r]
            sums[0] += d.sum(axis=0)
            np.multiply(d, norm, out=dnorm)
            sums[1] += dnorm.sum(axis=0)
            np.multiply(d, weight, out=dnorm)
            # dinp = (dnorm - mean(dnorm) - norm * mean(dnorm * norm)) * rstd
            np.multiply(dnorm, norm, out=o)
            dot = o.mean(axis=-1, keepdims=True)
            np.multiply(norm, dot, out=o)
            dnorm -= dnorm.mean(axis=-1, keepdims=True)
            np.subtract(dnorm, o, out=o)
            o *= rstd_all[r]
        return sums
    sums = on_all_cores(part, x_all.shape[0], rows)
    dbias[...] = sum(s[0] for s in sums)
    dweight[...] = sum(s[1] for s in sums)
    return dinp


def softmax_forward(logits, V):
    # train_gpt2.softmax_forward, a chunk of rows at a time (a row of GPT-2's 50,257 is one chunk)
    Vp = logits.shape[-1]
    logits_all = flat(np.ascontiguousarray(logits))
    probs = np.empty(logits.shape[:-1] + (V,), dtype=logits.dtype)  # (B,T,V)
    probs_all = flat(probs)
    rows = rows_per_chunk(Vp)

    def part(lo, hi):
        for start in range(lo, hi, rows):
            r = slice(start, min(start + rows, hi))
            lg, p = logits_all[r, :V], probs_all[r]
            np.subtract(lg, lg.max(axis=-1, keepdims=True), out=p)
            np.exp(p, out=p)
            p /= p.sum(axis=-1, keepdims=True)
    on_all_cores(part, probs_all.shape[0], rows)
    return probs


def attention_forward(inp, NH):
    # train_gpt2.attention_forward, with the scale, the mask and the softmax done in place in the
    # scores, a chunk of heads at a time, instead of in four temporaries of (B,NH,T,T)
    B, T, C3 = inp.shape
    C = C3 // 3
    hs = C // NH
    q, k, v = inp.reshape(B, T, 3, NH, hs).transpose(2, 0, 3, 1, 4)  # (B,T,3C) -> 3 x (B,NH,T,hs)
    att = q @ k.swapaxes(-1, -2)  # (B,NH,T,hs) @ (B,NH,hs,T) -> (B,NH,T,T)
    att_all = att.reshape(B * NH, T, T)
    above = ~np.tri(T, dtype=bool)  # (T,T), the positions t2 > t that t may not look at
    heads = rows_per_chunk(T * T)

    def part(lo, hi):
        for start in range(lo, hi, heads):
            a = att_all[start:min(start + heads, hi)]
            a *= 1.0 / math.sqrt(hs)
            np.copyto(a, -np.inf, where=above)
            np.subtract(a, a.max(axis=-1, keepdims=True), out=a)
            np.exp(a, out=a)
            a /= a.sum(axis=-1, keepdims=True)
    on_all_cores(part, B * NH, heads)
    out = att @ v  # (B,NH,T,T) @ (B,NH,T,hs) -> (B,NH,T,hs)
    out = out.transpose(0, 2, 1, 3).reshape(B, T, C)
    return out, (inp, att, NH)


# the faster forms use_device("cpu") puts in place of train_gpt2's plain layers, by name
FASTER_LAYERS = {
    "adamw": adamw_threaded, "gelu_forward": gelu_forward, "gelu_backward": gelu_backward,
    "layernorm_forward": layernorm_forward, "layernorm_backward": layernorm_backward,
    "softmax_forward": softmax_forward, "attention_forward": attention_forward,
}


def keep_freed_memory():
    # NumPy gets its arrays from malloc, and glibc's hands big freed blocks straight back to the
    # operating system: every step's activations (about 500 MB for GPT-2 124M) come back as fresh
    # pages, a page fault each, about 10% of a step. Keeping freed memory for reuse removes that,
    # at no cost in peak memory.
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc (macOS, Windows): nothing to tune
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from glibc's malloc.h
    libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)  # take blocks up to 1 GB from the reusable heap
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)  # and don't give the heap's free memory back
