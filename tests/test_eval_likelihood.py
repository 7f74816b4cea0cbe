"""Perplexity and multiple-choice log-likelihoods against transformers on the same tiny weights."""

import math

import pytest
import torch

import lmforge
from lmforge.errors import LmforgeError
from lmforge.evaluation.likelihood import choice_logprobs, perplexity, windows

TEXTS = ["The quick brown fox jumps over the lazy dog. What is the capital of France? Paris.",
         "one two three four five six seven"]


@pytest.fixture(scope="module")
def pair(tiny_lm_dirs):
    """(lmforge LM, transformers model) on the tiny plain Llama."""
    import transformers

    d = tiny_lm_dirs["plain"]
    return lmforge.load(d), transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()


def _hf_token_logprobs(hf, ids):
    """log p(ids[t] | ids[:t]) for t = 1..len-1 from transformers."""
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_perplexity_is_exp_mean_nll_like_transformers_loss(pair):
    lm, hf = pair
    ids = [lm.tokenizer.encode(t) for t in TEXTS]
    for one in ids:
        with torch.no_grad():
            loss = hf(torch.tensor([one]), labels=torch.tensor([one])).loss
        assert perplexity(lm.model, [one]).value == pytest.approx(math.exp(loss.item()), rel=1e-4)
    # Over several texts: exp of the mean NLL over all their predicted tokens.
    total = sum(-_hf_token_logprobs(hf, one).sum().item() for one in ids)
    count = sum(len(one) - 1 for one in ids)
    result = perplexity(lm.model, ids, batch_size=2)  # right-padded batch
    assert result.tokens == count
    assert result.value == pytest.approx(math.exp(total / count), rel=1e-4)


def test_sliding_window_matches_transformers_strided_loop(pair):
    """The strided evaluation of transformers' 'perplexity of fixed-length models' guide."""
    lm, hf = pair
    ids = lm.tokenizer.encode(" ".join(TEXTS * 3))
    window, stride = 24, 10
    assert len(ids) > 3 * window
    nll, prev_end = 0.0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        trg_len = end - prev_end
        chunk = torch.tensor([ids[begin:end]])
        labels = chunk.clone()
        labels[:, :-trg_len] = -100
        with torch.no_grad():
            out = hf(chunk, labels=labels)
        n_valid = int((labels[:, 1:] != -100).sum())
        nll += out.loss.item() * n_valid
        prev_end = end
        if end == len(ids):
            break
    result = perplexity(lm.model, [ids], window=window, stride=stride, batch_size=4)
    assert result.tokens == len(ids) - 1
    assert result.nll == pytest.approx(nll, rel=1e-4)
    # Every token is scored once, windows never exceed the window size.
    ws = windows(len(ids), window, stride)
    assert sum(e - f for _, e, f in ws) == len(ids) - 1 and all(e - b <= window for b, e, _ in ws)


def test_multiple_choice_matches_transformers_loglikelihoods(pair):
    lm, hf = pair
    tok = lm.tokenizer
    context = tok.encode("Input: sea otter\nOutput:")
    options = [" loutre de mer", " the lazy dog", " Paris", " one two three four"]
    choice_ids = [tok.encode(o, add_special_tokens=False) for o in options]
    (scores,) = choice_logprobs(lm.model, [context], [choice_ids], batch_size=3)
    expected = [_hf_token_logprobs(hf, context + c)[len(context) - 1:].sum().item() for c in choice_ids]
    assert scores.logprob == pytest.approx(expected, rel=1e-4, abs=1e-4)
    assert scores.best == max(range(4), key=expected.__getitem__)
    norm = [e / len(c) for e, c in zip(expected, choice_ids)]
    assert scores.normalized == pytest.approx(norm, rel=1e-4, abs=1e-4)
    assert scores.best_normalized == max(range(4), key=norm.__getitem__)


def test_multiple_choice_on_a_uniform_model_picks_the_shortest_choice(tiny_lm_dirs):
    """Hand-built case: zero output weights make every token equally likely (log p = -log V), so the
    summed log-likelihood prefers the choice with fewest tokens and the normalised scores all tie."""
    lm = lmforge.load(tiny_lm_dirs["plain"])
    with torch.no_grad():
        lm.model.lm_head.weight.zero_()
    V = lm.model.lm_head.weight.shape[0]
    tok = lm.tokenizer
    choices = [tok.encode(t, add_special_tokens=False) for t in (" one two three", " Paris", " the lazy dog")]
    (scores,) = choice_logprobs(lm.model, [tok.encode("Question:")], [choices])
    assert scores.best == 1
    assert scores.logprob == pytest.approx([-len(c) * math.log(V) for c in choices], rel=1e-5)
    assert scores.normalized == pytest.approx([-math.log(V)] * 3, rel=1e-5)


def test_bad_likelihood_input(pair):
    lm, _ = pair
    with pytest.raises(LmforgeError, match="at least 2"):
        perplexity(lm.model, [[5]])
    with pytest.raises(LmforgeError, match="stride must be"):
        perplexity(lm.model, [[5, 6, 7]], window=4, stride=4)
    with pytest.raises(LmforgeError, match="longer than the model's context"):
        perplexity(lm.model, [[5, 6, 7]], window=10_000)
    with pytest.raises(LmforgeError, match="choice 1 is empty"):
        choice_logprobs(lm.model, [[5, 6]], [[[7], []]])
    with pytest.raises(LmforgeError, match="longer than the model's context"):
        choice_logprobs(lm.model, [[5] * 127], [[[7], [8, 9]]])
