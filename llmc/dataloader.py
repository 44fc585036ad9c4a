"""
llm.c's data loader (llmc/dataloader.h) for shards: a file or a glob pattern of llm.c token
files, batches crossing from shard to shard, and with shuffling llm.c's order exactly (mt19937
seeded 42: the shards permuted at each epoch, the samples of each shard as it is loaded).
train_gpt2.py's DataLoader is the same loader for one file, in order: the one to read first.

Unlike llm.c, which seeds rank r with 42 + r, every process draws the same permutations: N
processes with -b B read exactly what one process with -b N*B reads, so a run can resume with
another number of processes.
"""

import glob
import os

import numpy as np

from llmc.formats import read_tokens
from llmc.rand import manual_seed, random_permutation
from llmc.utils import InputError

SHUFFLE_SEED = 42  # llm.c's
# the loader's position in a run state: shuffle, epoch, shard, sample, number of shards, then the
# shard order, then the mt19937 state before the current shard's samples were permuted
POSITION_WORDS = 5


def shard_paths(pattern, option):
    # the shards a --train-data/--val-data names: the file itself, or the sorted matches of a glob
    # pattern (as llm.c's glob(3) sorts them)
    if os.path.isfile(pattern) or not glob.has_magic(pattern):
        return [pattern]  # (read_tokens says what is wrong with a missing file)
    paths = sorted(path for path in glob.glob(pattern) if os.path.isfile(path))
    if not paths:
        raise InputError(f"{option} {pattern}: no files match the pattern")
    return paths


class ShardedDataLoader:
    """llm.c's DataLoader: batches of B*T+1 tokens from shards; with several processes, a batch
    has num_processes * B rows and this rank takes its B. next_batch() and reset() as the lesson's."""

    def __init__(self, pattern, B, T, vocab_size, rank=0, num_processes=1, shuffle=False, option="--train-data"):
        self.B, self.T, self.rank, self.num_processes, self.shuffle = B, T, rank, num_processes, shuffle
        self.paths = shard_paths(pattern, option)
        rows = num_processes * B  # of a batch, over all processes
        self.shards, self.shard_samples = [], []
        for path in self.paths:  # every shard checked before training, as in dataloader_init
            tokens = read_tokens(path, vocab_size)  # magic, version, size, ids < V; memory-mapped
            if len(tokens) < rows * T + 1:
                raise InputError(f"{path}: has {len(tokens)} tokens, fewer than one batch needs "
                                 f"(B*T+1 = {rows * T + 1})")
            self.shards.append(tokens)
            # (the +1 target token may overlap the next sample)
            self.shard_samples.append((len(tokens) - 1) // (rows * T))
        self.num_tokens = sum(len(tokens) for tokens in self.shards)
        self.num_batches = sum(self.shard_samples)  # per epoch
        self.rng = manual_seed(SHUFFLE_SEED) if shuffle else None
        self.shard_order = list(range(len(self.paths)))  # llm.c's shard_indices
        self.epoch = -1
        self.reset()

    def reset(self):
        # llm.c's dataloader_reset: back to the first shard, a new epoch (shuffled: a new order)
        self.epoch += 1
        if self.shuffle:
            random_permutation(self.shard_order, self.rng)
        self.load_shard(0)

    def load_shard(self, shard_idx):
        # the shard_idx-th shard of the epoch; shuffled: its samples in a new random order
        self.current_shard, self.current_sample = shard_idx, 0
        self.tokens = self.shards[self.shard_order[shard_idx]]
        self.num_samples = self.shard_samples[self.shard_order[shard_idx]]
        self.sample_order = None
        if self.shuffle:
            self.rng_before_shard = self.rng.state  # what rebuilds sample_order on resume
            self.sample_order = random_permutation(list(range(self.num_samples)), self.rng)

    def next_batch(self):
        # past the end of a shard: the next one; past the last shard: a new epoch
        if self.current_sample >= self.num_samples:
            if self.current_shard == len(self.paths) - 1:
                self.reset()
            else:
                self.load_shard(self.current_shard + 1)
        i = self.current_sample
        sample = self.sample_order[i] if self.shuffle else i
        B, T = self.B, self.T
        start = (sample * self.num_processes + self.rank) * B * T  # this process's rows
        buf = np.asarray(self.tokens[start:start + B * T + 1], dtype=np.int32)  # (B*T+1,)
        self.current_sample += 1
        return buf[:-1].reshape(B, T), buf[1:].reshape(B, T)  # inputs, targets: (B,T) each

    # ------------------------------------------------------------------------
    # the position, for the run state: enough to go on exactly, across shards and epochs

    def position(self):
        # uint64 words: shuffle, epoch, shard, sample, number of shards, the shard order, and
        # (shuffled) the mt19937 state before this shard's permutation: its position, 624 words
        words = [int(self.shuffle), self.epoch, self.current_shard, self.current_sample, len(self.paths)]
        words += self.shard_order
        if self.shuffle:
            state = self.rng_before_shard["state"]
            words += [state["pos"], *state["key"].tolist()]
        return np.array(words, dtype="<u8")

    def restore(self, words, where):
        words = [int(w) for w in words]
        shuffle, epoch, shard, sample, num_shards = words[:POSITION_WORDS]
        if bool(shuffle) != self.shuffle:
            raise InputError(f"{where}: the run was {'' if shuffle else 'not '}shuffled: resume it "
                             f"{'with' if shuffle else 'without'} --shuffle")
        if num_shards != len(self.paths):
            raise InputError(f"{where}: the run read {num_shards} training shards, --train-data has "
                             f"{len(self.paths)} now: resume it with the same data")
        order = words[POSITION_WORDS:POSITION_WORDS + num_shards]
        if sorted(order) != list(range(num_shards)) or shard >= num_shards:
            raise InputError(f"{where}: the data loader's position is damaged")
        self.shard_order, self.epoch = order, epoch
        if shuffle:
            state = self.rng.state
            key = np.array(words[POSITION_WORDS + num_shards + 1:], dtype=np.uint32)
            state["state"] = {"key": key, "pos": words[POSITION_WORDS + num_shards]}
            self.rng.state = state
        self.load_shard(shard)  # (shuffled: the same permutation again, from the same state)
        if sample > self.num_samples:
            raise InputError(f"{where}: sample {sample} of a shard with {self.num_samples}: "
                             f"resume it with the same data, -b and -t")
        self.current_sample = sample


def loader_position(loader):
    # the position of either loader: the lesson's DataLoader is one shard, in order
    if isinstance(loader, ShardedDataLoader):
        return loader.position()
    return np.array([0, 0, 0, loader.current_batch, 1, 0], dtype="<u8")


def restore_loader(loader, words, where):
    if isinstance(loader, ShardedDataLoader):
        return loader.restore(words, where)
    shuffle, _, shard, sample, num_shards = (int(w) for w in words[:POSITION_WORDS])
    if shuffle or num_shards != 1:
        raise InputError(f"{where}: the run read shards{' shuffled' if shuffle else ''}: resume it "
                         f"with the same --train-data{' and --shuffle' if shuffle else ''}")
    loader.current_batch = sample
