"""
Checks train_gpt2.py against PyTorch, as llm.c's test_gpt2.c checks train_gpt2.c.

A debug state written by PyTorch holds one batch (x, y), the logits and the loss PyTorch computed
for it, and the gradients of all 16 parameter tensors. We run one forward and backward pass of our
own on the same batch and compare, tensor by tensor; then 10 AdamW steps on that batch, comparing
each step's loss with PyTorch's.

    python test_gpt2.py        # gpt2_124M.bin + gpt2_124M_debug_state.bin from llm.c's starter pack
    python test_gpt2.py --checkpoint tests/fixtures/tiny_gpt2.bin \\
        --state tests/fixtures/tiny_gpt2_debug_state.bin \\
        --expected-losses tests/fixtures/tiny_gpt2_expected_losses.json

Each tensor is compared two ways. As llm.c does: the largest absolute difference of any element,
against --logits-tol / --grad-tol (llm.c's 1e-2 / 2e-2 by default). And, beyond llm.c, the
norm-wise relative error ||ours - PyTorch|| / ||PyTorch|| of the whole tensor, against --rel-tol:
an absolute tolerance that suits logits of size 1 says nothing about gradients of size 1e-4, while
the relative error means the same for both. fp32 on a CPU agrees to about 1e-6 (the suite holds the
fixture to 1.5e-6), TF32 matmuls on a GPU to about 1e-3; the default, 1e-2, passes both and still
catches errors of a percent that the absolute check lets through. The loss and the 10 step losses
are scalars, compared as llm.c does (--loss-tol).

With --dtype bf16 (GPU), the defaults are the tolerances of llm.c's test_gpt2.cu for its bf16 build:
logits within 25, the loss and the step losses within 0.05, and each gradient element within its
tensor's threshold (from 4e-3 for dwpe to 0.5 for dwte) plus 7.9% of the reference value, llm.c's
"BF16 epsilon". Those are loose; the relative error is the check that catches real mistakes there,
at --rel-tol 5e-2 by default (bfloat16 rounds to 8 bits, 0.4%, at every step of the chain).

It ends with `overall okay: 1` (exit 0) or `overall okay: 0` (exit 1).
"""

import json
import math
import os
import sys
import time

import numpy as np

import train_gpt2 as tg
from llmc import cli, device, formats

# PyTorch's losses for 10 AdamW steps on the GPT-2 124M debug state
# (llm.c's test_gpt2.c)
LLMC_EXPECTED_LOSSES = [5.270007, 4.059707, 3.375123, 2.800783, 2.315382,
                        1.849029, 1.394656, 0.999147, 0.624080, 0.376511]

# llm.c's test_gpt2.cu, bf16 build: a gradient element passes if
# |ours - ref| <= its tensor's threshold + BF16_EPSILON * |ref|;
# logits within 25, losses within 0.05
LLMC_BF16_GRAD_TOLS = {"wte": 5e-1, "wpe": 4e-3, "ln1w": 1e-1, "ln1b": 4e-2, "qkvw": 5e-2, "qkvb": 3.5e-2,
                       "attprojw": 2e-2, "attprojb": 3e-2, "ln2w": 5e-2, "ln2b": 3e-2, "fcw": 3e-2, "fcb": 3e-2,
                       "fcprojw": 2e-2, "fcprojb": 1e-2, "lnfw": 1e-1, "lnfb": 2e-2}
BF16_EPSILON = 0.079
# defaults of --logits-tol, --loss-tol, --grad-tol (None: per tensor), --rel-tol
TOLERANCES = {
    "fp32": dict(logits_tol=1e-2, loss_tol=1e-2, grad_tol=2e-2, rel_tol=1e-2),
    "bf16": dict(logits_tol=25.0, loss_tol=0.05, grad_tol=None, rel_tol=5e-2),
}

STATE_MAGIC, STATE_VERSION = 20240327, 2
CHECKPOINT_HINT = ("get gpt2_124M.bin and its debug state from llm.c's starter pack (python download_starter_pack.py), "
                   "or write a model and its debug state with dev/make_reference.py")


def read_debug_state(path, config):
    # llm.c's debug state: a 256-int32 header (magic, version, B, T), x and y
    # (B,T) int32, logits (B,T,V) float32, the loss, then the gradients in the
    # checkpoint's layout
    if not os.path.isfile(path):
        raise tg.InputError(f"debug state {path} not found: get gpt2_124M_debug_state.bin from llm.c's starter "
                            f"pack, or write one with dev/make_reference.py")
    with open(path, "rb") as f:
        header = formats.read_header(path, f, "debug state")
        if header[0] != STATE_MAGIC:
            raise tg.InputError(f"{path}: bad magic {header[0]}, expected {STATE_MAGIC} (an llm.c debug state)")
        if header[1] != STATE_VERSION:
            raise tg.InputError(f"{path}: unsupported debug state version {header[1]}, expected {STATE_VERSION}; "
                                f"re-run llm.c's train_gpt2.py to regenerate it")
        B, T = int(header[2]), int(header[3])
        V, n = config.vocab_size, tg.num_parameters(config)
        expected_size = tg.HEADER_INTS * 4 + (2 * B * T + B * T * V + 1 + n) * 4
        actual_size = os.fstat(f.fileno()).st_size
        if B <= 0 or T <= 0 or actual_size != expected_size:
            raise tg.InputError(f"{path}: file is {actual_size} bytes, but B={B}, T={T} and the checkpoint's "
                                f"shape (V={V}, {n} parameters) imply {expected_size}: "
                                f"is it the debug state of this checkpoint?")
        if T > config.max_seq_len:
            raise tg.InputError(f"{path}: its batch has T={T} positions, more than the checkpoint's max_seq_len "
                                f"{config.max_seq_len}: is it the debug state of this checkpoint?")
        x = np.fromfile(f, dtype="<i4", count=B * T).reshape(B, T)
        y = np.fromfile(f, dtype="<i4", count=B * T).reshape(B, T)
        logits = np.fromfile(f, dtype="<f4", count=B * T * V).reshape(B, T, V)
        loss = float(np.fromfile(f, dtype="<f4", count=1)[0])
        grads_memory = np.fromfile(f, dtype="<f4", count=n)
    return x, y, logits, loss, tg.point_parameters(grads_memory, config)


def read_expected_losses(path):
    try:
        with open(path) as f:
            losses = json.load(f)["losses"]
        # (bool is an int to Python, and JSON's NaN and Infinity are floats: neither is a loss)
        if len(losses) != 10 or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                        and math.isfinite(v) for v in losses):
            raise ValueError
    except (OSError, ValueError, KeyError, TypeError):
        raise tg.InputError(f"{path}: expected a JSON file {{\"losses\": [10 finite numbers]}}") from None
    return [float(v) for v in losses]


def relative_error(a, b):
    # ||a - b|| / ||b|| in float64: unlike a max abs difference it scales, so
    # it means the same for logits of size 10 and gradients of size 1e-4
    # (0 when both are zero, inf when only b is)
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    num, den = np.linalg.norm(a - b), np.linalg.norm(b)
    return float(num / den) if den > 0 else (0.0 if num == 0 else math.inf)


def check_tensor(a, b, label, tol, rel_tol=math.inf, epsilon=0.0):
    # poor man's tensor checker, as llm.c's, plus the relative error. a is ours
    # (host or device, fp32 or bf16), b PyTorch's. An element passes within
    # tol + epsilon * |b| (llm.c's bf16 test: epsilon 0.079).
    a, b = tg.to_host(a).astype(np.float32).ravel(), b.ravel()
    diff = np.abs(a.astype(np.float64) - b)
    maxdiff = float(diff.max())
    rel = relative_error(a, b)
    allowed = tol + epsilon * np.abs(b)
    ok = bool(np.all(diff <= allowed)) and rel <= rel_tol
    print(label)
    for i in range(min(5, a.size)):
        print(f"{'OK' if diff[i] <= allowed[i] else 'NOT OK'} {a[i]:f} {b[i]:f}")
    print(f"TENSOR {'OK' if ok else 'NOT OK'}, maxdiff = {maxdiff:e}, rel err = {rel:e}")
    return ok, maxdiff, rel


def parse_args(argv=None):
    parser = cli.ArgumentParser(description="Compare train_gpt2.py with a PyTorch debug state, as llm.c's test_gpt2.c does.")
    parser.add_argument("--checkpoint", default="gpt2_124M.bin", help="llm.c GPT-2 checkpoint")
    parser.add_argument("--state", default="gpt2_124M_debug_state.bin", help="llm.c debug state written by PyTorch")
    parser.add_argument("--expected-losses", metavar="FILE",
                        help='JSON {"losses": [10 floats]} of the 10 AdamW steps (default: llm.c\'s published '
                             'values, which belong to the official GPT-2 124M state)')
    parser.add_argument("--logits-tol", type=float, help="max abs difference of logits (llm.c: 1e-2; bf16: 25)")
    parser.add_argument("--loss-tol", type=float,
                        help="max abs difference of the loss and of each step's loss (llm.c: 1e-2; bf16: 0.05)")
    parser.add_argument("--grad-tol", type=float,
                        help="max abs difference of gradients (llm.c: 2e-2; bf16: llm.c's threshold per tensor); "
                             "with --dtype bf16, given or not, plus 0.079 times the reference value (llm.c's epsilon)")
    parser.add_argument("--rel-tol", type=float,
                        help="max norm-wise relative error ||ours - PyTorch|| / ||PyTorch|| of the logits and of each "
                             "gradient tensor (not in llm.c; default 1e-2: fp32 on a CPU agrees to ~1e-6, TF32 to "
                             "~1e-3; bf16: 5e-2; inf: not checked)")
    # --device, --tf32, --dtype (bf16 defaults to llm.c's bf16 tolerances)
    cli.add_device_arguments(parser)
    args = parser.parse_args(argv)
    for name, default in TOLERANCES[args.dtype].items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    return args


def main(args):
    tg.use_device(args.device, tf32=bool(args.tf32), dtype=args.dtype, attention=args.attention)
    print(f"device: {device.describe_device()}")
    model = tg.gpt2_build_from_checkpoint(args.checkpoint, hint=CHECKPOINT_HINT)
    c = model.config
    print(f"[GPT-2] {c}")
    x, y, expected_logits, expected_loss, expected_grads = read_debug_state(args.state, c)
    B, T = x.shape
    print(f"[State] batch_size: {B}, seq_len: {T}")
    if args.expected_losses:
        expected_losses = read_expected_losses(args.expected_losses)
        print(f"expected losses: {args.expected_losses}")
    else:
        expected_losses = LLMC_EXPECTED_LOSSES
        print("expected losses: llm.c's published values for the GPT-2 124M debug state")
    if not (0 <= x.min() and x.max() < c.vocab_size and 0 <= y.min() and y.max() < c.vocab_size):
        raise tg.InputError(f"{args.state}: token ids outside [0, {c.vocab_size}), the checkpoint's vocabulary")

    allok = True
    margins, rel_errors = {}, {}  # largest absolute differences, relative errors
    epsilon = BF16_EPSILON if args.dtype == "bf16" else 0.0  # gradient tolerance: + epsilon |ref|
    for step in range(10):
        t0 = time.perf_counter()
        loss = float(tg.gpt2_forward(model, x, y))
        tg.gpt2_backward(model)
        t1 = time.perf_counter()

        if step == 0:
            # logits (only the first V of Vp columns are real), loss, gradients
            logits = model.acts["logits"][..., :c.vocab_size]
            logits_ok, margins["logits"], rel_errors["logits"] = check_tensor(logits, expected_logits, "logits",
                                                                              args.logits_tol, args.rel_tol)
            allok &= logits_ok
            margins["loss"] = abs(loss - expected_loss)
            loss_ok = margins["loss"] <= args.loss_tol
            print(f"LOSS {'OK' if loss_ok else 'MISMATCH'}: {loss:f} {expected_loss:f}")
            allok &= loss_ok
            grad_margins, grad_rel = {}, {}
            for name in model.grads:
                tol = LLMC_BF16_GRAD_TOLS[name] if args.grad_tol is None else args.grad_tol
                ok, grad_margins[name], grad_rel[name] = check_tensor(
                    model.grads[name], expected_grads[name], f"d{name}", tol, args.rel_tol,
                    epsilon=epsilon)
                allok &= ok
            worst = max(grad_margins, key=grad_margins.get)
            margins["grads"] = grad_margins[worst]
            worst_rel = max(grad_rel, key=grad_rel.get)
            rel_errors["grads"] = grad_rel[worst_rel]

        tg.gpt2_update(model, 1e-4, 0.9, 0.999, 1e-8, 0.01, step + 1)
        step_diff = abs(loss - expected_losses[step])
        margins["step losses"] = max(margins.get("step losses", 0.0), step_diff)
        step_ok = step_diff <= args.loss_tol
        allok &= step_ok
        print(f"step {step}: loss {loss:f} (took {(t1 - t0) * 1000:f} ms) OK = {int(step_ok)}")

    grad_tol = (f"tol llm.c's bf16 {LLMC_BF16_GRAD_TOLS[worst]:g}" if args.grad_tol is None
                else f"tol {args.grad_tol:g}") + (f" + {epsilon} |ref|" if epsilon else "")
    print(f"max abs differences: logits {margins['logits']:.2e} (tol {args.logits_tol:g}), "
          f"loss {margins['loss']:.2e} (tol {args.loss_tol:g}), "
          f"gradients {margins['grads']:.2e} in d{worst} ({grad_tol}), "
          f"step losses {margins['step losses']:.2e} (tol {args.loss_tol:g})")
    print(f"norm-wise relative errors ||ours - PyTorch|| / ||PyTorch|| per tensor: logits {rel_errors['logits']:.2e}, "
          f"gradients {rel_errors['grads']:.2e} in d{worst_rel} (tol {args.rel_tol:g})")
    print(f"overall okay: {int(allok)}")
    return 0 if allok else 1


if __name__ == "__main__":
    try:
        sys.exit(main(parse_args()))
    except tg.InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
