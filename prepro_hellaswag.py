"""
Downloads HellaSwag's validation set and writes it in llm.c's eval format, for train_gpt2.py's
--hellaswag. The output is byte for byte what llm.c's dev/data/hellaswag.py writes (render_example
and write_evalfile):

    $ python prepro_hellaswag.py
    writing 10,042 examples to data/hellaswag_val.bin

Each example is a context and 4 endings (one correct: its label), from rowanz/hellaswag's
hellaswag_val.jsonl. The file is a header of 256 int32 (magic 20240522, version 1, the number of
examples, the longest example in bytes), then per example a stream of uint16: 65535, the example's
size in bytes, its index, its label, 4, the context's tokens, then each ending's tokens (GPT-2's
tokenizer; each ending after a space, as it follows the context), each list after its length.

The jsonl is downloaded once to data/hellaswag_val.jsonl (resumed where it stopped if cut off). Offline,
pass a local copy with --input, and point TIKTOKEN_CACHE_DIR at a folder that holds tiktoken's
GPT-2 files:

    $ python prepro_hellaswag.py --input path/to/hellaswag_val.jsonl --output-dir data
"""

import json
import os
import sys


# the starter pack's download (progress, resumed, complete under its name or absent), the trainer's
# atomic write, and llm.c's eval format as the trainer reads it
from llmc.formats import tokens_header, write_tokens
from llmc.hellaswag import COMPLETIONS, EVAL_MAGIC, EVAL_VERSION, START_EXAMPLE
from download_starter_pack import ArgumentParser, DownloadError, download  # (a bad option: one line)
from prepro_tinyshakespeare import PreproError, make_output_dir  # one line, its exit status

URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
SOURCE = "https://github.com/rowanz/hellaswag (data/hellaswag_val.jsonl)"


# ----------------------------------------------------------------------------
# read, render, write: llm.c's steps


def read_examples(path):
    # one JSON object a line: ctx (str), label (0-3), endings (4 str)
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")  # (as `for line in f` reads: only newlines end a line)
    except FileNotFoundError:
        raise PreproError(f"{path} not found; expected HellaSwag's hellaswag_val.jsonl, or leave out --input "
                          f"to download it", 2) from None
    except UnicodeDecodeError as e:
        raise PreproError(f"{path} is not UTF-8 text (at byte {e.start:,}); expected HellaSwag's jsonl", 2) from None
    except OSError as e:
        raise PreproError(f"could not read {path} ({e.strerror})", 2) from None
    examples = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue  # (a blank last line)
        try:
            example = json.loads(line)
        except json.JSONDecodeError as e:
            raise PreproError(f"{path}, line {n}: not JSON ({e.msg}); expected one HellaSwag example a line", 2) from None
        check_example(example, f"{path}, line {n}")
        examples.append(example)
    if not examples:
        raise PreproError(f"{path}: no examples; expected HellaSwag's jsonl, one example a line", 2)
    if len(examples) >= 1 << 16:  # an example's index is a uint16
        raise PreproError(f"{path}: {len(examples):,} examples, more than llm.c's eval format holds (65,535)", 2)
    return examples


def check_example(example, where):
    # what llm.c's script uses of an example, and what its eval format and loader need of it
    if not isinstance(example, dict):
        raise PreproError(f"{where}: not a JSON object; expected a HellaSwag example", 2)
    ctx, label, endings = example.get("ctx"), example.get("label"), example.get("endings")
    if not isinstance(ctx, str) or not ctx:
        raise PreproError(f"{where}: no context (\"ctx\", a non-empty string)", 2)
    if type(label) is not int or not 0 <= label < COMPLETIONS:
        raise PreproError(f"{where}: label {label!r}, expected an integer from 0 to {COMPLETIONS - 1}", 2)
    if not isinstance(endings, list) or len(endings) != COMPLETIONS or not all(isinstance(e, str) for e in endings):
        raise PreproError(f"{where}: \"endings\" must be a list of {COMPLETIONS} strings", 2)


def gpt2_encoding():
    # GPT-2's BPE tokenizer (tiktoken's "gpt2"), imported here as only this step needs it
    try:
        import tiktoken
    except ImportError:
        raise PreproError("tiktoken is not installed; it is GPT-2's tokenizer here: pip install tiktoken", 2) from None
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # its files could not be downloaded, or the cached ones read
        raise PreproError(f"tiktoken could not load GPT-2's tokenizer files ({type(e).__name__}); it downloads "
                          f"them on first use, or set TIKTOKEN_CACHE_DIR to a folder that holds them", 1) from None


def render_example(enc, example, index):
    # one example's uint16 stream. The endings are encoded after a space, as they follow the
    # context in the text (GPT-2's tokens mostly start with their space).
    try:
        context = enc.encode(example["ctx"])
        endings = [enc.encode(" " + ending) for ending in example["endings"]]
    except ValueError as e:  # a special token (<|endoftext|>) in the text: llm.c's refuses it too
        raise PreproError(f"example {index}: {str(e).splitlines()[0]}", 2) from None
    stream = [START_EXAMPLE, 0, index, example["label"], len(endings), len(context), *context]
    for ending in endings:
        stream += [len(ending), *ending]
    if 2 * len(stream) >= 1 << 16:  # its size in bytes is a uint16
        raise PreproError(f"example {index}: {2 * len(stream):,} bytes, too long for llm.c's eval format", 2)
    stream[1] = 2 * len(stream)  # the example's size in bytes, these 2 uint16 included
    return stream


def write_evalfile(path, streams):
    # llm.c's eval file: the header (magic, version, examples, the longest in bytes), the examples
    header = tokens_header(len(streams), EVAL_MAGIC, EVAL_VERSION, max(stream[1] for stream in streams))
    print(f"writing {len(streams):,} examples to {path}")
    try:
        write_tokens(path, [token for stream in streams for token in stream], header)
    except OSError as e:
        raise PreproError(f"could not write {path} ({e.strerror}); expected a writable folder", 2) from None


def main(args):
    jsonl = args.input
    if jsonl is None:  # download the jsonl into the output folder, once
        jsonl = os.path.join(args.output_dir, "hellaswag_val.jsonl")
        if os.path.exists(jsonl):
            print(f"{jsonl} already exists, skipping download")
        else:
            make_output_dir(args.output_dir)
            try:
                download(args.url, jsonl, "hellaswag_val.jsonl", SOURCE)
            except DownloadError as e:
                raise PreproError(str(e), 1) from None
    # everything is rendered before anything is written, so bad input leaves no output
    examples = read_examples(jsonl)
    enc = gpt2_encoding()
    streams = [render_example(enc, example, i) for i, example in enumerate(examples)]
    make_output_dir(args.output_dir)
    write_evalfile(os.path.join(args.output_dir, "hellaswag_val.bin"), streams)


if __name__ == "__main__":
    parser = ArgumentParser(description="Write HellaSwag's validation set in llm.c's eval format.")
    parser.add_argument("--input", metavar="FILE.jsonl", help="a local copy of hellaswag_val.jsonl, instead of "
                                                              "downloading it")
    parser.add_argument("--output-dir", metavar="DIR", default="data",
                        help="where the jsonl is downloaded and hellaswag_val.bin written (default: %(default)s)")
    parser.add_argument("--url", default=URL, help="where to download the jsonl from (default: %(default)s)")
    try:
        main(parser.parse_args())
    except PreproError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.status)
