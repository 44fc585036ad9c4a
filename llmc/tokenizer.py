"""
Tokens to text and text to tokens, for samples and prompts, as llm.c's llmc/tokenizer.h: llm.c's
gpt2_tokenizer.bin where it sits beside the checkpoint, else tiktoken's GPT-2 encoding.
"""

import functools
import os

import numpy as np

from llmc.formats import HEADER_INTS
from llmc.utils import InputError

TOKENIZER_MAGIC = 20240328
GPT2_EOT = 50256  # the id of <|endoftext|>, which starts every sample


def tokenizer_load(path):
    # llm.c's tokenizer file: a 256-int32 header (magic, version, vocab size, EOT id),
    # then for each token one length byte and that many bytes. Returns a list of bytes.
    with open(path, "rb") as f:
        data = f.read()
    header = np.frombuffer(data[:HEADER_INTS * 4], dtype="<i4")
    if header.size != HEADER_INTS or header[0] != TOKENIZER_MAGIC or header[1] not in (1, 2):
        raise InputError(f"{path}: not an llm.c tokenizer file (expected magic {TOKENIZER_MAGIC}, version 1 or 2)")
    table, pos = [], HEADER_INTS * 4
    for _ in range(int(header[2])):
        if pos >= len(data) or pos + 1 + data[pos] > len(data):
            raise InputError(f"{path}: truncated tokenizer file ({header[2]} tokens announced)")
        length = data[pos]
        table.append(data[pos + 1:pos + 1 + length])
        pos += 1 + length
    return table


@functools.cache
def tiktoken_gpt2():
    # tiktoken's GPT-2 tokenizer, loaded once, or why it could not load: not installed, or
    # offline without its cached files
    try:
        import tiktoken
        return tiktoken.get_encoding("gpt2")
    except Exception as e:
        return e


def make_decoder(checkpoint_path):
    # token id -> bytes: gpt2_tokenizer.bin beside the checkpoint, else tiktoken, else None
    # (offline, no tokenizer files: samples are printed as token ids)
    tokenizer_path = os.path.join(os.path.dirname(checkpoint_path) or ".", "gpt2_tokenizer.bin")
    if os.path.isfile(tokenizer_path):
        table = tokenizer_load(tokenizer_path)
        return lambda token: table[token] if token < len(table) else b""
    enc = tiktoken_gpt2()
    return None if isinstance(enc, Exception) else enc.decode_single_token_bytes


def encode_prompt(text, vocab_size):
    # the prompt's tokens, after <|endoftext|> as at the start of any document
    eot = min(GPT2_EOT, vocab_size - 1)
    if eot != GPT2_EOT:
        print(f"note: the model's vocabulary ({vocab_size} tokens) has no GPT-2 <|endoftext|> ({GPT2_EOT}): "
              f"samples start from its last token, {eot}, instead")
    if text is None:
        return [eot]
    enc = tiktoken_gpt2()
    if isinstance(enc, Exception):
        raise InputError(f"--prompt needs tiktoken's GPT-2 tokenizer, which could not load ({type(enc).__name__})")
    tokens = enc.encode_ordinary(text)
    if max(tokens, default=0) >= vocab_size:
        raise InputError(f"--prompt has tokens beyond the model's vocab size {vocab_size}")
    return [eot] + tokens
