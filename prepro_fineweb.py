"""
Tokenizes FineWeb (or FineWeb-Edu) into llm.c's token shards, as llm.c's dev/data/fineweb.py does.

    python prepro_fineweb.py                          # downloads sample-10BT, writes data/fineweb10B/
    python prepro_fineweb.py --type edu --version 100B
    python prepro_fineweb.py --input a.parquet b.jsonl --output-dir data/mine   # local documents

Every document becomes <|endoftext|> and its GPT-2 tokens; the tokens fill shards of --shard-size
(10^8 by default): fineweb_val_000000.bin first (edu_fineweb_... for edu), then
fineweb_train_000001.bin, ... A document that does not fit finishes in the next shard, exactly as
llm.c's loop splits it (a document that would fill a shard exactly also ends it, llm.c's `<`), so
the shards are byte-identical to llm.c's on the same documents in the same order. Unlike llm.c,
a document longer than a whole shard is split over as many shards as it needs.

Downloading: Hugging Face's API lists the dataset's parquet files (HuggingFaceFW/fineweb, or
fineweb-edu, folder sample/10BT or sample/100BT), which are fetched one by one into
--output-dir/parquet/ (resumable, with progress) and read in sorted order, as llm.c's
load_dataset reads them. Reading parquet needs pyarrow (pip install pyarrow): the one package that
reads the format without pulling in a dataframe library. JSON lines with a "text" field need
nothing more. Tokenizing runs on all cores. A rerun resumes after the last finished shard (a
small progress file records where each shard ended); each shard is written atomically.
"""

import json
import multiprocessing
import os
import sys
import time
import urllib.request

import numpy as np

from llmc.cpu import usable_cpus
from llmc.formats import write_tokens
from llmc.utils import InputError, atomic_write
from download_starter_pack import ArgumentParser  # one line for a bad option, exit status 2

EOT = 50256  # GPT-2's <|endoftext|>
HF = "https://huggingface.co"
DATASETS = {"classic": ("HuggingFaceFW/fineweb", "fineweb"), "edu": ("HuggingFaceFW/fineweb-edu", "edu_fineweb")}


class DocumentError(Exception):
    """A document file that can't be read: one line, exit status 2."""


def tokenize(text):
    # <|endoftext|>, then the document's tokens, as llm.c's tokenize_gpt2
    global ENCODER
    if ENCODER is None:
        import tiktoken
        ENCODER = tiktoken.get_encoding("gpt2")
    return np.array([EOT] + ENCODER.encode_ordinary(text), dtype="<u2")


ENCODER = None  # tiktoken's GPT-2 encoding, loaded once in each process


def documents(paths):
    # the "text" of every document, file by file in the order given: parquet or JSON lines
    for path in paths:
        if path.endswith(".parquet"):
            yield from parquet_texts(path)
            continue
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line)["text"]
                    except (ValueError, KeyError, TypeError):
                        raise DocumentError(f"{path}, line {number}: not a JSON object with a \"text\"") from None


def parquet_texts(path):
    try:
        import pyarrow.parquet
    except ImportError:
        raise InputError(f"{path}: reading parquet needs pyarrow: pip install pyarrow") from None
    try:
        for batch in pyarrow.parquet.ParquetFile(path).iter_batches(columns=["text"], batch_size=1024):
            yield from batch.column(0).to_pylist()
    except (OSError, KeyError, ValueError) as e:  # pyarrow's errors derive from these
        raise DocumentError(f"{path}: not a parquet file with a \"text\" column ({e})") from None


def shard_path(folder, name, index):
    return os.path.join(folder, f"{name}_{'val' if index == 0 else 'train'}_{index:06d}.bin")


def write_shard(path, tokens):
    write_tokens(path, tokens)


def write_shards(texts, folder, name, shard_size, processes, progress_path, settings):
    # llm.c's loop: fill a shard; a document that doesn't fit (or would fill it exactly) ends it
    # with its first tokens, and its rest starts the next. Where a progress file says how far an
    # earlier run got, the shards it finished are kept and the documents before its end skipped.
    done = read_progress(progress_path, settings, folder, name)
    if done.get("finished"):
        print(f"{folder}: all {done['shard']} shards are there already", file=sys.stderr)
        return
    index, skip_docs, skip_tokens = done["shard"], done["doc"], done["offset"]
    shard = np.empty(shard_size, dtype=np.uint16)
    count, doc, t0 = 0, skip_docs, time.time()
    texts = (text for i, text in enumerate(texts) if i >= skip_docs)
    with multiprocessing.Pool(processes) as pool:
        for tokens in pool.imap(tokenize, texts, chunksize=16):
            if skip_tokens:  # (the first document, resumed partway through)
                tokens, offset, skip_tokens = tokens[skip_tokens:], skip_tokens, 0
            else:
                offset = 0
            while count + len(tokens) >= shard_size:
                remainder = shard_size - count
                shard[count:] = tokens[:remainder]
                write_shard(shard_path(folder, name, index), shard)
                index, count = index + 1, 0
                tokens, offset = tokens[remainder:], offset + remainder
                # the next shard starts in this document, `offset` tokens in
                write_progress(progress_path, settings, index, doc, offset)
                print(f"\rshard {index - 1}: {shard_size:,} tokens ({time.time() - t0:.0f} s)", file=sys.stderr)
            shard[count:count + len(tokens)] = tokens
            count += len(tokens)
            doc += 1
            if doc % 1000 == 0:
                print(f"\rshard {index}: {count / shard_size:.0%} ({doc:,} documents)", end="", file=sys.stderr)
    if count:
        write_shard(shard_path(folder, name, index), shard[:count])
        index += 1
    write_progress(progress_path, settings, index, doc, 0, finished=True)
    print(f"\r{index} shards in {folder} ({time.time() - t0:.0f} s)", file=sys.stderr)


def read_progress(path, settings, folder, name):
    # where an earlier run with the same settings stopped: the next shard's index, and the
    # document (and the tokens into it) at which that shard starts
    start = {"shard": 0, "doc": 0, "offset": 0}
    try:
        with open(path) as f:
            progress = json.load(f)
    except (OSError, ValueError):
        return start
    if progress.get("settings") != settings:
        return start
    if not all(os.path.exists(shard_path(folder, name, i)) for i in range(progress["shard"])):
        return start
    print(f"resuming at shard {progress['shard']} (document {progress['doc']:,})", file=sys.stderr)
    return progress


def write_progress(path, settings, shard, doc, offset, finished=False):
    with atomic_write(path) as f:
        f.write(json.dumps(dict(settings=settings, shard=shard, doc=doc, offset=offset,
                                finished=finished)).encode())


def download_parquet(dataset, version, folder, hf=HF):
    # the dataset's parquet files of sample/<version>T, listed by Hugging Face's API, fetched
    # into folder (each resumable); returns their paths in sorted order
    from download_starter_pack import download
    api = f"{hf}/api/datasets/{dataset}/tree/main/sample/{version}T"
    try:
        with urllib.request.urlopen(api, timeout=60) as response:
            listing = json.load(response)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: could not list {api} ({getattr(e, 'reason', e)}); check the network and run "
                         f"again, or download the parquet files by hand and give them with --input") from None
    names = sorted(entry["path"] for entry in listing if entry.get("path", "").endswith(".parquet"))
    os.makedirs(folder, exist_ok=True)
    paths = []
    for name in names:
        path = os.path.join(folder, os.path.basename(name))
        if not os.path.exists(path):
            download(f"{hf}/datasets/{dataset}/resolve/main/{name}", path, os.path.basename(name),
                     f"{hf}/datasets/{dataset}")
        paths.append(path)
    return paths


def main(argv=None):
    parser = ArgumentParser(description="Tokenize FineWeb into llm.c's token shards (GPT-2).")
    parser.add_argument("-t", "--type", choices=["classic", "edu"], default="classic", help="FineWeb or FineWeb-Edu")
    parser.add_argument("-v", "--version", choices=["10B", "100B"], default="10B", help="the sample's size")
    parser.add_argument("-s", "--shard-size", type=int, default=10**8, help="tokens per shard")
    parser.add_argument("--input", nargs="+", metavar="FILE",
                        help="local documents instead of downloading: parquet files, or JSON lines with a "
                             "\"text\" field, read in the order given")
    parser.add_argument("--hf-url", default=HF, help="Hugging Face, or a mirror of it")
    parser.add_argument("--output-dir", help="where the shards go (default: data/fineweb10B, data/edu_fineweb100B, ...)")
    parser.add_argument("--processes", type=int, default=usable_cpus(),
                        help="tokenizing processes (default: all usable cores)")
    args = parser.parse_args(argv)
    if args.shard_size <= 0 or args.processes <= 0:
        raise InputError("--shard-size and --processes must be positive")
    from download_starter_pack import DownloadError, check_url
    dataset, name = DATASETS[args.type]
    folder = args.output_dir or os.path.join("data", f"{name}{args.version}")
    os.makedirs(folder, exist_ok=True)
    if args.input:
        for path in args.input:
            if not os.path.isfile(path):
                raise InputError(f"--input {path}: no such file")
        paths = args.input
    else:
        try:
            check_url(args.hf_url, "--hf-url")
        except ValueError as e:
            raise InputError(str(e)) from None
        try:
            paths = download_parquet(dataset, args.version, os.path.join(folder, "parquet"), args.hf_url)
        except DownloadError as e:
            raise SystemExit(f"error: {e}") from None  # a network failure: one line, exit status 1
    settings = dict(inputs=[os.path.abspath(p) for p in paths], shard_size=args.shard_size, name=name)
    write_shards(documents(paths), folder, name, args.shard_size, args.processes,
                 os.path.join(folder, f"{name}_progress.json"), settings)


if __name__ == "__main__":
    try:
        main()
    except (InputError, DocumentError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
