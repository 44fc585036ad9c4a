"""Checkpoints are written atomically, and a resumed run prints exactly what an uninterrupted one does."""

import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest

import train_gpt2 as tg
from llmc import formats
from helpers import MODEL, ROOT, write_tokens

# MODEL is the tiny fixture: V = 777


@pytest.fixture
def data(tmp_path):
    # tokens with some structure to learn: a noisy repeating pattern
    rng = np.random.default_rng(0)
    tokens = (np.arange(6000) * 7 % 777 + rng.integers(0, 3, 6000)) % 777
    return write_tokens(tmp_path / "train.bin", tokens[:5000]), write_tokens(tmp_path / "val.bin", tokens[5000:])


def train_args(data, *args):
    # unbuffered (-u): a pipe would otherwise get the output in blocks, long after it was printed
    return [sys.executable, "-u", os.path.join(ROOT, "train_gpt2.py"), "--checkpoint", MODEL, "--train-data", data[0],
            "--val-data", data[1], "-b", "4", "-t", "16", "--lr", "1e-3", "--val-every", "3",
            "--sample-every", "4", "--gen-tokens", "6", *args]


def transcript(stdout):
    # everything a run prints about the model from its first loss on, samples included, without timings
    lines = [re.sub(r" \(took .*", "", line) for line in stdout.splitlines()]
    lines = [line for line in lines if not line.startswith("generated ")]  # "generated N tokens in X ms"
    first = next(i for i, line in enumerate(lines) if line.startswith(("val loss", "step ")))
    return [line for line in lines[first:] if not line.startswith(("saved ", "wrote "))]


def run_steps(stdout):
    return {int(m.group(1)): m.group(0) for m in re.finditer(r"^step (\d+): train loss [\d.]+", stdout, re.M)}


def test_resume_prints_the_same_losses(tmp_path, data):
    full = subprocess.run(train_args(data, "--steps", "10"), capture_output=True, text=True, cwd=tmp_path)
    assert full.returncode == 0, full.stderr
    # the same run, stopped after 6 steps and resumed
    first = subprocess.run(train_args(data, "--steps", "6", "--output-dir", str(tmp_path / "run"), "--save-every", "3"),
                           capture_output=True, text=True, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert sorted(os.listdir(tmp_path / "run")) == ["model_3.bin", "model_6.bin", "state_3.bin", "state_6.bin"]
    resumed = subprocess.run(train_args(data, "--steps", "10", "--resume", str(tmp_path / "run")),
                             capture_output=True, text=True, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout and "after 6 steps" in resumed.stdout
    # every line from step 6 on, val losses and samples included, is the same to the last printed digit
    full_lines = transcript(full.stdout)
    start = full_lines.index(run_steps(full.stdout)[6]) - 1  # the val loss printed before step 6
    assert full_lines[start].startswith("val loss")
    assert transcript(resumed.stdout) == full_lines[start:]
    assert sum(line == "generating:" for line in full_lines[start:]) == 2  # samples at steps 8 and 10
    # it saved at the end, into the folder it resumed from; the model is an llm.c checkpoint
    assert "model_10.bin" in os.listdir(tmp_path / "run")
    tg.gpt2_build_from_checkpoint(str(tmp_path / "run" / "model_10.bin"))


def test_resume_after_a_kill(tmp_path, data):
    steps = 20
    full = subprocess.run(train_args(data, "--steps", str(steps), "--sample-every", "0"), capture_output=True, text=True,
                          cwd=tmp_path)
    assert full.returncode == 0, full.stderr
    assert sorted(run_steps(full.stdout)) == list(range(steps))
    # kill -9 the same run once it has saved after 5 steps (it saves after every step). Its output reaches
    # us as it is printed (python -u), whatever the environment says, so the kill comes in the middle
    proc = subprocess.Popen(train_args(data, "--steps", str(steps), "--sample-every", "0", "--output-dir", str(tmp_path / "run"),
                                       "--save-every", "1"), stdout=subprocess.PIPE, text=True, cwd=tmp_path)
    printed = []
    for line in proc.stdout:
        printed.append(line)
        if line.startswith("saved model_5.bin"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.stdout.close()
    assert proc.wait() == -signal.SIGKILL, "".join(printed)  # killed in the middle, not finished
    assert not any(line.startswith(f"saved model_{steps}.bin") for line in printed)
    resumed = subprocess.run(train_args(data, "--steps", str(steps), "--sample-every", "0", "--resume", str(tmp_path / "run")),
                             capture_output=True, text=True, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    # it resumed from the last checkpoint before the kill (the run may have saved one or two more by then)
    steps_done = int(re.search(r"^resuming from .* after (\d+) steps$", resumed.stdout, re.M).group(1))
    assert 5 <= steps_done < steps
    assert sorted(run_steps(resumed.stdout)) == list(range(steps_done, steps))  # only the steps that were left
    # and from there on it prints what the uninterrupted run printed: train and val losses to the last digit
    full_lines, resumed_lines = transcript(full.stdout), transcript(resumed.stdout)
    assert resumed_lines == full_lines[len(full_lines) - len(resumed_lines):]


def test_crash_between_write_and_rename(tmp_path, monkeypatch):
    model = tg.gpt2_build_from_checkpoint(MODEL)
    path = tmp_path / "model.bin"
    tg.gpt2_write_checkpoint(model, str(path))
    good = path.read_bytes()
    model.params_memory[:] = 0.0

    def crash(src, dst):
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        tg.gpt2_write_checkpoint(model, str(path))
    assert path.read_bytes() == good  # the finished checkpoint is intact
    assert os.listdir(tmp_path) == ["model.bin"]  # and the temporary file is gone


def test_hard_crash_leaves_nothing_that_looks_valid(tmp_path, data):
    # a process killed between write and rename can't clean up: its temporary file stays, but under a
    # name that no loader takes for a checkpoint, and --resume picks the newest complete pair
    run = tmp_path / "run"
    first = subprocess.run(train_args(data, "--steps", "2", "--sample-every", "0", "--output-dir", str(run), "--save-every", "1"),
                           capture_output=True, text=True, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    code = ("import os, sys; sys.argv[0] = 'train_gpt2.py'; sys.path.insert(0, %r); import train_gpt2 as tg;"
            "os.replace = lambda a, b: os._exit(9);"
            "m = tg.gpt2_build_from_checkpoint(%r); tg.gpt2_write_checkpoint(m, %r)") % (ROOT, MODEL, str(run / "model_3.bin"))
    assert subprocess.run([sys.executable, "-c", code]).returncode == 9
    (run / "state_3.bin.tmp.12345").write_bytes(b"half a state")
    assert "model_3.bin" not in os.listdir(run) and any(n.startswith("model_3.bin.tmp.") for n in os.listdir(run))
    assert formats.latest_checkpoint(str(run)) == 2
    (run / "model_4.bin").write_bytes(open(run / "model_2.bin", "rb").read())  # a model whose state never came
    assert formats.latest_checkpoint(str(run)) == 2


def test_run_state_round_trip(tmp_path):
    model = tg.gpt2_build_from_checkpoint(MODEL)
    rng = np.random.default_rng(1)
    model.m_memory = rng.standard_normal(model.params_memory.size, dtype=np.float32)
    model.v_memory = rng.random(model.params_memory.size, dtype=np.float32)
    loader = tg.DataLoader(np.arange(1000), 4, 16)
    loader.current_batch = 7
    formats.write_run_state(str(tmp_path / "state.bin"), model, 42, loader, [2**64 - 5])
    n = model.params_memory.size
    *header, position, m, v = formats.read_run_state(str(tmp_path / "state.bin"), n)
    assert header == [42, 4, 16, 7, 2**64 - 5]
    assert position.tolist() == [0, 0, 0, 7, 1, 0]  # the lesson's loader: one shard, in order, sample 7
    # a sharded, shuffled loader's whole position comes back word for word
    words = np.arange(5, 640, dtype=np.uint64)
    formats.write_run_state(str(tmp_path / "state2.bin"), model, 43, loader, [9], words)
    assert formats.read_run_state(str(tmp_path / "state2.bin"), n)[5].tolist() == words.tolist()
    # a version 1 state (written before loader positions) still loads, as the same position
    old = bytearray((tmp_path / "state.bin").read_bytes())
    old[8:16], old[72:80] = np.uint64(1).tobytes(), np.uint64(0).tobytes()  # version 1, no position words
    del old[1024:1024 + 6 * 8]
    (tmp_path / "v1.bin").write_bytes(bytes(old))
    *header, position, m1, _ = formats.read_run_state(str(tmp_path / "v1.bin"), n)
    assert header == [42, 4, 16, 7, 2**64 - 5] and position.tolist() == [0, 0, 0, 7, 1, 0]
    np.testing.assert_array_equal(m1, model.m_memory)
    np.testing.assert_array_equal(m, model.m_memory)
    np.testing.assert_array_equal(v, model.v_memory)
    # a state of another model, or a file that isn't a state, is refused with the file named
    (tmp_path / "bad.bin").write_bytes(b"\0" * 2048)
    with pytest.raises(tg.InputError, match="bad.bin: not a run state"):
        formats.read_run_state(str(tmp_path / "bad.bin"), n)
    with pytest.raises(tg.InputError, match="parameters"):
        formats.read_run_state(str(tmp_path / "state.bin"), tg.num_parameters(tg.GPT2Config(8, 50, 128, 1, 2, 4)))


def test_resume_errors(tmp_path, data):
    (tmp_path / "empty").mkdir()
    result = subprocess.run(train_args(data, "--resume", str(tmp_path / "empty")), capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "no model_<step>.bin" in result.stderr
    run = tmp_path / "run"
    subprocess.run(train_args(data, "--steps", "2", "--sample-every", "0", "--output-dir", str(run)), capture_output=True, cwd=tmp_path)
    result = subprocess.run(train_args(data, "--resume", str(run), "-b", "2"), capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2 and "-b 4 -t 16" in result.stderr
