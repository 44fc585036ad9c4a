"""
HellaSwag, scored as llm.c's train_gpt2.cu scores it (-h 1, llmc/dataloader.h's EvalLoader): its
eval file read and checked before any work (read_eval_file), the examples packed into batches of
whole examples (plan_batches), and each example's four endings compared by their mean loss over
the ending's tokens, the lowest winning (evalloader_stat_losses). The forward pass is the lesson's.

Unlike llm.c, the batches do not depend on -b and -t: they are as wide as their longest example and
hold as many examples as BATCH_POSITIONS allows. Planned from the file and the model's context
alone, they are the same on every process; several processes take turns at them, so N processes
score every example exactly as one process does.
"""

import sys
import time
from collections import namedtuple

import numpy as np

from llmc.formats import HEADER_INTS
from llmc.utils import InputError, check_file, to_host

# llm.c's eval file (dev/data/data_common.py's write_evalfile): a header of 256 int32 (magic,
# version, number of examples, the longest example in bytes), then per example a stream of uint16:
# 65535, its size in bytes, its index, its label, 4, then the context and each ending, each list
# after its length
EVAL_MAGIC, EVAL_VERSION = 20240522, 1
START_EXAMPLE = 65535
COMPLETIONS = 4  # llm.c's ASSUMED_NUM_COMPLETIONS
EVAL_HINT = ("write it with python prepro_hellaswag.py, or fetch llm.c's with "
             "python download_starter_pack.py --data")
# the rows times the width of one batch, at most: for GPT-2 124M about 2 GB for the forward pass's
# activations and probabilities (a single example wider than this still gets a batch of its own)
BATCH_POSITIONS = 2048

# one example: its index in the file, the correct ending, the context's and 4 endings' tokens
Example = namedtuple("Example", "index label context endings")


def read_eval_file(path, vocab_size):
    # every example of an llm.c eval file, each checked as llm.c's loader asserts, and a few more
    # things (sizes, tokens within the vocabulary): one error line, before any training step
    check_file(path, "HellaSwag file", EVAL_HINT)
    with open(path, "rb") as f:
        header = np.fromfile(f, dtype="<i4", count=HEADER_INTS)
        stream = np.fromfile(f, dtype="<u2")
    if header.size != HEADER_INTS:
        raise InputError(f"{path}: too short for llm.c's eval file (a {HEADER_INTS * 4}-byte header); {EVAL_HINT}")
    if header[0] != EVAL_MAGIC:
        raise InputError(f"{path}: bad magic {header[0]}, expected {EVAL_MAGIC} (llm.c's eval file); {EVAL_HINT}")
    if header[1] != EVAL_VERSION:
        raise InputError(f"{path}: unsupported eval file version {header[1]}, expected {EVAL_VERSION}; {EVAL_HINT}")
    num_examples = int(header[2])
    if num_examples <= 0:
        raise InputError(f"{path}: the header gives {num_examples} examples; {EVAL_HINT}")
    examples, pos, longest = [], 0, 0
    for i in range(num_examples):
        where = f"{path}: example {i} (at byte {HEADER_INTS * 4 + 2 * pos:,})"
        if pos + 3 > stream.size:
            raise InputError(f"{path}: truncated: the header gives {num_examples:,} examples, the file ends "
                             f"after {i:,}; {EVAL_HINT}")
        start, nbytes, index = (int(x) for x in stream[pos:pos + 3])
        if start != START_EXAMPLE or nbytes % 2 or nbytes < 2 * 6:
            raise InputError(f"{where}: corrupt (no start marker {START_EXAMPLE} and size); {EVAL_HINT}")
        if index != i:
            raise InputError(f"{where}: index {index} out of order (expected {i}); {EVAL_HINT}")
        if pos + nbytes // 2 > stream.size:
            raise InputError(f"{where}: truncated: the example needs {nbytes} bytes, the file ends first; "
                             f"{EVAL_HINT}")
        example = parse_example(stream[pos + 3:pos + nbytes // 2], i, where)
        if max(int(t.max()) for t in (example.context, *example.endings)) >= vocab_size:
            raise InputError(f"{where}: a token id beyond the model's vocab_size {vocab_size}")
        examples.append(example)
        pos += nbytes // 2
        longest = max(longest, nbytes)
    if pos != stream.size:
        raise InputError(f"{path}: {2 * (stream.size - pos):,} bytes after the last of the header's "
                         f"{num_examples:,} examples: corrupt; {EVAL_HINT}")
    if header[3] != longest:
        raise InputError(f"{path}: the header gives the longest example as {header[3]} bytes, but it is "
                         f"{longest}: corrupt; {EVAL_HINT}")
    return examples


def parse_example(body, i, where):
    # body: label, number of completions, then (length, tokens) for the context and each ending
    label, num_completions = int(body[0]), int(body[1])
    if num_completions != COMPLETIONS:
        raise InputError(f"{where}: {num_completions} completions, expected {COMPLETIONS} (as llm.c)")
    if label >= COMPLETIONS:
        raise InputError(f"{where}: label {label}, expected 0 to {COMPLETIONS - 1}")
    lists, p = [], 2
    for _ in range(1 + COMPLETIONS):
        n = int(body[p]) if p < body.size else 0
        if n == 0 or p + 1 + n > body.size:
            raise InputError(f"{where}: corrupt (an empty context or ending, or lengths beyond the example's "
                             f"size); {EVAL_HINT}")
        lists.append(body[p + 1:p + 1 + n].astype(np.int32))
        p += 1 + n
    if p != body.size:
        raise InputError(f"{where}: corrupt (its size says {2 * (body.size + 3)} bytes, its lengths "
                         f"{2 * (p + 3)}); {EVAL_HINT}")
    return Example(i, label, lists[0], lists[1:])


# ----------------------------------------------------------------------------
# batches: rows of context + ending, packed whole examples at a time


def width(example):
    # the positions one example needs: context + its longest ending, less the last token (which
    # predicts nothing that is scored)
    return len(example.context) + max(len(ending) for ending in example.endings) - 1


def plan_batches(examples, max_seq_len, positions=BATCH_POSITIONS):
    # the examples that fit the model's context, shortest first (so little of a batch is padding),
    # in batches of at most `positions` rows times width; returns (batches, number skipped)
    fits = sorted((e for e in examples if width(e) <= max_seq_len), key=lambda e: (width(e), e.index))
    batches, batch = [], []
    for example in fits:
        if batch and COMPLETIONS * (len(batch) + 1) * width(example) > positions:
            batches.append(batch)
            batch = []
        batch.append(example)
    if batch:
        batches.append(batch)
    return batches, len(examples) - len(fits)


def batch_arrays(batch):
    # inputs and targets (R,W) for R = 4 rows an example, and mask (R,W): True where a target is
    # one of the ending's tokens (from the context's last position on), as llm.c's evalloader
    R, W = COMPLETIONS * len(batch), max(width(e) for e in batch)
    # (padding comes after a row's tokens: attention is causal, so it changes nothing before it)
    inputs = np.zeros((R, W), dtype=np.int32)  # (R,W)
    targets = np.zeros((R, W), dtype=np.int32)
    mask = np.zeros((R, W), dtype=bool)
    for k, example in enumerate(batch):
        for c, ending in enumerate(example.endings):
            row, r = np.concatenate([example.context, ending]), COMPLETIONS * k + c
            inputs[r, :len(row) - 1] = row[:-1]
            targets[r, :len(row) - 1] = row[1:]
            mask[r, len(example.context) - 1:len(row) - 1] = True
    return inputs, targets, mask


def ending_mean_losses(losses, mask):
    # losses and mask (R,W) -> (R/4, 4): each row's mean loss over its ending's tokens
    sums = np.where(mask, losses, 0.0).sum(axis=1, dtype=np.float64)  # (R,)
    return (sums / mask.sum(axis=1)).reshape(-1, COMPLETIONS)


def predictions(means):
    # the ending with the lowest mean loss; the first on ties, as llm.c's strict `<`
    return np.argmin(means, axis=1)  # (examples,)


def score_batches(lesson, model, batches, progress=False):
    # the lesson's forward pass, no targets: only the probabilities are needed, and its caches
    # are let go of after each batch. Yields (batch, its mean losses (examples,4)).
    t0, done = time.perf_counter(), 0
    total = sum(COMPLETIONS * len(batch) * width(batch[-1]) for batch in batches)  # positions
    for i, batch in enumerate(batches):
        if progress and i % 10 == 0:  # (the ETA by positions: the widest batches come last)
            elapsed = time.perf_counter() - t0
            eta = f", ETA {elapsed / done * (total - done):.0f} s" if done else ""
            print(f"\revaluating HellaSwag: batch {i}/{len(batches)}, {elapsed:.0f} s{eta}   ",
                  end="", file=sys.stderr, flush=True)
        inputs, targets, mask = batch_arrays(batch)
        done += inputs.size
        lesson.gpt2_forward(model, inputs)
        probs, targets = model.acts["probs"], lesson.xp.asarray(targets)  # (R,W,V), (R,W)
        losses = lesson.crossentropy_forward(probs, targets)  # (R,W)
        model.acts = None  # nothing is kept: no backward pass follows
        yield batch, ending_mean_losses(to_host(losses), mask)
    if progress:
        print(f"\revaluating HellaSwag: {len(batches)} batches in {time.perf_counter() - t0:.0f} s" + " " * 20,
              file=sys.stderr, flush=True)


class HellaSwag:
    """An eval file, read and planned into batches for a model's context (made by run.setup)."""

    def __init__(self, path, max_seq_len, vocab_size):
        self.path = path
        examples = read_eval_file(path, vocab_size)
        self.batches, self.skipped = plan_batches(examples, max_seq_len)
        self.num_examples = len(examples) - self.skipped  # those scored
        if not self.batches:
            raise InputError(f"{path}: every one of its {len(examples):,} examples is longer than the model's "
                             f"context ({max_seq_len} positions)")

    def describe(self):
        skipped = (f"; {self.skipped:,} skipped, longer than the model's context" if self.skipped else "")
        batches = f"{len(self.batches):,} batch{'es' if len(self.batches) > 1 else ''}"
        return f"HellaSwag: {self.num_examples:,} examples in {batches}{skipped}"

    def evaluate(self, lesson, model, procs):
        # the number of examples whose lowest mean loss is the label's, over all processes: each
        # takes every procs.size-th batch, and the counts are added up
        correct = 0
        mine = self.batches[procs.rank::procs.size]
        for batch, means in score_batches(lesson, model, mine, progress=procs.is_main and len(mine) > 10):
            labels = np.array([example.label for example in batch])
            correct += int((predictions(means) == labels).sum())
        return round(procs.mean(correct) * procs.size)  # the sum of exact integers
