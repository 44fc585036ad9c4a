"""
Speed on the CPU, beside the plain layers of train_gpt2.py: AdamW in cache-sized chunks on all
cores, and malloc tuned to keep freed memory. use_device("cpu") installs FASTER_LAYERS.
"""

import ctypes
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


ADAMW_POOL = None  # adamw_threaded's threads, started on first use and kept


def adamw_threaded(param, grad, m, v, learning_rate, beta1, beta2, eps, weight_decay, t):
    # adamw_inplace on all cores: NumPy lets go of the GIL inside its loops, so threads can update
    # disjoint parts at once. A part per core, none smaller than a chunk (a LayerNorm stays whole).
    global ADAMW_POOL
    num_parts = max(1, min(usable_cpus(), param.size // ADAMW_CHUNK))
    if num_parts == 1:
        return adamw_inplace(param, grad, m, v, learning_rate, beta1, beta2, eps, weight_decay, t)
    if ADAMW_POOL is None:
        ADAMW_POOL = ThreadPoolExecutor(usable_cpus())
    bounds = [param.size * i // num_parts for i in range(num_parts + 1)]
    errstate = np.geterr()  # NumPy's error settings are per thread: the workers take the caller's
    jobs = [ADAMW_POOL.submit(with_errstate, errstate, adamw_inplace, param[lo:hi], grad[lo:hi], m[lo:hi],
                              v[lo:hi], learning_rate, beta1, beta2, eps, weight_decay, t)
            for lo, hi in zip(bounds[:-1], bounds[1:])]
    for job in jobs:
        job.result()  # (re-raises an exception from the thread, if any)


def with_errstate(errstate, fn, *args):
    with np.errstate(**errstate):
        return fn(*args)


# the faster forms use_device("cpu") puts in place of train_gpt2's plain layers, by name
FASTER_LAYERS = {"adamw": adamw_threaded}


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
