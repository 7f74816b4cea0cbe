"""Sampling cannot raise on accepted input: the accepted ranges, the fallbacks in ``sample_next``, the
CLI's one-line errors, and generation leaving the caller's flush-denormal flag as it found it."""

import pytest
import torch

from lmforge.cli import main
from lmforge.errors import LmforgeError
from lmforge.generation.generate import flush_denormal_enabled, generate_tokens
from lmforge.generation.sampling import SamplingParams, check_seed, sample_next, top_p_filter

# Values the old checks accepted and sampling then failed on (inf / NaN probabilities, a seed torch refuses).
POISON = [dict(temperature=1e-300), dict(temperature=1.0, top_p=1e-300),
          dict(temperature=1.0, repetition_penalty=1e-300), dict(temperature=float("nan")),
          dict(temperature=float("inf")), dict(repetition_penalty=1e300)]


@pytest.fixture(scope="module")
def model():
    from lmforge.config import preset
    from lmforge.models.decoder import DecoderLM

    return DecoderLM(preset("tiny-llama", vocab_size=64, max_seq_len=64)).init_weights(seed=0, std=0.2).eval()


@pytest.mark.parametrize("bad", POISON)
def test_sampling_params_refuse_values_whose_float32_arithmetic_breaks(bad):
    with pytest.raises(LmforgeError, match=list(bad)[-1] + " must be"):
        SamplingParams(**bad)


def test_seeds_are_integers_in_0_to_2_pow_63(model):
    check_seed(None)
    check_seed(2**63 - 1)
    for bad in (2**63, 2**64, -1, 1.5, True):
        with pytest.raises(LmforgeError, match=r"seed must be an integer in \[0, 2\*\*63\)"):
            check_seed(bad)
    with pytest.raises(LmforgeError, match="seed must be"):
        list(generate_tokens(model, [[1, 2, 3]], 2, SamplingParams(temperature=1.0), seed=2**63))
    assert len(list(generate_tokens(model, [[1, 2, 3]], 2, SamplingParams(temperature=1.0), seed=2**63 - 1))) == 2


def test_edges_of_the_accepted_ranges_sample_finite_tokens():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50) * 30
    seen = torch.rand(3, 50) < 0.5
    for params in (SamplingParams(temperature=0.01), SamplingParams(temperature=1.0, top_p=1e-6),
                   SamplingParams(temperature=0.01, repetition_penalty=0.01),
                   SamplingParams(temperature=1.0, repetition_penalty=100.0, top_k=1)):
        toks = sample_next(logits, params, seen, gen)
        assert toks.shape == (3,) and bool(((toks >= 0) & (toks < 50)).all())


def test_sample_next_falls_back_to_the_best_token_instead_of_raising():
    gen = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.0, 5.0, 1.0], [float("nan")] * 3, [float("-inf")] * 3, [1.0, float("nan"), 2.0]])
    toks = sample_next(logits, SamplingParams(temperature=1.0), generator=gen)
    assert toks.tolist()[2] in (0, 1, 2) and toks.tolist()[3] == 2
    # top_p that rounds to 0 in float32 still keeps the most likely token (greedy)
    assert torch.isfinite(top_p_filter(torch.tensor([[0.0, 3.0, 1.0]]), 1e-300)).tolist() == [[False, True, False]]


@pytest.mark.parametrize("flags", [["-t", "1e-300"], ["-t", "1", "--top-p", "1e-300"],
                                   ["-t", "1", "--repetition-penalty", "1e-300"], ["-t", "1", "--seed", str(2**63)],
                                   ["-t", "nan"], ["--seed", "-1"]])
def test_cli_generate_refuses_poison_values_in_one_line(tiny_lm_dirs, capsys, flags):
    assert main(["generate", "hello", "-m", str(tiny_lm_dirs["plain"]), "-n", "3", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert flags[-2].lstrip("-").split("-")[0] in err  # names the flag


def test_cli_generate_accepts_the_edges(tiny_lm_dirs, capsys):
    assert main(["generate", "hello", "-m", str(tiny_lm_dirs["plain"]), "-n", "3", "-t", "0.01", "--top-p", "1e-6",
                 "--repetition-penalty", "100", "--seed", str(2**63 - 1)]) == 0


@pytest.mark.parametrize("before", [False, True])
def test_generation_restores_flush_denormal_and_never_holds_it_across_a_yield(model, before):
    torch.set_flush_denormal(before)
    try:
        steps = generate_tokens(model, [[1, 2, 3]], 8, SamplingParams(temperature=1.0), seed=1)
        next(steps)
        assert flush_denormal_enabled() is before, "the flag leaked out of a suspended stream"
        next(steps)
        steps.close()
        assert flush_denormal_enabled() is before
        assert len(list(generate_tokens(model, [[4, 5]], 4))) == 4
        assert flush_denormal_enabled() is before, "the flag was not restored after generation"
    finally:
        torch.set_flush_denormal(False)
