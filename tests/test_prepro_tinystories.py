"""prepro_tinystories.py: llm.c's dev/data/tinystories.py, byte for byte, on a small local copy."""

import io
import json
import random
import tarfile

import numpy as np
import pytest

from helpers import assert_one_error_line, run, token_bytes

tiktoken = pytest.importorskip("tiktoken")


def stories(k):
    return [{"story": f"  Story {k}.{i}: Tom saw a {'big ' * i}dog.\n"} for i in range(7)]


def expected(shards):
    # llm.c's loop: per shard k of a split, Random(1337 + k) shuffles, then EOT + stripped story
    enc = tiktoken.get_encoding("gpt2")
    tokens = []
    for k, data in enumerate(shards):
        random.Random(1337 + k).shuffle(data)
        for example in data:
            tokens += [50256] + enc.encode_ordinary(example["story"].strip())
    return token_bytes(tokens)


@pytest.mark.parametrize("form", ["folder", "tar"])
def test_byte_identical_to_llmc(tmp_path, form):
    names = ["data02.json", "data00.json", "data01.json"]  # sorted: data00 is validation
    folder = tmp_path / "all"
    folder.mkdir()
    for name in names:
        (folder / name).write_text(json.dumps(stories(int(name[4:6]))))
    path = folder
    if form == "tar":
        path = tmp_path / "all.tar.gz"
        with tarfile.open(path, "w:gz") as tar:
            for name in names:
                tar.add(folder / name, arcname=name)
    result = run("prepro_tinystories.py", "--input", str(path), "--output-dir", str(tmp_path / "out"),
                 "--processes", "2")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "TinyStories_val.bin").read_bytes() == expected([stories(0)])
    assert (tmp_path / "out" / "TinyStories_train.bin").read_bytes() == expected([stories(1), stories(2)])


def test_bad_input(tmp_path):
    (tmp_path / "x.txt").write_text("not a tar")
    assert_one_error_line(run("prepro_tinystories.py", "--input", str(tmp_path / "x.txt")), "neither a folder")
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "a.json").write_text("[]")
    assert_one_error_line(run("prepro_tinystories.py", "--input", str(tmp_path / "one")), "at least 2")
