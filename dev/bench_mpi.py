"""
Benchmarks of training on several processes (distributed.py). Needs mpi4py and an mpiexec
(pip install mpi4py mpich).

    python dev/bench_mpi.py                  # this CPU: 2 processes x 1 BLAS thread against 1 process x all threads
    python dev/bench_mpi.py --device cuda    # GPUs: averaging GPT-2 124M's gradients over NCCL and over MPI

CPU: train_gpt2.py trains GPT-2 124M's shape (--init d12, on random tokens) for a few steps with the same
global batch (llm.c's CPU default, 4 rows of 64 tokens) in one process with -b 4 and in 2 processes with
-b 2, the runs interleaved; each prints the median ms per step (the first step left out). Then the time
to average 124M float32 gradients between the 2 processes over MPI, alone.

GPU: the time to average 124M float32 gradients (what allreduce_mean does each step) over NCCL, with one
process per GPU (needs 2 GPUs or more), and over MPI through host memory, with 2 processes (sharing the
GPU where there is only one); then the trainer's single-GPU step at -b 8 -t 1024 for comparison, so
that what the averaging costs a step can be read off.
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from llmc import distributed  # noqa: E402
import train_gpt2 as tg  # noqa: E402
from llmc import cpu, formats  # noqa: E402

TRAIN = os.path.join(ROOT, "train_gpt2.py")
# the mpiexec of the MPI that mpi4py uses: the one pip's mpich put beside this Python, else the PATH's
MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")
MPIEXEC = MPIEXEC if os.access(MPIEXEC, os.X_OK) else "mpiexec"


def write_random_tokens(path, n, vocab_size=50257, seed=0):
    # an llm.c token file: 256-int32 header (magic, version, count), then uint16 tokens
    header = np.zeros(tg.HEADER_INTS, dtype="<i4")
    header[:3] = [formats.TOKENS_MAGIC, formats.TOKENS_VERSION, n]
    tokens = np.random.default_rng(seed).integers(0, vocab_size, n).astype("<u2")
    with open(path, "wb") as f:
        f.write(header.tobytes() + tokens.tobytes())
    return path


def step_times(command):
    # runs the trainer; returns its ms per step, the first (warm-up) step left out
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"failed: {' '.join(command)}\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    times = [float(ms) for ms in re.findall(r"^step \d+: train loss \S+ \(took ([\d.]+) ms\)", result.stdout, re.M)]
    return times[1:]


def bench_cpu(args):
    cores = cpu.usable_cpus()
    with tempfile.TemporaryDirectory() as tmp:
        data = write_random_tokens(os.path.join(tmp, "train.bin"), 100_000)
        common = ["--init", "d12", "-t", str(args.seq_len), "--steps", str(args.steps), "--val-every", "0",
                  "--sample-every", "0", "--train-data", data]
        runs = {f"1 process x {cores} BLAS threads, -b {args.batch}": [sys.executable, TRAIN, "-b", str(args.batch)] + common,
                f"{args.procs} processes x {max(1, cores // args.procs)} BLAS thread(s), -b {args.batch // args.procs}":
                    [MPIEXEC, "-n", str(args.procs), sys.executable, TRAIN, "-b", str(args.batch // args.procs)] + common}
        times = {name: [] for name in runs}
        for _ in range(args.repeats):  # interleaved, so that a slower spell of the machine hits both
            for name, command in runs.items():
                times[name] += step_times(command)
        allreduce = subprocess.run([MPIEXEC, "-n", str(args.procs), sys.executable, __file__, "--worker", "--device", "cpu"],
                                   capture_output=True, text=True)
    print(f"GPT-2 124M (d12), a global batch of {args.batch} x {args.seq_len} tokens, {cores} cores "
          f"(load average {os.getloadavg()[0]:.1f} at the end); median (min-max) ms per step over "
          f"{args.repeats} x {args.steps - 1} steps:")
    for name, ts in times.items():
        print(f"  {name:45s} {statistics.median(ts):8.0f} ms  ({min(ts):.0f}-{max(ts):.0f})")
    print(allreduce.stdout.strip() or allreduce.stderr.strip())


def worker(args):
    # under mpiexec: times allreduce_mean of GPT-2 124M's gradients, over each transport there is
    procs = distributed.init(args.device)
    if procs.size == 1:
        sys.exit("--worker runs under mpiexec, with 2 processes or more")
    tg.use_device(args.device)
    procs.start_together()  # chooses NCCL where every process has a GPU of its own
    n = tg.num_parameters(tg.random_config("d12"))
    grads = tg.xp.asarray(np.random.default_rng(procs.rank).standard_normal(n, dtype=np.float32))
    transports = {"NCCL": procs.nccl, "MPI": None} if procs.nccl is not None else {"MPI": None}
    if args.device == "cuda" and procs.nccl is None:
        print(f"NCCL: not used: {'two processes share a GPU' if procs.size > tg.xp.cuda.runtime.getDeviceCount() else 'not available'}")
    for name, nccl in transports.items():
        procs.nccl = nccl  # the transport allreduce_mean uses
        times = []
        for i in range(args.iters + 2):
            procs.comm.Barrier()
            if args.device == "cuda":
                tg.xp.cuda.Device().synchronize()
            t0 = time.perf_counter()
            procs.allreduce_mean(grads)
            if args.device == "cuda":
                tg.xp.cuda.Device().synchronize()
            times.append(time.perf_counter() - t0)
        t = statistics.median(times[2:])  # two warm-ups
        N, size = procs.size, 4 * n
        print(f"averaging {n:,} float32 gradients ({size / 1e6:.0f} MB) over {name}, {N} processes "
              f"({args.device}): {t * 1000:.1f} ms, algorithm bandwidth {size / t / 1e9:.1f} GB/s, "
              f"bus bandwidth {2 * (N - 1) / N * size / t / 1e9:.1f} GB/s")


def bench_cuda(args):
    import cupy
    gpus = cupy.cuda.runtime.getDeviceCount()
    runs = [max(2, gpus)] if gpus == 1 else [gpus, 2 * gpus]  # one per GPU (NCCL), and two per GPU (MPI only)
    for n in runs:
        result = subprocess.run([MPIEXEC, "-n", str(n), sys.executable, __file__, "--worker", "--device", "cuda"],
                                capture_output=True, text=True)
        print(result.stdout.strip() or result.stderr.strip()[-3000:])
    with tempfile.TemporaryDirectory() as tmp:
        data = write_random_tokens(os.path.join(tmp, "train.bin"), 1_000_000)
        times = step_times([sys.executable, TRAIN, "--device", "cuda", "--init", "d12", "-b", "8", "-t", "1024",
                            "--steps", "6", "--val-every", "0", "--sample-every", "0", "--train-data", data])
    print(f"one GPU, GPT-2 124M (d12), -b 8 -t 1024: {statistics.median(times):.1f} ms per step (median of {len(times)})")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--procs", type=int, default=2, help="CPU: processes against one")
    parser.add_argument("-b", "--batch", type=int, default=4, help="CPU: the global batch (rows)")
    parser.add_argument("-t", "--seq-len", type=int, default=64, help="CPU: tokens per row")
    parser.add_argument("--steps", type=int, default=5, help="CPU: steps per run (the first is left out)")
    parser.add_argument("--repeats", type=int, default=2, help="CPU: runs of each, interleaved")
    parser.add_argument("--iters", type=int, default=10, help="allreduce: timed repeats")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # run under mpiexec by the above
    args = parser.parse_args()
    if args.worker:
        worker(args)
    elif args.device == "cuda":
        bench_cuda(args)
    else:
        bench_cpu(args)


if __name__ == "__main__":
    main()
