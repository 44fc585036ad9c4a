"""--init dN draws llm.c's -e dN weights (train_gpt2.cu, gpt_build_from_descriptor): mt19937 seeded 42,
rand.h's normal_, the tensors in llm.c's order. The values pinned here are what llm.c's own rand.h gave
(compiled with gcc, glibc's logf/sinf/cosf): ours agree within a few float32 ulps."""

import numpy as np

import train_gpt2 as tg
from llmc import rand


def test_d6_is_llmcs():
    model = tg.gpt2_build_from_random("d6")
    p, c = model.params, model.config
    close = dict(rtol=1e-6, atol=0)
    # wte is drawn first (its V rows), then wpe, then per layer qkvw, attprojw, fcw, fcprojw
    np.testing.assert_allclose(p["wte"][0, :4], [0.0385383, 0.029745683, 0.018014343, -0.04211043], **close)
    np.testing.assert_allclose(p["wte"][50256, -3:], [0.017192258, -0.030286126, -0.019178359], **close)
    np.testing.assert_allclose(p["wpe"][1023, -2:], [-0.007625827, 0.003208264], **close)
    np.testing.assert_allclose(p["qkvw"][0, 0, :3], [-0.02360738, 0.008090737, -0.01592615], **close)
    # the projections into the residual stream: 0.02 / sqrt(2L)
    np.testing.assert_allclose(p["attprojw"][3, 5, :3], [0.0080160955, 0.004214682, 0.005725169], **close)
    np.testing.assert_allclose(p["fcprojw"][5, -1, -3:], [-0.003853908, -0.0057314867, 0.005199362], **close)
    assert np.all(p["wte"][c.vocab_size:] == 0) and np.all(p["qkvb"] == 0) and np.all(p["lnfb"] == 0)
    assert np.all(p["ln1w"] == 1) and np.all(p["ln2w"] == 1) and np.all(p["lnfw"] == 1)


def test_init_is_deterministic_and_seeded():
    # the same weights every time (--seed is the sampler's alone); another seed, other weights
    a, b = tg.gpt2_build_from_random("d6"), tg.gpt2_build_from_random("d6")
    assert np.array_equal(a.params_memory, b.params_memory)
    assert not np.array_equal(a.params["qkvw"], tg.gpt2_build_from_random("d6", seed=1).params["qkvw"])


def test_layer_order():
    # layer 1's qkvw follows layer 0's fcprojw in the stream: drawn by hand, it is the same
    model = tg.gpt2_build_from_random("d6")
    p, c = model.params, model.config
    g = rand.manual_seed(42)
    skip = np.zeros(c.vocab_size * c.channels + p["wpe"].size + sum(p[n][0].size for n in ("qkvw", "attprojw", "fcw", "fcprojw")),
                    np.float32)
    g.random_raw(skip.size)  # every tensor before it is a multiple of 16 floats: no redraws
    qkvw1 = np.zeros_like(p["qkvw"][1])
    rand.normal_(qkvw1, 0.0, 0.02, g)
    np.testing.assert_array_equal(p["qkvw"][1], qkvw1)
