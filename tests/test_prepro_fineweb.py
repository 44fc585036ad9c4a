"""prepro_fineweb.py: llm.c's shards on the same documents (its loop, written out below as the
oracle), resume after a failure, parquet and JSON lines, the download, bad input."""

import functools
import http.server
import json
import os
import random
import threading

import numpy as np
import pytest

import prepro_fineweb
from helpers import run

tiktoken = pytest.importorskip("tiktoken")


@pytest.fixture(scope="module")
def enc():
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # offline without the cached files
        pytest.skip(f"tiktoken's GPT-2 files are not available here ({type(e).__name__})")


def llmc_shards(texts, enc, shard_size):
    # llm.c's dev/data/fineweb.py loop, as an independent oracle: a document goes into the shard
    # if it fits with room to spare (`<`); else it ends the shard and its rest starts the next
    shards, shard, count = [], np.empty(shard_size, np.uint16), 0
    for text in texts:
        tokens = np.array([50256] + enc.encode_ordinary(text), dtype=np.uint16)
        if count + len(tokens) < shard_size:
            shard[count:count + len(tokens)] = tokens
            count += len(tokens)
        else:
            remainder = shard_size - count
            shard[count:] = tokens[:remainder]
            shards.append(shard.copy())
            shard[:len(tokens) - remainder] = tokens[remainder:]
            count = len(tokens) - remainder
    if count:
        shards.append(shard[:count].copy())
    return shards


def documents(enc, n=120, seed=0, exact_fill_at=None):
    # random short documents; with exact_fill_at, one whose end fills a shard of that size exactly
    rng = random.Random(seed)
    words = "the cat sat on a mat while dogs ran far away under blue skies, café".split()
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(0, 50))) for _ in range(n)]
    if exact_fill_at:
        total = sum(1 + len(enc.encode_ordinary(t)) for t in texts[:10])
        texts.insert(10, " the" * (exact_fill_at - total % exact_fill_at - 1))
        assert (total + 1 + len(enc.encode_ordinary(texts[10]))) % exact_fill_at == 0
    return texts


def write_jsonl(path, texts):
    with open(path, "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text, "id": "x"}) + "\n")
    return str(path)


def read_shard(path):
    data = open(path, "rb").read()
    header = np.frombuffer(data[:1024], "<i4")
    assert list(header[:3]) == [20240520, 1, (len(data) - 1024) // 2] and not header[3:].any()
    return np.frombuffer(data[1024:], "<u2")


def shards_in(folder, name="fineweb"):
    files = sorted((f for f in os.listdir(folder) if f.endswith(".bin")), key=lambda f: f[-10:])
    assert files == [f"{name}_{'val' if i == 0 else 'train'}_{i:06d}.bin" for i in range(len(files))]
    return [read_shard(os.path.join(folder, f)) for f in files]


def prepro(*args):
    return run("prepro_fineweb.py", *args)


@pytest.mark.parametrize("shard_size", [300, 1000, 100000])
def test_shards_are_llmcs(tmp_path, enc, shard_size):
    texts = documents(enc, exact_fill_at=shard_size if shard_size < 10000 else None)
    result = prepro("--input", write_jsonl(tmp_path / "docs.jsonl", texts), "-s", str(shard_size),
                    "--output-dir", str(tmp_path / "out"), "--processes", "2")
    assert result.returncode == 0, result.stderr
    ours, expected = shards_in(tmp_path / "out"), llmc_shards(texts, enc, shard_size)
    assert len(ours) == len(expected) and all((a == b).all() for a, b in zip(ours, expected))


def test_a_document_longer_than_a_shard_spans_several(tmp_path, enc):
    # (llm.c's loop fails there); the shards still hold every token, in order
    texts = ["short one", " the" * 250, "and after"]
    assert prepro("--input", write_jsonl(tmp_path / "d.jsonl", texts), "-s", "64",
                  "--output-dir", str(tmp_path / "out")).returncode == 0
    shards = shards_in(tmp_path / "out")
    assert [len(s) for s in shards[:-1]] == [64] * (len(shards) - 1)
    expected = np.concatenate([[50256] + enc.encode_ordinary(t) for t in texts])
    np.testing.assert_array_equal(np.concatenate(shards), expected)


def test_a_rerun_resumes_after_the_last_finished_shard(tmp_path, enc, monkeypatch):
    texts = documents(enc, n=200, seed=1)
    docs = write_jsonl(tmp_path / "docs.jsonl", texts)
    out = tmp_path / "out"
    written = []

    def failing(path, tokens):  # the disk fills at the fourth shard
        if len(written) == 3:
            raise OSError(28, "No space left on device")
        written.append(path)
        write_shard(path, tokens)
    write_shard = prepro_fineweb.write_shard
    monkeypatch.setattr(prepro_fineweb, "write_shard", failing)
    with pytest.raises(OSError):
        prepro_fineweb.main(["--input", docs, "-s", "500", "--output-dir", str(out), "--processes", "1"])
    assert len(shards_in(out)) == 3 and not [f for f in os.listdir(out) if ".tmp." in f]
    monkeypatch.undo()
    result = prepro("--input", docs, "-s", "500", "--output-dir", str(out))
    assert result.returncode == 0 and "resuming at shard 3" in result.stderr, result.stderr
    expected = llmc_shards(texts, enc, 500)
    ours = shards_in(out)
    assert len(ours) == len(expected) and all((a == b).all() for a, b in zip(ours, expected))
    # once finished, a rerun has nothing to do
    again = prepro("--input", docs, "-s", "500", "--output-dir", str(out))
    assert again.returncode == 0 and "are there already" in again.stderr


def test_parquet_and_json_lines_in_the_order_given(tmp_path, enc):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow
    texts = documents(enc, n=60, seed=2)
    pq.write_table(pyarrow.table({"id": [str(i) for i in range(40)], "text": texts[:40]}), tmp_path / "a.parquet",
                   row_group_size=7)
    docs = write_jsonl(tmp_path / "b.jsonl", texts[40:])
    result = prepro("--input", str(tmp_path / "a.parquet"), docs, "-s", "400", "--output-dir", str(tmp_path / "o"),
                    "--type", "edu")
    assert result.returncode == 0, result.stderr
    ours, expected = shards_in(tmp_path / "o", "edu_fineweb"), llmc_shards(texts, enc, 400)
    assert len(ours) == len(expected) and all((a == b).all() for a, b in zip(ours, expected))


@pytest.mark.parametrize("content, fragment", [
    (None, "no such file"),
    ('{"text": "fine"}\nnot json\n', "line 2: not a JSON object"),
    ('{"body": "no text field"}\n', "line 1: not a JSON object"),
])
def test_bad_input_is_one_line(tmp_path, content, fragment):
    path = tmp_path / "docs.jsonl"
    if content is not None:
        path.write_text(content)
    result = prepro("--input", str(path), "--output-dir", str(tmp_path / "out"))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and fragment in lines[-1] and "Traceback" not in result.stderr


class Handler(http.server.SimpleHTTPRequestHandler):
    # Hugging Face as the script sees it: the API's listing of sample/10BT, and its files
    def do_GET(self):
        if self.path.startswith("/api/datasets/HuggingFaceFW/fineweb/tree/main/sample/10BT"):
            body = json.dumps([{"path": "sample/10BT/001_00000.parquet"}, {"path": "sample/10BT/000_00000.parquet"},
                               {"path": "sample/10BT/README.md"}]).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.path = self.path.replace("/datasets/HuggingFaceFW/fineweb/resolve/main/sample/10BT/", "/")
        super().do_GET()

    def log_message(self, *args):
        pass


def test_download_lists_and_fetches_the_parquet_files_in_sorted_order(tmp_path, enc):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow
    www = tmp_path / "www"
    www.mkdir()
    texts = documents(enc, n=50, seed=3)
    pq.write_table(pyarrow.table({"text": texts[:30]}), www / "000_00000.parquet")
    pq.write_table(pyarrow.table({"text": texts[30:]}), www / "001_00000.parquet")
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(www)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        result = prepro("--hf-url", url, "-s", "300", "--output-dir", str(tmp_path / "out"))
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(tmp_path / "out" / "parquet")) == ["000_00000.parquet", "001_00000.parquet"]
    ours, expected = shards_in(tmp_path / "out"), llmc_shards(texts, enc, 300)
    assert len(ours) == len(expected) and all((a == b).all() for a, b in zip(ours, expected))


def test_no_network_is_one_line(tmp_path):
    result = prepro("--hf-url", "http://127.0.0.1:9", "--output-dir", str(tmp_path / "out"))
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1].startswith("error: could not list")


