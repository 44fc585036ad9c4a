"""
A training run around train_gpt2.py's loop, as llm.c's train_gpt2.cu sets one up around its step:
the device and the processes, downloads, resume, every check before any work (setup); the lines
it prints, the log, checkpoints, and how it ends: one line for every error, with its exit status.
"""

import codecs
import contextlib
import glob
import math
import os
import re
import signal
import sys
import time

import numpy as np

from llmc import distributed
from llmc.cli import check_options, check_outputs_spare_inputs, check_run_fits, set_grad_accum
from llmc.dataloader import ShardedDataLoader, loader_position, restore_loader
from llmc.cpu import keep_freed_memory
from llmc.device import describe_device, synchronize
from llmc.formats import latest_checkpoint, read_run_state, read_tokens, write_run_state
from llmc.hellaswag import HellaSwag
from llmc.tokenizer import encode_prompt, make_decoder
from llmc.utils import InputError, all_finite


class NonFiniteLossError(Exception):
    """The loss became inf or nan: training stops before the update would spoil the weights."""


class Interrupted(Exception):
    """Ctrl-C, SIGTERM or SIGHUP: the run stops with one line saying where, and how to go on; its
    exit status is the shell's for that signal (128 + its number)."""

    def __init__(self, message, status):
        super().__init__(message)
        self.status = status


class WriteError(Exception):
    """A file of the run could not be written (disk full, read-only, I/O error): one line saying
    what is intact and how to go on."""


def write_together(paths, writers):
    # writers[i](path) writes paths[i]; all are published together or none is (a checkpoint without
    # its run state never appears). Each is written under a temporary name first; an older file of
    # the same name is removed before any is renamed, so an old and a new file never make a pair.
    tmps = [f"{path}.tmp.{os.getpid()}" for path in paths]
    published = []
    try:
        for write, tmp, path in zip(writers, tmps, paths):
            try:
                write(tmp)
            except OSError as e:  # (a failed write() names no file: name the one it was for)
                e.filename = e.filename if e.filename and not e.filename.startswith(tmp) else path
                raise
        for path in paths:
            if os.path.lexists(path):
                os.remove(path)
        for tmp, path in zip(tmps, paths):
            os.replace(tmp, path)
            published.append(path)
    except BaseException:
        for path in tmps + (published if len(published) < len(paths) else []):
            if os.path.lexists(path):
                os.remove(path)
        raise


class Stopped(KeyboardInterrupt):
    """SIGTERM (a scheduler's preemption) or SIGHUP (a closed terminal), raised as Ctrl-C is."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


def stop_on_signals():
    # SIGTERM and SIGHUP stop a run as Ctrl-C does: atomic writes clean up, one line says where
    def stop(signum, frame):
        raise Stopped(signum)
    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name):  # (Windows has no SIGHUP)
            signal.signal(getattr(signal, name), stop)


def how_stopped(e):
    # ("interrupted", 130) for Ctrl-C; ("stopped by SIGTERM", 143) for a signal sent to stop
    if isinstance(e, Stopped):
        return f"stopped by {signal.Signals(e.signum).name}", 128 + e.signum
    return "interrupted", 128 + signal.SIGINT


def setup(args, lesson):
    # Everything before the first step; `lesson` is train_gpt2, whose functions build the device's
    # layers, the model and the data loaders. Every option and file is checked before the weights
    # are read, and every process is ready before the first step (or all stop with one line).
    # Under mpiexec, this process takes its own GPU or its share of the cores before any array.
    procs = distributed.init(args.device)
    keep_freed_memory()
    lesson.use_device(args.device, tf32=bool(args.tf32), dtype=args.dtype, attention=args.attention)
    print(f"device: {describe_device()}")
    if args.resume:
        args.init = None
        args.output_dir = args.output_dir or args.resume
    check_options(args)
    set_grad_accum(args, procs.size)  # from --total-batch-size, if given
    download(args, procs)

    # where the run starts: a random model, a checkpoint, or the newest checkpoint of a run
    steps_done = 0
    checkpoint = args.checkpoint
    if args.resume:
        steps_done = latest_checkpoint(args.resume)
        if steps_done is None:
            raise InputError(f"--resume {args.resume}: no model_<step>.bin with its state_<step>.bin in it")
        checkpoint = os.path.join(args.resume, f"model_{steps_done}.bin")
    check_outputs_spare_inputs(args, checkpoint, steps_done)
    config = lesson.random_config(args.init) if args.init else lesson.read_checkpoint_config(checkpoint)
    print(f"[GPT-2] {config}")
    print(f"num_parameters: {lesson.num_parameters(config)}")
    check_run_fits(config, lesson.num_parameters(config), args, steps_done)
    # --hellaswag: every example read and checked now, and planned into batches for this context
    hellaswag = HellaSwag(args.hellaswag, config.max_seq_len, config.vocab_size) if args.hellaswag else None
    if hellaswag:
        print(hellaswag.describe())
    # the last sampled token is never fed back: P prompt tokens and N new ones use P+N-1 positions
    prompt = encode_prompt(args.prompt, config.vocab_size) if args.sample_every else []
    if prompt and len(prompt) + args.gen_tokens - 1 > config.max_seq_len:
        raise InputError(f"the prompt ({len(prompt)} tokens with <|endoftext|>) and --gen-tokens {args.gen_tokens} "
                         f"exceed the model's max_seq_len {config.max_seq_len}")
    train_loader = val_loader = None
    if args.steps > steps_done:  # --steps 0 only evaluates and samples: no training data needed
        train_loader = data_loader(lesson, args.train_data, "--train-data", config, args, procs, args.shuffle)
        print(f"train dataset num_batches: {train_loader.num_batches}{describe_shards(train_loader)}")
    if args.val_every:  # (validation is never shuffled)
        val_loader = data_loader(lesson, args.val_data, "--val-data", config, args, procs, False)
        print(f"val dataset num_batches: {val_loader.num_batches}{describe_shards(val_loader)}")

    if args.init:
        model = lesson.gpt2_build_from_random(args.init, args.seed)
    else:
        model = lesson.gpt2_build_from_checkpoint(checkpoint)
        if not all_finite(model.params_memory):
            raise InputError(f"{checkpoint}: its weights hold inf or nan: a diverged model, or not a checkpoint")
    run = Run(args, lesson, procs, model, train_loader, val_loader, steps_done, prompt)
    run.hellaswag = hellaswag
    if args.resume:
        resume(run, os.path.join(args.resume, f"state_{steps_done}.bin"))
    run.decode = make_decoder(checkpoint)
    if args.output_dir and procs.is_main:
        run.lock = lock_folder(args.output_dir)  # one run per folder: held until this process ends
        remove_temporaries(args.output_dir)  # of checkpoints a dead run was writing
    if args.log:
        os.makedirs(os.path.dirname(args.log) or ".", exist_ok=True)
    # llm.c's logger appends on resume; with several processes, rank 0 alone writes
    run.log = open(args.log, "a" if args.resume else "w") if args.log and procs.is_main else None
    procs.start_together()  # every process is ready, or all stop here with one error line
    run.t_start = time.perf_counter()
    return run


def data_loader(lesson, path, option, config, args, procs, shuffle):
    # the lesson's DataLoader for one file read in order; llm.c's sharded loader
    # (llmc/dataloader.py) for a glob pattern of shards or --shuffle
    B, T = args.batch_size, args.seq_len
    if shuffle or (glob.has_magic(path) and not os.path.isfile(path)):
        return ShardedDataLoader(path, B, T, config.vocab_size, procs.rank, procs.size, shuffle, option)
    return lesson.DataLoader(read_tokens(path, config.vocab_size), B, T, path, procs.rank, procs.size)


def describe_shards(loader):
    if not isinstance(loader, ShardedDataLoader):
        return ""
    shards = f"{len(loader.paths)} shard{'s' if len(loader.paths) > 1 else ''}"
    return f" ({shards}, {loader.num_tokens:,} tokens{', shuffled' if loader.shuffle else ''})"


def lock_folder(folder):
    # an exclusive lock on the folder itself, which the operating system lets go of when this
    # process ends, however it ends: a second run into the same folder stops with one line
    try:
        import fcntl
    except ImportError:  # (Windows: no lock)
        return None
    os.makedirs(folder, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise InputError(f"--output-dir {folder}: another run is writing there; wait for it to end, or give "
                         f"another folder") from None
    return fd


def remove_temporaries(folder):
    # model_N.bin.tmp.PID and state_N.bin.tmp.PID (with the lock held, no live run is writing them)
    for name in os.listdir(folder):
        if re.fullmatch(r"(model|state)_[0-9]+\.bin(\.tmp\.[0-9]+)+", name, re.ASCII):
            os.remove(os.path.join(folder, name))


def download(args, procs):
    # --download, --download-data: what is missing of llm.c's starter pack, before anything is read
    if not (args.download or args.download_data):
        return
    if procs.size > 1:
        raise InputError("--download needs one process: fetch the files first (python download_starter_pack.py, "
                         "--data for the token files), then start mpiexec")
    from download_starter_pack import DownloadError, download_starter_pack  # standard library only
    try:
        download_starter_pack(os.path.dirname(args.checkpoint) if args.download else None,
                              os.path.dirname(args.train_data) if args.download_data else None, args.download_url)
    except DownloadError as e:
        raise SystemExit(f"error: {e}") from None  # a network failure: one line, exit status 1


def resume(run, state_path):
    # AdamW's moments, the data loader's place and the sampler's state, as the run left them
    B, T, procs = run.args.batch_size, run.args.seq_len, run.procs
    state_steps, state_B, state_T, _, rng, position, m, v = read_run_state(state_path, run.model.params_memory.size)
    run.model.m_memory, run.model.v_memory = run.lesson.xp.asarray(m), run.lesson.xp.asarray(v)
    run.rng_state[0] = rng
    # B counts the rows of all processes, so the number of processes may change
    if (state_B, state_T) != (B * procs.size, T):
        raise InputError(f"--resume {run.args.resume}: the run used -b {state_B} -t {state_T} (-b times the number "
                         f"of processes; here {B} x {procs.size}): resume it with the same")
    if run.train_loader is not None:
        restore_loader(run.train_loader, position, state_path)
    print(f"resuming from {run.args.resume} after {run.steps_done} steps")


class Run:
    """What the training loop needs (made by setup), and what it calls to print, log and save."""

    def __init__(self, args, lesson, procs, model, train_loader, val_loader, steps_done, prompt):
        self.args, self.lesson, self.procs, self.model = args, lesson, procs, model
        self.train_loader, self.val_loader, self.prompt = train_loader, val_loader, prompt
        self.steps_done = steps_done  # before this run
        self.step = steps_done  # the step under way
        self.saved = steps_done if args.resume else None  # the newest checkpoint's steps
        self.rng_state = [args.seed]  # the sampler's xorshift state
        self.decode = self.log = self.hellaswag = self.lock = None
        self.t_start = time.perf_counter()

    def print_hellaswag(self, step):
        # llm.c's line and log entry: the examples whose lowest mean loss is the label's ending
        h = self.hellaswag
        correct = h.evaluate(self.lesson, self.model, self.procs)
        print(f"HellaSwag: {correct}/{h.num_examples} = {correct / h.num_examples:f}")
        self.write_log(step, f"s:{step} eval:{correct / h.num_examples:.4f}")

    def write_log(self, step, line):
        # llm.c's main.log, one line per entry, on disk at once (flushed)
        if not self.log:
            return
        try:
            print(line, file=self.log, flush=True)
        except OSError as e:
            raise WriteError(f"could not write --log {self.args.log} ({e.strerror}) at step {step}; the log is "
                             f"complete up to its last whole line") from None

    def print_val_loss(self, step, val_loss):
        print(f"val loss {val_loss:f}")
        self.write_log(step, f"s:{step} tel:{val_loss:.4f}")

    def print_sample(self):
        # generate --gen-tokens tokens after the prompt, printing each as it comes
        args = self.args
        print("generating:\n---")
        # a character's bytes can be split across tokens: the decoder holds them until it is whole
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        if self.decode is None:  # no tokenizer: print the ids
            def show(token):
                print(token, end=" ", flush=True)
        else:
            def show(token):
                print(utf8.decode(self.decode(token)), end="", flush=True)
        for token in self.prompt[1:]:
            show(token)
        t0 = time.perf_counter()
        for token in self.lesson.gpt2_generate(self.model, self.prompt, args.gen_tokens, self.rng_state,
                                               args.temperature, args.top_k):
            show(token)
        print(f"\n---\ngenerated {args.gen_tokens} tokens in {(time.perf_counter() - t0) * 1000:.0f} ms")

    def check_finite(self, step, loss):
        if not math.isfinite(loss):
            raise NonFiniteLossError(f"step {step}: train loss is {loss}; stopped before the update touched "
                                     f"the weights (a lower --lr may help)")

    def seconds_since(self, t0):
        # a step's time: the GPU runs behind Python, so wait for it before reading the timer
        synchronize()
        return time.perf_counter() - t0

    def print_step(self, step, loss, lr, norm, seconds):
        # llm.c's line, then throughput and progress; and the log's line
        args = self.args
        self.step = step + 1
        elapsed, done = time.perf_counter() - self.t_start, step + 1 - self.steps_done
        eta = elapsed / done * (args.steps - step - 1)
        tokens = self.procs.size * args.grad_accum * args.batch_size * args.seq_len
        extra = f", norm {norm:.4f}" if norm is not None else ""
        print(f"step {step}: train loss {loss:f} (took {seconds * 1000:f} ms) "
              f"{tokens / seconds:.0f} tokens/s{extra}, {elapsed:.0f} s elapsed, ETA {eta:.0f} s")
        norm_entry = f" norm:{norm:.2f}" if norm is not None else ""
        self.write_log(step, f"s:{step} trl:{loss:.4f} lr:{lr:.6f}{norm_entry}")

    def save_checkpoint(self, steps_done):
        # with --output-dir, every --save-every steps and at the end: model_N.bin, then state_N.bin
        args = self.args
        if not args.output_dir:
            return
        if not ((args.save_every and steps_done % args.save_every == 0) or steps_done == args.steps):
            return
        self.check_weights_finite(os.path.join(args.output_dir, f"model_{steps_done}.bin"))
        if self.procs.is_main:  # one writer: the other processes hold the same weights
            paths = [os.path.join(args.output_dir, f"{kind}_{steps_done}.bin") for kind in ("model", "state")]
            try:
                os.makedirs(args.output_dir, exist_ok=True)
                write_together(paths, [
                    lambda path: self.lesson.gpt2_write_checkpoint(self.model, path),
                    lambda path: write_run_state(path, self.model, steps_done, self.train_loader, self.rng_state,
                                                 loader_position(self.train_loader))])
            except OSError as e:  # a full disk, a read-only or failing file system
                kept = (f"the newest complete checkpoint is after step {self.saved}: continue with --resume "
                        f"{args.output_dir}" if self.saved is not None else "no checkpoint was written")
                raise WriteError(f"could not write {e.filename or args.output_dir} ({e.strerror}); {kept}") from None
            print(f"saved model_{steps_done}.bin and state_{steps_done}.bin to {args.output_dir}")
        self.saved = steps_done

    @contextlib.contextmanager
    def stops_cleanly(self):
        # around the loop: NumPy's warnings off (a non-finite loss is caught by check_finite, with a
        # clearer message), Ctrl-C said in one line with how to go on, the log closed
        try:
            with np.errstate(all="ignore"):
                yield
        except KeyboardInterrupt as e:
            args, (what, status) = self.args, how_stopped(e)
            if self.saved is not None:
                how = (f"the newest checkpoint is after step {self.saved}: continue with --resume {args.output_dir} "
                       f"and the same options")
            elif args.output_dir:
                how = "no checkpoint was written yet"
            else:
                how = "no checkpoints were being written (--output-dir DIR --save-every N make a run resumable)"
            raise Interrupted(f"{what} at step {self.step} of {args.steps}; {how}", status) from None
        finally:
            if self.log:
                self.log.close()

    def check_weights_finite(self, path):
        # inf or nan never reach a file: the previous checkpoint stays the newest
        if not all_finite(self.model.params_memory):
            kept = (f"; the newest checkpoint is after step {self.saved} in {self.args.output_dir}"
                    if self.saved is not None else "")
            raise NonFiniteLossError(f"the weights hold inf or nan after {self.step} steps: not written to {path}"
                                     f"{kept} (a lower --lr may help)")

    def finish(self):
        # several processes: rank 0 prints each one's checksum of the weights; then --output
        args = self.args
        try:
            self.procs.check_same_weights(self.model.params_memory)
            if args.output and self.procs.is_main:
                self.check_weights_finite(args.output)
                os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
                self.lesson.gpt2_write_checkpoint(self.model, args.output)
                print(f"wrote {args.output}")
        except KeyboardInterrupt as e:  # after the loop: say what was written and what was not
            what, status = how_stopped(e)
            written = f"; --output {args.output} was not written" if args.output else ""
            if self.saved is not None:
                written += f"; the newest checkpoint is after step {self.saved} in {args.output_dir}"
            raise Interrupted(f"{what} after training finished ({args.steps} steps){written}", status) from None


@contextlib.contextmanager
def errors_as_one_line():
    # each error: one line "error: ...", then its exit status (with several processes, every one
    # exits and the line is printed once: distributed.exit). A console that cannot encode a
    # character prints a replacement; a closed pipe (| head) ends the run quietly.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    stop_on_signals()
    try:
        yield
    except InputError as e:
        distributed.exit(2, e)
    except (NonFiniteLossError, WriteError) as e:
        distributed.exit(1, e)
    except Interrupted as e:
        distributed.exit(e.status, e)
    except KeyboardInterrupt as e:
        what, status = how_stopped(e)
        distributed.exit(status, f"{what} before training started; nothing was written")
    except BrokenPipeError:
        # whoever read our output stopped reading: stop too, as Unix tools do (status 141),
        # with the standard output pointed away so Python's own flush at exit can't fail
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        os._exit(128 + 13)
