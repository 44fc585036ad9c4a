"""prepro_tinyshakespeare.py: llm.c's exact bytes on the real text, the format on small texts, downloads, errors."""

import functools
import hashlib
import http.server
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from helpers import gpt2_encoding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "prepro_tinyshakespeare.py")
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
SHAKESPEARE = os.path.join(SHARED, "data", "tinyshakespeare.txt")
EOT = 50256  # <|endoftext|>

# tiktoken can't download its GPT-2 files offline; the workplace keeps a copy beside the repo.
# Set here (not only in conftest.py) so this file runs on its own; the scripts we start inherit it.
if os.path.isdir(os.path.join(SHARED, "tiktoken_cache")):
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.join(SHARED, "tiktoken_cache"))

# SHA-256 of the two files llm.c's own dev/data/tinyshakespeare.py (--model_desc gpt-2, llm.c commit
# f1e2ace6) writes from that text: its tokenize() run in a scratch folder, with its transformers,
# requests and tqdm imports stubbed out, on a copy of the text
LLMC_SHA256 = {
    "tiny_shakespeare_val.bin": "fe99db720dc7c83e694806d4e047a952909411da1daccde4ccc2e55f40882a62",
    "tiny_shakespeare_train.bin": "8a70606be574040c26d225694f5f9759973b419852d22f7fe5c118e1b359dcc8",
}




def expected_tokens(enc, text):
    # llm.c's rule, written out here on its own: EOT before each section, "\n\n" kept on all but the last
    sections = text.split("\n\n")
    tokens = []
    for i, s in enumerate(sections):
        tokens += [EOT] + enc.encode_ordinary(s + "\n\n" if i < len(sections) - 1 else s)
    return tokens


def prepro(*args, cwd=ROOT, env=None):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, cwd=cwd, env=env)


def read_tokens(path):
    # a token file's tokens, after checking its header: magic, version, count, zeros
    data = open(path, "rb").read()
    header = np.frombuffer(data[:1024], dtype="<i4")
    assert len(header) == 256 and header[0] == 20240520 and header[1] == 1 and not header[3:].any()
    assert len(data) == 1024 + 2 * header[2]
    return np.frombuffer(data[1024:], dtype="<u2").tolist()


def assert_one_error_line(result, status, *names):
    assert result.returncode == status, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for name in names:
        assert name in lines[0]


@pytest.mark.skipif(not os.path.isfile(SHAKESPEARE), reason="../shared/data/tinyshakespeare.txt is not present")
def test_real_text_gives_llmcs_bytes(tmp_path):
    gpt2_encoding()
    # run from tmp_path with the default --output-dir, so the output reads exactly as in the docstring
    result = prepro("--input", SHAKESPEARE, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "writing 32,768 tokens to data/tiny_shakespeare_val.bin (66,560 bytes)",
        "writing 305,260 tokens to data/tiny_shakespeare_train.bin (611,544 bytes)",
    ]
    out = tmp_path / "data"
    assert sorted(os.listdir(out)) == sorted(LLMC_SHA256)  # no temporary files left behind
    assert len(read_tokens(out / "tiny_shakespeare_val.bin")) == 32768
    assert len(read_tokens(out / "tiny_shakespeare_train.bin")) == 305260
    assert (out / "tiny_shakespeare_val.bin").stat().st_size == 66560
    assert (out / "tiny_shakespeare_train.bin").stat().st_size == 611544
    for name, sha in LLMC_SHA256.items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == sha, name


BIG_TEXT = "To be.\n\nOr not.\n\n" * 5000  # about 50,000 tokens: enough for both splits


def test_small_text_token_by_token(tmp_path):
    enc = gpt2_encoding()
    sections = ["First Citizen:\nBefore we proceed", "All:\nSpeak, speak.", "The end."]
    text = "\n\n".join(sections)
    (tmp_path / "in.txt").write_text(text + "\n\n" + "Speak.\n\n" * 20000, encoding="utf-8")
    result = prepro("--input", str(tmp_path / "in.txt"), "--output-dir", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    # each section starts with <|endoftext|> and keeps its trailing blank line
    expected = []
    for s in sections:
        expected += [EOT] + enc.encode_ordinary(s + "\n\n")
    val = read_tokens(tmp_path / "out" / "tiny_shakespeare_val.bin")
    assert val[:len(expected)] == expected
    assert enc.decode(val[:len(expected)]) == "<|endoftext|>" + (text + "\n\n").replace("\n\n", "\n\n<|endoftext|>")[:-len("<|endoftext|>")]


def test_a_text_too_small_for_both_splits_is_an_error(tmp_path):
    # shorter than the 32,768-token validation split: no training tokens, so one line and no files
    # (llm.c's script writes an empty training file)
    (tmp_path / "in.txt").write_text("First Citizen:\nBefore we proceed\n\nAll:\nSpeak.", encoding="utf-8")
    result = prepro("--input", str(tmp_path / "in.txt"), "--output-dir", str(tmp_path / "out"))
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "too few for both splits" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_split_at_32768_tokens(tmp_path):
    enc = gpt2_encoding()
    # about 40,000 tokens of made-up sections (with some unicode and a trailing blank line)
    text = "\n\n".join(f"Citizen {i}:\nWhat say'st thou, café {i * 7}?" for i in range(2500)) + "\n\n"
    (tmp_path / "in.txt").write_text(text, encoding="utf-8")
    result = prepro("--input", str(tmp_path / "in.txt"), "--output-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    expected = expected_tokens(enc, text)
    assert len(expected) > 32768 and expected[-1] == EOT  # the text ends in "\n\n": an empty last section
    assert read_tokens(tmp_path / "tiny_shakespeare_val.bin") == expected[:32768]
    assert read_tokens(tmp_path / "tiny_shakespeare_train.bin") == expected[32768:]


@pytest.mark.parametrize("content", [None, b"To be, or not\xff to be"], ids=["missing", "not-utf8"])
def test_bad_input_is_one_clear_line(tmp_path, content):
    path = tmp_path / "in.txt"
    if content is not None:
        path.write_bytes(content)
    out = tmp_path / "out"
    result = prepro("--input", str(path), "--output-dir", str(out))
    assert_one_error_line(result, 2, str(path), "not found" if content is None else "UTF-8")
    assert not out.exists()  # nothing written, not even the folder


def test_output_dir_that_is_a_file_is_one_clear_line(tmp_path):
    gpt2_encoding()
    (tmp_path / "in.txt").write_text(BIG_TEXT, encoding="utf-8")
    (tmp_path / "out").write_text("not a folder")
    result = prepro("--input", str(tmp_path / "in.txt"), "--output-dir", str(tmp_path / "out"))
    assert_one_error_line(result, 2, str(tmp_path / "out"), "folder")
    assert (tmp_path / "out").read_text() == "not a folder"


def test_tiktoken_without_its_files_is_one_clear_line(tmp_path):
    pytest.importorskip("tiktoken", reason="this is about tiktoken without its files; without tiktoken itself, "
                                           "the script says to install it")
    # an empty tiktoken cache, and a proxy that refuses connections, so its download fails at once
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "https_proxy", "http_proxy")}
    env.update(TIKTOKEN_CACHE_DIR=str(tmp_path / "empty_cache"), HTTPS_PROXY="http://127.0.0.1:9",
               HTTP_PROXY="http://127.0.0.1:9")
    (tmp_path / "empty_cache").mkdir()
    (tmp_path / "in.txt").write_text("To be.\n\nOr not.", encoding="utf-8")
    out = tmp_path / "out"
    result = prepro("--input", str(tmp_path / "in.txt"), "--output-dir", str(out), env=env)
    assert_one_error_line(result, 1, "tiktoken", "TIKTOKEN_CACHE_DIR")
    assert not out.exists()


class Handler(http.server.SimpleHTTPRequestHandler):
    # serves files from its folder, and under /truncated/ a download cut off midway
    def do_GET(self):
        if not self.path.startswith("/truncated/"):
            return super().do_GET()
        self.send_response(200)
        self.send_header("Content-Length", "1000")  # announces 1,000 bytes, sends 10, closes
        self.end_headers()
        self.wfile.write(b"To be, or ")
        self.close_connection = True

    def log_message(self, *args):  # no request log in pytest's output
        pass


@pytest.fixture
def server(tmp_path):
    # a web server on 127.0.0.1, in a thread, serving tmp_path/www
    www = tmp_path / "www"
    www.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(www)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield www, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_download(tmp_path, server):
    enc = gpt2_encoding()
    www, url = server
    (www / "input.txt").write_text(BIG_TEXT, encoding="utf-8")
    out = tmp_path / "out"  # a folder that doesn't exist yet
    result = prepro("--url", f"{url}/input.txt", "--output-dir", str(out))
    assert result.returncode == 0, result.stderr
    assert f"downloading {url}/input.txt: {len(BIG_TEXT):,} bytes (100%)" in result.stderr
    assert (out / "tiny_shakespeare.txt").read_text(encoding="utf-8") == BIG_TEXT
    tokens = expected_tokens(enc, BIG_TEXT)
    assert read_tokens(out / "tiny_shakespeare_val.bin") == tokens[:32768]
    assert read_tokens(out / "tiny_shakespeare_train.bin") == tokens[32768:]
    assert sorted(os.listdir(out)) == ["tiny_shakespeare.txt", "tiny_shakespeare_train.bin", "tiny_shakespeare_val.bin"]
    # a second run finds the text and doesn't download it again (that URL would fail)
    result = prepro("--url", f"{url}/missing.txt", "--output-dir", str(out))
    assert result.returncode == 0, result.stderr
    assert "skipping download" in result.stdout and "downloading" not in result.stderr


@pytest.mark.parametrize("path, reason", [("missing.txt", "HTTP 404"), ("truncated/input.txt", "1,000 bytes")])
def test_failed_download_leaves_nothing(tmp_path, server, path, reason):
    _, url = server
    out = tmp_path / "out"
    result = prepro("--url", f"{url}/{path}", "--output-dir", str(out))
    # past the progress display (a cut-off download has one, ended before the error): one error line
    result.stderr = "\n".join(line for line in result.stderr.splitlines() if not line.startswith("downloading "))
    assert_one_error_line(result, 1, "could not download", f"{url}/{path}", reason, "--input")
    assert os.listdir(out) == []  # no text file, whole or partial, and no temporary file
