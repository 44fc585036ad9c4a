"""Training on several processes under mpiexec (distributed.py): 2 processes with -b 2 train as one
process with -b 4 does, rank 0 alone prints and writes, a run resumes under mpiexec (and with another
number of processes), bad input gives one error line, and a process that dies ends the whole job.
Skipped where mpi4py or mpiexec is missing (requirements-dev.txt installs both: mpi4py and mpich)."""

import os
import re
import shutil
import signal
import subprocess
import sys
import zlib

import numpy as np
import pytest

from llmc import distributed
import train_gpt2 as tg
from helpers import FIXTURES, MODEL, ROOT, assert_one_error_line, run, write_tokens

def find_mpiexec():
    # the mpiexec of the MPI that mpi4py uses: the one pip's mpich put beside this Python, else the PATH's
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return beside if os.access(beside, os.X_OK) else shutil.which("mpiexec")


try:
    import mpi4py  # noqa: F401
    MPIEXEC = find_mpiexec()
except ImportError:
    MPIEXEC = None
# MPICH's mpiexec (Hydra) adds nothing of its own to a job that exits with an error; Open MPI's mpirun adds a box
HYDRA = MPIEXEC is not None and "HYDRA" in subprocess.run([MPIEXEC, "--version"], capture_output=True, text=True).stdout
needs_mpi = pytest.mark.skipif(MPIEXEC is None, reason="needs mpi4py and mpiexec (pip install mpi4py mpich)")
TIMEOUT = 120  # seconds for any one job: a hang fails the test instead of the CI run
LAUNCHER_VARS = ("OMPI_COMM_WORLD_", "PMI_", "PMIX_", "MPI_LOCAL", "SLURM_")


def clean_env(**extra):
    # this environment without the variables of an MPI launcher (pytest itself may run under one)
    env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCHER_VARS)}
    return {**env, **extra}


def mpiexec(n, *args, script="train_gpt2.py", cwd=ROOT, env=None):
    # n processes of one of the repository's scripts (python -u: lines reach us as printed)
    return subprocess.run([MPIEXEC, "-n", str(n), sys.executable, "-u", os.path.join(ROOT, script), *args],
                          capture_output=True, text=True, cwd=cwd, env=env or clean_env(), timeout=TIMEOUT)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # tokens with some structure to learn: a noisy repeating pattern (as test_resume's)
    tmp = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    tokens = (np.arange(6000) * 7 % 777 + rng.integers(0, 3, 6000)) % 777
    return write_tokens(tmp / "train.bin", tokens[:5000]), write_tokens(tmp / "val.bin", tokens[5000:])


def train_args(data, *args):
    return ["--checkpoint", MODEL, "--train-data", data[0], "--val-data", data[1], "-t", "16", "--lr", "1e-3",
            "--val-every", "3", "--val-batches", "2", "--sample-every", "3", "--gen-tokens", "4", *args]


def losses(stdout):
    # every loss printed, in order: [("val", 6.68), ("step 0", 6.69), ...]
    return [(kind.replace(": train loss", ""), float(value))
            for kind, value in re.findall(r"^(val|step \d+: train loss)(?: loss)? ([\d.]+)", stdout, re.M)]


def assert_same_losses(a, b, tol=1e-5):
    assert [kind for kind, _ in a] == [kind for kind, _ in b]
    np.testing.assert_allclose([v for _, v in a], [v for _, v in b], rtol=0, atol=tol)


def transcript(stdout):
    # what a run prints from its first loss on, timings and file names left out
    lines = [re.sub(r" \(took .*", "", line) for line in stdout.splitlines()]
    first = next(i for i, line in enumerate(lines) if line.startswith(("val loss", "step ")))
    return [line for line in lines[first:] if not line.startswith(("generated ", "saved ", "wrote ", "weights' crc32"))]


def weights(path):
    return np.fromfile(path, dtype="<f4", offset=tg.HEADER_INTS * 4)


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    # 6 steps, validation every 3, samples every 3: once in one process with -b 4, once in 2 with -b 2
    tmp = tmp_path_factory.mktemp("runs")
    one = run("train_gpt2.py", *train_args(data, "-b", "4", "--steps", "6", "--output", str(tmp / "one.bin")),
              env=clean_env())
    assert one.returncode == 0, one.stderr
    two = mpiexec(2, *train_args(data, "-b", "2", "--steps", "6", "--output", str(tmp / "two.bin"),
                                 "--output-dir", str(tmp / "run"), "--save-every", "3", "--log", str(tmp / "main.log")))
    assert two.returncode == 0, two.stdout + two.stderr
    return tmp, one, two


@needs_mpi
def test_two_processes_train_as_one(runs):
    tmp, one, two = runs
    # the same losses, train and validation (global means), up to float32 reassociation
    assert len(losses(one.stdout)) == 9  # 3 val, 6 steps
    assert_same_losses(losses(two.stdout), losses(one.stdout))
    # the same weights at the end, as far as float32 sums in another order go (about 5e-6 here), except the
    # attention keys' biases: softmax ignores them, their gradients are rounding noise, and AdamW's
    # m / sqrt(v) makes full steps of noise (different noise in another order), at most lr a step
    config = tg.read_checkpoint_config(MODEL)
    ours, theirs = (tg.point_parameters(weights(tmp / name), config) for name in ("two.bin", "one.bin"))
    C = config.channels
    keys = np.s_[:, C:2 * C]  # the keys' part of qkvb
    np.testing.assert_allclose(ours["qkvb"][keys], theirs["qkvb"][keys], rtol=0, atol=6 * 1e-3)
    ours["qkvb"][keys] = theirs["qkvb"][keys] = 0
    for name in ours:
        np.testing.assert_allclose(ours[name], theirs[name], rtol=0, atol=1e-5, err_msg=name)
    # rank 0 alone printed: every line once, as one process prints them, samples included
    kinds = lambda t: [re.sub(r"[\d.]+$", "#", line) if line.startswith(("step ", "val ", "gen")) else "-" for line in t]  # noqa: E731
    assert kinds(transcript(two.stdout)) == kinds(transcript(one.stdout))
    assert two.stdout.count("generating:") == 2 and two.stdout.count("device: ") == 1
    assert two.stderr == ""
    assert re.search(r"^processes: 2 \(.*\), gradients averaged by MPI; (\d+) cores? and \1 BLAS threads? each", two.stdout, re.M)
    # one log and one set of checkpoints, from rank 0 alone
    assert sorted(os.listdir(tmp / "run")) == ["model_3.bin", "model_6.bin", "state_3.bin", "state_6.bin"]
    assert open(tmp / "main.log").read().count("s:0 trl:") == 1


@needs_mpi
def test_every_process_holds_the_same_weights(runs):
    tmp, _, two = runs
    # each process's checksum at the end, printed by rank 0: all the same, and those of the weights it wrote
    sums = re.search(r"^weights' crc32 on each process: (.*)$", two.stdout, re.M).group(1).split()
    assert len(sums) == 2 and len(set(sums)) == 1
    assert int(sums[0], 16) == zlib.crc32(weights(tmp / "two.bin").tobytes())
    assert zlib.crc32(weights(tmp / "run" / "model_6.bin").tobytes()) == int(sums[0], 16)


@pytest.fixture
def stopped_at_3(runs, tmp_path):
    # a copy of the 2 processes' run folder as if the run had stopped after step 3
    run_dir = tmp_path / "run"
    shutil.copytree(runs[0] / "run", run_dir)
    for name in ("model_6.bin", "state_6.bin"):
        os.remove(run_dir / name)
    return run_dir


@needs_mpi
def test_resume_under_mpiexec(runs, data, stopped_at_3):
    tmp, one, two = runs
    run_dir = stopped_at_3
    resumed = mpiexec(2, *train_args(data, "-b", "2", "--steps", "6", "--resume", str(run_dir)))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "after 3 steps" in resumed.stdout
    # from the validation before step 3 on, what the uninterrupted run printed, to the last digit
    full = transcript(two.stdout)
    assert transcript(resumed.stdout) == full[full.index(next(l for l in full if l.startswith("step 2:"))) + 1:]
    # the state records the 2 processes and the batch's 4 rows over both
    header = np.fromfile(run_dir / "state_6.bin", dtype="<u8", count=9)
    assert (header[4], header[5], header[8]) == (4, 16, 2)


@needs_mpi
def test_resume_with_another_number_of_processes(runs, data, stopped_at_3):
    tmp, one, two = runs
    run_dir = stopped_at_3
    # one process with the whole batch (-b 4) goes on from the 2 processes' step 3, as one process would have
    resumed = run("train_gpt2.py", *train_args(data, "-b", "4", "--steps", "6", "--resume", str(run_dir)), env=clean_env())
    assert resumed.returncode == 0, resumed.stderr
    assert_same_losses(losses(resumed.stdout), losses(one.stdout)[4:])  # from the val loss at step 3
    # another batch is refused: 2 processes with -b 4 would read 8 rows a step (from step 3 again: the
    # run above wrote step 6)
    os.remove(run_dir / "model_6.bin")
    os.remove(run_dir / "state_6.bin")
    refused = mpiexec(2, *train_args(data, "-b", "4", "--steps", "6", "--resume", str(run_dir)))
    assert refused.returncode == 2
    assert refused.stderr.splitlines()[0] == (f"error: --resume {run_dir}: the run used -b 4 -t 16 (-b times the number "
                                              f"of processes; here 4 x 2): resume it with the same")


@needs_mpi
@pytest.mark.parametrize("case", ["missing file", "bad option", "on one process only", "different options",
                                  "no mpi4py", "non-finite loss"])
def test_an_error_is_one_line(case, data, tmp_path):
    args = train_args(data, "-b", "2", "--steps", "3", "--sample-every", "0")
    script, status, env, expected = "train_gpt2.py", 2, clean_env(), "error: "
    if case == "missing file":
        args += ["--val-data", str(tmp_path / "missing.bin")]
        expected = f"error: token file {tmp_path / 'missing.bin'} not found"
    elif case == "bad option":
        args += ["--steps", "-1"]
        expected = "error: --steps must not be negative"
    elif case == "on one process only":
        # MPMD: rank 1 gets a file that isn't there; rank 0 is fine, and must not wait for ever
        args = args + [":", "-n", "1", sys.executable, os.path.join(ROOT, "train_gpt2.py"), *args,
                       "--train-data", str(tmp_path / "missing.bin")]
        expected = f"error: rank 1: token file {tmp_path / 'missing.bin'} not found"
    elif case == "different options":
        args = args + [":", "-n", "1", sys.executable, os.path.join(ROOT, "train_gpt2.py"), *args, "--steps", "5"]
        expected = "error: the processes were started with different options"
    elif case == "no mpi4py":
        (tmp_path / "mpi4py").mkdir()
        (tmp_path / "mpi4py" / "__init__.py").write_text("raise ImportError('not installed (a test)')\n")
        env = clean_env(PYTHONPATH=str(tmp_path))
        expected = "error: mpiexec started 2 processes, but mpi4py is not installed: pip install mpi4py mpich"
    elif case == "non-finite loss":  # during training, on every process at once: the losses are global means
        args += ["--lr", "1e30", "--steps", "20"]
        status, expected = 1, "error: step 1: train loss is nan"
    n = 1 if case in ("on one process only", "different options") else 2
    result = mpiexec(n, *args, script=script, env=env)
    assert result.returncode == status, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(expected), result.stderr
    assert result.stderr == errors[0] + "\n" or not HYDRA, result.stderr


def watch(*args):
    # a long run of 2 processes, read as it goes: returns the job and the ranks' pids once step 2 is done
    proc = subprocess.Popen([MPIEXEC, "-n", "2", sys.executable, "-u", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env=clean_env(), start_new_session=True)
    pids = None
    for line in proc.stdout:
        if line.startswith("processes: "):
            pids = [int(pid) for pid in re.findall(r"\d+: pid (\d+)", line)]
        if line.startswith("step 2:"):
            return proc, pids
    return proc, pids


def wait(proc, timeout=30):
    # the job's end, which must come soon: else the whole session is killed and the test fails
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"the job did not end within {timeout} s")
    return proc.returncode, out, err


@needs_mpi
def test_a_killed_process_ends_the_job(data, tmp_path):
    proc, pids = watch(os.path.join(ROOT, "train_gpt2.py"),
                       *train_args(data, "-b", "2", "--steps", "100000", "--sample-every", "0", "--val-every", "0"))
    assert pids and len(pids) == 2, "no 'processes:' line with the ranks' pids"
    os.kill(pids[1], signal.SIGKILL)  # as the kernel's out-of-memory killer would
    status, out, err = wait(proc)
    assert status != 0
    # the launcher names a process: MPICH's mpiexec its pid (the 'processes:' line says which rank that was; it
    # may be another process's, one that noticed first), Open MPI's the rank
    assert any(str(pid) in out + err for pid in pids) or "rank 1 " in out + err, out + err


@needs_mpi
def test_an_exception_on_one_process_ends_the_job(data, tmp_path):
    # rank 1 fails in its third step (planted, from outside the trainer): it says so, and takes the job down
    wrapper = tmp_path / "fail_on_rank_1.py"
    wrapper.write_text(f"""import runpy, sys
sys.path.insert(0, {ROOT!r})
from llmc import distributed
calls, allreduce_mean = [], distributed.MPIProcesses.allreduce_mean
def failing(self, array):
    calls.append(1)
    if self.rank == 1 and len(calls) == 3:
        raise MemoryError("planted")
    allreduce_mean(self, array)
distributed.MPIProcesses.allreduce_mean = failing
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
""")
    proc, _ = watch(wrapper, os.path.join(ROOT, "train_gpt2.py"),
                    *train_args(data, "-b", "2", "--steps", "100000", "--sample-every", "0", "--val-every", "0"))
    status, out, err = wait(proc)
    assert status != 0
    assert "error: rank 1: MemoryError: planted" in err.splitlines()
    assert "step 3:" not in out


@needs_mpi
@pytest.mark.parametrize("n", [2, 3, 5])
def test_hellaswag_on_several_processes_counts_as_one(n, data, tmp_path):
    # the fixture's 38 examples that fit, in 4 batches: each process scores every n-th batch
    # (with 5, one scores none) and the counts add up to one process's, to the example
    args = train_args(data, "-b", "2", "--steps", "0", "--sample-every", "0",
                      "--hellaswag", os.path.join(FIXTURES, "hellaswag_tiny.bin"))
    one = run("train_gpt2.py", *args, env=clean_env())
    many = mpiexec(n, *args, "--log", str(tmp_path / "main.log"))
    assert one.returncode == 0 and many.returncode == 0, one.stderr + many.stdout + many.stderr
    line = [line for line in one.stdout.splitlines() if line.startswith("HellaSwag: ") and "=" in line]
    assert line == ["HellaSwag: 20/38 = 0.526316"]
    assert [line for line in many.stdout.splitlines() if line.startswith("HellaSwag: ")] == [
        "HellaSwag: 38 examples in 4 batches; 2 skipped, longer than the model's context", *line]
    assert "s:0 eval:0.5263" in (tmp_path / "main.log").read_text().splitlines()


@pytest.mark.parametrize("N", [1, 2, 3])
def test_loader_shards_the_batch(N):
    # the N processes' batches, side by side, are the batch of one process with -b N*B; num_batches counts those
    tokens = np.arange(1000) % 777
    whole = tg.DataLoader(tokens, N * 2, 8)
    parts = [tg.DataLoader(tokens, 2, 8, "tokens", rank, N) for rank in range(N)]
    assert all(part.num_batches == whole.num_batches == 999 // (N * 16) for part in parts)
    for _ in range(whole.num_batches + 2):  # across the wrap-around too
        x, y = whole.next_batch()
        xs, ys = zip(*(part.next_batch() for part in parts))
        np.testing.assert_array_equal(np.concatenate(xs), x)
        np.testing.assert_array_equal(np.concatenate(ys), y)
    with pytest.raises(tg.InputError, match="fewer than one batch"):
        tg.DataLoader(np.arange(100), 2, 16, "small.bin", 1, 4)  # 4 x 2 x 16 + 1 tokens needed


def test_one_process_imports_no_mpi():
    # without a launcher: a single process, and mpi4py is not even imported (mpiexec -n 1 likewise)
    code = "import sys; from llmc import distributed; p = distributed.init(); print(type(p).__name__, 'mpi4py' in sys.modules)"
    for env in (clean_env(), clean_env(PMI_SIZE="1", PMI_RANK="0")):
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
        assert result.stdout.split() == ["SingleProcess", "False"], result.stderr


def test_a_launcher_that_does_not_say_how_many_without_mpi4py_is_one_process(tmp_path):
    # PMIx alone (outside Slurm) gives only the rank: without mpi4py, rank 0 trains as one process
    (tmp_path / "mpi4py").mkdir()
    (tmp_path / "mpi4py" / "__init__.py").write_text("raise ImportError('mpi4py is not installed')\n")
    code = "from llmc import distributed; print(type(distributed.init()).__name__)"
    env = clean_env(PMIX_RANK="0", PYTHONPATH=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    assert result.returncode == 0 and result.stdout.split() == ["SingleProcess"], result.stderr
    # but rank 3 shows there are several: one error line, not a fourth training of its own
    env = clean_env(PMIX_RANK="3", PYTHONPATH=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    assert result.stdout == "", result.stdout
    assert_one_error_line(result, "mpiexec started several processes (this one is rank 3), but mpi4py")
    # Slurm's srun says how many: rank 0 of 4 says so too, instead of training alone
    env = clean_env(PMIX_RANK="0", SLURM_STEP_NUM_TASKS="4", SLURM_LOCALID="0", PYTHONPATH=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    assert result.stdout == "", result.stdout
    assert_one_error_line(result, "mpiexec started 4 processes, but mpi4py")


def test_launcher_environment(monkeypatch):
    for name in list(os.environ):
        if name.startswith(LAUNCHER_VARS):
            monkeypatch.delenv(name)
    assert distributed.launched() == (None, None, None, None)
    monkeypatch.setenv("PMI_SIZE", "4")
    monkeypatch.setenv("PMI_RANK", "3")
    monkeypatch.setenv("MPI_LOCALNRANKS", "2")
    monkeypatch.setenv("MPI_LOCALRANKID", "1")
    assert distributed.launched() == (4, 3, 2, 1)
    for name in ("PMI_SIZE", "PMI_RANK", "MPI_LOCALNRANKS", "MPI_LOCALRANKID"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "8")
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "5")
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "4")
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "1")
    assert distributed.launched() == (8, 5, 4, 1)
    for name in ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("PMIX_RANK", "2")
    assert distributed.launched() == (None, 2, None, None)  # PMIx alone
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")
    monkeypatch.setenv("SLURM_LOCALID", "0")
    assert distributed.launched() == (4, 2, None, 0)  # srun --mpi=pmix


try:
    import cupy
    GPU = cupy.cuda.runtime.getDeviceCount() > 0
except Exception:
    GPU = False


@needs_mpi
@pytest.mark.skipif(not GPU, reason="needs CuPy and an NVIDIA GPU")
def test_two_processes_on_gpus(runs, data):
    # 2 processes on the GPUs there are: NCCL with a GPU each, else MPI through host memory (sharing one
    # GPU); TF32 off, so the losses are the CPU's up to float32 reassociation
    _, one, _ = runs
    two = mpiexec(2, *train_args(data, "-b", "2", "--steps", "6", "--device", "cuda", "--tf32", "0"))
    assert two.returncode == 0, two.stdout + two.stderr
    how = "NCCL" if cupy.cuda.runtime.getDeviceCount() >= 2 else "MPI through host memory"
    assert f"gradients averaged by {how}" in two.stdout
    assert_same_losses(losses(two.stdout), losses(one.stdout), tol=1e-4)
    sums = re.search(r"^weights' crc32 on each process: (.*)$", two.stdout, re.M).group(1).split()
    assert len(set(sums)) == 1
