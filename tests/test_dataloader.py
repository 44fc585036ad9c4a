"""llm.c's sharded, shuffled data loader (llmc/dataloader.py): its random numbers, batches across
shards and epochs, its position in the run state, the shard checks, and a shuffled run resumed."""

import os
import subprocess
import sys

import numpy as np
import pytest

import train_gpt2 as tg
from llmc import rand
from llmc.dataloader import ShardedDataLoader
from helpers import MODEL, ROOT, assert_one_error_line, run, write_tokens

# MODEL is the tiny fixture: V = 777, maxT = 64


def test_mt19937_is_llmcs_randint32():
    # llm.c's manual_seed(42), then randint32 (the values the issue checked against llm.c)
    assert rand.randint32(rand.manual_seed(42), 3).tolist() == [1608637542, 3421126067, 4083286876]
    # llmc/rand.h's own example, seed 137 (numerically identical to torch)
    assert rand.randint32(rand.manual_seed(137), 5).tolist() == [4053805790, 2173880614, 380293709,
                                                                  1237255315, 2986595568]


def test_random_permutation_by_hand():
    # Fisher-Yates from the end, j = randint32 % (i + 1), with the three draws above:
    # i=3: 1608637542 % 4 = 2, swap 3<->2: [0,1,3,2]; i=2: 3421126067 % 3 = 2, no swap;
    # i=1: 4083286876 % 2 = 0, swap 1<->0: [1,0,3,2]
    assert rand.random_permutation(list(range(4)), rand.manual_seed(42)) == [1, 0, 3, 2]


def test_normal_matches_rand_h():
    # llmc/rand.h's example (seed 137): 5 randint32, normal_ of 8 (the path for fewer than 16),
    # one randint32, normal_ of 16 (Box-Muller over 16), one randint32
    g = rand.manual_seed(137)
    rand.randint32(g, 5)
    t8 = np.zeros(8, np.float32)
    rand.normal_(t8, 0.0, 1.0, g)
    np.testing.assert_allclose(t8, [0.7947664260864258, 1.4369317293167114, -0.2292192131280899,
                                    0.47556325793266296, -0.6334410905838013, -0.5791953802108765,
                                    -0.0925704762339592, -0.8659197092056274], rtol=1e-6)
    assert rand.randint32(g, 1).tolist() == [2186503452]
    t16 = np.zeros(16, np.float32)
    rand.normal_(t16, 0.0, 1.0, g)
    np.testing.assert_allclose(t16[[0, 1, 6, 7, 15]], [-1.2813878059387207, -2.646395683288574,
                                                       2.5485482215881348, 0.10425379872322083,
                                                       0.3961987793445587], rtol=1e-6)
    assert rand.randint32(g, 1).tolist() == [2756748748]


def test_normal_redraws_the_tail():
    # 17 values: 17 uniforms drawn, the first 16 made normal, then 16 fresh uniforms replace the
    # last 16 (so 33 draws in all, and value 0 from the first 16)
    out = np.zeros(17, np.float32)
    rand.normal_(out, 0.0, 1.0, rand.manual_seed(7))
    u = rand.randfloat32(rand.manual_seed(7), 33)
    first, tail = rand.box_muller_16(u[None, :16], 0, 1)[0], rand.box_muller_16(u[None, 17:], 0, 1)[0]
    np.testing.assert_array_equal(out, np.concatenate([first[:1], tail]))


def shards(tmp_path, sizes, start=0):
    # shards whose tokens are their positions in the concatenation: a batch says where it came from
    paths = []
    for k, n in enumerate(sizes):
        paths.append(write_tokens(tmp_path / f"shard_{k:03d}.bin", np.arange(start, start + n)))
        start += n
    return str(tmp_path / "shard_*.bin")


def first_tokens(loader, n):
    return [int(loader.next_batch()[0][0, 0]) for _ in range(n)]


def test_batches_cross_shards_in_order(tmp_path):
    # B=1, T=4: shard 0 (10 tokens) has (10-1)//4 = 2 samples, shard 1 (13 tokens) 3; then epoch 2
    loader = ShardedDataLoader(shards(tmp_path, [10, 13]), 1, 4, 777)
    assert loader.num_batches == 5
    inputs, targets = loader.next_batch()
    assert inputs.tolist() == [[0, 1, 2, 3]] and targets.tolist() == [[1, 2, 3, 4]]
    assert first_tokens(loader, 6) == [4, 10, 14, 18, 0, 4]


def test_shuffled_order_is_llmcs(tmp_path):
    # the order llm.c's dataloader.h gives, worked out from the raw draws of mt19937(42): at each
    # epoch the shard order is permuted (in place), then each shard's samples as it is loaded
    sizes = [10, 13, 9]  # 2, 3 and 2 samples at B=1, T=4
    loader = ShardedDataLoader(shards(tmp_path, sizes), 1, 4, 777, shuffle=True)
    draws = iter(rand.randint32(rand.manual_seed(42), 100).tolist())

    def permute(items):  # Fisher-Yates as rand.h writes it, on the draws in order
        for i in range(len(items) - 1, 0, -1):
            j = next(draws) % (i + 1)
            items[i], items[j] = items[j], items[i]
        return items

    starts, samples, expected, order = [0, 10, 23], [2, 3, 2], [], [0, 1, 2]
    for _ in range(3):  # epochs
        order = permute(order)
        for shard in order:
            expected += [starts[shard] + 4 * s for s in permute(list(range(samples[shard])))]
    assert first_tokens(loader, len(expected)) == expected
    assert sorted(expected[:7]) == [0, 4, 10, 14, 18, 23, 27]  # every sample once per epoch


def test_processes_read_one_global_batch(tmp_path):
    # 2 processes with -b 1 read the rows that one process with -b 2 reads, shuffled too
    pattern = shards(tmp_path, [40, 50])
    one = ShardedDataLoader(pattern, 2, 4, 777, shuffle=True)
    two = [ShardedDataLoader(pattern, 1, 4, 777, rank, 2, shuffle=True) for rank in range(2)]
    for _ in range(25):
        rows = one.next_batch()[0]
        assert [p.next_batch()[0][0].tolist() for p in two] == rows.tolist()


@pytest.mark.parametrize("shuffle", [False, True])
def test_position_restores_exactly(tmp_path, shuffle):
    # after any number of batches (mid-shard, at a shard's end, past an epoch), a new loader given
    # the position continues with exactly the batches the first would have given
    pattern = shards(tmp_path, [10, 13, 9])
    for done in (0, 2, 5, 7, 9, 16):
        loader = ShardedDataLoader(pattern, 1, 4, 777, shuffle=shuffle)
        first_tokens(loader, done)
        position = loader.position()
        expected = first_tokens(loader, 20)
        again = ShardedDataLoader(pattern, 1, 4, 777, shuffle=shuffle)
        again.restore(position, "state")
        assert first_tokens(again, 20) == expected, done


def test_position_of_another_run_is_refused(tmp_path):
    loader = ShardedDataLoader(shards(tmp_path, [10, 13, 9]), 1, 4, 777, shuffle=True)
    position = loader.position()
    with pytest.raises(tg.InputError, match="was shuffled: resume it with --shuffle"):
        ShardedDataLoader(str(tmp_path / "shard_*.bin"), 1, 4, 777).restore(position, "state")
    with pytest.raises(tg.InputError, match="read 3 training shards"):
        ShardedDataLoader(str(tmp_path / "shard_00[01].bin"), 1, 4, 777, shuffle=True).restore(position, "state")


def test_bad_shards(tmp_path):
    pattern = shards(tmp_path, [10, 13])
    with pytest.raises(tg.InputError, match="no files match"):
        ShardedDataLoader(str(tmp_path / "none_*.bin"), 1, 4, 777)
    write_tokens(tmp_path / "shard_002.bin", [1, 2, 3])  # fewer than B*T+1 tokens
    with pytest.raises(tg.InputError, match="shard_002.bin: has 3 tokens"):
        ShardedDataLoader(pattern, 1, 4, 777)
    write_tokens(tmp_path / "shard_002.bin", [1, 2, 3, 4, 5, 800])  # an id the model doesn't have
    with pytest.raises(tg.InputError, match="shard_002.bin: has token ids up to 800"):
        ShardedDataLoader(pattern, 1, 4, 777)
    (tmp_path / "shard_002.bin").write_bytes(b"\xff" * 1200)  # no magic, nor old-style token ids
    with pytest.raises(tg.InputError, match="shard_002.bin: not an llm.c token file"):
        ShardedDataLoader(pattern, 1, 4, 777)


def test_trainer_errors(tmp_path):
    result = run("train_gpt2.py", "--checkpoint", MODEL, "--train-data", str(tmp_path / "x_*.bin"), "-t", "4",
                 "--shuffle", cwd=tmp_path)
    assert_one_error_line(result, "--train-data", "x_*.bin: no files match")


def train(tmp_path, pattern, *args):
    cmd = [sys.executable, os.path.join(ROOT, "train_gpt2.py"), "--checkpoint", MODEL, "--train-data", pattern,
           "--val-data", pattern, "-b", "2", "-t", "8", "--lr", "1e-3", "--val-every", "0", "--sample-every", "0",
           *args]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return [line.split(" (took")[0] for line in result.stdout.splitlines() if line.startswith("step ")]


def test_shuffled_sharded_run_resumes_exactly(tmp_path):
    # 3 shards of 3, 2 and 2 samples at -b 2 -t 8: 7 steps an epoch; stopped after 5 and 9 steps
    # (mid-shard, then in the second epoch) and resumed, every loss as in one unbroken run
    rng = np.random.default_rng(0)
    for k, n in enumerate([50, 40, 33]):
        write_tokens(tmp_path / f"tok_{k}.bin", (np.arange(n) * 7 + rng.integers(0, 3, n)) % 777)
    pattern = str(tmp_path / "tok_*.bin")
    full = train(tmp_path, pattern, "--shuffle", "--steps", "16")
    out = str(tmp_path / "run")
    part = train(tmp_path, pattern, "--shuffle", "--steps", "5", "--output-dir", out)
    part += train(tmp_path, pattern, "--shuffle", "--steps", "9", "--resume", out)
    part += train(tmp_path, pattern, "--shuffle", "--steps", "16", "--resume", out)
    assert part == full
    unshuffled = train(tmp_path, pattern, "--steps", "16")
    assert len(full) == 16 and unshuffled != full  # (the order shows in the losses)
