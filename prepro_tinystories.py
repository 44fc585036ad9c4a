"""
Tokenizes TinyStories into llm.c's token files, as llm.c's dev/data/tinystories.py does (GPT-2).

    python prepro_tinystories.py                       # downloads TinyStories_all_data.tar.gz
    python prepro_tinystories.py --input DIR_OR_TAR    # or a local copy: the .tar.gz or its *.json

The *.json shards in sorted order: shard 0 is validation, the rest training. The stories of the
k-th shard of a split are shuffled with random.Random(1337 + k), and each stripped story follows
an <|endoftext|> token. Byte-identical to llm.c's output with its shards taken in sorted order;
llm.c appends the training shards as their workers finish (as_completed), so its own output
varies from run to run, while ours is always the same. Shards are tokenized on all cores and
written as they come, in order: the 925M training tokens are never all in memory.
"""

import glob
import json
import multiprocessing
import os
import random
import sys
import tarfile

import numpy as np

from llmc.formats import tokens_header
from llmc.utils import InputError, atomic_write
from download_starter_pack import ArgumentParser  # one line for a bad option, exit status 2

URL = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStories_all_data.tar.gz"
EOT = 50256  # GPT-2's <|endoftext|>


def tokenize_shard(job):
    # the tokens of one shard (k: its index within its split), as llm.c's process_shard
    k, name, data = job
    import tiktoken
    enc = tiktoken.get_encoding("gpt2")
    stories = json.loads(data)
    random.Random(1337 + k).shuffle(stories)
    tokens = []
    for story in stories:
        tokens.append(EOT)
        tokens.extend(enc.encode_ordinary(story["story"].strip()))
    return np.array(tokens, dtype="<u2")


def read_shards(path):
    # (name, bytes) of every *.json shard, sorted by name: from a folder or the .tar.gz
    if os.path.isdir(path):
        names = sorted(glob.glob(os.path.join(path, "*.json")))
        return [(name, lambda name=name: open(name, "rb").read()) for name in names]
    if not tarfile.is_tarfile(path):
        raise InputError(f"--input {path}: neither a folder of *.json shards nor a .tar.gz of them")
    tar = tarfile.open(path)
    members = sorted((m for m in tar.getmembers() if m.isfile() and m.name.endswith(".json")), key=lambda m: m.name)
    return [(m.name, lambda m=m: tar.extractfile(m).read()) for m in members]


def write_split(path, shards, processes):
    # tokenize the shards in parallel, writing each one's tokens in order; then the header's count
    count = 0
    with atomic_write(path) as f:
        f.write(tokens_header(0))  # (the count is known at the end)
        jobs = ((k, name, read()) for k, (name, read) in enumerate(shards))
        with multiprocessing.Pool(processes) as pool:
            for tokens in pool.imap(tokenize_shard, jobs):
                f.write(tokens.tobytes())
                count += tokens.size
        f.seek(0)
        f.write(tokens_header(count))
    print(f"writing {count:,} tokens to {path}")


def main(argv=None):
    parser = ArgumentParser(description="Tokenize TinyStories into llm.c's token files (GPT-2).")
    parser.add_argument("--input", help="TinyStories_all_data.tar.gz or a folder of its *.json (default: download)")
    parser.add_argument("--output-dir", default="data", help="where TinyStories_{val,train}.bin go")
    parser.add_argument("--url", default=URL, help="where to download TinyStories_all_data.tar.gz from (a mirror)")
    parser.add_argument("--processes", type=int, default=os.cpu_count(), help="tokenizing processes")
    args = parser.parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    path = args.input
    if path is None:
        from download_starter_pack import DownloadError, download  # resumable, with progress
        path = os.path.join(args.output_dir, "TinyStories_all_data.tar.gz")
        try:
            if not os.path.exists(path):
                download(args.url, path, "TinyStories_all_data.tar.gz", URL)
        except DownloadError as e:
            raise SystemExit(f"error: {e}") from None  # a network failure: one line, exit status 1
    if not os.path.exists(path):
        raise InputError(f"--input {path}: no such file or folder")
    shards = read_shards(path)
    if len(shards) < 2:
        raise InputError(f"--input {path}: has {len(shards)} *.json shards; at least 2 are needed (val, train)")
    print(f"Number of shards: {len(shards)}")
    for split, part in [("val", shards[:1]), ("train", shards[1:])]:
        print(f"Tokenizing {split} split...")
        write_split(os.path.join(args.output_dir, f"TinyStories_{split}.bin"), part, max(1, args.processes))


if __name__ == "__main__":
    try:
        main()
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
