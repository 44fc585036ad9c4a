"""The inputs and faults real users and clusters produce (issue 23): each gets one line and an exit
status, and nothing is lost or left half-written."""

import http.server
import os
import signal
import subprocess
import sys
import threading
import warnings

import numpy as np
import pytest

import train_gpt2 as tg
from llmc import cli, formats
from llmc.run import NonFiniteLossError
from llmc.utils import InputError
from helpers import MODEL, ROOT, STATE, STATE_MAGIC, assert_one_error_line, header, run, write_tokens


# 1. numeric options: finite and in range, before any work

@pytest.mark.parametrize("option, value", [
    ("--lr", "nan"), ("--lr", "inf"), ("--lr", "-1e-4"), ("--weight-decay", "nan"), ("--weight-decay", "-0.1"),
    ("--grad-clip", "nan"), ("--grad-clip", "inf"), ("--temperature", "nan"), ("--temperature", "inf"),
    ("--lr-min-frac", "nan"), ("--seed", "0"), ("--seed", "-1"), ("--seed", str(2**64)),
])
def test_nonsense_numbers_are_refused(option, value):
    with pytest.raises(InputError, match=option):
        cli.parse_args(tg.DEPTHS, ["--init", "d6", option, value])


def test_the_largest_seed_is_taken():
    assert cli.parse_args(tg.DEPTHS, ["--seed", str(2**64 - 1)]).seed == 2**64 - 1


def test_a_nan_learning_rate_is_one_line_from_the_command_line(tmp_path):
    result = run("train_gpt2.py", "--checkpoint", MODEL, "--lr", "nan", "--output", str(tmp_path / "m.bin"))
    assert_one_error_line(result, "--lr must be a finite number")
    assert not (tmp_path / "m.bin").exists()


def test_a_tiny_temperature_is_greedy_sampling():
    logits = np.array([0.5, 3.0, 2.999, -1.0], dtype=np.float32)
    for seed in (1, 2, 3):
        assert tg.sample_token(logits, 4, [seed], temperature=1e-40) == 1
        assert tg.sample_token(logits, 4, [seed], temperature=1e-40) == tg.sample_token(logits, 4, [seed], top_k=1)


# 8. test_gpt2.py: a debug state that does not fit its checkpoint, expected losses of the wrong kind

def test_a_debug_state_longer_than_the_context_is_one_line(tmp_path):
    config = tg.read_checkpoint_config(MODEL)
    B, T, V, n = 1, config.max_seq_len + 1, config.vocab_size, tg.num_parameters(config)
    state = tmp_path / "state.bin"
    state.write_bytes(header(STATE_MAGIC, 2, B, T) + np.zeros(2 * B * T + B * T * V + 1 + n, "<i4").tobytes())
    result = run("test_gpt2.py", "--checkpoint", MODEL, "--state", str(state))
    assert_one_error_line(result, f"T={T}", "max_seq_len 64")


@pytest.mark.parametrize("losses", ["[true, 1, 1, 1, 1, 1, 1, 1, 1, 1]", "[NaN, 1, 1, 1, 1, 1, 1, 1, 1, 1]",
                                    "[1, 1, 1, 1, 1, 1, 1, 1, 1, Infinity]", '"0123456789"'])
def test_expected_losses_of_the_wrong_kind_are_one_line(tmp_path, losses):
    path = tmp_path / "losses.json"
    path.write_text('{"losses": %s}' % losses)
    result = run("test_gpt2.py", "--checkpoint", MODEL, "--state", STATE, "--expected-losses", str(path))
    assert_one_error_line(result, "10 finite numbers")


# 11. resume folders: only the names this trainer writes count

def test_resume_ignores_look_alikes(tmp_path):
    from llmc.formats import latest_checkpoint
    for name in ("model_3.bin", "state_3.bin", "model_7.bin", "state_007.bin", "model_².bin", "state_².bin",
                 "model_9.bin", "state_9.bin.tmp.12", "model_10.bin", "model_11.bin"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "state_10.bin").mkdir()  # a folder is not a run state
    (tmp_path / "state_11.bin").symlink_to(tmp_path / "missing")  # nor a dangling link
    assert latest_checkpoint(str(tmp_path)) == 3


def test_a_folder_of_look_alikes_is_one_line(tmp_path):
    for name in ("model_².bin", "state_².bin", "model_01.bin", "state_01.bin"):
        (tmp_path / name).write_bytes(b"")
    result = run("train_gpt2.py", "--resume", str(tmp_path), "--steps", "2")
    assert_one_error_line(result, "no model_<step>.bin with its state_<step>.bin")


# 4. signals: SIGTERM and SIGHUP stop as Ctrl-C does; 7. a closed pipe ends the run quietly

def signal_after(sig, line_start, tmp_path, *args):
    # a long run of the tiny model, sent `sig` once it has printed a line starting with line_start
    data = [write_tokens(tmp_path / name, np.arange(600) % 700) for name in ("train.bin", "val.bin")]
    cmd = [sys.executable, "-u", os.path.join(ROOT, "train_gpt2.py"), "--checkpoint", MODEL, "--train-data",
           data[0], "--val-data", data[1], "-b", "2", "-t", "8", "--steps", "100000", "--val-every", "0",
           "--sample-every", "0", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        for line in proc.stdout:
            if line.startswith(line_start):
                break
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    return proc.returncode, stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_to_stop_is_one_line_and_leaves_whole_checkpoints(tmp_path, sig):
    out = tmp_path / "run"
    status, stderr = signal_after(sig, "saved model_2.bin", tmp_path, "--output-dir", str(out), "--save-every", "1")
    assert status == 128 + sig, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: stopped by {signal.Signals(sig).name} at step "), stderr
    assert f"--resume {out}" in lines[0]
    assert not [name for name in os.listdir(out) if ".tmp." in name]
    assert formats.latest_checkpoint(str(out)) >= 2


def test_a_signal_before_training_is_one_line(tmp_path):
    status, stderr = signal_after(signal.SIGTERM, "device:", tmp_path)
    assert status == 143 and stderr.strip().splitlines() == [
        "error: stopped by SIGTERM before training started; nothing was written"], stderr


def test_a_closed_pipe_ends_the_run_quietly(tmp_path):
    data = write_tokens(tmp_path / "train.bin", np.arange(600) % 700)
    cmd = [sys.executable, os.path.join(ROOT, "train_gpt2.py"), "--checkpoint", MODEL, "--train-data", data,
           "-b", "2", "-t", "8", "--steps", "100000", "--val-every", "0", "--sample-every", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    proc.stdout.readline()
    proc.stdout.close()  # as `| head -1` does
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141 and stderr == "", stderr


def test_a_console_that_cannot_encode_prints_a_replacement(tmp_path):
    env = dict(os.environ, PYTHONIOENCODING="ascii")
    result = run("train_gpt2.py", "--init", "d6", "--steps", "0", "--val-every", "0", "--gen-tokens", "1",
                 "--prompt", "café", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "caf?" in result.stdout


# 3. write failures during a run: one line, a checkpoint never without its state, no temporary files

def tiny_run(tmp_path, *args):
    data = write_tokens(tmp_path / "tokens.bin", np.arange(600) % 700)
    return run("train_gpt2.py", "--checkpoint", MODEL, "--train-data", data, "--val-data", data, "-b", "2", "-t", "8",
               "--val-every", "0", "--sample-every", "0", *args, cwd=tmp_path)


@pytest.fixture
def small_disk(tmp_path):
    # a file system of 2.2 MB: one checkpoint pair of the tiny model (0.65 + 1.3 MB) fits, two don't
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2200k", "tmpfs", str(disk)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root and mount for a small tmpfs (the patched-write test covers the same)")
    yield disk
    subprocess.run(["umount", str(disk)])


def test_a_full_disk_keeps_the_newest_whole_pair(tmp_path, small_disk):
    out = small_disk / "run"
    result = tiny_run(tmp_path, "--steps", "3", "--output-dir", str(out), "--save-every", "1")
    assert_one_error_line(result, f"could not write {out / 'model_2.bin'}", "No space left on device",
                          f"after step 1: continue with --resume {out}", status=1)
    assert sorted(os.listdir(out)) == ["model_1.bin", "state_1.bin"]


def test_a_run_state_that_fails_to_write_takes_its_checkpoint_with_it(tmp_path, monkeypatch):
    import errno
    from llmc import run as run_module
    written = []

    def failing(path, *args):
        written.append(path)
        if len(written) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return formats.write_run_state(path, *args)
    monkeypatch.setattr(run_module, "write_run_state", failing)
    data = write_tokens(tmp_path / "tokens.bin", np.arange(600) % 700)
    out = tmp_path / "run"
    args = cli.parse_args(tg.DEPTHS, ["--checkpoint", MODEL, "--train-data", data, "--val-data", data, "-b", "2",
                                      "-t", "8", "--steps", "3", "--val-every", "0", "--sample-every", "0",
                                      "--output-dir", str(out), "--save-every", "1"])
    with pytest.raises(run_module.WriteError, match=r"state_2\.bin \(No space left on device\); .* after step 1"):
        tg.main(args)
    assert sorted(os.listdir(out)) == ["model_1.bin", "state_1.bin"]


def test_a_log_that_fails_to_write_is_one_line(tmp_path, monkeypatch):
    import errno
    from llmc import run as run_module

    class FullFile:
        def __init__(self, *args):
            self.lines = 0

        def write(self, text):
            self.lines += text.count("\n")
            if self.lines > 2:
                raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self):
            pass

        def close(self):
            pass
    monkeypatch.setattr(run_module, "open", FullFile, raising=False)
    data = write_tokens(tmp_path / "tokens.bin", np.arange(600) % 700)
    args = cli.parse_args(tg.DEPTHS, ["--checkpoint", MODEL, "--train-data", data, "--val-data", data, "-b", "2",
                                      "-t", "8", "--steps", "5", "--val-every", "0", "--sample-every", "0",
                                      "--log", str(tmp_path / "main.log")])
    with pytest.raises(run_module.WriteError, match=r"--log .*main\.log \(No space left on device\) at step 2"):
        tg.main(args)


# 5. non-finite numbers never reach a file

def test_weights_that_became_nan_are_never_written(tmp_path, monkeypatch):
    out, final = tmp_path / "run", tmp_path / "final.bin"
    original = tg.gpt2_update

    def update_then_spoil(model, *args, **kwargs):  # as a huge learning rate would, after the update
        original(model, *args, **kwargs)
        if args[5] == 3:  # t: the third step
            model.params_memory[7] = np.nan
    monkeypatch.setattr(tg, "gpt2_update", update_then_spoil)
    data = write_tokens(tmp_path / "tokens.bin", np.arange(600) % 700)
    args = cli.parse_args(tg.DEPTHS, ["--checkpoint", MODEL, "--train-data", data, "--val-data", data, "-b", "2",
                                      "-t", "8", "--steps", "3", "--val-every", "0", "--sample-every", "0",
                                      "--output-dir", str(out), "--save-every", "1", "--output", str(final)])
    with pytest.raises(NonFiniteLossError, match=r"inf or nan after 3 steps: not written to .*model_3\.bin; "
                                                 r"the newest checkpoint is after step 2"):
        tg.main(args)
    assert sorted(os.listdir(out)) == ["model_1.bin", "model_2.bin", "state_1.bin", "state_2.bin"]
    assert not final.exists()


# 2. outputs never clobber inputs, each other, or anything but a regular file

@pytest.mark.parametrize("options, fragment", [
    (["--log", "{checkpoint}"], "--log {checkpoint} is --checkpoint"),
    (["--log", "{data}"], "--log {data} is --train-data"),
    (["--output", "{data}"], "--output {data} is --train-data"),
    (["--output", "{tmp}/x.bin", "--log", "{tmp}/x.bin"], "--output {tmp}/x.bin is --log"),
    (["--log", "{tmp}/../{tmpname}/tokens.bin"], "is --train-data"),  # another path to the same file
    (["--output", "{tmp}/fifo"], "--output {tmp}/fifo is not a regular file"),  # (not /dev/null: as root,
    # a regression would replace the machine's /dev/null with a file)
    (["--output-dir", "{tmp}", "--steps", "5"], "would overwrite --checkpoint {tmp}/model_5.bin"),
])
def test_an_output_that_would_clobber_an_input_is_refused(tmp_path, options, fragment):
    checkpoint = tmp_path / "model_5.bin"
    checkpoint.write_bytes(open(MODEL, "rb").read())
    data = write_tokens(tmp_path / "tokens.bin", np.arange(600) % 700)
    os.mkfifo(tmp_path / "fifo")
    before = {path: open(path, "rb").read() for path in (checkpoint, data)}
    names = dict(checkpoint=checkpoint, data=data, tmp=tmp_path, tmpname=tmp_path.name)
    result = run("train_gpt2.py", "--checkpoint", str(checkpoint), "--train-data", data, "--val-data", data,
                 "-b", "2", "-t", "8", "--steps", "1", "--val-every", "0", "--sample-every", "0",
                 *[option.format(**names) for option in options], cwd=tmp_path)
    assert_one_error_line(result, fragment.format(**names))
    assert {path: open(path, "rb").read() for path in before} == before
    assert not os.path.isfile(tmp_path / "fifo")


def test_the_trained_model_may_replace_its_starting_checkpoint(tmp_path):
    checkpoint = tmp_path / "model.bin"
    checkpoint.write_bytes(open(MODEL, "rb").read())
    result = tiny_run(tmp_path, "--steps", "1", "--checkpoint", str(checkpoint), "--output", str(checkpoint))
    assert result.returncode == 0, result.stderr
    assert checkpoint.read_bytes() != open(MODEL, "rb").read() and not list(tmp_path.glob("*.tmp.*"))


# 6. one run per output folder; temporary files of a dead run are removed

def test_a_second_run_into_a_live_runs_folder_stops(tmp_path):
    out = tmp_path / "run"
    data = write_tokens(tmp_path / "tokens.bin", np.arange(600) % 700)
    cmd = [sys.executable, "-u", os.path.join(ROOT, "train_gpt2.py"), "--checkpoint", MODEL, "--train-data", data,
           "--val-data", data, "-b", "2", "-t", "8", "--steps", "100000", "--val-every", "0", "--sample-every", "0",
           "--output-dir", str(out)]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        for line in first.stdout:
            if line.startswith("step 0"):
                break
        second = tiny_run(tmp_path, "--steps", "2", "--output-dir", str(out))
        assert_one_error_line(second, f"--output-dir {out}: another run is writing there")
    finally:
        first.kill()
        first.wait()
    # the first run died without a word (kill -9): its lock went with it, and so do its temporaries
    (out / "model_7.bin.tmp.12345").write_bytes(b"half")
    (out / "notes.tmp.1").write_bytes(b"not ours")
    again = tiny_run(tmp_path, "--steps", "2", "--output-dir", str(out))
    assert again.returncode == 0, again.stderr
    assert sorted(os.listdir(out)) == ["model_2.bin", "notes.tmp.1", "state_2.bin"]


def test_a_checkpoint_or_run_state_with_inf_or_nan_is_refused_on_load(tmp_path):
    model = tg.gpt2_build_from_checkpoint(MODEL)
    model.params["lnfw"][3] = np.nan
    tg.gpt2_write_checkpoint(model, str(tmp_path / "nan.bin"))
    result = tiny_run(tmp_path, "--checkpoint", str(tmp_path / "nan.bin"), "--steps", "1")
    assert_one_error_line(result, "nan.bin: its weights hold inf or nan")
    # a run state whose second moment is negative (a mean of squares cannot be)
    out = tmp_path / "run"
    assert tiny_run(tmp_path, "--steps", "1", "--output-dir", str(out)).returncode == 0
    state = bytearray((out / "state_1.bin").read_bytes())
    state[-4:] = np.float32(-1.0).tobytes()  # the last element of v
    (out / "state_1.bin").write_bytes(bytes(state))
    result = tiny_run(tmp_path, "--steps", "2", "--resume", str(out))
    assert_one_error_line(result, "state_1.bin: AdamW's moments hold inf, nan or a negative second moment")


def test_adamw_threads_take_the_callers_numpy_error_settings(monkeypatch):
    from llmc import cpu
    monkeypatch.setattr(cpu, "ADAMW_CHUNK", 64)
    monkeypatch.setattr(cpu, "usable_cpus", lambda: 2)
    param, grad, m, v = (np.ones(1000, np.float32) for _ in range(4))
    grad[500:] = np.inf  # the second thread's part overflows
    with np.errstate(all="raise"):
        with pytest.raises(FloatingPointError):
            cpu.adamw_threaded(param, grad, m, v, 1e-3, 0.9, 0.999, 1e-8, 0.0, 1)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("error")  # a RuntimeWarning from a worker would fail here
        cpu.adamw_threaded(param, grad, m, v, 1e-3, 0.9, 0.999, 1e-8, 0.0, 2)


# 9. downloads: bad input is one line (exit 2), a misbehaving server one line (exit 1)

@pytest.mark.parametrize("script", ["download_starter_pack.py", "prepro_tinyshakespeare.py", "prepro_hellaswag.py",
                                    "prepro_tinystories.py", "prepro_fineweb.py"])
def test_a_bad_option_of_any_script_is_one_line(tmp_path, script):
    assert_one_error_line(run(script, "--no-such-option", cwd=tmp_path), "unrecognized arguments: --no-such-option")


@pytest.mark.parametrize("url", ["notaurl", "ftp://example.com/x", "http://[::1", "https://"])
def test_a_malformed_url_is_one_line(tmp_path, url):
    assert_one_error_line(run("download_starter_pack.py", "--download-url", url, cwd=tmp_path), "--download-url")
    assert_one_error_line(run("train_gpt2.py", "--download", "--download-url", url, cwd=tmp_path), "--download-url")
    assert os.listdir(tmp_path) == []


def test_a_destination_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "afile").write_text("")
    assert_one_error_line(run("download_starter_pack.py", "--dir", "afile", cwd=tmp_path), "--dir afile is a file")


class LyingServer(http.server.BaseHTTPRequestHandler):
    # a server whose lengths are nonsense: a Content-Length that is not a number, then HTML
    def do_GET(self):
        body = b"<html>not a model</html>"
        self.send_response(200)
        self.send_header("Content-Length", "lots")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_a_server_with_nonsense_lengths_and_html_is_one_line(tmp_path):
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), LyingServer)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        result = run("download_starter_pack.py", "--download-url", f"http://127.0.0.1:{httpd.server_address[1]}",
                     cwd=tmp_path)
    finally:
        httpd.shutdown()
        httpd.server_close()
    result.stderr = "\n".join(line for line in result.stderr.splitlines() if not line.startswith("downloading "))
    assert_one_error_line(result, "gpt2_124M.bin", "the server sent something else", status=1)
    assert os.listdir(tmp_path) == []  # neither the file nor a .partial that cannot be resumed


def test_ctrl_c_after_the_last_step_says_what_was_written(tmp_path, monkeypatch):
    from llmc.run import Interrupted

    def interrupted(model, path):
        raise KeyboardInterrupt
    data = write_tokens(tmp_path / "tokens.bin", np.arange(600) % 700)
    out, final = tmp_path / "run", tmp_path / "final.bin"
    args = cli.parse_args(tg.DEPTHS, ["--checkpoint", MODEL, "--train-data", data, "--val-data", data, "-b", "2",
                                      "-t", "8", "--steps", "2", "--val-every", "0", "--sample-every", "0",
                                      "--output-dir", str(out), "--output", str(final)])
    real_write = tg.gpt2_write_checkpoint
    monkeypatch.setattr(tg, "gpt2_write_checkpoint",
                        lambda model, path: (interrupted if path == str(final) else real_write)(model, path))
    with pytest.raises(Interrupted, match=rf"interrupted after training finished \(2 steps\); --output {final} was "
                                          rf"not written; the newest checkpoint is after step 2 in {out}") as e:
        tg.main(args)
    assert e.value.status == 130 and not final.exists()
