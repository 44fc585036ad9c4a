"""
The GPU half of dev/bench.py: a full GPT-2 training step (forward, backward, AdamW) of train_gpt2.py
on an NVIDIA GPU through CuPy, next to eager PyTorch on the same GPU, the same weights and the same batch.

    python dev/bench.py --device cuda                  # GPT-2 124M (d12), B=8, T=1024, TF32
    python dev/bench.py --device cuda --no-tf32        # ours in full fp32 matmuls
    python dev/bench.py --device cuda --steps 20 --warmup 5 --torch-variants tf32-sdpa
    python dev/bench.py --device cuda --dtype bf16     # mixed precision, against PyTorch bf16 autocast + SDPA
    python dev/bench.py --device cuda --dtype bf16 --find-max-batch   # the largest B that fits, tokens/s at each
    python dev/bench.py --device cuda --attention flash    # ours with the flash attention kernels

What it prints:
- the GPU (train_gpt2's describe_device() and PyTorch's name for it), PyTorch's version, its
  AdamW (foreach=True, PyTorch's default on CUDA; not fused) and the attention kernel SDPA picks;
- for ours and each PyTorch variant: the median ms/step over the timed steps, tokens/s, MFU, the peak
  GPU memory of its step, and its loss at the first and the last step (the same weights and batch
  and the same AdamW settings, so the losses must track each other: a check that the systems
  compute the same thing). Then ours / PyTorch for each variant. The PyTorch variants:
    tf32-sdpa    TF32 matmuls, F.scaled_dot_product_attention(is_causal=True)   (the target's yardstick)
    fp32-manual  fp32 matmuls (TF32 off), attention written out: softmax(q k^T / sqrt(hs)) v, masked
    tf32-manual  TF32 matmuls, attention written out
    fp32-sdpa    fp32 matmuls, scaled_dot_product_attention (not run unless asked for)
    bf16-sdpa    torch.autocast(bfloat16) around the forward pass, SDPA: PyTorch's mixed precision, float32
                 parameters and gradients (the yardstick of --dtype bf16, its default variant)
- sampling: tokens/s at batch 1 from <|endoftext|> with the KV cache (train_gpt2.gpt2_generate);
- where our step's time goes: every layer function of train_gpt2 is wrapped with the GPU
  synchronized before and after it, so each layer's time is its own, kernels and launches alike
  (this serializes the CPU's launches with the GPU's work, so the step is slower with the timers on;
  what is left of the step is "glue": the Python between the layers).

How it is timed. The GPU is synchronized (cupy.cuda.Device().synchronize(), torch.cuda.synchronize())
before every timer starts and before it stops. The steps are interleaved: ours, then one step of each
PyTorch variant, then ours again, and so on, so that clock and temperature drift hit every system
alike. The first --warmup rounds are not timed (CuPy compiles its kernels on first use, cuBLAS picks
its algorithms, both allocators fill their pools).

Processes. Ours runs in this process, which never imports PyTorch; the PyTorch variants run in one
worker process of their own (this file, --torch-worker), stepped over a pipe. Two reasons: PyTorch
loads its own CUDA libraries (cuBLAS, cuDNN, ... from its wheels), and in one process CuPy could end
up calling PyTorch's copy of cuBLAS (the same soname is loaded only once), so ours would not be timed
as `train_gpt2.py --device cuda` runs; and each allocator's memory stays its own. Since each side
synchronizes its GPU before it stops its clock, the GPU is idle whenever the other side starts. The
cost: both processes hold their memory pools on the GPU at once, and one more CUDA context; should the
card run out of memory, run fewer variants (--torch-variants).

Peak GPU memory. Ours: CuPy's memory pool, with its allocator wrapped for one extra untimed step
after the timed ones (the wrapper costs a Python call per allocation, so it stays out of the timed
steps), recording the largest pool.used_bytes(): the bytes in live arrays, weights, gradients and
AdamW's moments included. PyTorch: torch.cuda.max_memory_allocated() over each of the variant's steps
(reset_peak_memory_stats() before each), less what the other variants' models hold in the same
process, plus what this variant's own model holds: the peak of that variant as if it were alone.
Both count bytes in live arrays, not what the pools keep cached; what the pools hold at the end
(CuPy's pool.total_bytes(), PyTorch's memory_reserved(), all variants together) is printed too.

MFU, as llm.c's train_gpt2.cu estimates it (gpt2_estimate_mfu): 6 N + 6 L C T FLOPs per token, with N
all parameters (the padded wte included), against the GPU's dense TF32 tensor-core peak from llm.c's
llmc/mfu.h (for an H100 SXM, "NVIDIA H100 80GB HBM3": 378 TFLOP/s * 528/456 cores * 1830/1620 MHz
= 494 TFLOP/s), the figure llm.c uses for its fp32 (TF32) trainer, so it is the same yardstick for the
fp32 runs too; with --dtype bf16, against the dense bf16 peak, as llm.c's bf16 trainer (twice TF32's:
989 TFLOP/s for that H100). --peak-tflops sets it for a GPU not in the table.

--find-max-batch: instead of the comparison, ours alone at B = 8, 16, 24, ... (at -t T) until CuPy
runs out of GPU memory: ms/step (median of 3 after 1 warm-up step), tokens/s and peak memory at each.

The PyTorch model is nanoGPT's (nn.Linear, nn.LayerNorm, GELU tanh, the classifier tied to wte, vocab
50257 as llm.c's PyTorch reference trains it; --torch-padded-vocab gives it nanoGPT's padded 50304
rows), with weights copied from ours, and torch.optim.AdamW(lr=1e-4, betas=(0.9, 0.999), eps=1e-8,
weight_decay=0.0, foreach=True) as ours runs AdamW. Each variant has its own copy of the model, so each
trains from the same weights on the same batch as ours. The batch is the first B*T tokens of --data,
the same every step; random tokens (seed 0) if that file is missing (the time of a step hardly
depends on which tokens).

This is a benchmark, not a test: it prints figures and asserts nothing. PyTorch is dev-only and
optional: without it, only ours is timed. Without a GPU, `python dev/bench.py --simulate-cpu` (a
hidden option; d6, B=2, T=64 unless given) runs this same code with NumPy and PyTorch on the CPU, the
GPU's synchronizations and memory figures left out: a check of everything but the CUDA calls.
"""

import argparse
import importlib.util
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_gpt2 as tg  # noqa: E402
from llmc import cpu, formats, tokenizer  # noqa: E402
from llmc.device import describe_device  # noqa: E402

# name: (label, TF32 matmuls, scaled_dot_product_attention, bf16 autocast)
TORCH_VARIANTS = {
    "tf32-sdpa": ("TF32, SDPA", True, True, False),
    "fp32-manual": ("fp32, attention written out", False, False, False),
    "tf32-manual": ("TF32, attention written out", True, False, False),
    "fp32-sdpa": ("fp32, SDPA", False, True, False),
    "bf16-sdpa": ("bf16 autocast, SDPA", True, True, True),
}
DEFAULT_VARIANTS = {"fp32": "tf32-sdpa,fp32-manual,tf32-manual", "bf16": "bf16-sdpa"}
TARGETS = {TORCH_VARIANTS["tf32-sdpa"][0]: "issue 9's target: 0.80 or less",  # by the variant's label
           TORCH_VARIANTS["bf16-sdpa"][0]: "issue 10's bar: 1.00 or less"}
LR, BETA1, BETA2, EPS, WEIGHT_DECAY = 1e-4, 0.9, 0.999, 1e-8, 0.0  # the same AdamW for both


def add_arguments(parser):
    # the options of --device cuda (dev/bench.py adds them to its own parser)
    group = parser.add_argument_group("with --device cuda (dev/bench_cuda.py)")
    group.add_argument("--no-tf32", action="store_true", help="ours with full fp32 matmuls (default: TF32 tensor cores)")
    group.add_argument("--no-fused", action="store_true", help="ours with the plain layers only, no fused GPU kernels")
    group.add_argument("--dtype", choices=["fp32", "bf16"], default=None,
                       help="ours in fp32 (TF32 matmuls unless --no-tf32) or bf16 mixed precision (train_gpt2.py --dtype)")
    group.add_argument("--attention", choices=["blocked", "flash"], default=None,
                       help="ours with this attention (train_gpt2.py --attention; default blocked)")
    group.add_argument("--find-max-batch", action="store_true",
                       help="ours alone at B = 8, 16, 24, ... until the GPU's memory runs out: tokens/s at each")
    group.add_argument("--torch-variants", default=None, metavar="LIST",
                       help=f"comma-separated, of {', '.join(TORCH_VARIANTS)} (default {DEFAULT_VARIANTS['fp32']}; "
                            f"with --dtype bf16, {DEFAULT_VARIANTS['bf16']})")
    group.add_argument("--torch-padded-vocab", action="store_true",
                       help="PyTorch's wte and logits with the padded vocab (50304 rows, as nanoGPT trains from scratch)")
    group.add_argument("--gen-tokens", type=int, default=None, help="tokens to sample for the sampling speed (default 128)")
    group.add_argument("--peak-tflops", type=float, default=None,
                       help="the GPU's dense TF32 (bf16 with --dtype bf16) peak for MFU, where llm.c's table doesn't know the GPU")
    group.add_argument("--simulate-cpu", action="store_true", help=argparse.SUPPRESS)  # the same code on the CPU, for testing
    return ("no_tf32", "no_fused", "dtype", "attention", "find_max_batch", "torch_variants", "torch_padded_vocab", "gen_tokens",
            "peak_tflops", "simulate_cpu")


# ----------------------------------------------------------------------------
# MFU: llm.c's llmc/mfu.h, its dense TF32 column (the one its fp32 trainer uses) and its bf16 column

# (TF32 TFLOP/s, tensor cores, MHz) of a reference GPU of each architecture, from NVIDIA's whitepapers
VOLTA, AMPERE_DATACENTER, AMPERE_CONSUMER = (125.0, 640, 1530), (156.0, 432, 1410), (40.0, 336, 1860)
HOPPER, ADA = (378.0, 456, 1620), (82.6, 512, 2520)
GPU_TABLE = {  # name as the driver reports it: (architecture, tensor cores, MHz)
    "Tesla V100-SXM2-16GB": (VOLTA, 640, 1530), "Tesla V100-PCIE-32GB": (VOLTA, 640, 1530),
    "NVIDIA A100-PCIE-40GB": (AMPERE_DATACENTER, 432, 1410), "NVIDIA A100-PCIE-80GB": (AMPERE_DATACENTER, 432, 1410),
    "NVIDIA A100-SXM4-40GB": (AMPERE_DATACENTER, 432, 1410), "NVIDIA A100-SXM4-80GB": (AMPERE_DATACENTER, 432, 1410),
    "NVIDIA RTX A2000": (AMPERE_CONSUMER, 104, 1200), "NVIDIA RTX A4000": (AMPERE_CONSUMER, 192, 1560),
    "NVIDIA RTX A4500": (AMPERE_CONSUMER, 224, 1650), "NVIDIA RTX A5000": (AMPERE_CONSUMER, 256, 1695),
    "NVIDIA RTX A5500": (AMPERE_CONSUMER, 320, 1770), "NVIDIA RTX A6000": (AMPERE_CONSUMER, 336, 1800),
    "NVIDIA GeForce RTX 3090 Ti": (AMPERE_CONSUMER, 336, 1860), "NVIDIA GeForce RTX 3090": (AMPERE_CONSUMER, 328, 1695),
    "NVIDIA GeForce RTX 3080 Ti": (AMPERE_CONSUMER, 320, 1665), "NVIDIA GeForce RTX 3080": (AMPERE_CONSUMER, 272, 1710),
    "NVIDIA GeForce RTX 3070 Ti": (AMPERE_CONSUMER, 192, 1770), "NVIDIA GeForce RTX 3070": (AMPERE_CONSUMER, 184, 1725),
    "NVIDIA GeForce RTX 3060 Ti": (AMPERE_CONSUMER, 152, 1665), "NVIDIA GeForce RTX 3060": (AMPERE_CONSUMER, 112, 1777),
    "NVIDIA RTX A2000 ADA": (ADA, 88, 2130), "NVIDIA RTX A4000 ADA": (ADA, 192, 2175),
    "NVIDIA RTX A4500 ADA": (ADA, 224, 2580), "NVIDIA RTX A5000 ADA": (ADA, 400, 2550),
    "NVIDIA RTX A5880 ADA": (ADA, 440, 2460), "NVIDIA RTX A6000 ADA": (ADA, 568, 2505),
    "NVIDIA GeForce RTX 4090": (ADA, 512, 2520), "NVIDIA GeForce RTX 4080 SUPER": (ADA, 320, 2550),
    "NVIDIA GeForce RTX 4080": (ADA, 304, 2505), "NVIDIA GeForce RTX 4070 Ti SUPER": (ADA, 264, 2610),
    "NVIDIA GeForce RTX 4070 Ti": (ADA, 240, 2610), "NVIDIA GeForce RTX 4070 SUPER": (ADA, 224, 2475),
    "NVIDIA GeForce RTX 4070": (ADA, 184, 2475), "NVIDIA GeForce RTX 4060 Ti": (ADA, 136, 2535),
    "NVIDIA GeForce RTX 4060": (ADA, 96, 2460),
    "NVIDIA H100 PCIe": (HOPPER, 456, 1620), "NVIDIA H100 80GB HBM3": (HOPPER, 528, 1830),  # HBM3 = SXM5
    "NVIDIA H200": (HOPPER, 528, 1830),  # not in llm.c's table: the H100 SXM's tensor cores and clock
}


def peak_tflops(gpu_name, dtype="fp32"):
    # llm.c's get_flops_promised for its fp32 (TF32) mode, or its bf16 mode: the architecture's
    # figure, scaled by this GPU's tensor cores and clock; None for a GPU not in the table. In llm.c's
    # table the dense bf16 figure is twice the TF32 one for every architecture that has bf16 (Volta has not).
    if gpu_name not in GPU_TABLE:
        return None
    architecture, new_cores, new_mhz = GPU_TABLE[gpu_name]
    if dtype == "bf16" and architecture is VOLTA:
        return None
    tf32, cores, mhz = architecture
    return tf32 * (2 if dtype == "bf16" else 1) * (new_cores / cores) * (new_mhz / mhz)


def flops_per_step(config, B, T):
    # llm.c's gpt2_estimate_mfu: 6 N (every weight in a matmul, forward and backward) plus 6 L C T
    # (attention's two matmuls; T is the step's sequence length) per token
    N, L, C = tg.num_parameters(config), config.num_layers, config.channels
    return (6 * N + 6 * L * C * T) * B * T


# ----------------------------------------------------------------------------
# the device: CuPy on a GPU, or (--simulate-cpu) NumPy on the CPU with the GPU calls left out

class Device:
    def __init__(self, args):
        self.simulated = args.simulate_cpu
        cpu.keep_freed_memory()  # ours runs as train_gpt2.py runs it
        if self.simulated:
            tg.use_device("cpu")
            self.sync = lambda: None
            self.gpu_name = "cpu (simulated)"
            return
        tg.use_device("cuda", tf32=not args.no_tf32, fused=not args.no_fused, dtype=args.dtype,
                      attention=args.attention)  # raises InputError, one line
        import cupy
        self.cupy = cupy
        self.sync = cupy.cuda.Device().synchronize
        name = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"]
        self.gpu_name = name.decode() if isinstance(name, bytes) else str(name)  # bytes or str, by CuPy version

    def describe(self):
        return describe_device() + (" (simulating the GPU run: no GPU calls, no GPU memory figures)" if self.simulated else "")

    def pool(self):
        # the memory pool our arrays come from: the one whose malloc is CuPy's allocator (its default pool
        # unless something installed another), and the allocator itself
        allocator = self.cupy.cuda.get_allocator()
        pool = getattr(allocator, "__self__", None)
        return (pool if hasattr(pool, "used_bytes") else self.cupy.get_default_memory_pool()), allocator

    def peak_memory_of(self, fn):
        # runs fn with CuPy's allocator wrapped to record the largest number of bytes in use; None when simulated
        if self.simulated:
            fn()
            return None
        pool, allocator = self.pool()
        peak = pool.used_bytes()

        def track(memory):
            nonlocal peak
            peak = max(peak, pool.used_bytes())
            return memory
        self.cupy.cuda.set_allocator(lambda n: track(allocator(n)))
        try:
            fn()
        finally:
            self.cupy.cuda.set_allocator(allocator)
        return peak

    def held_memory(self):
        return None if self.simulated else self.pool()[0].total_bytes()


def our_step(model, x, y, step):
    loss = tg.gpt2_forward(model, x, y)  # the float loss: a sync
    tg.gpt2_backward(model)
    tg.gpt2_update(model, LR, BETA1, BETA2, EPS, WEIGHT_DECAY, step + 1)
    return loss


def timed(sync, fn, *args):
    sync()
    t0 = time.perf_counter()
    out = fn(*args)
    sync()
    return time.perf_counter() - t0, out


def load_batch(args, config, B, T):
    if os.path.isfile(args.data):
        x, y = tg.DataLoader(formats.read_tokens(args.data, config.vocab_size), B, T, args.data).next_batch()
        return x, y, f"the first {B}x{T} tokens of {args.data}"
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, B * T + 1, dtype=np.int32)
    return tokens[:-1].reshape(B, T), tokens[1:].reshape(B, T), f"random tokens ({args.data} not found)"


# ----------------------------------------------------------------------------
# the breakdown: bench.py's LayerTimer, with the GPU synchronized around every layer call

def make_layer_timer(LayerTimer):
    class SyncedLayerTimer(LayerTimer):
        def __init__(self, model, sync):
            super().__init__(model)
            self.sync, self.depth = sync, 0
            # every layer function train_gpt2 has, the fused ones use_device installs included
            for name in dir(tg):
                if re.fullmatch(r"[a-z0-9_]+_(forward|backward)", name) and not name.startswith("gpt2_") \
                        and callable(getattr(tg, name)):
                    self.originals.setdefault(name, getattr(tg, name))

        def label(self, name, args):
            try:
                return super().label(name, args)
            except (IndexError, AttributeError, TypeError):  # a fused layer's arguments may differ
                return name.replace("_", " ")

        def wrap(self, name, fn):
            def timed_layer(*args, **kwargs):
                if self.depth:  # a layer called from inside another: its time is the outer one's
                    return fn(*args, **kwargs)
                self.sync()
                t0 = time.perf_counter()
                self.depth += 1
                try:
                    out = fn(*args, **kwargs)
                finally:
                    self.depth -= 1
                self.sync()
                self.totals[self.label(name, args)] += time.perf_counter() - t0
                return out
            return timed_layer
    return SyncedLayerTimer


def breakdown(LayerTimer, device, model, x, y, steps):
    step_times = []
    with make_layer_timer(LayerTimer)(model, device.sync) as timer:
        for step in range(steps):
            seconds, _ = timed(device.sync, our_step, model, x, y, 1000 + step)
            step_times.append(seconds)
    totals = {k: v / steps for k, v in timer.totals.items()}
    totals["(glue: everything else)"] = sum(step_times) / steps - sum(totals.values())
    return totals, sum(step_times) / steps


def sampling(device, model, num_tokens, runs=3):
    # batch 1, from <|endoftext|>, with the KV cache; one untimed run first (kernels compile)
    def run():
        for _ in tg.gpt2_generate(model, [tokenizer.GPT2_EOT], num_tokens, [1337]):
            pass
    timed(device.sync, run)
    return statistics.median(timed(device.sync, run)[0] for _ in range(runs))


# ----------------------------------------------------------------------------
# PyTorch, in a process of its own

class TorchWorker:
    def __init__(self, args, model, x, y, variants):
        # the weights and the batch go over in a file (500 MB for d12), the rest on the command line
        self.tmp = tempfile.mkdtemp(prefix="bench_cuda_")
        path = os.path.join(self.tmp, "state.npz")
        np.savez(path, params=tg.to_host(model.params_memory), x=tg.to_host(x), y=tg.to_host(y))
        c = model.config
        cmd = [sys.executable, os.path.abspath(__file__), "--torch-worker", "--state", path, "--variants", ",".join(variants),
               "--config", ",".join(str(v) for v in (c.max_seq_len, c.vocab_size, c.padded_vocab_size,
                                                     c.num_layers, c.num_heads, c.channels))]
        cmd += ["--simulate-cpu"] if args.simulate_cpu else []
        cmd += ["--padded-vocab"] if args.torch_padded_vocab else []
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        try:
            self.info = json.loads(self.readline())  # once it has loaded the state, which we can then delete
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def readline(self):
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the PyTorch worker stopped (exit status {self.proc.wait()}; its error is above)")
        return line

    def step(self, variant):
        print("step", variant, file=self.proc.stdin, flush=True)
        seconds, loss, peak = self.readline().split()
        return float(seconds), float(loss), (None if int(peak) < 0 else int(peak))

    def close(self):
        try:
            print("quit", file=self.proc.stdin, flush=True)
            info = json.loads(self.readline())
        except (RuntimeError, BrokenPipeError):
            info = {}
        self.proc.wait()
        return info


def torch_model_class():
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class Block(nn.Module):
        # attribute names as dev/make_reference.py's GPT, so that its load_llmc_params fills them
        def __init__(self, C, NH, maxT, sdpa):
            super().__init__()
            self.NH, self.sdpa = NH, sdpa
            self.ln_1 = nn.LayerNorm(C, eps=1e-5)
            self.c_attn = nn.Linear(C, 3 * C)
            self.attn_proj = nn.Linear(C, C)
            self.ln_2 = nn.LayerNorm(C, eps=1e-5)
            self.c_fc = nn.Linear(C, 4 * C)
            self.mlp_proj = nn.Linear(4 * C, C)
            if not sdpa:
                self.register_buffer("mask", torch.ones(maxT, maxT, dtype=torch.bool).triu(1), persistent=False)

        def attention(self, x):
            B, T, C = x.shape
            hs = C // self.NH
            q, k, v = self.c_attn(x).split(C, dim=2)
            q, k, v = (t.view(B, T, self.NH, hs).transpose(1, 2) for t in (q, k, v))  # (B,NH,T,hs)
            if self.sdpa:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))  # (B,NH,T,T)
                att = att.masked_fill(self.mask[:T, :T], float("-inf"))
                y = F.softmax(att, dim=-1) @ v
            return self.attn_proj(y.transpose(1, 2).contiguous().view(B, T, C))

        def forward(self, x):
            x = x + self.attention(self.ln_1(x))
            return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))

    class GPT(nn.Module):
        def __init__(self, V, maxT, L, NH, C, sdpa):
            super().__init__()
            self.wte = nn.Embedding(V, C)  # also the classifier's weight (tied)
            self.wpe = nn.Embedding(maxT, C)
            self.h = nn.ModuleList(Block(C, NH, maxT, sdpa) for _ in range(L))
            self.ln_f = nn.LayerNorm(C, eps=1e-5)

        def forward(self, idx, targets):
            x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
            for block in self.h:
                x = block(x)
            logits = F.linear(self.ln_f(x), self.wte.weight)  # (B,T,V)
            return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))

    return GPT


def set_tf32(torch, on):
    # the new API where PyTorch has it (2.9 on): mixing it with the old allow_tf32 flags is an error there
    mode = "tf32" if on else "ieee"
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        torch.backends.cuda.matmul.fp32_precision = mode
        torch.backends.cudnn.fp32_precision = mode
    else:
        torch.backends.cuda.matmul.allow_tf32 = on
        torch.backends.cudnn.allow_tf32 = on


def torch_worker(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--torch-worker", action="store_true")
    parser.add_argument("--state", required=True)
    parser.add_argument("--variants", required=True)
    parser.add_argument("--config", required=True)
    parser.add_argument("--simulate-cpu", action="store_true")
    parser.add_argument("--padded-vocab", action="store_true")
    args = parser.parse_args(argv)
    import torch
    from make_reference import load_llmc_params

    maxT, V, Vp, L, NH, C = (int(v) for v in args.config.split(","))
    config = tg.GPT2Config(max_seq_len=maxT, vocab_size=V, padded_vocab_size=Vp, num_layers=L, num_heads=NH, channels=C)
    state = np.load(args.state)
    params = tg.point_parameters(state["params"], config)
    cuda = not args.simulate_cpu
    device = torch.device("cuda" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    x = torch.from_numpy(state["x"]).long().to(device)
    y = torch.from_numpy(state["y"]).long().to(device)
    GPT = torch_model_class()
    systems = {}
    for name in args.variants.split(","):
        _, tf32, sdpa, bf16 = TORCH_VARIANTS[name]
        with torch.device(device):
            gpt = GPT(Vp if args.padded_vocab else V, maxT, L, NH, C, sdpa)
        load_llmc_params(gpt, params)  # copies from the host arrays onto the device
        optimizer = torch.optim.AdamW(gpt.parameters(), lr=LR, betas=(BETA1, BETA2), eps=EPS,
                                      weight_decay=WEIGHT_DECAY, foreach=True, fused=False)
        systems[name] = (gpt, optimizer, tf32, bf16)
    del state, params

    # which kernel scaled_dot_product_attention picks for this step's shapes (a private PyTorch call)
    try:
        from torch.nn.attention import SDPBackend
        q = torch.zeros(x.shape[0], NH, x.shape[1], C // NH, device=device, requires_grad=True)
        sdpa_kernel = {int(v): k for k, v in SDPBackend.__members__.items()}[int(torch._fused_sdp_choice(q, q, q, is_causal=True))]
        del q
    except Exception as e:  # noqa: BLE001 (only for the printout)
        sdpa_kernel = f"unknown ({type(e).__name__})"
    print(json.dumps(dict(torch=torch.__version__, cuda=torch.version.cuda,
                          gpu=torch.cuda.get_device_name() if cuda else "cpu", sdpa_kernel=sdpa_kernel)), flush=True)

    def resident(gpt, optimizer):
        # the bytes this variant's model holds between steps: weights, gradients, AdamW's moments
        tensors = [p for p in gpt.parameters()] + [p.grad for p in gpt.parameters() if p.grad is not None]
        tensors += [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
        return sum(t.numel() * t.element_size() for t in tensors if t.device.type == device.type)

    for line in sys.stdin:
        if line.split()[0] == "quit":
            break
        gpt, optimizer, tf32, bf16 = systems[line.split()[1]]
        set_tf32(torch, tf32)
        if cuda:
            sync()
            others = torch.cuda.memory_allocated() - resident(gpt, optimizer)
            torch.cuda.reset_peak_memory_stats()
        sync()
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        # (bf16: autocast runs the matmuls and SDPA in bf16, keeps LayerNorm and the loss in float32)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = gpt(x, y)
        loss.backward()
        optimizer.step()
        sync()
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() - others if cuda else -1
        print(seconds, loss.item(), peak, flush=True)
    print(json.dumps(dict(reserved=torch.cuda.memory_reserved() if cuda else None)), flush=True)


# ----------------------------------------------------------------------------

def gb(n):
    return "n/a" if n is None else f"{n / 1e9:.2f} GB"


def mfu_text(flops, seconds, peak):
    # the model FLOPs utilization of a step of `flops` in `seconds`, against `peak` TFLOP/s (None: n/a)
    return f"{100 * flops / seconds / (peak * 1e12):5.1f}%" if peak else "n/a"


def main(args, LayerTimer):
    if args.simulate_cpu and not hasattr(tg, "use_device"):
        sys.exit("error: train_gpt2.py has no use_device yet")
    # (None on the command line: bench.py refuses GPU options for the CPU)
    args.dtype, args.attention = args.dtype or "fp32", args.attention or "blocked"
    try:
        device = Device(args)
    except tg.InputError as e:
        sys.exit(f"error: {e}")
    variants = (args.torch_variants or DEFAULT_VARIANTS[args.dtype]).split(",")
    for v in variants:
        if v not in TORCH_VARIANTS:
            sys.exit(f"error: --torch-variants: unknown variant {v!r}, expected some of {', '.join(TORCH_VARIANTS)}")
    if args.no_torch:
        variants = []
    elif importlib.util.find_spec("torch") is None:
        print("PyTorch is not installed (pip install torch, a CUDA build): timing ours only")
        variants = []
    B, T, num_tokens = args.batch_size, args.seq_len, args.gen_tokens or 128
    tf32 = not args.no_tf32
    print(f"device: {device.describe()}", flush=True)
    if args.find_max_batch:
        return find_max_batch(args, device)

    model = tg.gpt2_build_from_random(args.depth, seed=0)
    config = model.config
    x, y, batch = load_batch(args, config, B, T)
    worker = None
    if variants:
        try:
            worker = TorchWorker(args, model, x, y, variants)
        except RuntimeError as e:
            print(f"{e}: timing ours only", flush=True)
            variants = []
    if worker is not None:
        i = worker.info
        print(f"pytorch: {i['torch']} (CUDA {i['cuda']}) on {i['gpu']}, in a process of its own; "
              f"AdamW foreach=True (PyTorch's default on CUDA), not fused; SDPA picks {i['sdpa_kernel']}", flush=True)

    precision = "bf16" if args.dtype == "bf16" else "TF32" if tf32 else "fp32"
    ours = f"ours (CuPy, {precision}, {'plain layers' if args.no_fused else 'fused kernels'}" + \
        (", flash attention)" if args.attention == "flash" else ")")
    if device.simulated:
        ours = "ours (NumPy, simulated)"
    print(f"\nGPT-2 {args.depth} ({tg.num_parameters(config) / 1e6:.2f}M parameters), B={B}, T={T}, batch: {batch}\n"
          f"median of {args.steps} training steps after {args.warmup} warm-up steps, "
          + ("ours and PyTorch interleaved step by step" if variants else "ours only")
          + ", the GPU synchronized around every timer", flush=True)

    runners = {ours: lambda step: timed(device.sync, our_step, model, x, y, step) + (None,)}
    for v in variants:
        runners[f"pytorch eager, {TORCH_VARIANTS[v][0]}"] = lambda step, v=v: worker.step(v)
    times, losses, peaks = defaultdict(list), defaultdict(list), {}
    for step in range(args.warmup + args.steps):
        for name, run in list(runners.items()):  # interleaved: ours, each variant, ours, ...
            try:
                seconds, loss, peak = run(step)
            except (RuntimeError, OSError) as e:  # the worker died (out of memory?): go on with ours
                print(f"  {e}; going on with ours only", flush=True)
                runners, worker = {ours: runners[ours]}, None
                break
            if step >= args.warmup:
                times[name].append(seconds)
            losses[name].append(loss)
            if peak is not None:
                peaks[name] = max(peaks.get(name, 0), peak)
    step = args.warmup + args.steps
    peaks[ours] = device.peak_memory_of(lambda: our_step(model, x, y, step))  # one more step, untimed
    held = {ours: device.held_memory()}
    if worker is not None:
        held["pytorch (all variants)"] = worker.close().get("reserved")

    peak = args.peak_tflops or peak_tflops(device.gpu_name, args.dtype)
    flops = flops_per_step(config, B, T)
    print(f"MFU: llm.c's estimate, (6N + 6LCT) x B x T = {flops / 1e12:.3f} TFLOP per step, "
          + (f"against {peak:.1f} TFLOP/s, {device.gpu_name}'s dense {'bf16' if args.dtype == 'bf16' else 'TF32'} peak"
             + (" (--peak-tflops)" if args.peak_tflops else " (llm.c's llmc/mfu.h)") if peak else
             f"n/a: {device.gpu_name} is not in llm.c's table of peak figures (give one with --peak-tflops)"))
    medians = {name: statistics.median(t) for name, t in times.items() if t}
    print(f"\n  {'system':<42} {'ms/step':>8} {'(min-max)':>15} {'tokens/s':>9} {'MFU':>6} {'peak mem':>9}  "
          f"{'loss: first':>11} {'last':>9}")
    for name, median in medians.items():
        mfu = mfu_text(flops, median, peak)
        spread = f"({min(times[name]) * 1e3:.1f}-{max(times[name]) * 1e3:.1f})"
        print(f"  {name:<42} {median * 1e3:8.1f} {spread:>15} {B * T / median:9.0f} {mfu:>6} {gb(peaks.get(name)):>9}  "
              f"{losses[name][0]:11.6f} {losses[name][-1]:9.6f}")
    if ours in medians and len(medians) > 1:
        print("  time of ours / that of pytorch (below 1: ours is faster):")
        for name, median in medians.items():
            if name != ours:
                label = name.removeprefix("pytorch eager, ")
                print(f"    {label:<40} {medians[ours] / median:5.2f}" + (f"  ({TARGETS[label]})" if label in TARGETS else ""))
    print("  memory the pools hold at the end: " + ", ".join(f"{k.split(' (')[0]} {gb(v)}" for k, v in held.items()))

    seconds = sampling(device, model, num_tokens)
    print(f"\nsampling, batch 1, {num_tokens} tokens from <|endoftext|> with the KV cache: {seconds * 1e3:.0f} ms, "
          f"{num_tokens / seconds:.0f} tokens/s (median of 3; issue 9's target: 200 tokens/s or more)")

    totals, step_time = breakdown(LayerTimer, device, model, x, y, steps=3)
    print(f"\nwhere our step's time goes (mean of 3 steps, the GPU synchronized around each layer call: "
          f"{step_time * 1e3:.1f} ms per step with the timers on, {medians.get(ours, float('nan')) * 1e3:.1f} without):")
    for name, t in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"  {name:<36} {t * 1e3:8.2f} ms  {100 * t / step_time:5.1f}%")


def find_max_batch(args, device):
    # ours alone, B = 8, 16, 24, ... at T until a step runs out of GPU memory
    T = args.seq_len
    model = tg.gpt2_build_from_random(args.depth, seed=0)
    peak = args.peak_tflops or peak_tflops(device.gpu_name, args.dtype)
    print(f"\nGPT-2 {args.depth}, T={T}, {args.dtype}: the largest batch that fits (median of 3 steps after 1 warm-up)")
    print(f"  {'B':>4} {'ms/step':>9} {'tokens/s':>9} {'MFU':>6} {'peak mem':>9}")
    out_of_memory = (MemoryError,) if device.simulated else (  # (cuBLAS's own allocations fail with CUBLASError)
        MemoryError, device.cupy.cuda.memory.OutOfMemoryError, device.cupy.cuda.cublas.CUBLASError)
    B = 8
    while True:
        try:
            x, y, _ = load_batch(args, model.config, B, T)
            our_step(model, x, y, 0)
            seconds = statistics.median(timed(device.sync, our_step, model, x, y, step)[0] for step in range(1, 4))
            peak_memory = device.peak_memory_of(lambda: our_step(model, x, y, 4))
        except out_of_memory:
            print(f"  {B:>4}  out of memory")
            return
        finally:
            model.acts = None
            if not device.simulated:
                device.cupy.get_default_memory_pool().free_all_blocks()
        mfu = mfu_text(flops_per_step(model.config, B, T), seconds, peak)
        print(f"  {B:>4} {seconds * 1e3:9.1f} {B * T / seconds:9.0f} {mfu:>6} {gb(peak_memory):>9}", flush=True)
        B += 8
        if device.simulated and B > 16:  # (the CPU would take long to fill its memory)
            return


if __name__ == "__main__":
    if "--torch-worker" in sys.argv:
        torch_worker(sys.argv[1:])
    else:  # python dev/bench_cuda.py [options] is bench.py --device cuda [options] (bench.py imports
        # this module, so it is started as a program, not imported back)
        bench_py = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench.py")
        os.execv(sys.executable, [sys.executable, bench_py, "--device", "cuda"] + sys.argv[1:])
