"""
Downloads Tiny Shakespeare and tokenizes it with GPT-2's tokenizer, into llm.c's token files.

The output is byte for byte what llm.c's dev/data/tinyshakespeare.py writes (for --model_desc=gpt-2):

    $ python prepro_tinyshakespeare.py
    writing 32,768 tokens to data/tiny_shakespeare_val.bin (66,560 bytes)
    writing 305,260 tokens to data/tiny_shakespeare_train.bin (611,544 bytes)

Each .bin file is a header of 256 int32 (magic 20240520, version 1, number of tokens, then zeros)
followed by the tokens as uint16, all little-endian. The first 32,768 tokens (about 10%) are the
validation split, the rest the training split.

The text (char-rnn's input.txt, 1,115,394 bytes) is downloaded once to data/tiny_shakespeare.txt.
Offline, pass a local copy with --input, and point TIKTOKEN_CACHE_DIR at a folder that holds
tiktoken's GPT-2 files (tiktoken downloads them on first use):

    $ python prepro_tinyshakespeare.py --input path/to/input.txt --output-dir data
"""

import http.client
import os
import sys
import urllib.error
import urllib.request


# the trainer's atomic write (a file is complete under its name, or absent) and llm.c's token
# file format: a 256-int32 header (magic 20240520, version 1, token count), then uint16 tokens
from llmc.formats import HEADER_INTS, write_tokens
from llmc.utils import atomic_write
from download_starter_pack import ArgumentParser  # one line for a bad option, exit status 2

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
VAL_TOKENS = 32768                          # the first 32,768 tokens are the validation split


class PreproError(Exception):
    """A problem reported as one line 'error: ...', exiting with its status (2: bad input, 1: network)."""

    def __init__(self, message, status):
        super().__init__(message)
        self.status = status


# ----------------------------------------------------------------------------
# download, tokenize, write: the three steps of llm.c's script

def download(url, path):
    # fetch url into path, with one progress line on stderr; atomic, so never half a download
    done = 0
    try:
        with atomic_write(path) as f, urllib.request.urlopen(url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0)  # 0: unknown
            while chunk := response.read(1 << 16):
                f.write(chunk)
                done += len(chunk)
                percent = f" ({100 * done / total:.0f}%)" if total else ""
                print(f"\rdownloading {url}: {done:,} bytes{percent}", end="", file=sys.stderr, flush=True)
            if total and done != total:
                raise OSError(f"the connection closed after {done:,} of {total:,} bytes")
    except ValueError as e:  # urllib's answer to something that is not a URL
        raise PreproError(f"{url} is not a URL urllib can fetch ({e}); expected the http(s) address of the text",
                          2) from None
    except (OSError, http.client.HTTPException) as e:  # URLError and HTTPError are OSErrors
        reason = f"HTTP {e.code} {e.reason}" if isinstance(e, urllib.error.HTTPError) else getattr(e, "reason", e)
        raise PreproError(f"could not download {url} ({reason}); expected the Tiny Shakespeare text there: "
                          f"run again, or pass a local copy with --input", 1) from None
    finally:
        if done:
            print(file=sys.stderr)  # end the progress line


def tokenize(text):
    # GPT-2's BPE tokenizer (tiktoken's "gpt2"), imported here as only this step needs it
    try:
        import tiktoken
    except ImportError:
        raise PreproError("tiktoken is not installed; it is GPT-2's tokenizer here: pip install tiktoken", 2) from None
    try:
        enc = tiktoken.get_encoding("gpt2")
    except Exception as e:  # its files could not be downloaded, or the cached ones read
        raise PreproError(f"tiktoken could not load GPT-2's tokenizer files ({type(e).__name__}); it downloads "
                          f"them on first use, or set TIKTOKEN_CACHE_DIR to a folder that holds them", 1) from None
    eot = enc._special_tokens["<|endoftext|>"]  # 50256, the end-of-text token
    # each block between blank lines is a "document" starting with <|endoftext|>. llm.c meant
    # to drop the "\n\n" between them but kept it (still, for compatibility), so we add it back
    # to every section but the last.
    sections = text.split("\n\n")
    tokens = []
    for i, section in enumerate(sections):
        tokens.append(eot)
        tokens.extend(enc.encode_ordinary(section + "\n\n" if i != len(sections) - 1 else section))
    return tokens


def write_datafile(path, tokens):
    # llm.c's token file: a 256-int32 header, then the tokens as uint16, both little-endian
    # (GPT-2's 50,257 token ids all fit in 16 bits)
    print(f"writing {len(tokens):,} tokens to {path} ({HEADER_INTS * 4 + 2 * len(tokens):,} bytes)")
    try:
        write_tokens(path, tokens)
    except OSError as e:
        raise PreproError(f"could not write {path} ({e.strerror}); expected a writable folder", 2) from None


# ----------------------------------------------------------------------------
# main: get the text, tokenize it, write the two splits

def read_text(path):
    # the whole text as a str; text mode, as llm.c reads it (so "\r\n" would become "\n")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise PreproError(f"input text {path} not found; expected a copy of Tiny Shakespeare "
                          f"(char-rnn's input.txt), or leave out --input to download it", 2) from None
    except UnicodeDecodeError as e:
        raise PreproError(f"{path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start:,}); "
                          f"expected Tiny Shakespeare as plain UTF-8 text", 2) from None
    except OSError as e:
        raise PreproError(f"could not read {path} ({e.strerror}); expected a readable text file", 2) from None


def make_output_dir(path):
    # the folder for the text and the .bin files, created if missing
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise PreproError(f"could not create the output folder {path} ({e.strerror}); expected a folder "
                          f"path that is not a file", 2) from None


def main(args):
    text_path = args.input
    if text_path is None:  # download the text into the output folder, once
        text_path = os.path.join(args.output_dir, "tiny_shakespeare.txt")
        if os.path.exists(text_path):
            print(f"{text_path} already exists, skipping download")
        else:
            make_output_dir(args.output_dir)
            download(args.url, text_path)
    # tokenize everything before writing anything, so bad input leaves no output
    tokens = tokenize(read_text(text_path))
    if len(tokens) <= VAL_TOKENS:  # (llm.c's script writes an empty training file then)
        raise PreproError(f"{text_path}: {len(tokens):,} tokens, too few for both splits: the first "
                          f"{VAL_TOKENS:,} are validation and training needs at least one more", 2)
    make_output_dir(args.output_dir)
    write_datafile(os.path.join(args.output_dir, "tiny_shakespeare_val.bin"), tokens[:VAL_TOKENS])
    write_datafile(os.path.join(args.output_dir, "tiny_shakespeare_train.bin"), tokens[VAL_TOKENS:])


if __name__ == "__main__":
    parser = ArgumentParser(description="Tokenize Tiny Shakespeare into llm.c's token files.")
    parser.add_argument("--input", metavar="PATH", help="a local copy of the text, instead of downloading it")
    parser.add_argument("--output-dir", metavar="DIR", default="data",
                        help="where the text is downloaded and the .bin files are written (default: %(default)s)")
    parser.add_argument("--url", default=URL, help="where to download the text from (default: %(default)s)")
    try:
        main(parser.parse_args())
    except PreproError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.status)
