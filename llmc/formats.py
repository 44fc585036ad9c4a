"""
llm.c's file formats, byte for byte, and their checks: checkpoints, token files, and the run state
that lets a run resume exactly. Each starts with a header of 256 int32 (the run state: 128 uint64).
"""

import os
import re

import numpy as np

from llmc.utils import InputError, all_finite, atomic_write, check_file, check_file_size, to_host

HEADER_INTS = 256  # every llm.c file starts with a header of 256 int32

# ----------------------------------------------------------------------------
# checkpoints: the header, then every parameter as float32, in the order of the parameter table

CHECKPOINT_MAGIC, CHECKPOINT_VERSION = 20240326, 3
CHECKPOINT_HINT = ("fetch llm.c's starter pack with --download (GPT-2 124M), convert Hugging Face weights "
                   "with dev/convert_hf.py, or train from scratch with --init d6")
# the model's shape as the header holds it (after magic and version), in GPT2Config's order
CONFIG_FIELDS = ("max_seq_len", "vocab_size", "padded_vocab_size", "num_layers", "num_heads", "channels")


def read_header(path, f, what):
    header = np.fromfile(f, dtype="<i4", count=HEADER_INTS)
    if header.size != HEADER_INTS:
        raise InputError(f"{path}: file too short for a {what} (expected a {HEADER_INTS * 4}-byte header)")
    return header


def describe_config(config):
    # "max_seq_len: 1024, vocab_size: 50257, ...": llm.c's printout of a model's shape
    return ", ".join(f"{name}: {value}" for name, value in config.items())


def read_checkpoint_header(path, hint=CHECKPOINT_HINT):
    # the model's shape from a checkpoint's header, as {field: value}, checked (the size of the file
    # is checked by whoever knows how many parameters that shape has)
    check_file(path, "checkpoint", hint)
    with open(path, "rb") as f:
        header = read_header(path, f, "GPT-2 checkpoint")
    if header[0] != CHECKPOINT_MAGIC:
        raise InputError(f"{path}: bad magic {header[0]}, expected {CHECKPOINT_MAGIC} (an llm.c GPT-2 checkpoint)")
    version = int(header[1])
    if version not in (1, 3):
        raise InputError(f"{path}: unsupported checkpoint version {version}; versions 3 (fp32, "
                         f"padded vocab) and 1 (fp32) are supported: re-run llm.c's train_gpt2.py to regenerate it")
    maxT, V, L, NH, C = (int(x) for x in header[2:7])
    Vp = int(header[7]) if version == 3 else V  # version 1 had no padding
    config = dict(zip(CONFIG_FIELDS, (maxT, V, Vp, L, NH, C)))
    if min(maxT, V, L, NH, C) <= 0 or C % NH != 0 or Vp < V:
        raise InputError(f"{path}: nonsensical header ({describe_config(config)}): sizes must be positive, "
                         f"channels divisible by num_heads, padded_vocab_size >= vocab_size")
    return config


def check_checkpoint_size(path, config, num_parameters):
    check_file_size(path, HEADER_INTS * 4 + num_parameters * 4, f"its header ({config})")


def checkpoint_header(config):
    # the 1024 bytes before the weights of llm.c's checkpoint format, version 3
    c = config
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:8] = [CHECKPOINT_MAGIC, CHECKPOINT_VERSION, c.max_seq_len, c.vocab_size,
                  c.num_layers, c.num_heads, c.channels, c.padded_vocab_size]
    return header.tobytes()


# ----------------------------------------------------------------------------
# token files: the header (magic, version, count), then uint16 tokens

TOKENS_MAGIC, TOKENS_VERSION = 20240520, 1


def tokens_header(count, magic=TOKENS_MAGIC, version=TOKENS_VERSION, *more):
    # the 1024 bytes before uint16 tokens: magic, version, count (and more, for an eval file)
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3 + len(more)] = [magic, version, count, *more]
    return header.tobytes()


def write_tokens(path, tokens, header=None):
    # an llm.c token file, written atomically: the header (by default a token file's), the tokens
    with atomic_write(path) as f:
        f.write(tokens_header(len(tokens)) if header is None else header)
        f.write(np.asarray(tokens, dtype="<u2").tobytes())


def read_tokens(path, vocab_size):
    # a token file as a NumPy array (a memory map: only what is read is loaded). Older llm.c files
    # have no header: just int32 tokens.
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
            raise InputError(f"{path}: file is {size:,} bytes, but its header says {ntok:,} tokens "
                             f"({expected_size:,} bytes)")
        if not ntok:
            return np.zeros(0, np.uint16)
        tokens = np.memmap(path, dtype="<u2", mode="r", offset=HEADER_INTS * 4, shape=(ntok,))
        if tokens.max() >= vocab_size:
            raise InputError(f"{path}: has token ids up to {tokens.max()}, but the model's vocab size is {vocab_size}")
        return tokens
    # no magic: perhaps the older headerless format, but only if every value is a token id
    tokens = np.memmap(path, dtype="<i4", mode="r") if size and size % 4 == 0 else None
    if tokens is None or tokens.min() < 0 or tokens.max() >= vocab_size:
        raise InputError(f"{path}: not an llm.c token file (expected magic {TOKENS_MAGIC}, or the older "
                         f"headerless int32 tokens, all below the vocab size {vocab_size})")
    return tokens


# ----------------------------------------------------------------------------
# the run state: what a run needs besides the checkpoint to continue exactly where it stopped.
# Every --save-every steps a run writes model_<steps>.bin, then state_<steps>.bin, each atomically:
# a pair whose state exists is complete.

RUN_STATE_MAGIC, RUN_STATE_VERSION = 20261122, 2  # version 1 (no loader position) still loads
RUN_STATE_HEADER = 128  # uint64 values: 1024 bytes, like llm.c's headers


def write_run_state(path, model, steps_done, train_loader, rng_state, position=None):
    # header: magic, version, steps done, number of parameters, B, T, the loader's next sample, the
    # sampler's RNG state, the number of processes, the length of the loader's position; then the
    # position (llmc/dataloader.py: shard, sample, epoch, shard order, shuffle state; by default the
    # lesson's one file, in order), then AdamW's m and v. B counts the rows of all processes: N
    # processes with -b B/N read the data as one with -b B, so either can resume the other's run.
    n = model.params_memory.size
    if position is None:
        position = np.array([0, 0, 0, train_loader.current_batch, 1, 0], dtype="<u8")
    position = np.asarray(position, dtype="<u8")
    header = np.zeros(RUN_STATE_HEADER, dtype="<u8")
    header[:10] = [RUN_STATE_MAGIC, RUN_STATE_VERSION, steps_done, n,
                   train_loader.num_processes * train_loader.B, train_loader.T, position[3],
                   rng_state[0], train_loader.num_processes, position.size]
    zeros = np.zeros(n, dtype=np.float32)  # no update yet: the moments are still zero
    with atomic_write(path) as f:
        f.write(header.tobytes())
        f.write(position.tobytes())
        for moment in (model.m_memory, model.v_memory):
            f.write(zeros.tobytes() if moment is None else to_host(moment).astype("<f4", copy=False).tobytes())


def read_run_state(path, num_parameters):
    # the reverse: (steps done, B, T, next sample, RNG state, loader position, m, v), the last three
    # NumPy arrays; a version 1 state (one file, in order) gets the position that means the same
    check_file(path, "run state", "it is written next to model_<step>.bin by --output-dir")
    n = num_parameters
    with open(path, "rb") as f:
        header = np.fromfile(f, dtype="<u8", count=RUN_STATE_HEADER)
        if (header.size != RUN_STATE_HEADER or header[0] != RUN_STATE_MAGIC
                or header[1] not in (1, RUN_STATE_VERSION)):
            raise InputError(f"{path}: not a run state of this trainer (expected magic {RUN_STATE_MAGIC}, "
                             f"version {RUN_STATE_VERSION} or 1)")
        words = int(header[9]) if header[1] == 2 else 0
        expected_size = RUN_STATE_HEADER * 8 + words * 8 + 2 * n * 4
        actual_size = os.fstat(f.fileno()).st_size
        if header[3] != n or actual_size != expected_size:
            raise InputError(f"{path}: holds {header[3]:,} parameters in {actual_size:,} bytes, but its model has "
                             f"{n:,} ({expected_size:,} bytes expected)")
        position = np.fromfile(f, dtype="<u8", count=words)
        m = np.fromfile(f, dtype="<f4", count=n)
        v = np.fromfile(f, dtype="<f4", count=n)
    # AdamW's moments: finite, and the second a mean of squares, never negative
    if not (all_finite(m) and all_finite(v) and v.min() >= 0):
        raise InputError(f"{path}: AdamW's moments hold inf, nan or a negative second moment: not a state to resume")
    steps_done, _, B, T, next_batch, rng = (int(x) for x in header[2:8])
    if header[1] == 1:
        position = np.array([0, 0, 0, next_batch, 1, 0], dtype="<u8")
    return steps_done, B, T, next_batch, rng, position, m, v


def latest_checkpoint(run_dir):
    # the most steps for which both model_<steps>.bin and state_<steps>.bin are files (or None).
    # Only the names this trainer writes count: no leading zeros, ASCII digits (temporary files of
    # an interrupted write end in .tmp.<pid>, and look-alikes such as state_007.bin are ignored)
    if not os.path.isdir(run_dir):
        raise InputError(f"--resume {run_dir}: not a directory")
    names = set(os.listdir(run_dir))
    steps = [int(match[1]) for match in map(CHECKPOINT_NAME.fullmatch, names) if match
             and match[0].startswith("state_") and f"model_{match[1]}.bin" in names
             and all(os.path.isfile(os.path.join(run_dir, f"{kind}_{match[1]}.bin")) for kind in ("model", "state"))]
    return max(steps, default=None)


CHECKPOINT_NAME = re.compile(r"(?:model|state)_(0|[1-9][0-9]*)\.bin", re.ASCII)
