"""
A training run around train_gpt2.py's loop, as llm.c's train_gpt2.cu sets one up around its step:
the device and the processes, downloads, resume, every check before any work (setup); the lines
it prints, the log, checkpoints, and how it ends: one line for every error, with its exit status.
"""

import codecs
import contextlib
import math
import os
import time

import numpy as np

from llmc import distributed
from llmc.cli import check_options, check_run_fits
from llmc.cpu import keep_freed_memory
from llmc.device import describe_device, synchronize
from llmc.formats import latest_checkpoint, read_run_state, read_tokens, write_run_state
from llmc.tokenizer import encode_prompt, make_decoder
from llmc.utils import InputError


class NonFiniteLossError(Exception):
    """The loss became inf or nan: training stops before the update would spoil the weights."""


class Interrupted(Exception):
    """Ctrl-C: the run stops with one line saying where, and how to go on."""


def setup(args, lesson):
    # Everything before the first step; `lesson` is train_gpt2, whose functions build the device's
    # layers, the model and the data loaders. Every option and file is checked before the weights
    # are read, and every process is ready before the first step (or all stop with one line).
    # Under mpiexec, this process takes its own GPU or its share of the cores before any array.
    procs = distributed.init(args.device)
    keep_freed_memory()
    lesson.use_device(args.device, tf32=bool(args.tf32), dtype=args.dtype, attention=args.attention)
    print(f"device: {describe_device()}")
    B, T = args.batch_size, args.seq_len
    if args.resume:
        args.init = None
        args.output_dir = args.output_dir or args.resume
    check_options(args)
    download(args, procs)

    # where the run starts: a random model, a checkpoint, or the newest checkpoint of a run
    steps_done = 0
    checkpoint = args.checkpoint
    if args.resume:
        steps_done = latest_checkpoint(args.resume)
        if steps_done is None:
            raise InputError(f"--resume {args.resume}: no model_<step>.bin with its state_<step>.bin in it")
        checkpoint = os.path.join(args.resume, f"model_{steps_done}.bin")
    config = lesson.random_config(args.init) if args.init else lesson.read_checkpoint_config(checkpoint)
    print(f"[GPT-2] {config}")
    print(f"num_parameters: {lesson.num_parameters(config)}")
    check_run_fits(config, lesson.num_parameters(config), args, steps_done)
    # the last sampled token is never fed back: P prompt tokens and N new ones use P+N-1 positions
    prompt = encode_prompt(args.prompt, config.vocab_size) if args.sample_every else []
    if prompt and len(prompt) + args.gen_tokens - 1 > config.max_seq_len:
        raise InputError(f"the prompt ({len(prompt)} tokens with <|endoftext|>) and --gen-tokens {args.gen_tokens} "
                         f"exceed the model's max_seq_len {config.max_seq_len}")
    train_loader = val_loader = None
    if args.steps > steps_done:  # --steps 0 only evaluates and samples: no training data needed
        train_loader = lesson.DataLoader(read_tokens(args.train_data, config.vocab_size), B, T, args.train_data,
                                         procs.rank, procs.size)
        print(f"train dataset num_batches: {train_loader.num_batches}")
    if args.val_every:
        val_loader = lesson.DataLoader(read_tokens(args.val_data, config.vocab_size), B, T, args.val_data,
                                       procs.rank, procs.size)
        print(f"val dataset num_batches: {val_loader.num_batches}")

    if args.init:
        model = lesson.gpt2_build_from_random(args.init, args.seed)
    else:
        model = lesson.gpt2_build_from_checkpoint(checkpoint)
    run = Run(args, lesson, procs, model, train_loader, val_loader, steps_done, prompt)
    if args.resume:
        resume(run, os.path.join(args.resume, f"state_{steps_done}.bin"))
    run.decode = make_decoder(checkpoint)
    if args.log:
        os.makedirs(os.path.dirname(args.log) or ".", exist_ok=True)
    # llm.c's logger appends on resume; with several processes, rank 0 alone writes
    run.log = open(args.log, "a" if args.resume else "w") if args.log and procs.is_main else None
    procs.start_together()  # every process is ready, or all stop here with one error line
    run.t_start = time.perf_counter()
    return run


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
    state_steps, state_B, state_T, next_batch, rng, m, v = read_run_state(state_path, run.model.params_memory.size)
    run.model.m_memory, run.model.v_memory = run.lesson.xp.asarray(m), run.lesson.xp.asarray(v)
    run.rng_state[0] = rng
    # B counts the rows of all processes, so the number of processes may change
    if (state_B, state_T) != (B * procs.size, T):
        raise InputError(f"--resume {run.args.resume}: the run used -b {state_B} -t {state_T} (-b times the number "
                         f"of processes; here {B} x {procs.size}): resume it with the same")
    if run.train_loader is not None:
        run.train_loader.current_batch = next_batch
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
        self.decode = self.log = None
        self.t_start = time.perf_counter()

    def print_val_loss(self, step, val_loss):
        print(f"val loss {val_loss:f}")
        if self.log:
            print(f"s:{step} tel:{val_loss:.4f}", file=self.log, flush=True)

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
        if self.log:
            print(f"s:{step} trl:{loss:.4f} lr:{lr:.6f}" + (f" norm:{norm:.2f}" if norm is not None else ""),
                  file=self.log, flush=True)

    def save_checkpoint(self, steps_done):
        # with --output-dir, every --save-every steps and at the end: model_N.bin, then state_N.bin
        args = self.args
        if not args.output_dir:
            return
        if not ((args.save_every and steps_done % args.save_every == 0) or steps_done == args.steps):
            return
        if self.procs.is_main:  # one writer: the other processes hold the same weights
            os.makedirs(args.output_dir, exist_ok=True)
            self.lesson.gpt2_write_checkpoint(self.model, os.path.join(args.output_dir, f"model_{steps_done}.bin"))
            write_run_state(os.path.join(args.output_dir, f"state_{steps_done}.bin"), self.model, steps_done,
                            self.train_loader, self.rng_state)
            print(f"saved model_{steps_done}.bin and state_{steps_done}.bin to {args.output_dir}")
        self.saved = steps_done

    @contextlib.contextmanager
    def stops_cleanly(self):
        # around the loop: NumPy's warnings off (a non-finite loss is caught by check_finite, with a
        # clearer message), Ctrl-C said in one line with how to go on, the log closed
        try:
            with np.errstate(all="ignore"):
                yield
        except KeyboardInterrupt:
            args = self.args
            if self.saved is not None:
                how = (f"the newest checkpoint is after step {self.saved}: continue with --resume {args.output_dir} "
                       f"and the same options")
            elif args.output_dir:
                how = "no checkpoint was written yet"
            else:
                how = "no checkpoints were being written (--output-dir DIR --save-every N make a run resumable)"
            raise Interrupted(f"interrupted at step {self.step} of {args.steps}; {how}") from None
        finally:
            if self.log:
                self.log.close()

    def finish(self):
        # several processes: rank 0 prints each one's checksum of the weights; then --output
        self.procs.check_same_weights(self.model.params_memory)
        if self.args.output and self.procs.is_main:
            os.makedirs(os.path.dirname(self.args.output) or ".", exist_ok=True)
            self.lesson.gpt2_write_checkpoint(self.model, self.args.output)
            print(f"wrote {self.args.output}")


@contextlib.contextmanager
def errors_as_one_line():
    # each error: one line "error: ...", then its exit status (with several processes, every one
    # exits and the line is printed once: distributed.exit)
    try:
        yield
    except InputError as e:
        distributed.exit(2, e)
    except NonFiniteLossError as e:
        distributed.exit(1, e)
    except Interrupted as e:
        distributed.exit(130, e)  # the shell's status for a program stopped by Ctrl-C
    except KeyboardInterrupt:
        distributed.exit(130, "interrupted before training started; nothing was written")
