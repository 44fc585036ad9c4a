"""download_starter_pack.py against a web server on 127.0.0.1 that misbehaves on request."""

import http.server
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import download_starter_pack as dl
from helpers import FIXTURES, MODEL, ROOT, STATE, TOKENIZER_MAGIC, header, token_bytes


def starter_pack():
    # small stand-ins with llm.c's headers: the tiny fixture model plays GPT-2 124M
    return {
        "gpt2_124M.bin": open(MODEL, "rb").read(),
        "gpt2_124M_debug_state.bin": open(STATE, "rb").read(),
        "gpt2_tokenizer.bin": header(TOKENIZER_MAGIC, 2, 2, 1) + b"\x01a\x02bc",
        "tiny_shakespeare_train.bin": token_bytes(np.arange(3000) % 777),
        "tiny_shakespeare_val.bin": token_bytes(np.arange(500) % 777),
        "hellaswag_val.bin": open(os.path.join(FIXTURES, "hellaswag_tiny.bin"), "rb").read(),
    }


class Server:
    """Serves files with HTTP Range support; behaviour[name] makes it misbehave:
    'cut' (the first response stops halfway and the connection closes), 'error' (HTTP 500),
    'no-range' (ignores Range and sends everything)."""

    def __init__(self, files):
        self.files, self.behaviour, self.requests = dict(files), {}, []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                server.requests.append((name, self.headers.get("Range")))
                if name not in server.files:
                    return self.send_error(404)
                if server.behaviour.get(name) == "error":
                    return self.send_error(500)
                data, start = server.files[name], 0
                if self.headers.get("Range") and server.behaviour.get(name) != "no-range":
                    start = int(self.headers["Range"].split("=")[1].rstrip("-"))
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                if server.behaviour.get(name) == "cut":
                    server.behaviour.pop(name)  # only once: the next request gets the rest
                    self.wfile.write(data[start:start + (len(data) - start) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(data[start:])

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/pack"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def server():
    s = Server(starter_pack())
    yield s
    s.httpd.shutdown()


def test_full_download(tmp_path, server):
    dl.download_starter_pack(str(tmp_path), str(tmp_path / "data"), server.url)
    for name, data in server.files.items():
        folder = tmp_path / "data" if name in dl.DATA_FILES else tmp_path
        assert (folder / name).read_bytes() == data
    assert sorted(os.listdir(tmp_path)) == ["data", *sorted(dl.MODEL_FILES)]  # no .partial left
    server.requests.clear()
    dl.download_starter_pack(str(tmp_path), str(tmp_path / "data"), server.url)
    assert server.requests == []  # everything is there: nothing fetched again


def test_resume_after_a_cut_connection(tmp_path, server):
    server.behaviour["gpt2_124M.bin"] = "cut"
    with pytest.raises(dl.DownloadError, match="broke off|stopped at") as e:
        dl.download_starter_pack(str(tmp_path), None, server.url)
    assert "run again to resume" in str(e.value)
    size = len(server.files["gpt2_124M.bin"])
    assert not (tmp_path / "gpt2_124M.bin").exists()  # nothing half-written under the final name
    assert 0 < os.path.getsize(tmp_path / "gpt2_124M.bin.partial") < size
    dl.download_starter_pack(str(tmp_path), None, server.url)
    assert (tmp_path / "gpt2_124M.bin").read_bytes() == server.files["gpt2_124M.bin"]
    resumed = [r for n, r in server.requests if n == "gpt2_124M.bin"][-1]
    assert resumed == f"bytes={size // 2}-"  # it asked only for the rest
    assert not (tmp_path / "gpt2_124M.bin.partial").exists()


def test_server_ignoring_range_starts_over(tmp_path, server):
    good = server.files["gpt2_124M.bin"]
    (tmp_path / "gpt2_124M.bin.partial").write_bytes(good[:1000])
    server.behaviour["gpt2_124M.bin"] = "no-range"
    dl.download_starter_pack(str(tmp_path), None, server.url)
    assert (tmp_path / "gpt2_124M.bin").read_bytes() == good


def test_complete_partial_file_is_finished(tmp_path, server):
    (tmp_path / "gpt2_124M.bin.partial").write_bytes(server.files["gpt2_124M.bin"])
    dl.download_starter_pack(str(tmp_path), None, server.url)  # the server answers 416: nothing left
    assert (tmp_path / "gpt2_124M.bin").read_bytes() == server.files["gpt2_124M.bin"]


def test_server_error(tmp_path, server):
    server.behaviour["gpt2_tokenizer.bin"] = "error"
    with pytest.raises(dl.DownloadError, match="HTTP 500") as e:
        dl.download_starter_pack(str(tmp_path), None, server.url)
    assert "by hand from https://huggingface.co" in str(e.value)
    assert "gpt2_tokenizer.bin" not in os.listdir(tmp_path) and "gpt2_tokenizer.bin.partial" not in os.listdir(tmp_path)


@pytest.mark.parametrize("name, damage, fragment", [
    ("gpt2_124M.bin", lambda d: d[:-400], "header implies"),  # the server's copy is truncated
    ("tiny_shakespeare_val.bin", lambda d: d[:-2], "header implies"),
    ("gpt2_124M_debug_state.bin", lambda d: b"<html>not found</html>" + d[22:], "not llm.c's magic 20240327"),
    ("gpt2_tokenizer.bin", lambda d: d[:100], "too short"),
    ("hellaswag_val.bin", lambda d: d[:1100], "shorter than its longest example"),
    ("hellaswag_val.bin", lambda d: d[4:8] + d[4:], "not llm.c's magic 20240522"),
])
def test_bad_file_is_not_kept(tmp_path, server, name, damage, fragment):
    server.files[name] = damage(server.files[name])
    with pytest.raises(dl.DownloadError, match=fragment):
        dl.download_starter_pack(str(tmp_path), str(tmp_path), server.url)
    assert name not in os.listdir(tmp_path) and name + ".partial" not in os.listdir(tmp_path)


def test_no_server(tmp_path):
    with pytest.raises(dl.DownloadError, match="could not download http://127.0.0.1:9/x/gpt2_124M.bin"):
        dl.download_starter_pack(str(tmp_path), None, "http://127.0.0.1:9/x")
    assert os.listdir(tmp_path) == []


def test_train_gpt2_download(tmp_path, server):
    cmd = [sys.executable, os.path.join(ROOT, "train_gpt2.py"), "--download", "--download-data", "--download-url", server.url,
           "--steps", "1", "-b", "2", "-t", "8", "--val-batches", "1", "--sample-every", "0"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "step 0: train loss" in result.stdout and "wrote gpt2_124M.bin" in result.stdout
    assert sorted(os.listdir(tmp_path / "data")) == sorted(dl.DATA_FILES)
    server.behaviour["gpt2_124M.bin"] = "error"
    os.remove(tmp_path / "gpt2_124M.bin")
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 1 and result.stderr.startswith("error: could not download") and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
