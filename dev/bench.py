"""
Benchmark: how long a full GPT-2 training step (forward, backward, AdamW) takes in train_gpt2.py,
next to eager PyTorch on the same CPU, the same weights and the same batch.

    python dev/bench.py                       # GPT-2 124M (d12), B=4, T=64, with PyTorch if importable
    python dev/bench.py -b 8 -t 128 --depth d6
    python dev/bench.py --sweep               # a table over B*T and depth
    python dev/bench.py --no-torch --no-rss   # only ours
    python dev/bench.py --device cuda         # on an NVIDIA GPU: see dev/bench_cuda.py

It prints the BLAS NumPy uses, the median ms/step of ours and of PyTorch (their steps interleaved,
so that the noise of a shared machine hits both alike), the floor set by the step's matmuls alone,
tokens/s, the peak RSS of `train_gpt2.py --init` and of the PyTorch step (each in its own process),
and a per-layer breakdown of where our step's time goes. This is a benchmark, not a test: it
prints figures and asserts nothing. PyTorch is a dev-only dependency (pip install torch==2.13.0).
"""

import argparse
import ctypes
import importlib.util
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections import defaultdict

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_gpt2 as tg  # noqa: E402
from llmc import cpu, formats, tokenizer  # noqa: E402
import bench_cuda  # noqa: E402  (--device cuda)


# ----------------------------------------------------------------------------
# the machine and its BLAS

def openblas_info():
    # numpy's wheels bundle OpenBLAS with prefixed symbols; ask it which kernel and how many threads
    for line in open("/proc/self/maps") if os.path.exists("/proc/self/maps") else []:
        path = line.split()[-1]
        if "openblas" in path.lower() and ".so" in path:
            lib = ctypes.CDLL(path)
            for prefix, suffix in (("scipy_openblas_", "64_"), ("scipy_openblas_", ""), ("openblas_", "")):
                try:
                    corename = getattr(lib, f"{prefix}get_corename{suffix}")
                    threads = getattr(lib, f"{prefix}get_num_threads{suffix}")
                    config = getattr(lib, f"{prefix}get_config{suffix}")
                except AttributeError:
                    continue
                corename.restype = config.restype = ctypes.c_char_p
                return f"{config().decode()} (kernel {corename().decode()}, {threads()} threads)"
    return "unknown (not OpenBLAS?)"


def machine_info():
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (OSError, ValueError):
        mem_gb = float("nan")
    env = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith(("OPENBLAS_", "OMP_")))
    return (f"machine: {cpu}, {os.cpu_count()} cores, {mem_gb:.0f} GB; Python {platform.python_version()}, "
            f"numpy {np.__version__}\nBLAS: {openblas_info()}" + (f"\nenvironment: {env}" if env else ""))


# ----------------------------------------------------------------------------
# one training step, ours

def numpy_step(model, x, y, step):
    loss = tg.gpt2_forward(model, x, y)
    tg.gpt2_backward(model)
    tg.gpt2_update(model, 1e-4, 0.9, 0.999, 1e-8, 0.0, step + 1)
    return loss


def matmul_floor(model, B, T, repeats):
    # the time of the step's matrix products alone (forward, and both backward products of each),
    # with the same shapes, in numpy: what the step would cost if everything else were free
    c = model.config
    C, L, Vp = c.channels, c.num_layers, c.padded_vocab_size
    rng = np.random.default_rng(0)
    shapes = [(3 * C, C), (C, C), (4 * C, C), (C, 4 * C)] * L + [(Vp, C)]
    weights = {s: rng.standard_normal(s, dtype=np.float32) for s in set(shapes)}
    inputs = {s: rng.standard_normal((B * T, s[1]), dtype=np.float32) for s in set(shapes)}
    douts = {s: rng.standard_normal((B * T, s[0]), dtype=np.float32) for s in set(shapes)}
    dweight = {s: np.empty(s, dtype=np.float32) for s in set(shapes)}
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for s in shapes:
            inputs[s] @ weights[s].T  # forward
            douts[s] @ weights[s]  # backward into the input
            np.matmul(douts[s].T, inputs[s], out=dweight[s])  # backward into the weight
        times.append(time.perf_counter() - t0)
    flops = sum(3 * 2 * B * T * s[0] * s[1] for s in shapes)
    return statistics.median(times), flops


class LayerTimer:
    """Wraps every layer function of train_gpt2 to add up the time spent in it (a profiler in miniature)."""

    LAYERS = ["encoder", "layernorm", "matmul", "attention", "gelu", "residual", "softmax",
              "crossentropy", "crossentropy_softmax"]

    def __init__(self, model):
        self.totals = defaultdict(float)
        self.Vp = model.config.padded_vocab_size
        self.originals = {}
        for layer in self.LAYERS:
            for direction in ("forward", "backward"):
                name = f"{layer}_{direction}"
                if hasattr(tg, name):
                    self.originals[name] = getattr(tg, name)
        self.originals["gpt2_update"] = tg.gpt2_update

    def label(self, name, args):
        # the classifier is the matmul whose weight is wte: its output has Vp columns
        if name == "matmul_forward" and args[1].shape[0] == self.Vp:
            return "classifier matmul forward"
        if name == "matmul_backward" and args[1][1].shape[0] == self.Vp:
            return "classifier matmul backward"
        if name in ("softmax_forward", "crossentropy_forward", "crossentropy_softmax_backward"):
            return "softmax + crossentropy " + ("backward" if "backward" in name else "forward")
        if name == "gpt2_update":
            return "AdamW update"
        return name.replace("_", " ")

    def wrap(self, name, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            self.totals[self.label(name, args)] += time.perf_counter() - t0
            return out
        return timed

    def __enter__(self):
        for name, fn in self.originals.items():
            setattr(tg, name, self.wrap(name, fn))
        return self

    def __exit__(self, *exc):
        for name, fn in self.originals.items():
            setattr(tg, name, fn)


def breakdown(model, x, y, steps):
    # time the layers over a few steps; what is left of the step is the glue between them
    step_times = []
    with LayerTimer(model) as timer:
        for step in range(steps):
            t0 = time.perf_counter()
            numpy_step(model, x, y, 100 + step)
            step_times.append(time.perf_counter() - t0)
    totals = {k: v / steps for k, v in timer.totals.items()}
    totals["(glue: everything else)"] = sum(step_times) / steps - sum(totals.values())
    return totals, sum(step_times) / steps


# ----------------------------------------------------------------------------
# the same step in eager PyTorch

def torch_model_from(model):
    # the PyTorch GPT-2 of dev/make_reference.py (per-layer nn.Linear and nn.LayerNorm modules),
    # loaded with our model's weights, and PyTorch's own AdamW
    import torch
    from make_reference import GPT, load_llmc_params
    c = model.config
    gpt = GPT(c.vocab_size, c.max_seq_len, c.num_layers, c.num_heads, c.channels)
    load_llmc_params(gpt, model.params)
    optimizer = torch.optim.AdamW(gpt.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    return gpt, optimizer


def torch_step(gpt, optimizer, x, y):
    optimizer.zero_grad(set_to_none=True)
    _, loss = gpt(x, y)
    loss.backward()
    optimizer.step()
    return loss.item()


# ----------------------------------------------------------------------------
# PyTorch runs in processes of its own: its memory allocator settings stay its own (our trainer
# tunes glibc's malloc, see keep_freed_memory, which would speed PyTorch up too), and its peak
# memory is its own. The steps still interleave with ours: each worker waits for "step".

class TorchWorker:
    def __init__(self, args, depth, B, T, tuned):
        cmd = [sys.executable, __file__, "--torch-worker", "--depth", depth, "-b", str(B), "-t", str(T), "--data", args.data]
        self.proc = subprocess.Popen(cmd + (["--tuned-malloc"] if tuned else []), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, cwd=ROOT)
        self.name = f"pytorch {self.proc.stdout.readline().split()[1]} eager" + (", malloc tuned as ours" if tuned else "")

    def step(self):
        print("step", file=self.proc.stdin, flush=True)
        seconds, loss = self.proc.stdout.readline().split()
        return float(seconds), float(loss)

    def close(self):
        print("quit", file=self.proc.stdin, flush=True)
        peak = float(self.proc.stdout.readline())  # its peak RSS, in GB
        self.proc.wait()
        return peak


def torch_worker(args):
    # the PyTorch side of bench(): the same weights and batch, one step per "step" line on stdin
    import torch
    if args.tuned_malloc:
        cpu.keep_freed_memory()
    model = tg.gpt2_build_from_random(args.depth, seed=0)
    x, y = tg.DataLoader(formats.read_tokens(args.data, model.config.vocab_size), args.batch_size, args.seq_len).next_batch()
    gpt, optimizer = torch_model_from(model)
    del model
    tx, ty = torch.from_numpy(x).long(), torch.from_numpy(y).long()
    print("torch", torch.__version__, torch.get_num_threads(), flush=True)
    for line in sys.stdin:
        if line.strip() == "quit":
            break
        t0 = time.perf_counter()
        loss = torch_step(gpt, optimizer, tx, ty)
        print(time.perf_counter() - t0, loss, flush=True)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, flush=True)  # kB -> GB


def peak_rss_of(cmd):
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        return f"failed: {proc.stderr.read().decode().strip()[-300:]}"
    return f"{usage.ru_maxrss / 1e6:.2f} GB"  # ru_maxrss is in kB on Linux


# ----------------------------------------------------------------------------

def bench(args, depth, B, T, torch_too, show_breakdown):
    # the workers start first, while this process is small: a child's peak RSS starts from its parent's
    workers = [TorchWorker(args, depth, B, T, tuned) for tuned in (False, True)] if torch_too else []
    model = tg.gpt2_build_from_random(depth, seed=0)
    x, y = tg.DataLoader(formats.read_tokens(args.data, model.config.vocab_size), B, T).next_batch()
    runners = {"numpy (ours)": lambda step: timed(numpy_step, model, x, y, step)}
    runners.update({w.name: (lambda step, w=w: w.step()) for w in workers})
    times, first_loss = defaultdict(list), {}
    for step in range(args.warmup + args.steps):
        for name, run in runners.items():  # interleaved: ours, theirs, ours, theirs, ...
            seconds, loss = run(step)
            if step >= args.warmup:
                times[name].append(seconds)
            first_loss.setdefault(name, loss)
    peaks = {w.name: w.close() for w in workers}
    medians = {name: statistics.median(t) for name, t in times.items()}
    floor, flops = matmul_floor(model, B, T, repeats=3)
    result = dict(medians=medians, floor=floor, flops=flops, first_loss=first_loss, peaks=peaks)
    if show_breakdown:
        result["breakdown"] = breakdown(model, x, y, steps=3)
        result["sampling"] = sampling(model, num_tokens=64)
    return result


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def sampling(model, num_tokens):
    # 64 tokens from <|endoftext|>: with the KV cache (median of 3), and llm.c's way, re-running the
    # whole sequence for every token (once)
    def run(sampler):
        t0 = time.perf_counter()
        for _ in sampler(model, [tokenizer.GPT2_EOT], num_tokens, [1337]):
            pass
        return time.perf_counter() - t0
    cached = statistics.median(run(tg.gpt2_generate) for _ in range(3))
    return cached, run(tg.gpt2_sample)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cuda: ours on an NVIDIA GPU through CuPy against eager PyTorch on the same GPU (dev/bench_cuda.py)")
    parser.add_argument("-b", "--batch-size", type=int, help="batch size (default 4 on cpu, 8 on cuda)")
    parser.add_argument("-t", "--seq-len", type=int, help="sequence length (default 64 on cpu, 1024 on cuda)")
    parser.add_argument("--depth", choices=["d6", "d12", "d24", "d36", "d48"], help="model size (default d12)")
    parser.add_argument("--steps", type=int, help="timed steps, after the warm-up (default 5 on cpu, 10 on cuda)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default 2 on cpu, 3 on cuda)")
    parser.add_argument("--data", default=os.path.join(ROOT, "data", "tiny_shakespeare_train.bin"), help="token file")
    parser.add_argument("--no-torch", action="store_true", help="don't time PyTorch, even if it is importable")
    parser.add_argument("--no-rss", action="store_true", help="don't measure peak RSS (it runs extra processes)")
    parser.add_argument("--sweep", action="store_true", help="a table of ms/step over B*T and depth instead")
    parser.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tuned-malloc", action="store_true", help=argparse.SUPPRESS)
    gpu_options = bench_cuda.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.simulate_cpu:  # the GPU code path, run on the CPU (a hidden option, for testing bench_cuda.py)
        args.device = "cuda"
    gpu = args.device == "cuda"
    column = 2 if args.simulate_cpu else int(gpu)  # the defaults of cpu, cuda, and of the simulation: small
    for name, value in zip(("batch_size", "seq_len", "steps", "warmup"), ((4, 8, 2), (64, 1024, 64), (5, 10, 3), (2, 3, 1))):
        if getattr(args, name) is None:
            setattr(args, name, value[column])
    args.depth = args.depth or ("d6" if args.simulate_cpu else "d12")
    if gpu:
        if args.sweep:
            parser.error("--sweep is for the CPU only")
        return bench_cuda.main(args, LayerTimer)
    used = [name for name in gpu_options if getattr(args, name) not in (None, False)]
    if used:
        parser.error(f"--{used[0].replace('_', '-')} is an option of --device cuda")
    if not os.path.isfile(args.data):
        sys.exit(f"error: token file {args.data} not found: run `python prepro_tinyshakespeare.py` first")
    if args.torch_worker:
        return torch_worker(args)
    cpu.keep_freed_memory()  # ours runs as train_gpt2.py runs it: malloc tuned, the faster layers in
    tg.use_device("cpu")
    print(machine_info())
    B, T = args.batch_size, args.seq_len
    torch_too = not args.no_torch and importlib.util.find_spec("torch") is not None
    if not args.no_rss and not args.sweep:
        # first, while this process is still small: a child's peak RSS starts from its parent's at fork
        print(f"\npeak RSS of train_gpt2.py --init {args.depth} -b {B} -t {T}, 3 steps, in its own process: "
              + peak_rss_of([sys.executable, "train_gpt2.py", "--init", args.depth, "-b", str(B), "-t", str(T), "--steps", "3",
                             "--sample-every", "0", "--val-batches", "1", "--train-data", args.data, "--val-data", args.data]))

    if args.sweep:
        print(f"\n{'depth':>5} {'B':>3} {'T':>4} {'B*T':>5} {'ours ms':>8} {'torch ms':>9} {'ours/torch':>10} "
              f"{'torch tuned':>11} {'ours/tuned':>10} {'floor ms':>9} {'ours/floor':>10} {'tokens/s':>9}")
        for depth, B, T in [("d12", 1, 64), ("d12", 4, 64), ("d12", 4, 128), ("d12", 8, 128), ("d12", 8, 256),
                            ("d6", 4, 64), ("d24", 4, 64)]:
            r = bench(args, depth, B, T, torch_too, show_breakdown=False)
            ours = r["medians"]["numpy (ours)"]
            theirs = [v for k, v in r["medians"].items() if k.startswith("pytorch")] or [float("nan")] * 2
            print(f"{depth:>5} {B:>3} {T:>4} {B * T:>5} {ours * 1e3:8.0f} {theirs[0] * 1e3:9.0f} {ours / theirs[0]:10.2f} "
                  f"{theirs[1] * 1e3:11.0f} {ours / theirs[1]:10.2f} {r['floor'] * 1e3:9.0f} {ours / r['floor']:10.2f} "
                  f"{B * T / ours:9.0f}", flush=True)
        return

    print(f"\nGPT-2 {args.depth}, B={B}, T={T}: median of {args.steps} training steps after {args.warmup} "
          f"warm-up steps, {'ours and PyTorch (2 processes of its own) interleaved' if torch_too else 'ours only'}")
    r = bench(args, args.depth, B, T, torch_too, show_breakdown=True)
    ours = r["medians"]["numpy (ours)"]
    for name, median in r["medians"].items():
        print(f"  {name:<44} {median * 1e3:8.1f} ms/step  {B * T / median:8.1f} tokens/s  "
              f"(first loss {r['first_loss'][name]:.6f})" + (f", peak RSS {r['peaks'][name]:.2f} GB" if name in r["peaks"] else ""))
        if name != "numpy (ours)":
            print(f"  {'  ratio ours / that':<44} {ours / median:8.2f}")
    print(f"  {'matmul floor (numpy sgemm)':<44} {r['floor'] * 1e3:8.1f} ms/step  "
          f"({r['flops'] / 1e9:.0f} GFLOP at {r['flops'] / r['floor'] / 1e9:.0f} GFLOP/s)")
    print(f"  {'  ratio ours / floor':<44} {ours / r['floor']:8.2f}")

    cached, naive = r["sampling"]
    print(f"\nsampling 64 tokens: {cached * 1e3:.0f} ms with the KV cache ({cached / ours:.2f} x a training step), "
          f"{naive * 1e3:.0f} ms re-running the sequence for each token as llm.c does")

    totals, step_time = r["breakdown"]
    print(f"\nwhere our step's time goes (mean of 3 timed steps, {step_time * 1e3:.0f} ms each with the timers on):")
    for name, t in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"  {name:<36} {t * 1e3:8.1f} ms  {100 * t / step_time:5.1f}%")


if __name__ == "__main__":
    main()
