"""
Downloads Tiny Shakespeare and tokenizes it with GPT-2's tokenizer, into llm.c's token files.

The output is byte for byte what llm.c's dev/data/tinyshakespeare.py writes:

    $ python prepro_tinyshakespeare.py
    writing 32,768 tokens to data/tiny_shakespeare_val.bin (66,560 bytes)
    writing 305,260 tokens to data/tiny_shakespeare_train.bin (611,544 bytes)

Each file is a header of 256 int32 (magic 20240520, version 1, number of tokens) followed by the
tokens as uint16. Offline, point --input at a copy of the text (char-rnn's input.txt).
"""

import argparse
import os
import sys
import time
import urllib.error
import urllib.request

import numpy as np

from train_gpt2 import write_file_atomic

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TOKENS_MAGIC, TOKENS_VERSION = 20240520, 1
VAL_TOKENS = 32768  # the first 32,768 tokens (about 10%) are the validation split


class PreproError(Exception):
    """Reported as one line 'error: ...' with the exit status it carries."""

    def __init__(self, message, status):
        super().__init__(message)
        self.status = status


def download(url, path):
    # fetch url into path, with a progress line; the file appears under its name only when complete
    tmp_path = f"{path}.tmp.{os.getpid()}"
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp_path, "wb") as f:
            total = int(response.headers.get("Content-Length") or 0)
            done, t0 = 0, time.time()
            while chunk := response.read(1 << 16):
                f.write(chunk)
                done += len(chunk)
                percent = f" ({100 * done / total:.0f}%)" if total else ""
                print(f"\rdownloading {url}: {done:,} bytes{percent}", end="", file=sys.stderr, flush=True)
            print(f" in {time.time() - t0:.1f} s", file=sys.stderr)
            if total and done != total:
                raise PreproError(f"download of {url} stopped at {done:,} of {total:,} bytes; run the script again", 1)
        os.replace(tmp_path, path)
    except (urllib.error.URLError, OSError) as e:
        raise PreproError(f"could not download {url} ({getattr(e, 'reason', e)}); run again, or pass a copy "
                          f"of the text with --input", 1) from None
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)


def tokenize(text):
    # GPT-2's BPE tokenizer (tiktoken's "gpt2"); imported here, as only this step needs it
    import tiktoken
    try:
        enc = tiktoken.get_encoding("gpt2")
    except Exception as e:
        raise PreproError(f"tiktoken could not load GPT-2's tokenizer files ({type(e).__name__}); it downloads "
                          f"them on first use, or set TIKTOKEN_CACHE_DIR to a folder that holds them", 1) from None
    eot = enc._special_tokens["<|endoftext|>"]  # 50256, the end-of-text token
    # every block of text between blank lines is a "document", and each starts with <|endoftext|>.
    # llm.c keeps the "\n\n" at the end of each section (a small accident it keeps for compatibility),
    # so we add it back to every section but the last.
    sections = text.split("\n\n")
    tokens = []
    for i, section in enumerate(sections):
        tokens.append(eot)
        tokens.extend(enc.encode_ordinary(section + "\n\n" if i != len(sections) - 1 else section))
    return tokens


def write_datafile(path, tokens):
    # llm.c's token file: a 256-int32 header, then the tokens as uint16, written atomically
    header = np.zeros(256, dtype="<i4")
    header[:3] = [TOKENS_MAGIC, TOKENS_VERSION, len(tokens)]
    body = np.array(tokens, dtype="<u2")
    print(f"writing {len(tokens):,} tokens to {path} ({header.nbytes + body.nbytes:,} bytes)")
    write_file_atomic(path, [header.tobytes(), body.tobytes()])  # the trainer's: temporary file, then rename


def main(args):
    os.makedirs(args.output_dir, exist_ok=True)
    text_path = args.input
    if text_path is None:
        text_path = os.path.join(args.output_dir, "tiny_shakespeare.txt")
        if os.path.exists(text_path):
            print(f"{text_path} already exists, skipping download")
        else:
            download(args.url, text_path)
    try:
        with open(text_path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise PreproError(f"input text {text_path} not found", 2) from None
    except (OSError, UnicodeDecodeError) as e:
        raise PreproError(f"{text_path}: could not read it as UTF-8 text ({e})", 2) from None
    tokens = tokenize(text)
    # tokenize everything first, then write both files: an error never leaves just one of them
    write_datafile(os.path.join(args.output_dir, "tiny_shakespeare_val.bin"), tokens[:VAL_TOKENS])
    write_datafile(os.path.join(args.output_dir, "tiny_shakespeare_train.bin"), tokens[VAL_TOKENS:])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Tokenize Tiny Shakespeare into llm.c's token files.")
    parser.add_argument("--input", help="a local copy of the text (default: download it)")
    parser.add_argument("--output-dir", default="data", help="where to write the .bin files (default: data)")
    parser.add_argument("--url", default=URL, help="where to download the text from")
    try:
        main(parser.parse_args())
    except PreproError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.status)
