"""HellaSwag (--hellaswag, llmc/hellaswag.py, prepro_hellaswag.py): llm.c's eval file byte for byte,
each example's four mean losses and the count against PyTorch's scoring of a committed fixture,
batches that change nothing, the training loop's cadence and lines, and bad files as one error line."""

import hashlib
import json
import os
import re

import numpy as np
import pytest

import train_gpt2 as tg
from llmc import hellaswag as hs
from llmc.distributed import SingleProcess
from helpers import FIXTURES, MODEL, assert_one_error_line, gpt2_encoding, run, usable_gpu, write_tokens
from test_download import Server

# written by dev/make_hellaswag_reference.py: 40 examples of random tokens for the tiny model
# (V = 777, maxT = 64), two of them one position too wide; PyTorch's (float64) mean losses of
# each one's endings
EVAL = os.path.join(FIXTURES, "hellaswag_tiny.bin")
EXPECTED = json.load(open(os.path.join(FIXTURES, "hellaswag_tiny_expected.json")))
# a few made-up examples in HellaSwag's jsonl format (unicode, quotes, tabs and newlines, an emoji)
SAMPLE = os.path.join(FIXTURES, "hellaswag_sample.jsonl")
# SHA-256 of what llm.c's own dev/data/hellaswag.py writes from SAMPLE: its render_example and
# data_common.py's write_evalfile run in a scratch folder (llm.c commit f1e2ace6, tiktoken 0.14.0)
LLMC_SHA256 = "c5aa163c7604079396fceed865b3c3cf82a951b1be8033e1602aa419093fdcdf"




def prepro(*args, cwd=None):
    return run("prepro_hellaswag.py", *args, **({"cwd": cwd} if cwd else {}))


# ----------------------------------------------------------------------------
# prepro_hellaswag.py

def test_prepro_writes_llmcs_bytes(tmp_path):
    enc = gpt2_encoding()
    result = prepro("--input", SAMPLE, "--output-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"writing 7 examples to {tmp_path / 'hellaswag_val.bin'}\n"
    assert os.listdir(tmp_path) == ["hellaswag_val.bin"]
    data = (tmp_path / "hellaswag_val.bin").read_bytes()
    assert hashlib.sha256(data).hexdigest() == LLMC_SHA256
    # and read back, the tokens are the context's and each ending's after a space
    examples = hs.read_eval_file(str(tmp_path / "hellaswag_val.bin"), 50257)
    lines = [json.loads(line) for line in open(SAMPLE, encoding="utf-8")]
    assert len(examples) == len(lines) == 7
    for example, line in zip(examples, lines):
        assert example.label == line["label"]
        assert example.context.tolist() == enc.encode(line["ctx"])
        assert [e.tolist() for e in example.endings] == [enc.encode(" " + e) for e in line["endings"]]


def test_prepro_download_resumes(tmp_path):
    gpt2_encoding()
    jsonl = open(SAMPLE, "rb").read()
    server = Server({"hellaswag_val.jsonl": jsonl})
    try:
        server.behaviour["hellaswag_val.jsonl"] = "cut"  # the first response stops halfway
        url = server.url + "/hellaswag_val.jsonl"
        first = prepro("--url", url, "--output-dir", str(tmp_path))
        # (after the progress line) one error line, status 1: a network failure
        assert first.returncode == 1 and "Traceback" not in first.stderr
        assert re.match(r"error: download of .* (broke off|stopped) at .*run again to resume it$",
                        first.stderr.splitlines()[-1]), first.stderr
        # nothing under its own name
        assert sorted(os.listdir(tmp_path)) == ["hellaswag_val.jsonl.partial"]
        second = prepro("--url", url, "--output-dir", str(tmp_path))
        assert second.returncode == 0, second.stderr
        # it asked only for the rest
        assert server.requests[-1] == ("hellaswag_val.jsonl", f"bytes={len(jsonl) // 2}-")
        assert (tmp_path / "hellaswag_val.jsonl").read_bytes() == jsonl
        assert hashlib.sha256((tmp_path / "hellaswag_val.bin").read_bytes()).hexdigest() == LLMC_SHA256
        # there already: not fetched again
        third = prepro("--url", url, "--output-dir", str(tmp_path))
        assert "already exists, skipping download" in third.stdout and len(server.requests) == 2
        os.remove(tmp_path / "hellaswag_val.jsonl")
        server.behaviour["hellaswag_val.jsonl"] = "error"
        failed = prepro("--url", url, "--output-dir", str(tmp_path))
        assert_one_error_line(failed, "HTTP 500", "by hand from https://github.com/rowanz/hellaswag", status=1)
    finally:
        server.httpd.shutdown()


@pytest.mark.parametrize("line, fragment", [
    ("{not json", "line 2: not JSON"),
    ('{"ctx": "A man", "label": 4, "endings": ["a", "b", "c", "d"]}', "label 4"),
    ('{"ctx": "A man", "label": "1", "endings": ["a", "b", "c", "d"]}', "label '1'"),
    ('{"ctx": "A man", "label": 1, "endings": ["a", "b", "c"]}', "a list of 4 strings"),
    ('{"label": 1, "endings": ["a", "b", "c", "d"]}', "no context"),
    ('{"ctx": "A man <|endoftext|>", "label": 1, "endings": ["a", "b", "c", "d"]}', "example 1: Encountered"),
])
def test_prepro_bad_input_is_one_line(tmp_path, line, fragment):
    gpt2_encoding()
    good = open(SAMPLE, encoding="utf-8").readline()
    (tmp_path / "in.jsonl").write_text(good + line + "\n", encoding="utf-8")
    result = prepro("--input", str(tmp_path / "in.jsonl"), "--output-dir", str(tmp_path / "out"))
    assert_one_error_line(result, fragment)
    assert not (tmp_path / "out").exists()  # nothing written


def test_prepro_missing_input(tmp_path):
    result = prepro("--input", str(tmp_path / "none.jsonl"), "--output-dir", str(tmp_path / "out"))
    assert_one_error_line(result, "none.jsonl not found")


# ----------------------------------------------------------------------------
# the scoring, against PyTorch


def scored(model, batches):
    # {example index: its 4 mean losses} over all batches, and whether model.acts was let go of
    means = {}
    for batch, batch_means in hs.score_batches(tg, model, batches):
        assert model.acts is None  # no caches kept between batches
        means.update((example.index, m) for example, m in zip(batch, batch_means))
    return means


def expected_means():
    return {i: np.array(m) for i, m in enumerate(EXPECTED["mean_losses"]) if m is not None}


@pytest.mark.parametrize("positions", [hs.BATCH_POSITIONS, 1, 300, 10 ** 6])
def test_mean_losses_and_count_match_pytorch(positions):
    # each example's four means within float32 rounding of PyTorch's float64 (about 4e-7), and the
    # same count, however the examples are batched (one example a batch, a few, all at once)
    model = tg.gpt2_build_from_checkpoint(MODEL)
    batches, skipped = hs.plan_batches(hs.read_eval_file(EVAL, 777), 64, positions)
    assert skipped == EXPECTED["skipped"] == 2
    got, want = scored(model, batches), expected_means()
    assert sorted(got) == sorted(want)  # every example that fits, once; the two too wide left out
    assert max(np.abs(got[i] - want[i]).max() for i in want) < 2e-6
    labels = {e.index: e.label for e in hs.read_eval_file(EVAL, 777)}
    correct = sum(int(hs.predictions(got[i][None])[0]) == labels[i] for i in got)
    assert correct == EXPECTED["correct"] == 20


def test_evaluate_counts_and_frees_the_activations():
    model = tg.gpt2_build_from_checkpoint(MODEL)
    h = hs.HellaSwag(EVAL, 64, 777)
    assert (h.num_examples, h.skipped) == (38, 2)
    assert h.describe() == "HellaSwag: 38 examples in 4 batches; 2 skipped, longer than the model's context"
    assert h.evaluate(tg, model, SingleProcess()) == EXPECTED["correct"]
    assert model.acts is None


def test_the_first_of_equal_means_wins():
    # llm.c's evalloader_stat_losses keeps the first lowest mean (its comparison is a strict <)
    means = np.array([[2.0, 1.0, 1.0, 3.0], [0.5, 0.5, 0.5, 0.5], [4.0, 3.0, 2.0, 1.0]])
    assert hs.predictions(means).tolist() == [1, 0, 3]


def test_batches_pack_whole_examples_within_the_budget():
    examples = hs.read_eval_file(EVAL, 777)
    batches, _ = hs.plan_batches(examples, 64, 500)
    assert sorted(e.index for b in batches for e in b) == [e.index for e in examples if hs.width(e) <= 64]
    for batch in batches:
        inputs, targets, mask = hs.batch_arrays(batch)
        assert inputs.shape == targets.shape == mask.shape == (4 * len(batch), max(hs.width(e) for e in batch))
        assert inputs.size <= 500 or len(batch) == 1
        # row 4k+c: context + ending c, shifted by one; the mask covers the ending's targets
        example, c = batch[-1], 2
        row = np.concatenate([example.context, example.endings[c]])
        r = 4 * (len(batch) - 1) + c
        assert inputs[r, :len(row) - 1].tolist() == row[:-1].tolist()
        assert targets[r][mask[r]].tolist() == example.endings[c].tolist()


def test_progress_line(capsys):
    # a long evaluation says how far it is, on stderr (the scores go to stdout)
    model = tg.gpt2_build_from_checkpoint(MODEL)
    h = hs.HellaSwag(EVAL, 64, 777)
    h.batches, _ = hs.plan_batches(hs.read_eval_file(EVAL, 777), 64, 1)  # one example a batch: 38
    assert h.evaluate(tg, model, SingleProcess()) == EXPECTED["correct"]
    err = capsys.readouterr().err
    assert "\revaluating HellaSwag: batch 10/38" in err and "\revaluating HellaSwag: 38 batches in" in err


GPU, _why = usable_gpu()


@pytest.mark.skipif(not GPU, reason=f"needs CuPy and an NVIDIA GPU (--device cuda): {_why}")
@pytest.mark.parametrize("fused", [True, False])
def test_the_gpu_scores_as_the_cpu(fused):
    # the same layers on the GPU (TF32 off): the same means up to float32 rounding, the same count
    tg.use_device("cuda", tf32=False, fused=fused)
    try:
        model = tg.gpt2_build_from_checkpoint(MODEL)
        got, want = scored(model, hs.HellaSwag(EVAL, 64, 777).batches), expected_means()
        assert max(np.abs(got[i] - want[i]).max() for i in want) < 1e-5
        labels = {e.index: e.label for e in hs.read_eval_file(EVAL, 777)}
        assert sum(int(np.argmin(got[i])) == labels[i] for i in got) == EXPECTED["correct"]
    finally:
        tg.use_device("cpu")


# ----------------------------------------------------------------------------
# train_gpt2.py --hellaswag

LINE = "HellaSwag: 20/38 = 0.526316"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    return ["--train-data", write_tokens(tmp / "train.bin", rng.integers(0, 777, 3000)),
            "--val-data", write_tokens(tmp / "val.bin", rng.integers(0, 777, 500))]


def train(*args):
    return run("train_gpt2.py", "--checkpoint", MODEL, "--sample-every", "0", *args)


@pytest.mark.parametrize("bt", [["-b", "1", "-t", "8"], ["-b", "4", "-t", "64"]])
def test_steps_0_scores_once_whatever_b_and_t(tmp_path, data, bt):
    result = train(*data, "--steps", "0", "--hellaswag", EVAL, "--log", str(tmp_path / "main.log"), *bt)
    assert result.returncode == 0, result.stderr
    assert "HellaSwag: 38 examples in 4 batches; 2 skipped, longer than the model's context" in result.stdout
    assert result.stdout.count("HellaSwag: 20/") == 1 and LINE in result.stdout.splitlines()
    assert "s:0 eval:0.5263" in (tmp_path / "main.log").read_text().splitlines()


def test_training_scores_at_each_validation_after_step_0(tmp_path, data):
    # as llm.c: at steps 2 and 4 (validation every 2, not at step 0) and at the end; and the
    # evaluation changes nothing of the training
    args = [*data, "-b", "2", "-t", "16", "--steps", "5", "--val-every", "2", "--lr", "1e-3"]
    result = train(*args, "--hellaswag", EVAL, "--log", str(tmp_path / "main.log"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    scores = [i for i, line in enumerate(lines) if line.startswith("HellaSwag: ") and "=" in line]
    assert [lines[i + 1].split(":")[0] for i in scores[:2]] == ["step 2", "step 4"] and len(scores) == 3
    log = (tmp_path / "main.log").read_text()
    assert [line.split()[0] for line in log.splitlines() if " eval:" in line] == ["s:2", "s:4", "s:5"]
    plain = train(*args)
    # 4 validations and 5 steps, the same to the last digit
    assert losses(result.stdout) == losses(plain.stdout) and len(losses(plain.stdout)) == 9


def losses(stdout):
    return re.findall(r"^(?:val loss|step \d+: train loss) [\d.]+", stdout, re.M)


def damaged(tmp_path, change):
    # the fixture's bytes with one change, written to a file
    data = bytearray(open(EVAL, "rb").read())
    data = change(data) or data
    (tmp_path / "bad.bin").write_bytes(bytes(data))
    return str(tmp_path / "bad.bin")


def put_u16(offset, value):
    def change(data):
        data[offset:offset + 2] = int(value).to_bytes(2, "little")
    return change


def put_i32(index, value):
    def change(data):
        data[4 * index:4 * index + 4] = int(value).to_bytes(4, "little", signed=True)
    return change


FIRST = 1024  # example 0 starts right after the header: 65535, size, index, label, 4, ...
SECOND = 1024 + int.from_bytes(open(EVAL, "rb").read()[FIRST + 2:FIRST + 4], "little")


@pytest.mark.parametrize("change, fragment", [
    (lambda d: d[:-10], "truncated"),
    (lambda d: d[:SECOND + 4], "truncated: the header gives 40 examples, the file ends after 1"),
    (lambda d: d[:600], "too short for llm.c's eval file"),
    (lambda d: d + b"\x00\x00", "2 bytes after the last of the header's 40 examples"),
    (put_i32(0, 20240520), "bad magic 20240520, expected 20240522"),
    (put_i32(1, 2), "unsupported eval file version 2"),
    (put_i32(3, 100), "longest example as 100 bytes"),
    (put_u16(FIRST + 6, 4), "example 0 (at byte 1,024): label 4, expected 0 to 3"),
    (put_u16(FIRST + 8, 3), "example 0 (at byte 1,024): 3 completions, expected 4"),
    (put_u16(SECOND + 4, 2), "example 1 (at byte"),  # its index says 2
    (put_u16(SECOND, 12345), "corrupt (no start marker"),
    (put_u16(FIRST + 10, 0), "corrupt (an empty context"),
    (put_u16(FIRST + 12, 800), "a token id beyond the model's vocab_size 777"),
])
def test_a_bad_eval_file_is_one_error_line_before_training(tmp_path, data, change, fragment):
    path = damaged(tmp_path, change)
    result = train(*data, "-b", "2", "-t", "16", "--steps", "2", "--hellaswag", path)
    assert_one_error_line(result, path, fragment)
    assert "step 0" not in result.stdout and "val loss" not in result.stdout


def test_an_out_of_order_index_says_so(tmp_path, data):
    result = train(*data, "--steps", "0", "--hellaswag", damaged(tmp_path, put_u16(SECOND + 4, 2)))
    assert_one_error_line(result, "index 2 out of order (expected 1)")


def test_examples_all_too_long_is_an_error(tmp_path, data):
    # only the fixture's two examples that are one position too wide: nothing left to score
    examples = hs.read_eval_file(EVAL, 777)
    wide = [e for e in examples if hs.width(e) > 64]
    streams = []
    for i, e in enumerate(wide):
        s = [65535, 0, i, e.label, 4, len(e.context), *e.context]
        for ending in e.endings:
            s += [len(ending), *ending]
        s[1] = 2 * len(s)
        streams.append(s)
    header = np.zeros(256, dtype="<i4")
    header[:4] = [20240522, 1, len(streams), max(s[1] for s in streams)]
    (tmp_path / "wide.bin").write_bytes(header.tobytes() + np.array(sum(streams, []), dtype="<u2").tobytes())
    result = train(*data, "--steps", "0", "--hellaswag", str(tmp_path / "wide.bin"))
    assert_one_error_line(result, "every one of its 2 examples is longer than the model's context (64 positions)")


def test_missing_file(tmp_path, data):
    result = train(*data, "--steps", "0", "--hellaswag", str(tmp_path / "none.bin"))
    assert_one_error_line(result, "HellaSwag file", "none.bin not found", "prepro_hellaswag.py")
