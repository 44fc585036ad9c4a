"""
Training on several processes: data parallelism over MPI, as llm.c's train_gpt2.cu does it.

    mpiexec -n 2 python train_gpt2.py -b 2 ...    # 2 processes, each taking 2 of every batch's 4 rows

Every process holds the whole model. Each step, each one runs the forward and backward passes on its own
rows of the batch (train_gpt2.DataLoader hands them out), the gradients are averaged across the processes
(allreduce_mean), and each makes the same AdamW update, so the weights stay the same everywhere: N
processes with -b B compute what one process with -b N*B computes, up to the order of float32 additions.

The trainer calls this module at its edges only: init at the start of main, allreduce_mean and mean in
the training step, is_main where one process alone prints, samples and writes, start_together before
the first step, and exit in its error handlers. Started without an MPI launcher, none of it does
anything and mpi4py is never imported.

- Transport: MPI (mpi4py over any MPI: MPICH, Open MPI) for the handshakes and for gradients in host
  memory; NCCL (through CuPy) for gradients on GPUs, one GPU per process, as llm.c does. Where NCCL is
  missing, or two processes share a GPU (which NCCL refuses), the gradients go through host memory over
  MPI, a slice at a time.
- Cores: the processes on one machine share its cores, each taking its own slice with as many BLAS
  threads, instead of each starting a thread per core.
- Errors: bad input found by any process before training stops every process, with one line from rank 0.
  A process that dies of an exception prints which rank it was and takes the whole job down (MPI Abort);
  one killed outright (kill -9, out of memory) is noticed by mpiexec, which ends the others: the rank of
  each pid is in the "processes:" line that rank 0 prints before the first step.
"""

import ctypes
import os
import socket
import sys
import time
import zlib

import numpy as np

MPI_INSTALL = "pip install mpi4py mpich (or just mpi4py, over your system's MPI)"
SLICE = 1 << 22  # floats (16 MB) per MPI call: MPI's own buffers stay that size, and it measured fastest here

# The environment variables by which MPI launchers tell each process how many there are and which one
# it is, read before MPI is started (and without mpi4py): size, rank, local size, local rank (on its machine)
LAUNCHERS = [
    ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),  # Open MPI
    ("PMI_SIZE", "PMI_RANK", "MPI_LOCALNRANKS", "MPI_LOCALRANKID"),  # MPICH's and Intel MPI's mpiexec (Hydra)
    # PMIx launchers give only the rank; Slurm's srun --mpi=pmix also says how many, and which on its machine
    ("SLURM_STEP_NUM_TASKS", "PMIX_RANK", None, "SLURM_LOCALID"),
]


def launched():
    # (size, rank, local size, local rank) from the launcher's environment, each None where it says
    # nothing: all None when no MPI launcher started this process
    for names in LAUNCHERS:
        if names[1] in os.environ:
            return tuple(int(os.environ[name]) if name and os.environ.get(name, "").isdigit() else None
                         for name in names)
    return None, None, None, None


PROCESSES = None  # what init returned, for exit


def init(device="cpu"):
    # Call first, before any array is made: returns the processes this one belongs to. Under an MPI
    # launcher with several processes, this starts MPI, takes this process's GPU (by its rank on its
    # machine) or its share of the machine's cores, and silences the standard output of all but rank 0.
    global PROCESSES
    size, rank, local_size, local_rank = launched()
    if rank is None or size == 1:
        PROCESSES = SingleProcess()
        return PROCESSES
    gpu = pick_gpu(local_rank) if device == "cuda" and local_rank is not None else None  # before MPI starts
    try:
        from mpi4py import MPI
    except ImportError:
        if size is None and not rank:  # a launcher that does not say how many (PMIx alone, outside Slurm):
            PROCESSES = SingleProcess()  # rank 0 may be the only one
            return PROCESSES
        # every process finds this out on its own: rank 0 alone says it, or, where the launcher did not say
        # how many there are, each process whose rank shows there are several
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
    # the end of a run that failed with reason (a one-line message): printed once, as "error: reason",
    # and every process ends with this exit status (see MPIProcesses.exit)
    if PROCESSES is None:  # an error before init (a bad option): each process has it, init joins them up
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
        # the processes on this machine, which share its cores and its GPUs
        self.node = self.comm.Split_type(MPI.COMM_TYPE_SHARED)
        self.local_rank, self.local_size = self.node.Get_rank(), self.node.Get_size()
        # the errors' own channel: the checks at the end never mix with a collective under way on comm
        self.exit_comm = self.comm.Dup()
        self.started = False  # start_together has passed: every process is training
        self.nccl = None
        if device == "cuda" and gpu is None:
            pick_gpu(self.local_rank)  # the launcher didn't say the local rank: MPI just did
        self.host_slice = None  # with GPUs but no NCCL: the page-locked host memory the gradients go through
        self.threads = self.share_cores()
        self.places = self.comm.allgather((os.getpid(), socket.gethostname()))
        # a process that dies of an exception takes the whole job down, saying which rank it was;
        # without this it would exit while the others wait for it, for ever
        sys.excepthook = self.excepthook
        if not self.is_main:
            sys.stdout = open(os.devnull, "w")  # rank 0 alone prints; errors still reach stderr

    # ------------------------------------------------------------------------
    # what a training step calls

    def allreduce_mean(self, array):
        # array (the flat gradients) becomes its mean over all processes, in place
        if self.nccl is not None:
            self.allreduce_nccl(array)
        else:
            self.allreduce_mpi(array)

    def allreduce_mpi(self, array):
        # the mean over all processes, in place, through host memory, a slice at a time: MPI sums each
        # slice, which is divided by the number of processes while it is still in the cache
        if isinstance(array, np.ndarray):
            for start in range(0, array.size, SLICE):
                part = array[start:start + SLICE]
                self.comm.Allreduce(self.MPI.IN_PLACE, part, op=self.MPI.SUM)
                part *= 1.0 / self.size
            return
        # a GPU array, with no NCCL: each slice to the host (page-locked memory, for fast copies), summed
        # over MPI, and back
        import cupyx
        if self.host_slice is None:
            self.host_slice = cupyx.empty_pinned((SLICE,), dtype=np.float32)
        for start in range(0, array.size, SLICE):
            part = array[start:start + SLICE]
            host = self.host_slice[:part.size]
            part.get(out=host)  # waits for the copy, and so for the backward pass before it
            self.comm.Allreduce(self.MPI.IN_PLACE, host, op=self.MPI.SUM)
            host *= 1.0 / self.size
            part.set(host)

    def allreduce_nccl(self, array):
        # the mean over all GPUs (NCCL's AVG: the sum, divided as it goes), in place, queued on the stream
        # that computed the gradients (so it starts when they are done, with no wait on the host); NCCL
        # moves the data GPU to GPU
        import cupy
        from cupy.cuda import nccl
        assert array.dtype == np.float32 and array.flags.c_contiguous
        self.nccl.allReduce(array.data.ptr, array.data.ptr, array.size, nccl.NCCL_FLOAT32, nccl.NCCL_AVG,
                            cupy.cuda.get_current_stream().ptr)

    def mean(self, value):
        # a number's mean over all processes (the losses): the same result on each
        return self.comm.allreduce(value, op=self.MPI.SUM) / self.size

    # ------------------------------------------------------------------------
    # the start, the end, and the errors

    def start_together(self):
        # Before the first step: every process has read and checked its input. All of them meet here; if
        # any one found an error (it meets the others in exit instead), all stop with one line, as
        # they would if every process had found it, rather than some waiting for ever for the others.
        self.meet(None)
        self.started = True
        if self.device == "cuda" and self.nccl_possible():
            from cupy.cuda import nccl
            unique_id = self.comm.bcast(nccl.get_unique_id() if self.is_main else None)  # as llm.c: over MPI
            self.nccl = nccl.NcclCommunicator(self.size, unique_id, self.rank)
        print(f"processes: {self.describe()}")

    def meet(self, failure):
        # one meeting of all processes before training: failure is this one's (status, reason), or None
        found = self.comm.allgather((failure, sys.argv[1:]))
        failed = [(rank, theirs) for rank, (theirs, _) in enumerate(found) if theirs]
        options = [argv for _, argv in found]
        if not failed and any(argv != options[0] for argv in options):
            # not one job: with, say, different --steps, some would wait for ever for the others
            other = next(rank for rank, argv in enumerate(options) if argv != options[0])
            failed = [(0, (2, f"the processes were started with different options: rank 0 with "
                              f"'{' '.join(options[0])}', rank {other} with '{' '.join(options[other])}'"))]
        if failed:
            rank, (status, reason) = failed[0]  # the lowest rank's, the same on every process
            if self.is_main:
                print(f"error: {reason}" if rank == 0 else f"error: rank {rank}: {reason}", file=sys.stderr)
            sys.exit(status)

    def exit(self, status, reason):
        if not self.started:
            self.meet((status, reason))  # exits
        # Training had started. An error that every process has at the same point (a non-finite loss:
        # the losses are global means) is printed by rank 0 once all have got here. A process whose
        # error is its own (the others are waiting for it in a collective) finds nobody to meet: it
        # says itself what happened and leaves, and the launcher ends the others.
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
        os._exit(status)  # not sys.exit: MPI's finalize would wait for processes that never come

    def excepthook(self, kind, value, traceback):
        sys.__excepthook__(kind, value, traceback)  # the traceback, as without MPI
        print(f"error: rank {self.rank}: {kind.__name__}: {value}", file=sys.stderr, flush=True)
        time.sleep(0.5)  # MPICH's mpiexec drops what it has not yet passed on when a process aborts
        self.comm.Abort(1)

    def check_same_weights(self, params_memory):
        # At the end: every process should hold the very same weights. Rank 0 prints each one's checksum.
        host = params_memory if isinstance(params_memory, np.ndarray) else params_memory.get()
        sums = self.comm.allgather(zlib.crc32(memoryview(np.ascontiguousarray(host)).cast("B")))
        print(f"weights' crc32 on each process: {' '.join(f'{s:08x}' for s in sums)}")
        if len(set(sums)) > 1:
            self.exit(1, "the processes' weights differ: the gradients were not averaged the same everywhere")

    # ------------------------------------------------------------------------
    # how the processes share a machine

    def share_cores(self):
        # The processes on one machine that may run on the same cores (no launcher binding told them
        # apart) each take an equal slice of those cores, and as many BLAS threads: N processes with a
        # thread per core each would make N times too many threads. Every process uses the same number
        # of threads: the sums of a dot product depend on it, and the gradient norm must be the same everywhere.
        if not hasattr(os, "sched_getaffinity"):
            return None
        mine = sorted(os.sched_getaffinity(0))
        sharing = [rank for rank, cores in enumerate(self.node.allgather(mine)) if cores == mine]
        share = len(mine) // len(sharing)
        if share >= 1 and len(sharing) > 1:
            part = sharing.index(self.local_rank)
            os.sched_setaffinity(0, mine[part * share:(part + 1) * share])  # train_gpt2.usable_cpus() sees this
        threads = self.comm.allreduce(max(1, share), op=self.MPI.MIN)
        return threads if set_blas_threads(threads) else None

    def nccl_possible(self):
        # NCCL, if CuPy has it and every process has a GPU of its own (the same on all processes)
        try:
            import cupy
            from cupy.cuda import nccl
            mine = (socket.gethostname(), cupy.cuda.Device().pci_bus_id) if nccl.available else None
        except Exception:
            mine = None
        gpus = self.comm.allgather(mine)
        return None not in gpus and len(set(gpus)) == len(gpus)

    def describe(self):
        # one line: how many, which MPI, how the gradients travel, where each rank runs (the pids name the
        # rank in mpiexec's message when one is killed)
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
    # this process's GPU, by its rank on its machine (several processes share a GPU when there are more
    # of them than GPUs); None without CuPy or a GPU (train_gpt2.use_device then says why, on every process)
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
    # OpenBLAS (NumPy's wheels bundle it, its names prefixed) started a thread per core when NumPy was
    # loaded: tell it how many to use from now on. False where there is no OpenBLAS to tell.
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
