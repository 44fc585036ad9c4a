"""The trainer's options are checked before any work: output paths before anything is built, the
model's shape and the memory a run needs before the weights are read; Ctrl-C stops with one line;
and the smaller promises of train_gpt2.py (prompt checks, scoped NumPy state, the AdamW pool)."""

import os
import signal
import subprocess
import sys

import numpy as np
import pytest

import train_gpt2 as tg
from llmc import cli, cpu, device, formats, tokenizer
from helpers import MODEL, ROOT, assert_one_error_line, run, usable_gpu, write_tokens

# MODEL is the tiny fixture: V = 777, maxT = 64


@pytest.fixture
def data(tmp_path):
    rng = np.random.default_rng(0)
    return ["--train-data", write_tokens(tmp_path / "train.bin", rng.integers(0, 777, 3000)),
            "--val-data", write_tokens(tmp_path / "val.bin", rng.integers(0, 777, 500))]


def train(tmp_path, data, *args):
    return run("train_gpt2.py", "--checkpoint", MODEL, *data, "-b", "2", "-t", "8", "--steps", "2",
               "--sample-every", "0", *args, cwd=tmp_path)


# output paths: refused before the model is built, so no step runs

@pytest.mark.parametrize("option, path, fragment", [
    ("--log", "afile/main.log", "is a file, not a folder"),
    ("--output", "afile/model.bin", "is a file, not a folder"),
    ("--output-dir", "afile", "is a file, not a folder"),
    ("--output-dir", "afile/run", "is a file, not a folder"),
    ("--log", "logs", "is a directory"),
])
def test_unwritable_outputs_are_refused_up_front(tmp_path, data, option, path, fragment):
    (tmp_path / "logs").mkdir()
    (tmp_path / "afile").write_text("not a folder")
    result = train(tmp_path, data, option, str(tmp_path / path))
    assert_one_error_line(result, option, fragment)
    assert "step 0" not in result.stdout and "num_parameters" not in result.stdout


def test_log_in_a_missing_folder_is_created(tmp_path, data):
    result = train(tmp_path, data, "--log", str(tmp_path / "new" / "main.log"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "new" / "main.log").read_text().startswith("s:0 tel:")


def test_missing_token_file_is_refused_before_the_weights_are_read(tmp_path, monkeypatch):
    monkeypatch.setattr(tg, "gpt2_build_from_checkpoint", lambda *a: pytest.fail("the model was built"))
    args = cli.parse_args(tg.DEPTHS, ["--checkpoint", MODEL, "--train-data", str(tmp_path / "none.bin")])
    with pytest.raises(tg.InputError, match="none.bin not found"):
        tg.main(args)


# the model's shape and the memory there is: refused before the (large) model is built

def never_built(monkeypatch):
    for name in ("gpt2_build_from_random", "gpt2_build_from_checkpoint"):
        monkeypatch.setattr(tg, name, lambda *a: pytest.fail("the model was built"))


def test_seq_len_beyond_the_model_is_refused_before_building(monkeypatch):
    never_built(monkeypatch)
    with pytest.raises(tg.InputError, match="--seq-len 2048 exceeds the model's max_seq_len 1024"):
        tg.main(cli.parse_args(tg.DEPTHS, ["--init", "d12", "-t", "2048"]))


def test_a_batch_that_cannot_fit_is_refused_with_an_estimate(monkeypatch):
    never_built(monkeypatch)
    monkeypatch.setattr(cli, "available_memory", lambda: 20e9)
    with pytest.raises(tg.InputError, match=r"-b 1000 -t 64 needs about 83\.\d GB .* only 20\.0 GB is available"):
        tg.main(cli.parse_args(tg.DEPTHS, ["--init", "d12", "-b", "1000", "--val-every", "0"]))


def test_oversized_batch_from_the_command_line(tmp_path):
    # the same in a real process, with this machine's real memory: 100,000 rows of 64 tokens need terabytes
    result = run("train_gpt2.py", "--init", "d12", "-b", "100000", "--val-every", "0", cwd=tmp_path)
    assert_one_error_line(result, "-b 100000 -t 64 needs about", "smaller --batch-size")


def test_memory_estimate_is_close_for_the_default_run():
    # GPT-2 124M at B=4, T=64: measured peak RSS 2.42 GB (README); the estimate must not be far off
    estimate = device.training_memory(tg.random_config("d12"), tg.num_parameters(tg.random_config("d12")), 4, 64)
    assert 2.0e9 < estimate < 2.6e9


# Ctrl-C

def ctrl_c_after(line_start, data, tmp_path, *args):
    # a long run, interrupted with SIGINT (what Ctrl-C sends) once it has printed a line starting so
    cmd = [sys.executable, "-u", os.path.join(ROOT, "train_gpt2.py"), "--checkpoint", MODEL, *data, "-b", "2",
           "-t", "8", "--steps", "100000", "--val-every", "0", "--sample-every", "0", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        for line in proc.stdout:
            if line.startswith(line_start):
                break
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    return proc.returncode, stderr


def test_ctrl_c_stops_with_one_line_and_keeps_the_checkpoints(tmp_path, data):
    out = tmp_path / "run"
    status, stderr = ctrl_c_after("saved model_4.bin", data, tmp_path, "--output-dir", str(out), "--save-every", "2")
    assert status == 130, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: interrupted at step "), stderr
    assert f"--resume {out}" in lines[0]
    # every pair on disk is whole: the newest loads and the run resumes from it
    steps = formats.latest_checkpoint(str(out))
    assert steps is not None and steps >= 4
    tg.gpt2_build_from_checkpoint(str(out / f"model_{steps}.bin"))
    assert not [name for name in os.listdir(out) if ".tmp." in name]
    resumed = run("train_gpt2.py", "--checkpoint", MODEL, *data, "-b", "2", "-t", "8", "--steps", str(steps + 1),
                  "--val-every", "0", "--sample-every", "0", "--resume", str(out), cwd=tmp_path)
    assert resumed.returncode == 0 and f"after {steps} steps" in resumed.stdout, resumed.stderr


def test_ctrl_c_without_checkpoints_says_so(tmp_path, data):
    status, stderr = ctrl_c_after("step 3:", data, tmp_path)
    assert status == 130
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "no checkpoints were being written" in lines[0], stderr


# sampling options

def test_prompt_is_not_checked_when_nothing_is_sampled(tmp_path, data):
    if isinstance(tokenizer.tiktoken_gpt2(), Exception):
        pytest.skip("tiktoken's GPT-2 files are not here (offline): set TIKTOKEN_CACHE_DIR")
    # "hello world" has GPT-2 tokens beyond the tiny model's 777: an error only if it will be used
    result = train(tmp_path, data, "--steps", "0", "--sample-every", "0", "--prompt", "hello world")
    assert result.returncode == 0, result.stderr
    result = train(tmp_path, data, "--steps", "0", "--sample-every", "1", "--prompt", "hello world")
    assert_one_error_line(result, "--prompt has tokens beyond the model's vocab size 777")


def test_a_full_context_of_samples_fits(tmp_path, data):
    # <|endoftext|> and 64 new tokens use positions 0..63 of the 64-position model
    result = train(tmp_path, data, "--steps", "0", "--sample-every", "1", "--gen-tokens", "64")
    assert result.returncode == 0, result.stderr
    assert "generated 64 tokens" in result.stdout
    # (65 are refused: test_options.py's bad options)


def test_a_small_vocabulary_says_which_token_starts_samples(tmp_path, data):
    result = train(tmp_path, data, "--steps", "0", "--sample-every", "1")
    assert "samples start from its last token, 776" in result.stdout


def test_test_gpt2_hint_names_its_own_options(tmp_path):
    result = run("test_gpt2.py", "--checkpoint", str(tmp_path / "none.bin"), cwd=tmp_path)
    assert_one_error_line(result, "none.bin not found")
    assert "--download" not in result.stderr and "--init" not in result.stderr


# no global state changed, nothing done twice

def test_numpy_error_state_is_left_alone(tmp_path, data):
    before = np.geterr()
    args = cli.parse_args(tg.DEPTHS, ["--checkpoint", MODEL, *data, "-b", "2", "-t", "8", "--steps", "1", "--sample-every", "0",
                          "--val-every", "0"])
    tg.main(args)
    assert np.geterr() == before


def test_adamw_keeps_one_pool_and_leaves_small_tensors_whole(monkeypatch):
    monkeypatch.setattr(cpu, "POOL", None)
    monkeypatch.setattr(cpu, "usable_cpus", lambda: 4)
    small = [np.ones(768, np.float32) for _ in range(4)]
    cpu.adamw_threaded(*small, 1e-3, 0.9, 0.999, 1e-8, 0.0, 1)
    assert cpu.POOL is None  # done inline: no threads for 768 floats
    big = [np.ones(4 * cpu.ADAMW_CHUNK + 5, np.float32) for _ in range(4)]
    cpu.adamw_threaded(*big, 1e-3, 0.9, 0.999, 1e-8, 0.0, 1)
    pool = cpu.POOL
    assert pool is not None
    cpu.adamw_threaded(*big, 1e-3, 0.9, 0.999, 1e-8, 0.0, 2)
    assert cpu.POOL is pool
    pool.shutdown()


def test_tiktoken_is_loaded_once():
    assert tokenizer.tiktoken_gpt2() is tokenizer.tiktoken_gpt2()


# the GPU option on a machine without one

def test_device_cuda_without_cupy_or_gpu_is_one_line(tmp_path):
    if usable_gpu()[0]:
        pytest.skip("a GPU is usable here: the error cannot happen")
    for script in ("train_gpt2.py", "test_gpt2.py"):
        result = run(script, "--device", "cuda", "--checkpoint", MODEL, cwd=tmp_path)
        assert_one_error_line(result, "--device cuda", "cupy-cuda12x")


def test_bf16_on_the_cpu_is_one_line(tmp_path):
    # mixed precision is for the GPU: on the CPU, --dtype bf16 stops before any work, in both scripts
    for script in ("train_gpt2.py", "test_gpt2.py"):
        result = run(script, "--dtype", "bf16", "--checkpoint", MODEL, cwd=tmp_path)
        assert_one_error_line(result, "--dtype bf16", "--device cuda")
        assert list(tmp_path.iterdir()) == []


def test_bf16_is_refused_by_the_plain_layers():
    # the plain layers are the float32 reference: bf16 runs on the fused kernels only (and never on NumPy)
    with pytest.raises(tg.InputError, match="fused"):
        tg.use_device("cuda", fused=False, dtype="bf16")
    with pytest.raises(tg.InputError, match="--device cuda"):
        tg.use_device("cpu", dtype="bf16")
    assert tg.xp is np and tg.floatX is np.float32
