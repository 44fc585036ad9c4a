"""
llmc/distributed.py: data parallelism over MPI, as in llm.c's train_gpt2.cu.

    mpiexec -n 2 python train_gpt2.py -b 2 ...    # 2 processes, each 2 rows of every 4

Every process holds the whole model and runs forward and backward on its own rows of the
batch (train_gpt2.DataLoader hands them out). The gradients are averaged (allreduce_mean) and
every process makes the same AdamW update, so N processes with -b B compute what one does
with -b N*B, up to the order of float32 additions.

Callers: llmc/run.py's setup (called by train_gpt2.py's main) calls init; train_gpt2.py's loop
calls allreduce_mean, mean and is_main; llmc/run.py calls start_together, check_same_weights
and exit. Without an MPI launcher none of it does anything and mpi4py is never imported.

- Transport: MPI (mpi4py, over MPICH or Open MPI) for handshakes and host gradients; NCCL
  (through CuPy) for GPU gradients, one GPU per process, as llm.c. Without NCCL, or when two
  processes share a GPU (NCCL refuses that), GPU gradients go over MPI through host memory.
- Cores: processes on one machine split its cores, with as many BLAS threads each.
- Errors: bad input found by any process before training stops all of them, with one line
  from rank 0. An uncaught exception prints its rank and aborts the job; a process killed
  outright is noticed by mpiexec, and rank 0's "processes:" line maps each pid to its rank.
"""

import ctypes
import os
import socket
import sys
import time
import zlib

import numpy as np

MPI_INSTALL = "pip install mpi4py mpich (or just mpi4py, over your system's MPI)"
SLICE = 1 << 22  # floats (16 MB) per MPI call, so MPI's own buffers stay that size

# Launchers' environment variables, read before MPI starts (and without mpi4py):
# size, rank, local size, local rank (on its machine)
LAUNCHERS = [
    # Open MPI
    ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("PMI_SIZE", "PMI_RANK", "MPI_LOCALNRANKS", "MPI_LOCALRANKID"),  # MPICH, Intel MPI (Hydra)
    # PMIx gives only the rank; Slurm's srun --mpi=pmix adds the size and local rank
    ("SLURM_STEP_NUM_TASKS", "PMIX_RANK", None, "SLURM_LOCALID"),
]


def launched():
    # (size, rank, local size, local rank); None where the launcher doesn't say
    for names in LAUNCHERS:
        if names[1] in os.environ:
            return tuple(int(os.environ[name]) if name and os.environ.get(name, "").isdigit() else None
                         for name in names)
    return None, None, None, None


PROCESSES = None  # what init returned, for exit


def init(device="cpu"):
    # Call before any array is made. With several processes: starts MPI, takes
    # a GPU (by local rank) or a share of the cores, silences stdout but rank 0's.
    global PROCESSES
    size, rank, local_size, local_rank = launched()
    if rank is None or size == 1:
        PROCESSES = SingleProcess()
        return PROCESSES
    # before MPI starts
    gpu = pick_gpu(local_rank) if device == "cuda" and local_rank is not None else None
    try:
        from mpi4py import MPI
    except ImportError:
        if size is None and not rank:  # size unknown (PMIx outside Slurm): rank 0 may be alone
            PROCESSES = SingleProcess()
            return PROCESSES
        # every process finds this: rank 0 says it, or any rank > 0 if size is unknown
        started = f"{size} processes" if size else f"several processes (this one is rank {rank})"
        if not rank or size is None:
            print(f"error: mpiexec started {started}, but mpi4py is not installed: {MPI_INSTALL}", file=sys.stderr)
        sys.exit(2)
    if MPI.COMM_WORLD.Get_size() == 1:
        PROCESSES = SingleProcess()
        return PROCESSES
    PROCESSES = MPIProcesses(MPI, device, gpu)
    return PROCESSES


def exit(status, reason):
    # a failed run: "error: reason" printed once, every process exits with status
    if PROCESSES is None:  # an error before init (a bad option): init joins the processes up
        init()
    PROCESSES.exit(status, str(reason))


class SingleProcess:
    """One process, as without mpiexec: rank 0 of 1, and nothing to average."""

    rank, size, is_main = 0, 1, True

    def allreduce_mean(self, array):
        pass

    def mean(self, value):
        return value

    def start_together(self):
        pass

    def check_same_weights(self, params_memory):
        pass

    def exit(self, status, reason):
        print(f"error: {reason}", file=sys.stderr)
        sys.exit(status)


class MPIProcesses:
    """Several processes started by an MPI launcher, with this one's place among them."""

    def __init__(self, MPI, device, gpu):
        self.MPI, self.device = MPI, device
        self.comm = MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.is_main = self.rank == 0
        # the processes on this machine, sharing its cores and GPUs
        self.node = self.comm.Split_type(MPI.COMM_TYPE_SHARED)
        self.local_rank, self.local_size = self.node.Get_rank(), self.node.Get_size()
        # errors' own channel, so exit's barrier never mixes with a collective on comm
        self.exit_comm = self.comm.Dup()
        self.started = False  # past start_together: every process is training
        self.nccl = None
        if device == "cuda" and gpu is None:
            pick_gpu(self.local_rank)  # the launcher didn't give the local rank; MPI did
        self.host_slice = None  # GPUs without NCCL: pinned host memory for the gradients
        self.threads = self.share_cores()
        self.places = self.comm.allgather((os.getpid(), socket.gethostname()))
        # an uncaught exception aborts the job, naming its rank, rather than leave
        # the others waiting for ever
        sys.excepthook = self.excepthook
        if not self.is_main:
            sys.stdout = open(os.devnull, "w")  # rank 0 alone prints; stderr still shows

    # ------------------------------------------------------------------------
    # what a training step calls

    def allreduce_mean(self, array):
        # the flat gradients become their mean over all processes, in place
        if self.nccl is not None:
            self.allreduce_nccl(array)
        else:
            self.allreduce_mpi(array)

    def allreduce_mpi(self, array):
        # a slice at a time: MPI sums it, and it is divided while still in the cache
        if isinstance(array, np.ndarray):
            for start in range(0, array.size, SLICE):
                part = array[start:start + SLICE]
                self.comm.Allreduce(self.MPI.IN_PLACE, part, op=self.MPI.SUM)
                part *= 1.0 / self.size
            return
        # a GPU array without NCCL: each slice to pinned host memory, summed, back
        import cupyx
        if self.host_slice is None:
            self.host_slice = cupyx.empty_pinned((SLICE,), dtype=np.float32)
        for start in range(0, array.size, SLICE):
            part = array[start:start + SLICE]
            host = self.host_slice[:part.size]
            part.get(out=host)  # waits for the copy, and so for the backward pass
            self.comm.Allreduce(self.MPI.IN_PLACE, host, op=self.MPI.SUM)
            host *= 1.0 / self.size
            part.set(host)

    def allreduce_nccl(self, array):
        # NCCL's AVG, in place, GPU to GPU, queued on the gradients' stream:
        # it starts when they are done, with no wait on the host
        import cupy
        from cupy.cuda import nccl
        assert array.dtype == np.float32 and array.flags.c_contiguous
        self.nccl.allReduce(array.data.ptr, array.data.ptr, array.size, nccl.NCCL_FLOAT32, nccl.NCCL_AVG,
                            cupy.cuda.get_current_stream().ptr)

    def mean(self, value):
        # a number's mean over all processes (the losses), the same on each
        return self.comm.allreduce(value, op=self.MPI.SUM) / self.size

    # ------------------------------------------------------------------------
    # the start, the end, and the errors

    def start_together(self):
        # Before the first step, inputs checked. All processes meet here; if one
        # found an error (it meets the others in exit instead), all stop with one
        # line rather than wait for it for ever.
        self.meet(None)
        self.started = True
        if self.device == "cuda" and self.nccl_possible():
            from cupy.cuda import nccl
            # as llm.c: the id goes over MPI
            unique_id = self.comm.bcast(nccl.get_unique_id() if self.is_main else None)
            self.nccl = nccl.NcclCommunicator(self.size, unique_id, self.rank)
        print(f"processes: {self.describe()}")

    def meet(self, failure):
        # failure: this process's (status, reason), or None
        found = self.comm.allgather((failure, sys.argv[1:]))
        failed = [(rank, theirs) for rank, (theirs, _) in enumerate(found) if theirs]
        options = [argv for _, argv in found]
        if not failed and any(argv != options[0] for argv in options):
            # not one job: with different --steps, say, some would wait for ever
            other = next(rank for rank, argv in enumerate(options) if argv != options[0])
            failed = [(0, (2, f"the processes were started with different options: rank 0 with "
                              f"'{' '.join(options[0])}', rank {other} with '{' '.join(options[other])}'"))]
        if failed:
            rank, (status, reason) = failed[0]  # the lowest rank's, the same everywhere
            if self.is_main:
                print(f"error: {reason}" if rank == 0 else f"error: rank {rank}: {reason}", file=sys.stderr)
            sys.exit(status)

    def exit(self, status, reason):
        if not self.started:
            self.meet((status, reason))  # exits
        # Training has started. An error all share (a non-finite loss: losses are
        # global means) is printed by rank 0. A process alone with its error (the
        # others wait in a collective) prints it itself; the launcher ends the rest.
        if self.is_main:
            print(f"error: {reason}", file=sys.stderr, flush=True)
        everyone = self.exit_comm.Ibarrier()
        deadline = time.monotonic() + 2.0
        while not everyone.Test() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not self.is_main and not everyone.Test():
            print(f"error: rank {self.rank}: {reason}", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)  # not sys.exit: MPI's finalize would wait for the missing processes

    def excepthook(self, kind, value, traceback):
        sys.__excepthook__(kind, value, traceback)  # the traceback, as without MPI
        print(f"error: rank {self.rank}: {kind.__name__}: {value}", file=sys.stderr, flush=True)
        time.sleep(0.5)  # MPICH's mpiexec drops unforwarded output when a process aborts
        self.comm.Abort(1)

    def check_same_weights(self, params_memory):
        # at the end all processes should hold the same weights: compare checksums
        host = params_memory if isinstance(params_memory, np.ndarray) else params_memory.get()
        sums = self.comm.allgather(zlib.crc32(memoryview(np.ascontiguousarray(host)).cast("B")))
        print(f"weights' crc32 on each process: {' '.join(f'{s:08x}' for s in sums)}")
        if len(set(sums)) > 1:
            self.exit(1, "the processes' weights differ: the gradients were not averaged the same everywhere")

    # ------------------------------------------------------------------------
    # how the processes share a machine

    def share_cores(self):
        # Processes on the same cores (not bound apart by the launcher) split them,
        # with a BLAS thread per core: not N threads per core. All use the same
        # thread count, as dot products' sums depend on it and the gradient norm
        # must match everywhere.
        if not hasattr(os, "sched_getaffinity"):
            return None
        mine = sorted(os.sched_getaffinity(0))
        sharing = [rank for rank, cores in enumerate(self.node.allgather(mine)) if cores == mine]
        share = len(mine) // len(sharing)
        if share >= 1 and len(sharing) > 1:
            part = sharing.index(self.local_rank)
            # llmc.cpu.usable_cpus() sees this
            os.sched_setaffinity(0, mine[part * share:(part + 1) * share])
        threads = self.comm.allreduce(max(1, share), op=self.MPI.MIN)
        return threads if set_blas_threads(threads) else None

    def nccl_possible(self):
        # whether CuPy has NCCL and each process its own GPU (same answer everywhere)
        try:
            import cupy
            from cupy.cuda import nccl
            mine = (socket.gethostname(), cupy.cuda.Device().pci_bus_id) if nccl.available else None
        except Exception:
            mine = None
        gpus = self.comm.allgather(mine)
        return None not in gpus and len(set(gpus)) == len(gpus)

    def describe(self):
        # one line: how many, which MPI, how gradients travel, each rank's pid and
        # host (to name the rank when mpiexec reports a pid killed)
        library = " ".join(self.MPI.Get_library_version().splitlines()[0].split(",")[0].replace("Version:", "").split())
        import mpi4py
        how = ("NCCL (GPU to GPU)" if self.nccl is not None else
               "MPI through host memory" if self.device == "cuda" else "MPI")
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        cores = f"; {plural(cores, 'core')} and {plural(self.threads, 'BLAS thread')} each" if self.threads else ""
        places = ", ".join(f"{rank}: pid {pid} on {host}" for rank, (pid, host) in enumerate(self.places))
        return (f"{self.size} ({library}, mpi4py {mpi4py.__version__}), gradients averaged by {how}{cores}; "
                f"ranks {places}")


def plural(n, noun):
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def pick_gpu(local_rank):
    # this process's GPU by local rank (shared if processes outnumber GPUs);
    # None without CuPy or a GPU (train_gpt2.use_device then says why)
    try:
        import cupy
        count = cupy.cuda.runtime.getDeviceCount()
        if count == 0:
            return None
        cupy.cuda.Device(local_rank % count).use()
        return local_rank % count
    except Exception:
        return None


def set_blas_threads(n):
    # NumPy's OpenBLAS (prefixed names in wheels) started a thread per core on
    # import: set how many to use. False without OpenBLAS.
    if not os.path.exists("/proc/self/maps"):
        return False
    with open("/proc/self/maps") as maps:
        paths = {line.split()[-1] for line in maps if "openblas" in line.lower() and ".so" in line}
    for path in paths:
        lib = ctypes.CDLL(path)
        for prefix, suffix in (("scipy_openblas_", "64_"), ("scipy_openblas_", ""), ("openblas_", "")):
            set_num_threads = getattr(lib, f"{prefix}set_num_threads{suffix}", None)
            if set_num_threads is not None:
                set_num_threads(n)
                return True
    return False
