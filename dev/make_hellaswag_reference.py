"""
The independent oracle for --hellaswag: a small eval file in llm.c's format, and each example's four
mean losses scored by PyTorch the way llm.c's dev/data/hellaswag.py scores them (the 4 rows context
+ ending, the per-token losses shifted by one, the mean over the ending's tokens, the lowest wins).
tests/test_hellaswag.py checks train_gpt2.py's scoring against it.

Dev only: it needs PyTorch (`pip install torch==2.13.0`, the CPU build); the trainer doesn't.

    python dev/make_hellaswag_reference.py     # tests/fixtures/hellaswag_tiny.bin and _expected.json

The model is the committed tiny GPT-2 (tests/fixtures/tiny_gpt2.bin: V = 777, maxT = 64), read with
this script's own reader into dev/make_reference.py's PyTorch GPT-2; nothing of train_gpt2.py or
llmc/ is used. The examples are random tokens below 777, of random lengths: contexts of 1 to 40
tokens, endings of 1 to 24, plus one example exactly as wide as the model's context (it fits) and
two one position wider (skipped). Even-numbered examples are labelled with PyTorch's answer; the
others with the answer of a plausible mistake where it differs (the mean over the whole row, or the
sum over the ending, llm.c's unnormalized "acc"), else at random: so the count is neither 0 nor all,
and either mistake changes it. Every example's two lowest means are at least 1e-4 apart, so float32
rounding cannot change an answer. PyTorch computes in float64.
"""

import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_reference import GPT, LLMC_LAYOUT, load_llmc_params  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures")
NUM_EXAMPLES = 40
TOO_WIDE = (17, 29)  # the indices of the examples one position wider than the context
EXACT = 23  # the index of the example exactly as wide as the context


def read_llmc_checkpoint(path):
    # llm.c's checkpoint (version 3): the shape from the header, then the 16 tensors in order
    header = np.fromfile(path, dtype="<i4", count=256)
    assert header[0] == 20240326 and header[1] == 3, "not an llm.c fp32 checkpoint"
    maxT, V, L, NH, C, Vp = (int(x) for x in header[2:8])
    shapes = {"wte": (Vp, C), "wpe": (maxT, C), "ln1w": (L, C), "ln1b": (L, C), "qkvw": (L, 3 * C, C),
              "qkvb": (L, 3 * C), "attprojw": (L, C, C), "attprojb": (L, C), "ln2w": (L, C), "ln2b": (L, C),
              "fcw": (L, 4 * C, C), "fcb": (L, 4 * C), "fcprojw": (L, C, 4 * C), "fcprojb": (L, C),
              "lnfw": (C,), "lnfb": (C,)}
    data, params, at = np.fromfile(path, dtype="<f4", offset=1024), {}, 0
    for name, _ in LLMC_LAYOUT:
        n = int(np.prod(shapes[name]))
        params[name] = data[at:at + n].reshape(shapes[name])
        at += n
    assert at == data.size
    return (V, maxT, L, NH, C), params


def random_example(rng, maxT, width=None):
    # a context and 4 endings of random tokens; with width, context + longest ending - 1 == width
    context = rng.integers(0, 777, rng.integers(1, 41)).tolist()
    endings = [rng.integers(0, 777, rng.integers(1, 25)).tolist() for _ in range(4)]
    if width is not None:
        endings[1] = rng.integers(0, 777, 24).tolist()  # the longest ending
        context = rng.integers(0, 777, width + 1 - 24).tolist()
    return context, endings


@torch.no_grad()
def mean_losses(model, context, endings):
    # llm.c's hellaswag.py, for one example: rows context + ending, padded; the losses of the
    # shifted tokens; the mean over the mask's ending positions. The last column is only ever a
    # target, so the rows go in without it (so an example as wide as the context fits wpe).
    rows = [context + ending for ending in endings]
    n = max(len(row) for row in rows)
    tokens = torch.zeros((4, n), dtype=torch.long)
    mask = torch.zeros((4, n), dtype=torch.long)
    for i, row in enumerate(rows):
        tokens[i, :len(row)] = torch.tensor(row)
        mask[i, len(context):len(row)] = 1
    logits, _ = model(tokens[:, :-1], tokens[:, 1:])  # (4,n-1,V)
    losses = F.cross_entropy(logits.reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1), reduction="none")
    losses = losses.view(4, n - 1)
    shift_mask = mask[:, 1:]
    sums = (losses * shift_mask).sum(dim=1)
    # and two plausible mistakes' answers: the whole row's mean, the ending's sum
    row_mask = torch.zeros_like(shift_mask)
    for i, row in enumerate(rows):
        row_mask[i, :len(row) - 1] = 1
    mistakes = [int((losses * row_mask).sum(dim=1).div(row_mask.sum(dim=1)).argmin()), int(sums.argmin())]
    return (sums / shift_mask.sum(dim=1)).tolist(), mistakes


def write_evalfile(path, examples):
    # llm.c's eval format, written out here on its own
    streams = []
    for index, (context, endings, label) in enumerate(examples):
        stream = [65535, 0, index, label, 4, len(context), *context]
        for ending in endings:
            stream += [len(ending), *ending]
        stream[1] = 2 * len(stream)
        streams.append(stream)
    header = np.zeros(256, dtype="<i4")
    header[:4] = [20240522, 1, len(streams), max(s[1] for s in streams)]
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.array([t for s in streams for t in s], dtype="<u2").tobytes())


def main():
    (V, maxT, L, NH, C), params = read_llmc_checkpoint(os.path.join(FIXTURES, "tiny_gpt2.bin"))
    model = GPT(V, maxT, L, NH, C)
    load_llmc_params(model, params)
    model.double().eval()
    rng = np.random.default_rng(20)
    examples, expected = [], []
    while len(examples) < NUM_EXAMPLES:
        i = len(examples)
        width = maxT + 1 if i in TOO_WIDE else maxT if i == EXACT else None
        context, endings = random_example(rng, maxT, width)
        if i in TOO_WIDE:  # skipped: not scored
            examples.append((context, endings, int(rng.integers(0, 4))))
            expected.append(None)
            continue
        means, mistakes = mean_losses(model, context, endings)
        lowest = sorted(means)
        if lowest[1] - lowest[0] < 1e-4:
            continue  # too close to call in float32: draw another
        right = int(np.argmin(means))
        wrong = [m for m in mistakes if m != right]
        label = right if i % 2 == 0 else wrong[0] if wrong else int(rng.integers(0, 4))
        examples.append((context, endings, label))
        expected.append(means)
    write_evalfile(os.path.join(FIXTURES, "hellaswag_tiny.bin"), examples)
    scored = [(m, e[2]) for m, e in zip(expected, examples) if m is not None]
    correct = sum(int(np.argmin(m)) == label for m, label in scored)
    with open(os.path.join(FIXTURES, "hellaswag_tiny_expected.json"), "w") as f:
        json.dump({"correct": correct, "scored": len(scored), "skipped": len(examples) - len(scored),
                   "mean_losses": expected}, f, indent=1)
        f.write("\n")
    print(f"HellaSwag: {correct}/{len(scored)} = {correct / len(scored):f} ({len(examples) - len(scored)} skipped)")
    for name in ("hellaswag_tiny.bin", "hellaswag_tiny_expected.json"):
        path = os.path.join(FIXTURES, name)
        print(f"wrote {path} ({os.path.getsize(path):,} bytes)")


if __name__ == "__main__":
    main()
