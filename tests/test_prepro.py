"""prepro_tinyshakespeare.py: llm.c's exact bytes on the real text, the format on a small one, and its errors."""

import hashlib
import http.server
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAKESPEARE = os.path.join(os.path.dirname(ROOT), "shared", "data", "tinyshakespeare.txt")
# SHA-256 of the files llm.c's own dev/data/tinyshakespeare.py writes from that text (run once, by hand)
LLMC_SHA256 = {
    "tiny_shakespeare_val.bin": "fe99db720dc7c83e694806d4e047a952909411da1daccde4ccc2e55f40882a62",
    "tiny_shakespeare_train.bin": "8a70606be574040c26d225694f5f9759973b419852d22f7fe5c118e1b359dcc8",
}


def gpt2_encoding():
    try:
        import tiktoken
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # offline without the cache: nothing here can run
        pytest.skip(f"tiktoken cannot load the gpt2 encoding: {e}")


def prepro(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "prepro_tinyshakespeare.py"), *args],
                          capture_output=True, text=True, cwd=ROOT)


def read_tokens(path):
    data = open(path, "rb").read()
    header = np.frombuffer(data[:1024], dtype="<i4")
    assert header[0] == 20240520 and header[1] == 1 and not header[3:].any()
    tokens = np.frombuffer(data[1024:], dtype="<u2")
    assert len(tokens) == header[2]
    return tokens.tolist()


@pytest.mark.skipif(not os.path.isfile(SHAKESPEARE), reason="the shared Tiny Shakespeare text is not present")
def test_real_text_gives_llmcs_bytes(tmp_path):
    gpt2_encoding()
    result = prepro("--input", SHAKESPEARE, "--output-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"writing 32,768 tokens to {tmp_path / 'tiny_shakespeare_val.bin'} (66,560 bytes)",
        f"writing 305,260 tokens to {tmp_path / 'tiny_shakespeare_train.bin'} (611,544 bytes)",
    ]
    for name, sha in LLMC_SHA256.items():
        assert hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() == sha, name
    assert sorted(os.listdir(tmp_path)) == sorted(LLMC_SHA256)  # no temporary files left behind


def test_small_text_token_by_token(tmp_path):
    enc = gpt2_encoding()
    sections = ["First Citizen:\nBefore we proceed", "All:\nSpeak, speak.", "The end."]
    (tmp_path / "in.txt").write_text("\n\n".join(sections), encoding="utf-8")
    result = prepro("--input", str(tmp_path / "in.txt"), "--output-dir", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    # each section starts with <|endoftext|>; all but the last keep their trailing blank line
    expected = []
    for i, s in enumerate(sections):
        expected += [50256] + enc.encode_ordinary(s + "\n\n" if i < len(sections) - 1 else s)
    assert read_tokens(tmp_path / "out" / "tiny_shakespeare_val.bin") == expected
    assert read_tokens(tmp_path / "out" / "tiny_shakespeare_train.bin") == []  # shorter than the val split


@pytest.mark.parametrize("content", [None, b"\xff\xfe not utf-8 \xff"])
def test_bad_input_is_one_clear_line(tmp_path, content):
    path = tmp_path / "in.txt"
    if content is not None:
        path.write_bytes(content)
    result = prepro("--input", str(path), "--output-dir", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and str(path) in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not any(name.endswith(".bin") for name in os.listdir(tmp_path / "out"))


@pytest.fixture
def server(tmp_path):
    # a web server on 127.0.0.1 serving tmp_path/www
    (tmp_path / "www").mkdir()
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path / "www"))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield tmp_path / "www", f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_download(tmp_path, server):
    enc = gpt2_encoding()
    www, url = server
    (www / "input.txt").write_text("To be.\n\nOr not.", encoding="utf-8")
    out = tmp_path / "out"
    result = prepro("--url", f"{url}/input.txt", "--output-dir", str(out))
    assert result.returncode == 0, result.stderr
    assert "downloading" in result.stderr and "(100%)" in result.stderr
    assert (out / "tiny_shakespeare.txt").read_text() == "To be.\n\nOr not."
    assert read_tokens(out / "tiny_shakespeare_val.bin") == [50256, *enc.encode_ordinary("To be.\n\n"), 50256, *enc.encode_ordinary("Or not.")]
    # a second run finds the text and doesn't download it again
    result = prepro("--url", f"{url}/missing.txt", "--output-dir", str(out))
    assert result.returncode == 0 and "skipping download" in result.stdout


def test_failed_download_leaves_nothing(tmp_path, server):
    _, url = server
    out = tmp_path / "out"
    result = prepro("--url", f"{url}/missing.txt", "--output-dir", str(out))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: could not download") and "missing.txt" in lines[-1] and "--input" in lines[-1]
    assert "Traceback" not in result.stderr and os.listdir(out) == []
