"""prepro_tinystories.py: llm.c's dev/data/tinystories.py, byte for byte, on a small local copy."""

import io
import json
import random
import tarfile

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


def test_download_resumes_and_gives_the_same_bytes(tmp_path):
    # a loopback server that cuts the archive off once, then serves the rest (HTTP Range)
    import functools
    import http.server
    import threading
    www = tmp_path / "www"
    www.mkdir()
    data = {name: stories(int(name[4:6])) for name in ["data00.json", "data01.json", "data02.json"]}
    with tarfile.open(www / "all.tar.gz", "w:gz") as tar:
        for name, content in data.items():
            blob = json.dumps(content).encode()
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    archive = (www / "all.tar.gz").read_bytes()
    served = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            start = int(self.headers.get("Range", "bytes=0-")[6:-1])
            body = archive[start:]
            served.append(start)
            self.send_response(206 if start else 200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[:len(body) // 2] if len(served) == 1 else body)  # the first one cut off

        def log_message(self, *args):
            pass
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(www)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/all.tar.gz"
    try:
        first = run("prepro_tinystories.py", "--url", url, "--output-dir", str(tmp_path / "out"), "--processes", "1")
        second = run("prepro_tinystories.py", "--url", url, "--output-dir", str(tmp_path / "out"), "--processes", "1")
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert first.returncode == 1 and "run again to resume" in first.stderr, first.stderr
    assert second.returncode == 0, second.stderr
    assert served[0] == 0 and served[1] > 0  # the second run asked for the rest only
    assert (tmp_path / "out" / "TinyStories_val.bin").read_bytes() == expected([data["data00.json"]])
    assert (tmp_path / "out" / "TinyStories_train.bin").read_bytes() == expected([data["data01.json"],
                                                                                  data["data02.json"]])
