"""
llm.c's random numbers (llmc/rand.h): the Mersenne Twister mt19937 as PyTorch seeds it, its
normal_ (Box-Muller over 16 floats at a time) and random_permutation. NumPy's MT19937 with its
legacy seeding is the same generator, so its raw 32-bit outputs are llm.c's randint32, drawn in
bulk instead of one call at a time.
"""

import math

import numpy as np


def manual_seed(seed):
    # llm.c's manual_seed: a generator whose random_raw() returns randint32's stream
    generator = np.random.MT19937()
    generator._legacy_seeding(seed)
    return generator


def randint32(generator, n):
    # the next n values of randint32, as int64 (n at once)
    return generator.random_raw(n).astype(np.int64)


def randfloat32(generator, n):
    # randint32's low 24 bits over 2^24: uniform floats in [0, 1), as float32 (exactly)
    return ((generator.random_raw(n) & 0xFFFFFF).astype(np.float32) * np.float32(1.0 / (1 << 24)))


def box_muller_16(u, mean, std):
    # normal_fill_16 on rows of 16 uniforms: the first 8 give the radii, the last 8 the angles.
    # float32 as in C; log, cos and sin in float64, rounded once. glibc's logf, cosf and sinf are
    # not always correctly rounded: about 1% of values differ from llm.c's, by a few float32 ulps
    f32 = np.float32
    u1 = f32(1) - u[:, :8]
    radius = np.sqrt(f32(-2) * np.log((u1 + f32(1e-12)).astype(np.float64)).astype(f32))
    theta = (2.0 * math.pi * u[:, 8:].astype(np.float64)).astype(f32)  # (float)(2.0 * M_PI * u2)
    theta = theta.astype(np.float64)
    cos, sin = np.cos(theta).astype(f32), np.sin(theta).astype(f32)
    return np.concatenate([radius * cos * f32(std) + f32(mean), radius * sin * f32(std) + f32(mean)], axis=1)


def normal_(out, mean, std, generator, chunk=1 << 20):
    # llm.c's normal_(data, numel, mean, std, state) into the float32 array out (contiguous), in
    # place. numel >= 16: numel uniforms drawn, turned into normals 16 at a time; if numel is not a
    # multiple of 16, 16 more uniforms are drawn and replace the last 16 values.
    data = out.reshape(-1)  # (a view: out must be contiguous)
    n = data.size
    if n < 16:
        return _normal_small(data, mean, std, generator)
    full = n // 16 * 16
    for start in range(0, full, chunk):  # chunk is a multiple of 16: the rows of 16 don't split
        stop = min(start + chunk, full)
        u = randfloat32(generator, stop - start).reshape(-1, 16)
        data[start:stop] = box_muller_16(u, mean, std).reshape(-1)
    if n % 16:
        generator.random_raw(n % 16)  # drawn, then overwritten, as in llm.c
        data[n - 16:] = box_muller_16(randfloat32(generator, 16).reshape(1, 16), mean, std).reshape(-1)


def _normal_small(data, mean, std, generator):
    # numel < 16: a pair of doubles (53 random bits from two randint32) per pair of values
    f32 = np.float32
    pending = None
    for t in range(data.size):
        if pending is not None:
            data[t], pending = f32(pending * std + mean), None
            continue
        hi_lo = generator.random_raw(4)
        u1, u2 = ((int(hi_lo[2 * k]) << 32 | int(hi_lo[2 * k + 1])) & ((1 << 53) - 1) for k in range(2))
        u1, u2 = f32(u1 / (1 << 53)), f32(u2 / (1 << 53))
        radius = np.sqrt(f32(-2) * f32(math.log(float(f32(1) - u2 + f32(1e-12)))))
        theta = f32(2.0 * math.pi * float(u1))
        pending = float(radius * f32(math.sin(float(theta))))  # a double in C
        data[t] = radius * f32(math.cos(float(theta))) * f32(std) + f32(mean)


def random_permutation(data, generator):
    # llm.c's random_permutation, in place: Fisher-Yates from the end, j = randint32 % (i + 1).
    # The draws come in one call; the swaps depend on each other, so they run one by one.
    n = len(data)
    if n < 2:
        return data
    bounds = np.arange(n, 1, -1, dtype=np.int64)  # i + 1 for i = n-1 .. 1
    js = (randint32(generator, n - 1) % bounds).tolist()
    items = list(data)
    for i, j in zip(range(n - 1, 0, -1), js):
        items[i], items[j] = items[j], items[i]
    data[:] = items
    return data
