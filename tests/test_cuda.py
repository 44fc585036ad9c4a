"""The whole trainer on an NVIDIA GPU (--device cuda, through CuPy) against the same trainer on the
CPU and against PyTorch: test_gpt2.py's checks, training steps that agree across devices, files
that move between them. Skipped where CuPy or a GPU is missing (CI has neither): run on a GPU
machine. The fused kernels alone are checked against the plain layers in test_cuda_layers.py."""

import contextlib
import os
import re

import numpy as np
import pytest

import train_gpt2 as tg
from llmc import device
from helpers import FIXTURE_ARGS, MODEL, run, usable_bf16, usable_gpu, write_tokens

GPU, _why = usable_gpu()
if GPU:
    import cupy
pytestmark = pytest.mark.skipif(not GPU, reason=f"needs CuPy and an NVIDIA GPU (--device cuda): {_why}")


@pytest.fixture(params=["fused", "plain"])
def cuda(request):
    # the GPU with TF32 off, so that it computes what the CPU computes up to float32 reassociation;
    # with the fused kernels, and with the plain layers as written (CuPy under the same lines)
    with on_gpu(tf32=False, fused=request.param == "fused"):
        yield request.param


@contextlib.contextmanager
def on_gpu(**device_args):
    # tg.use_device("cuda", **device_args) for the block, then the CPU again whatever happens
    tg.use_device("cuda", **device_args)
    try:
        yield
    finally:
        tg.use_device("cpu")


def train_steps(model, tokens, n=3):
    # n AdamW steps on one batch: the losses, and the gradients of the first step, on the host
    losses, first_grads = [], None
    for t in range(1, n + 1):
        losses.append(tg.gpt2_forward(model, tokens[:, :-1], tokens[:, 1:]))
        tg.gpt2_backward(model)
        if first_grads is None:
            first_grads = tg.to_host(model.grads_memory).copy()
        tg.gpt2_update(model, 1e-3, 0.9, 0.999, 1e-8, 0.01, t)
    return np.array(losses), first_grads


def steps(device_args, n=3):
    # train_steps of the fixture's model, on the CPU (device_args None) or on the GPU
    with contextlib.nullcontext() if device_args is None else on_gpu(**device_args):
        rng = np.random.default_rng(0)
        tokens = rng.integers(0, 777, (4, 33)).astype(np.int32)
        tokens[1, :8] = tokens[0, :8]  # repeated tokens: their embedding gradients must add up
        return train_steps(tg.gpt2_build_from_checkpoint(MODEL), tokens, n)


@pytest.fixture(scope="module")
def cpu_steps():
    # steps(None): the CPU's losses and gradients, which the GPU's are compared with (computed once)
    return steps(None)


@pytest.mark.parametrize("fused", [True, False])
def test_training_steps_agree_with_the_cpu(cpu_steps, fused):
    # Losses and gradients, not weights: the gradient of the keys' bias is zero in exact arithmetic
    # (a constant added to every key moves no softmax), so AdamW turns its rounding noise into steps
    # of +-lr that differ between any two machines, and that change no loss.
    cpu_losses, cpu_grads = cpu_steps
    gpu_losses, gpu_grads = steps(dict(tf32=False, fused=fused))
    np.testing.assert_allclose(gpu_losses, cpu_losses, rtol=2e-6)
    assert np.linalg.norm(gpu_grads - cpu_grads) <= 2e-6 * np.linalg.norm(cpu_grads)
    # TF32 rounds the matmuls' inputs to 10 bits of mantissa: close, not equal
    tf32_losses, tf32_grads = steps(dict(tf32=True, fused=fused))
    np.testing.assert_allclose(tf32_losses, cpu_losses, rtol=5e-3)
    assert np.linalg.norm(tf32_grads - cpu_grads) <= 2e-2 * np.linalg.norm(cpu_grads)


def test_arrays_live_on_the_gpu_and_stay_float32(cuda):
    model = tg.gpt2_build_from_checkpoint(MODEL)
    tokens = np.arange(2 * 17, dtype=np.int32).reshape(2, 17) % 777
    tg.gpt2_forward(model, tokens[:, :-1], tokens[:, 1:])
    probs = model.acts["probs"]
    tg.gpt2_backward(model)
    tg.gpt2_update(model, 1e-3, 0.9, 0.999, 1e-8, 0.0, 1)
    for array in (model.params_memory, model.grads_memory, model.m_memory, model.v_memory,
                  model.acts["logits"], probs):
        assert isinstance(array, cupy.ndarray) and array.dtype == np.float32
    assert "cuda:" in device.describe_device()


def test_kv_cache_sampling_on_the_gpu(cuda):
    model = tg.gpt2_build_from_checkpoint(MODEL)
    naive = list(tg.gpt2_sample(model, [776, 5, 300], 20, [1337], 0.8, 50))
    cached = list(tg.gpt2_generate(model, [776, 5, 300], 20, [1337], 0.8, 50))
    assert naive == cached
    tg.use_device("cpu")
    cpu = list(tg.gpt2_generate(tg.gpt2_build_from_checkpoint(MODEL), [776, 5, 300], 20, [1337], 0.8, 50))
    assert cached == cpu


@pytest.mark.parametrize("tf32, tolerances", [
    # full fp32: nearly as tight as the CPU's TIGHT (atomic adds on the GPU sum in another order)
    ("0", ["--logits-tol", "1e-5", "--grad-tol", "2e-6", "--loss-tol", "1e-5", "--rel-tol", "3e-6"]),
    ("1", []),  # TF32 tensor cores, the default: llm.c's tolerances
])
def test_test_gpt2_on_the_gpu(tmp_path, tf32, tolerances):
    result = run("test_gpt2.py", "--device", "cuda", "--tf32", tf32, *FIXTURE_ARGS, *tolerances, cwd=tmp_path)
    assert result.returncode == 0 and "overall okay: 1" in result.stdout, result.stdout[-3000:] + result.stderr
    assert result.stdout.startswith("device: cuda:")


@pytest.fixture
def data(tmp_path):
    rng = np.random.default_rng(0)
    tokens = (np.arange(6000) * 7 % 777 + rng.integers(0, 3, 6000)) % 777
    return ["--train-data", write_tokens(tmp_path / "train.bin", tokens[:5000]),
            "--val-data", write_tokens(tmp_path / "val.bin", tokens[5000:])]


def train(tmp_path, data, device, *args):
    result = run("train_gpt2.py", "--device", device, "--tf32", "0", "--checkpoint", MODEL, *data, "-b", "4", "-t", "16",
                 "--lr", "1e-3", "--val-every", "3", "--sample-every", "0", "--grad-accum", "2", "--grad-clip", "1.0",
                 *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return result.stdout


def losses(stdout):
    return [float(x) for x in re.findall(r"(?:val loss|train loss) ([\d.]+)", stdout)]


@pytest.mark.parametrize("first, second", [("cuda", "cpu"), ("cpu", "cuda")])
def test_resume_across_devices(tmp_path, data, first, second):
    full = train(tmp_path, data, "cpu", "--steps", "8")
    run_dir = str(tmp_path / f"run_{first}")
    train(tmp_path, data, first, "--steps", "4", "--output-dir", run_dir)
    resumed = train(tmp_path, data, second, "--steps", "8", "--resume", run_dir)
    assert "resuming from" in resumed and "after 4 steps" in resumed
    # the files are the CPU's formats byte for byte: a GPU-written model loads on the CPU
    model = tg.gpt2_build_from_checkpoint(os.path.join(run_dir, "model_8.bin"))
    assert model.params_memory.dtype == np.float32
    np.testing.assert_allclose(losses(resumed), losses(full)[-len(losses(resumed)):], rtol=1e-5, atol=2e-6)


def test_checkpoint_bytes_are_the_same_from_either_device(tmp_path):
    model = tg.gpt2_build_from_checkpoint(MODEL)
    tg.gpt2_write_checkpoint(model, str(tmp_path / "cpu.bin"))
    with on_gpu():
        tg.gpt2_write_checkpoint(tg.gpt2_build_from_checkpoint(MODEL), str(tmp_path / "gpu.bin"))
    assert (tmp_path / "cpu.bin").read_bytes() == (tmp_path / "gpu.bin").read_bytes() == open(MODEL, "rb").read()


# ----------------------------------------------------------------------------
# mixed precision (--dtype bf16)

BF16, BF16_REASON = usable_bf16()
bf16_only = pytest.mark.skipif(not BF16, reason=BF16_REASON)
BF16_PARAM = pytest.param("bf16", marks=bf16_only)  # a "bf16" case of a test over both dtypes


@bf16_only
def test_bf16_arrays_and_what_stays_float32():
    import ml_dtypes
    with on_gpu(dtype="bf16"):
        model = tg.gpt2_build_from_checkpoint(MODEL)
        tokens = np.arange(2 * 17, dtype=np.int32).reshape(2, 17) % 777
        tg.gpt2_forward(model, tokens[:, :-1], tokens[:, 1:])
        logits, probs = model.acts["logits"], model.acts["probs"]
        tg.gpt2_backward(model)
        before = {name: w.copy() for name, w in model.weights.items()}
        tg.gpt2_update(model, 1e-3, 0.9, 0.999, 1e-8, 0.0, 1)
        # master weights, gradients, AdamW's moments and the probabilities: float32; the rest bfloat16
        for array in (model.params_memory, model.grads_memory, model.m_memory, model.v_memory, probs):
            assert array.dtype == np.float32
        for array in (*model.weights.values(), logits):
            assert array.dtype == ml_dtypes.bfloat16
        # the update made a new bfloat16 copy of the new weights, each rounded to nearest
        assert set(model.weights) == set(model.params)
        assert not all(bool((model.weights[name].view(np.uint16) == before[name].view(np.uint16)).all())
                       for name in model.weights)
        for name, weight in model.weights.items():
            expected = tg.to_host(model.params[name]).astype(ml_dtypes.bfloat16)
            assert (tg.to_host(weight).view(np.uint16) == expected.view(np.uint16)).all(), name
        assert "bf16" in device.describe_device()


@bf16_only
def test_bf16_sampling_with_top_k():
    # gpt2_sample runs the bf16 forward, so its logits are bfloat16; top-k would partition them as
    # they are, which CuPy 14.2 cannot do (the simulation refuses it too): the sampler works on
    # float32. Greedy (top-k 1) picks what the float32 logits' argmax is.
    with on_gpu(dtype="bf16"):
        model = tg.gpt2_build_from_checkpoint(MODEL)
        sampled = list(tg.gpt2_sample(model, [776, 5, 300], 4, [1337], 1.0, 50))
        assert all(0 <= token < 777 for token in sampled)
        greedy = list(tg.gpt2_sample(model, [776, 5, 300], 1, [1337], 1.0, 1))
        logits = tg.to_host(model.acts["logits"][0, -1, :777]).astype(np.float32)
        assert greedy == [int(np.argmax(logits))]


@bf16_only
def test_bf16_training_steps_track_the_cpu(cpu_steps):
    # bfloat16 keeps 8 bits of mantissa: the losses of 3 steps within 0.5% of float32's, the first
    # step's gradients within 5% (norm-wise); measured in a simulation 0.1% and 1.4%
    cpu_losses, cpu_grads = cpu_steps
    bf16_losses, bf16_grads = steps(dict(dtype="bf16"))
    np.testing.assert_allclose(bf16_losses, cpu_losses, rtol=5e-3)
    assert np.linalg.norm(bf16_grads - cpu_grads) <= 5e-2 * np.linalg.norm(cpu_grads)


@bf16_only
def test_test_gpt2_bf16():
    # tighter than llm.c's bf16 tolerances (logits 25, losses 0.05; its per-tensor gradient thresholds
    # stay), and a relative error of at most 3% for every tensor. Measured in the CPU simulation:
    # logits 8.0e-3, loss 6e-5, step losses 3.1e-4, relative errors 1.0e-2 (logits) and 1.35e-2 (dqkvw)
    result = run("test_gpt2.py", "--device", "cuda", "--dtype", "bf16", *FIXTURE_ARGS,
                 "--logits-tol", "5e-2", "--loss-tol", "5e-3", "--rel-tol", "3e-2")
    assert result.returncode == 0 and "overall okay: 1" in result.stdout, result.stdout[-3000:] + result.stderr
    assert "bf16" in result.stdout.splitlines()[0]


@pytest.mark.parametrize("dtype", ["fp32", BF16_PARAM])
def test_a_gpu_run_resumes_exactly_and_its_checkpoints_load_on_the_cpu(tmp_path, data, dtype):
    full = train(tmp_path, data, "cuda", "--dtype", dtype, "--steps", "8", "--output", str(tmp_path / "full.bin"))
    run_dir = str(tmp_path / f"run_{dtype}")
    train(tmp_path, data, "cuda", "--dtype", dtype, "--steps", "4", "--output-dir", run_dir)
    resumed = train(tmp_path, data, "cuda", "--dtype", dtype, "--steps", "8", "--resume", run_dir)
    assert "after 4 steps" in resumed
    # every kernel of a step is deterministic (the encoder's backward adds in a fixed order, not with
    # atomics), so the resumed run is the uninterrupted one, bit for bit: its losses and its weights
    printed = losses(resumed)
    assert printed and printed == losses(full)[-len(printed):]
    assert (tmp_path / "full.bin").read_bytes() == open(os.path.join(run_dir, "model_8.bin"), "rb").read()
    # the checkpoints hold the float32 master weights: the CPU reads them, and continues the run
    model = tg.gpt2_build_from_checkpoint(os.path.join(run_dir, "model_8.bin"))
    assert model.params_memory.dtype == np.float32
    on_cpu = train(tmp_path, data, "cpu", "--steps", "10", "--resume", run_dir)
    assert "after 8 steps" in on_cpu and "step 9:" in on_cpu


# ----------------------------------------------------------------------------
# flash attention (--attention flash): the whole model, against the blocked attention


FLASH_CONFIG = tg.GPT2Config(max_seq_len=64, vocab_size=97, padded_vocab_size=128, num_layers=2, num_heads=2,
                             channels=128)  # head size 64, as every GPT-2's


def flash_steps(dtype, attention, n=3):
    # train_steps of a small random GPT-2 with head size 64, at T = 64, on the GPU
    with on_gpu(dtype=dtype, attention=attention):
        assert ("flash attention" in device.describe_device()) == (attention == "flash")
        rng = np.random.default_rng(0)
        params = (rng.standard_normal(tg.num_parameters(FLASH_CONFIG)) * 0.1).astype(np.float32)
        return train_steps(tg.GPT2(FLASH_CONFIG, params), rng.integers(0, 97, (2, 65)).astype(np.int32), n)


@pytest.mark.parametrize("dtype", ["fp32", BF16_PARAM])
def test_flash_attention_trains_as_the_blocked_one(dtype):
    blocked_losses, blocked_grads = flash_steps(dtype, "blocked")
    flash_losses, flash_grads = flash_steps(dtype, "flash")
    # TF32 (fp32) or bf16 roundings in another order: close, not equal
    rtol = 1e-3 if dtype == "fp32" else 1e-2
    np.testing.assert_allclose(flash_losses, blocked_losses, rtol=rtol)
    blocked = tg.point_parameters(blocked_grads, FLASH_CONFIG)
    for name, grad in tg.point_parameters(flash_grads, FLASH_CONFIG).items():  # tensor by tensor: attention's are small
        expected = blocked[name]
        assert np.linalg.norm(grad - expected) <= 5 * rtol * np.linalg.norm(expected), name


def test_flash_attention_that_does_not_compile_is_one_error_line(monkeypatch):
    # (say, CUDA headers without WMMA's mma.h): use_device says so, before any work
    from llmc import cuda_layers

    def fail(dtype):
        raise RuntimeError("the flash attention kernels do not compile here (mma.h: no such file)")
    monkeypatch.setattr(cuda_layers, "compile_flash_attention", fail)
    try:
        with pytest.raises(tg.InputError, match="--attention flash: .*mma.h.*--attention blocked"):
            tg.use_device("cuda", attention="flash")
    finally:
        tg.use_device("cpu")


def test_flash_attention_below_compute_capability_8_is_one_error_line(monkeypatch):
    # a GPU without TF32 or bf16 tensor-core tiles (a T4: 7.5), faked: one line, nothing compiled
    from llmc import flash_attention

    def compile_flash(*args):
        raise AssertionError("compiled the flash kernels on a GPU that cannot run them")
    monkeypatch.setattr(flash_attention, "_compute_capability", lambda: 75)
    monkeypatch.setattr(flash_attention, "_compile_flash", compile_flash)
    try:
        with pytest.raises(tg.InputError, match=r"^--attention flash: needs compute capability 8.0 or later "
                                                r"\(.*\); this GPU's is 7.5; use --attention blocked$"):
            tg.use_device("cuda", attention="flash")
    finally:
        tg.use_device("cpu")
