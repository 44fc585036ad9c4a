"""
Where the layers compute: NumPy on the CPU, or CuPy on an NVIDIA GPU, with the faster forms of the
layers for each (llmc/cpu.py, llmc/cuda_layers.py); mixed precision; and the memory a run needs.
"""

import numpy as np

from llmc import cpu
from llmc.utils import InputError

CUPY_INSTALL = ("pip install cupy-cuda12x (for a CUDA 12 driver) or cupy-cuda13x (CUDA 13); "
                "nvidia-smi shows the driver's")

# Mixed precision (--dtype bf16, on a GPU), as llm.c's train_gpt2.cu does it:
# - The parameters stay float32: the master weights, what AdamW updates (its moments too) and what
#   checkpoints hold. After each update they are copied to bfloat16 (floatX_weights), rounded to
#   nearest; the forward and backward passes read only that copy: half the bytes to move.
# - Activations and their gradients are bfloat16 in memory. Each fused kernel reads bfloat16,
#   computes in float32 and rounds once when it stores. Matrix products multiply bfloat16 on the
#   tensor cores (twice TF32's rate) and add in float32.
# - Kept in float32, where bfloat16's 8 bits of mantissa would hurt: LayerNorm's mean and rstd,
#   attention's scores before the softmax, the probabilities, the loss.
# - The parameters' gradients are float32 (llm.c keeps them in bfloat16). cuBLAS writes the weight
#   gradients' float32 sums as they are, at no extra pass, and all that follows the backward pass is
#   unchanged: accumulation over --grad-accum (bfloat16 would round away small additions), the
#   norm and clipping, the average over processes, AdamW. The price: 2 bytes a parameter.
# - No loss scaling: bfloat16 has float32's exponent range, so small gradients don't underflow as
#   in float16. A loss that is not finite still stops the run before the update.
# - Sampling computes with the float32 parameters: one row at a time, bfloat16 would gain nothing.


class _Chosen:
    # what choose_device chose, for the questions below
    device, xp, floatX, fused = "cpu", np, np.dtype(np.float32), True


def choose_device(device, tf32=True, fused=True, dtype="fp32", attention="blocked"):
    # Checks the options and sets the device up; returns (xp, floatX, the faster layers by name).
    # On the GPU, matmuls use TF32 tensor cores unless tf32 is False (as llm.c's CUDA trainers),
    # and cuda_layers' fused kernels replace the plain layers unless fused is False.
    if dtype not in ("fp32", "bf16"):
        raise InputError(f"--dtype {dtype}: expected fp32 or bf16")
    if dtype == "bf16" and device != "cuda":
        raise InputError("--dtype bf16 needs --device cuda: bfloat16 pays on a GPU's tensor cores, while NumPy "
                         "has no fast bfloat16 matrix product (on the CPU, use --dtype fp32)")
    if dtype == "bf16" and not fused:
        raise InputError("--dtype bf16 runs on the fused GPU kernels only: the plain layers are the float32 reference")
    if attention not in ("blocked", "flash") or (attention == "flash" and (device != "cuda" or not fused)):
        raise InputError(f"--attention {attention}: expected blocked, or flash (with --device cuda)")
    if device == "cpu":
        _Chosen.device, _Chosen.xp, _Chosen.floatX, _Chosen.fused = "cpu", np, np.dtype(np.float32), True
        return np, np.float32, dict(cpu.FASTER_LAYERS)
    try:
        import cupy
    except ImportError:
        raise InputError(f"--device cuda needs CuPy, which is not installed: {CUPY_INSTALL}") from None
    try:
        if cupy.cuda.runtime.getDeviceCount() == 0:
            raise RuntimeError("no GPU found")
        a = cupy.ones((2, 2), dtype=cupy.float32)
        float((a @ a).sum())  # compiles a kernel and calls cuBLAS: driver, NVRTC and cuBLAS work
    except Exception as e:  # no GPU, no driver, or a CuPy for another CUDA than the driver's
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"--device cuda: CuPy {cupy.__version__} cannot use a GPU here ({reason}); "
                         f"check the GPU with nvidia-smi, and that CuPy matches its driver: {CUPY_INSTALL}") from None
    from llmc import cuda_layers
    try:
        floatX = cuda_layers.configure(tf32=tf32, dtype=dtype, attention=attention)
    except RuntimeError as e:  # bfloat16 or flash attention can't run here: why, in one line
        raise InputError(str(e)) from None
    _Chosen.device, _Chosen.xp, _Chosen.floatX, _Chosen.fused = "cuda", cupy, np.dtype(floatX), fused
    return cupy, floatX, dict(cuda_layers.FUSED_LAYERS) if fused else {}


def describe_device():
    # one line: what computes, with which versions
    if _Chosen.device == "cpu":
        return f"cpu: NumPy {np.__version__}, {cpu.usable_cpus()} cores"
    from llmc import cuda_layers
    return f"cuda: {cuda_layers.describe(_Chosen.fused)}"


def synchronize():
    # the GPU runs behind Python: wait for it (before reading a timer)
    if _Chosen.device == "cuda":
        from llmc import cuda_layers
        cuda_layers.synchronize()


def floatX_weights(params, floatX, weights=None):
    # the weights the layers read: the parameters themselves when floatX is float32 (or the
    # parameters float64, as the gradient checks use), else a copy in floatX, rounded to nearest,
    # written into `weights` (the previous copy) where given
    if floatX == np.float32:
        return params
    if weights is None or weights is params:
        weights = {name: _Chosen.xp.empty(p.shape, dtype=floatX) for name, p in params.items()}
    for name, p in params.items():
        weights[name][...] = p  # (a cast: float32 to floatX)
    return weights


def available_memory():
    # bytes the arrays of a run can still take: free GPU memory, or the host's available memory
    # (None where the system does not say)
    if _Chosen.device == "cuda":
        from llmc import cuda_layers
        return cuda_layers.free_memory()
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def training_memory(config, num_parameters, B, T):
    # About how many bytes a training step needs: the four float32 arrays of num_parameters
    # (parameters, gradients, AdamW's moments; with bf16 also the weights' copy), what the forward
    # pass keeps for the backward pass (17 arrays of (B,T,C) a layer, and the plain attention's
    # (B,NH,T,T), which the fused attention recomputes instead), and the logits, probabilities and
    # their gradient (B,T,Vp): the largest of all for GPT-2's 50,257 tokens.
    C, L, NH, Vp = config.channels, config.num_layers, config.num_heads, config.padded_vocab_size
    N, act_bytes = num_parameters, _Chosen.floatX.itemsize  # bytes per activation: 4, or 2 (bf16)
    if _Chosen.device == "cuda" and _Chosen.fused:
        from llmc import cuda_layers
        attention = cuda_layers.attention_bytes(B, NH, T)
    else:
        attention = 4 * L * B * NH * T * T
    weights = 4 * 4 * N + (act_bytes * N if act_bytes != 4 else 0)
    activations = act_bytes * L * 17 * B * T * C + attention
    logits = (act_bytes + 4 + act_bytes) * B * T * Vp  # logits and dlogits in floatX, probs float32
    return weights + activations + logits
