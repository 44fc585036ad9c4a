"""
The command line of train_gpt2.py and test_gpt2.py, and the checks made before any work: every
option in its range, every output writable, the run within the memory there is.
"""

import argparse
import math
import os
import stat

from llmc.device import CUPY_INSTALL, available_memory, training_memory
from llmc.dataloader import shard_paths
from llmc.formats import CHECKPOINT_NAME
from llmc.utils import InputError


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        # a bad option is bad input like any other: one line, exit status 2
        raise InputError(f"{message} (see --help)")


def add_device_arguments(parser):
    # where and in which precision to compute: the same options for train_gpt2.py and test_gpt2.py
    group = parser.add_argument_group("running on a GPU (NVIDIA, through CuPy)")
    group.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                       help="where to compute: cpu (NumPy) or cuda (CuPy, an optional dependency: " + CUPY_INSTALL + ")")
    group.add_argument("--tf32", type=int, choices=[0, 1], default=1,
                       help="on the GPU, TF32 tensor cores for the matmuls (0: full fp32), as llm.c's CUDA trainers")
    group.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                       help="bf16 (GPU only): bfloat16 activations and matmuls over float32 parameters, gradients "
                            "and checkpoints, as llm.c's train_gpt2.cu")
    group.add_argument("--attention", choices=["blocked", "flash"], default="blocked",
                       help="on the GPU, attention's kernels: blocked (cuBLAS products, by blocks of rows) or flash "
                            "(tensor-core FlashAttention kernels, for head size 64 and -t a multiple of 64; with "
                            "TF32 or bf16)")


def parse_args(depths, argv=None):
    # the command line of train_gpt2.py, every option checked; --init takes one of depths
    parser = ArgumentParser(description="Train GPT-2 in NumPy, as llm.c's train_gpt2.c does "
                                        "(defaults are llm.c's).", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--checkpoint", default="gpt2_124M.bin", help="llm.c GPT-2 checkpoint to start from")
    add("--init", choices=list(depths), help="instead of a checkpoint, start from a randomly initialized GPT-2 of this depth")
    add("--train-data", default="data/tiny_shakespeare_train.bin",
        help="training tokens: a file, or a quoted glob pattern of shards (llm.c's -i)")
    add("--val-data", default="data/tiny_shakespeare_val.bin", help="validation tokens: a file or a pattern (llm.c's -j)")
    add("-b", "--batch-size", type=int, default=4, help="batch size B")
    add("-t", "--seq-len", type=int, default=64, help="sequence length T (at most the model's maxT)")
    add("--steps", type=int, default=40, help="number of training steps (0: just evaluate and sample)")
    add("--lr", type=float, default=1e-4, help="AdamW learning rate")
    add("--weight-decay", type=float, default=0.0, help="AdamW weight decay, on every tensor as llm.c's CPU code does")
    add("--val-every", type=int, default=10, help="evaluate the validation loss every N steps (0 = never)")
    add("--val-batches", type=int, default=5, help="validation batches per evaluation")
    add("--hellaswag", metavar="FILE",
        help="score HellaSwag (llm.c's eval file: prepro_hellaswag.py) at every validation after step 0 "
             "and at the end (with --steps 0, once), as llm.c's -h 1")
    add("--seed", type=int, default=1337, help="seed of the sampler")
    add("--output", help="write the trained model here, as an llm.c checkpoint")
    group = parser.add_argument_group("sampling")
    group.add_argument("--sample-every", type=int, default=20, help="sample every N steps and at the end (0 = never)")
    group.add_argument("--gen-tokens", type=int, default=64, help="tokens to generate per sample")
    group.add_argument("--prompt", help="text to continue (default: start from <|endoftext|>); needs tiktoken")
    group.add_argument("--temperature", type=float, default=1.0, help="below 1: more predictable, above 1: more random")
    group.add_argument("--top-k", type=int, default=0, help="sample only from the k most likely tokens (0 = all)")
    group = parser.add_argument_group("training options of llm.c's GPU trainer (off by default)")
    group.add_argument("--grad-accum", type=int, default=1, help="accumulate the gradients of K batches per step, as one batch of K*B rows")
    group.add_argument("--grad-clip", type=float, default=0.0, help="clip the gradients' global norm to X (0 = off)")
    group.add_argument("--warmup-steps", type=int, default=0, help="linear learning rate warmup over W steps")
    group.add_argument("--lr-min-frac", type=float, default=1.0,
                       help="cosine decay of the learning rate to this fraction of --lr at the last step (1 = no decay)")
    group.add_argument("--decay-2d-only", action="store_true",
                       help="weight decay only on the weight matrices, as nanoGPT and llm.c's GPU trainer do")
    group.add_argument("--shuffle", action="store_true",
                       help="training batches in llm.c's shuffled order (mt19937 seeded 42; shards and their samples)")
    group.add_argument("--beta1", type=float, default=0.9, help="AdamW's beta1")
    group.add_argument("--beta2", type=float, default=0.999, help="AdamW's beta2 (llm.c's GPU trainer: 0.95)")
    group.add_argument("--total-batch-size", type=int, metavar="TOKENS",
                       help="tokens per step over all processes (llm.c's -d): sets --grad-accum to "
                            "TOKENS / (B*T*processes), which must divide evenly")
    group.add_argument("--log", metavar="FILE", help="write llm.c's main.log format: s:STEP trl:LOSS / s:STEP tel:LOSS (/ s:STEP eval:ACC)")
    group = parser.add_argument_group("getting GPT-2's weights")
    group.add_argument("--download", action="store_true",
                       help="first fetch what is missing of llm.c's starter pack (gpt2_124M.bin, its debug state, "
                            "gpt2_tokenizer.bin) into the --checkpoint's folder")
    group.add_argument("--download-data", action="store_true",
                       help="first fetch the Tiny Shakespeare token files and HellaSwag's eval file into the "
                            "--train-data's folder")
    group.add_argument("--download-url", metavar="BASE", default="https://huggingface.co/datasets/karpathy/llmc-starter-pack/resolve/main",
                       help="where the starter pack's files are (a mirror)")
    group = parser.add_argument_group("checkpoints")
    group.add_argument("--output-dir", help="write model_<step>.bin and state_<step>.bin here (see --save-every)")
    group.add_argument("--save-every", type=int, default=0, help="with --output-dir: save every N steps, and at the end (0 = only at the end)")
    group.add_argument("--resume", metavar="DIR", help="continue from the newest model/state pair in DIR, up to --steps in total "
                                                       "(saving there too, unless --output-dir says otherwise)")
    add_device_arguments(parser)
    args = parser.parse_args(argv)
    for name in ("batch_size", "seq_len", "val_batches", "gen_tokens", "grad_accum", "temperature"):
        if getattr(args, name) <= 0:
            raise InputError(f"--{name.replace('_', '-')} must be positive, not {getattr(args, name)}")
    for name in ("steps", "val_every", "sample_every", "save_every", "top_k", "grad_clip", "warmup_steps"):
        if getattr(args, name) < 0:
            raise InputError(f"--{name.replace('_', '-')} must not be negative, not {getattr(args, name)}")
    for name in ("beta1", "beta2"):
        if not 0.0 <= getattr(args, name) < 1.0:
            raise InputError(f"--{name} must be at least 0 and below 1, not {getattr(args, name)}")
    if args.total_batch_size is not None and args.total_batch_size <= 0:
        raise InputError(f"--total-batch-size must be positive, not {args.total_batch_size}")
    if not 0.0 <= args.lr_min_frac <= 1.0:
        raise InputError(f"--lr-min-frac must be between 0 and 1, not {args.lr_min_frac}")
    check_numbers(args)
    if args.save_every and not (args.output_dir or args.resume):
        raise InputError("--save-every needs --output-dir (where to save)")
    return args


def check_numbers(args):
    # floats must be finite (argparse takes "nan" and "inf"), and in their range
    for name in ("lr", "weight_decay", "grad_clip", "temperature"):
        value = getattr(args, name)
        if not math.isfinite(value) or value < 0:
            raise InputError(f"--{name.replace('_', '-')} must be a finite number >= 0, not {value}")
    # the sampler's xorshift state is 64 bits and never 0 (it would stay 0), as llm.c's
    if not 0 < args.seed < 2**64:
        raise InputError(f"--seed must be between 1 and 2**64 - 1, not {args.seed}")


def check_output_path(option, path, folder=False):
    # an output must be writable before any work is done, not found unwritable after it: the path
    # must be of the right kind if it exists, and the nearest folder on its way must be one we may
    # write into (missing folders are created when the file is written)
    if folder and os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f"{option} {path} is a file, not a folder")
    if not folder and os.path.isdir(path):
        raise InputError(f"{option} {path} is a directory; give a file name, such as {os.path.join(path, 'model.bin')}")
    existing = os.path.abspath(path if folder else os.path.dirname(os.path.abspath(path)))
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise InputError(f"{option} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK) or (os.path.isfile(path) and not os.access(path, os.W_OK)):
        raise InputError(f"{option} {path}: no permission to write there")


def set_grad_accum(args, num_processes):
    # --total-batch-size: the gradient accumulation that makes a step of that many tokens
    if args.total_batch_size is None:
        return
    tokens = args.batch_size * args.seq_len * num_processes  # of one forward/backward pass
    if args.total_batch_size % tokens:
        raise InputError(f"--total-batch-size {args.total_batch_size} is not a multiple of B*T*processes "
                         f"= {args.batch_size}*{args.seq_len}*{num_processes} = {tokens}")
    grad_accum = args.total_batch_size // tokens
    if args.grad_accum not in (1, grad_accum):
        raise InputError(f"--grad-accum {args.grad_accum} disagrees with --total-batch-size "
                         f"{args.total_batch_size} (which gives {grad_accum}): give one of them")
    args.grad_accum = grad_accum
    print(f"total_batch_size {args.total_batch_size} => grad_accum_steps {grad_accum}")


def check_options(args):
    # every path option, before anything is downloaded, built or trained: outputs must be writable,
    # inputs must be there (their contents are checked when read, still before the first step)
    for option, path, folder in [("--output", args.output, False), ("--log", args.log, False),
                                 ("--output-dir", args.output_dir, True)]:
        if path:
            check_output_path(option, path, folder)
    if args.download or args.download_data:
        from download_starter_pack import check_url  # standard library only
        try:
            check_url(args.download_url, "--download-url")
        except ValueError as e:
            raise InputError(str(e)) from None
    if args.download:
        check_output_path("--checkpoint", os.path.dirname(args.checkpoint) or ".", folder=True)
    if args.download_data:
        check_output_path("--train-data", os.path.dirname(args.train_data) or ".", folder=True)
    if args.resume and not os.path.isdir(args.resume):
        raise InputError(f"--resume {args.resume}: not a folder")


def check_outputs_spare_inputs(args, checkpoint, steps_done):
    # No output may overwrite an input, another output, or anything but a regular file (a device,
    # a FIFO). Files are compared by device and inode where both exist, else by real path. The
    # trained model may replace its own starting checkpoint: that write is atomic.
    inputs = [("the tokenizer", os.path.join(os.path.dirname(checkpoint) or ".", "gpt2_tokenizer.bin"))]
    if not args.init:
        inputs.append(("--checkpoint", checkpoint))
    for option in ("--train-data", "--val-data", "--hellaswag"):
        pattern = getattr(args, option[2:].replace("-", "_"), None)
        if pattern:
            inputs += [(option, path) for path in shard_paths(pattern, option)]
    outputs = [(option, path) for option, path in (("--output", args.output), ("--log", args.log)) if path]
    for option, path in outputs:
        if os.path.exists(path) and not stat.S_ISREG(os.stat(path).st_mode):
            raise InputError(f"{option} {path} is not a regular file (a device, FIFO or socket): give a file name")
    for i, (option, path) in enumerate(outputs):
        for what, other in inputs + outputs[i + 1:]:
            if same_file(path, other) and not (option == "--output" and what == "--checkpoint"):
                raise InputError(f"{option} {path} is {what} {other}: it would be overwritten; give another file")
    # --output-dir's checkpoints, model_N.bin and state_N.bin for N past the steps done
    if args.output_dir:
        folder = os.path.realpath(args.output_dir)
        for what, other in inputs + outputs:
            match = CHECKPOINT_NAME.fullmatch(os.path.basename(other))
            if match and int(match[1]) > steps_done and os.path.dirname(os.path.realpath(other)) == folder:
                raise InputError(f"--output-dir {args.output_dir} would overwrite {what} {other} with a checkpoint")


def same_file(a, b):
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


def check_run_fits(config, num_parameters, args, steps_done):
    # the options against the model's shape, and the run against the memory there is, before the
    # model's weights are read
    B, T = args.batch_size, args.seq_len
    if T > config.max_seq_len:
        raise InputError(f"--seq-len {T} exceeds the model's max_seq_len {config.max_seq_len}")
    if args.top_k > config.vocab_size:
        raise InputError(f"--top-k {args.top_k} exceeds the vocab size {config.vocab_size}")
    if steps_done > args.steps:
        raise InputError(f"--resume {args.resume}: already {steps_done} steps done, more than --steps {args.steps}")
    need, have = training_memory(config, num_parameters, B, T), available_memory()
    if have is not None and need > have:
        where = "free on the GPU" if args.device == "cuda" else "available"
        raise InputError(f"-b {B} -t {T} needs about {need / 1e9:.1f} GB for the model and its activations, but only "
                         f"{have / 1e9:.1f} GB is {where}: use a smaller --batch-size or --seq-len "
                         f"(--grad-accum makes a larger batch out of smaller ones)")
