"""The inputs and faults real users and clusters produce (issue 23): each gets one line and an exit
status, and nothing is lost or left half-written."""

import numpy as np
import pytest

import train_gpt2 as tg
from llmc import cli
from llmc.utils import InputError
from helpers import MODEL, STATE, STATE_MAGIC, assert_one_error_line, header, run


# 1. numeric options: finite and in range, before any work

@pytest.mark.parametrize("option, value", [
    ("--lr", "nan"), ("--lr", "inf"), ("--lr", "-1e-4"), ("--weight-decay", "nan"), ("--weight-decay", "-0.1"),
    ("--grad-clip", "nan"), ("--grad-clip", "inf"), ("--temperature", "nan"), ("--temperature", "inf"),
    ("--lr-min-frac", "nan"), ("--seed", "0"), ("--seed", "-1"), ("--seed", str(2**64)),
])
def test_nonsense_numbers_are_refused(option, value):
    with pytest.raises(InputError, match=option):
        cli.parse_args(tg.DEPTHS, ["--init", "d6", option, value])


def test_the_largest_seed_is_taken():
    assert cli.parse_args(tg.DEPTHS, ["--seed", str(2**64 - 1)]).seed == 2**64 - 1


def test_a_nan_learning_rate_is_one_line_from_the_command_line(tmp_path):
    result = run("train_gpt2.py", "--checkpoint", MODEL, "--lr", "nan", "--output", str(tmp_path / "m.bin"))
    assert_one_error_line(result, "--lr must be a finite number")
    assert not (tmp_path / "m.bin").exists()


def test_a_tiny_temperature_is_greedy_sampling():
    logits = np.array([0.5, 3.0, 2.999, -1.0], dtype=np.float32)
    for seed in (1, 2, 3):
        assert tg.sample_token(logits, 4, [seed], temperature=1e-40) == 1
        assert tg.sample_token(logits, 4, [seed], temperature=1e-40) == tg.sample_token(logits, 4, [seed], top_k=1)


# 8. test_gpt2.py: a debug state that does not fit its checkpoint, expected losses of the wrong kind

def test_a_debug_state_longer_than_the_context_is_one_line(tmp_path):
    config = tg.read_checkpoint_config(MODEL)
    B, T, V, n = 1, config.max_seq_len + 1, config.vocab_size, tg.num_parameters(config)
    state = tmp_path / "state.bin"
    state.write_bytes(header(STATE_MAGIC, 2, B, T) + np.zeros(2 * B * T + B * T * V + 1 + n, "<i4").tobytes())
    result = run("test_gpt2.py", "--checkpoint", MODEL, "--state", str(state))
    assert_one_error_line(result, f"T={T}", "max_seq_len 64")


@pytest.mark.parametrize("losses", ["[true, 1, 1, 1, 1, 1, 1, 1, 1, 1]", "[NaN, 1, 1, 1, 1, 1, 1, 1, 1, 1]",
                                    "[1, 1, 1, 1, 1, 1, 1, 1, 1, Infinity]", '"0123456789"'])
def test_expected_losses_of_the_wrong_kind_are_one_line(tmp_path, losses):
    path = tmp_path / "losses.json"
    path.write_text('{"losses": %s}' % losses)
    result = run("test_gpt2.py", "--checkpoint", MODEL, "--state", STATE, "--expected-losses", str(path))
    assert_one_error_line(result, "10 finite numbers")


# 11. resume folders: only the names this trainer writes count

def test_resume_ignores_look_alikes(tmp_path):
    from llmc.formats import latest_checkpoint
    for name in ("model_3.bin", "state_3.bin", "model_7.bin", "state_007.bin", "model_².bin", "state_².bin",
                 "model_9.bin", "state_9.bin.tmp.12", "model_10.bin", "model_11.bin"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "state_10.bin").mkdir()  # a folder is not a run state
    (tmp_path / "state_11.bin").symlink_to(tmp_path / "missing")  # nor a dangling link
    assert latest_checkpoint(str(tmp_path)) == 3


def test_a_folder_of_look_alikes_is_one_line(tmp_path):
    for name in ("model_².bin", "state_².bin", "model_01.bin", "state_01.bin"):
        (tmp_path / name).write_bytes(b"")
    result = run("train_gpt2.py", "--resume", str(tmp_path), "--steps", "2")
    assert_one_error_line(result, "no model_<step>.bin with its state_<step>.bin")
