"""
Fetches llm.c's starter pack: GPT-2 124M's weights, its PyTorch debug state and the tokenizer,
in llm.c's formats, from Hugging Face. Standard library only; no PyTorch needed.

    python download_starter_pack.py              # into the current folder, what is missing
    python download_starter_pack.py --data       # also data/tiny_shakespeare_{train,val}.bin and
                                                 # data/hellaswag_val.bin (for --hellaswag)
    python train_gpt2.py --download              # the same, then train

A download that breaks off is resumed where it stopped the next time (HTTP Range). A file appears
under its own name only once it is complete and its header is what llm.c's format says.
"""

import argparse
import http.client
import os
import struct
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

BASE_URL = "https://huggingface.co/datasets/karpathy/llmc-starter-pack/resolve/main"
MODEL_FILES = ["gpt2_124M.bin", "gpt2_124M_debug_state.bin", "gpt2_tokenizer.bin"]
DATA_FILES = ["tiny_shakespeare_train.bin", "tiny_shakespeare_val.bin", "hellaswag_val.bin"]

# the magic number and versions at the start of each kind of llm.c file
MAGIC = {"gpt2_124M.bin": (20240326, (3,)), "gpt2_124M_debug_state.bin": (20240327, (2,)),
         "gpt2_tokenizer.bin": (20240328, (1, 2)), "tiny_shakespeare_train.bin": (20240520, (1,)),
         "tiny_shakespeare_val.bin": (20240520, (1,)), "hellaswag_val.bin": (20240522, (1,))}


class DownloadError(Exception):
    """Reported as one line 'error: ...' (exit status 1)."""


def check_url(url, option):
    # bad input, said before any work (exit status 2): not an http(s) URL with a host
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError as e:
        raise ValueError(f"{option} {url}: not a URL ({e})") from None
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{option} {url}: expected an http:// or https:// URL")


def content_length(headers, name, default=0):
    # a header's number, or default where it is missing or not a number
    try:
        return int(headers.get(name) or default)
    except ValueError:
        return default


def check_header(path, name):
    # does the file match llm.c's format: magic, version, and (checkpoints and token files)
    # the size its header gives?
    magic, versions = MAGIC[name]
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        header = f.read(1024)
    if len(header) < 1024:
        return f"it is {size:,} bytes, too short for an llm.c file"
    fields = struct.unpack("<256i", header)
    if fields[0] != magic or fields[1] not in versions:
        return f"its header starts {fields[0]}, {fields[1]}, not llm.c's magic {magic} and version {versions[0]}"
    if magic == 20240326:  # checkpoint: the parameters' count follows from the shape
        maxT, V, L, NH, C, Vp = fields[2:8]
        expected = 1024 + 4 * (Vp * C + maxT * C + L * (12 * C * C + 13 * C) + 2 * C)
    elif magic == 20240520:  # tokens: the header holds their count
        expected = 1024 + 2 * fields[2]
    elif magic == 20240522:  # an eval file: its examples at least as long as the longest one
        return None if size >= 1024 + fields[3] else f"it is {size:,} bytes, shorter than its longest example"
    else:
        return None
    if size != expected:
        return f"it is {size:,} bytes, but its header implies {expected:,}"
    return None


def show_progress(name, done, total, t0):
    speed = done / max(time.time() - t0, 1e-9) / 1e6
    of_total = f" of {total:,} bytes ({100 * done / total:.0f}%)" if total else " bytes"
    print(f"\rdownloading {name}: {done:,}{of_total} at {speed:.1f} MB/s ", end="", file=sys.stderr, flush=True)


def download(url, path, name, source=BASE_URL):
    # fetch url into path through path + ".partial", continuing a partial file where it stopped
    # (source: where to get it by hand, said on failure)
    partial = path + ".partial"
    start = os.path.getsize(partial) if os.path.exists(partial) else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={start}-"} if start else {})
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as e:
        if e.code == 416 and start:  # nothing left to send: the partial file is complete
            total = content_length({"total": e.headers.get("Content-Range", "*/-1").split("/")[-1]}, "total", -1)
            if total == start:
                return finish(partial, path, name, source)
            os.remove(partial)  # it doesn't match the file on the server: start over
            return download(url, path, name, source)
        raise DownloadError(f"could not download {url}: HTTP {e.code} {e.reason}; run again later, or get "
                            f"{name} by hand from {source}") from None
    except (urllib.error.URLError, OSError) as e:
        raise DownloadError(f"could not download {url} ({getattr(e, 'reason', e)}); check the network and run "
                            f"again (it resumes), or get {name} by hand from {source}") from None
    with response:
        if start and response.status != 206:
            start = 0  # the server ignored Range: it sends the whole file again
        length = content_length(response.headers, "Content-Length")
        total = start + length if length else 0
        done, t0 = start, time.time()
        try:
            with open(partial, "ab" if start else "wb") as f:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    done += len(chunk)
                    show_progress(name, done, total, t0)
                f.flush()
                os.fsync(f.fileno())
        except (OSError, http.client.HTTPException) as e:  # cut connection, timeout, full disk
            print(file=sys.stderr)
            raise DownloadError(f"download of {url} broke off at {done:,} bytes ({type(e).__name__}); "
                                f"run again to resume it") from None
    print(file=sys.stderr)
    if total and done != total:
        raise DownloadError(f"download of {url} stopped at {done:,} of {total:,} bytes; run again to resume it")
    return finish(partial, path, name, source)


def finish(partial, path, name, source=BASE_URL):
    # the complete file takes its name only if its header is right; a wrong one is not kept
    problem = check_header(partial, name) if name in MAGIC else None  # (no llm.c header to check)
    if problem:
        os.remove(partial)
        raise DownloadError(f"downloaded {name}, but {problem}: the server sent something else; "
                            f"get it by hand from {source}")
    os.replace(partial, path)
    print(f"wrote {path} ({os.path.getsize(path):,} bytes)")


def download_starter_pack(model_dir=".", data_dir=None, base_url=BASE_URL):
    # fetch whatever of the starter pack is missing: the model files into model_dir (unless it is
    # None), and the Tiny Shakespeare token files and HellaSwag into data_dir (if one is given)
    wanted = ([(name, model_dir) for name in MODEL_FILES if model_dir is not None] +
              [(name, data_dir) for name in DATA_FILES if data_dir is not None])
    for name, folder in wanted:
        path = os.path.join(folder, name) if folder else name
        if os.path.exists(path):
            continue
        os.makedirs(folder or ".", exist_ok=True)
        download(f"{base_url.rstrip('/')}/{name}", path, name)


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # a bad option: one line, exit status 2, as the trainer's
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    parser = ArgumentParser(description="Download llm.c's starter pack (GPT-2 124M) from Hugging Face.")
    parser.add_argument("--dir", default=".", help="where to put the model files (default: here)")
    parser.add_argument("--data", action="store_true", help="also fetch the Tiny Shakespeare token files and HellaSwag's eval file")
    parser.add_argument("--data-dir", default="data", help="where the token files go (default: data)")
    parser.add_argument("--download-url", default=BASE_URL, help="the starter pack's base URL (a mirror)")
    args = parser.parse_args()
    try:
        check_url(args.download_url, "--download-url")
        for option, folder in (("--dir", args.dir), ("--data-dir", args.data_dir if args.data else None)):
            if folder and os.path.exists(folder) and not os.path.isdir(folder):
                raise ValueError(f"{option} {folder} is a file, not a folder")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    try:
        download_starter_pack(args.dir, args.data_dir if args.data else None, args.download_url)
    except DownloadError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
