"""Metrics equal the reference implementations called directly; bad input names the problem."""

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from lmforge.errors import LmforgeError
from lmforge.evaluation import metrics as M

PREDS = ["The cat sat on the mat.", "#Person1# asks for help\nand #Person2# agrees.", "running dogs ran", ""]
REFS = ["A cat was sitting on the mat.", "#Person2# agrees to help #Person1#.\nThey leave.", "the dog runs", "empty"]


def test_rouge_equals_rouge_score():
    corpus, per = M.rouge(PREDS, REFS)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    direct = [scorer.score(r, p) for p, r in zip(PREDS, REFS)]
    for t in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        assert [d[t] for d in per] == [x[t].fmeasure for x in direct]
        assert corpus[t] == pytest.approx(sum(x[t].fmeasure for x in direct) / len(direct), abs=1e-15)
    assert corpus["rouge1"] > 0.3  # "running dogs ran" / "the dog runs" only match with stemming


def test_bleu_chrf_equal_sacrebleu():
    b, b_per = M.bleu(PREDS, REFS)
    c, c_per = M.chrf(PREDS, REFS)
    assert b == sacrebleu.corpus_bleu(PREDS, [REFS]).score
    assert c == sacrebleu.corpus_chrf(PREDS, [REFS]).score
    assert b_per == [sacrebleu.sentence_bleu(p, [r]).score for p, r in zip(PREDS, REFS)]
    assert c_per == [sacrebleu.sentence_chrf(p, [r]).score for p, r in zip(PREDS, REFS)]


def test_exact_match_and_score_generations():
    em, per = M.exact_match([" Paris ", "paris", "Lyon"], ["Paris", "Paris", "Lyon"])
    assert per == [1.0, 0.0, 1.0] and em == pytest.approx(2 / 3)
    corpus, rows = M.score_generations(PREDS, REFS, ["rougeL", "bleu", "exact_match"])
    assert set(corpus) == {"rougeL", "bleu", "exact_match"}
    assert corpus["bleu"] == sacrebleu.corpus_bleu(PREDS, [REFS]).score
    assert rows[0].keys() == {"rougeL", "bleu", "exact_match"}


def test_toxicity_uses_profanity_check_and_a_pluggable_scorer():
    from profanity_check import predict_prob

    texts = ["Have a lovely day, friend.", "you are a fucking idiot", "thanks for the help"]
    values, probs = M.toxicity(texts)
    assert probs == [float(p) for p in predict_prob(texts)]
    assert values["toxicity_rate"] == sum(p > 0.5 for p in probs) / 3
    assert values["toxicity_rate"] == pytest.approx(1 / 3)  # only the insult

    values, probs = M.toxicity(texts, scorer=lambda ts: [0.9 if "idiot" in t else 0.1 for t in ts])
    assert probs == [0.1, 0.9, 0.1] and values["toxicity_mean"] == pytest.approx(1.1 / 3)
    M.register_toxicity_scorer("always-clean", lambda ts: [0.0] * len(ts))
    assert M.toxicity(texts, "always-clean")[0]["toxicity_rate"] == 0.0
    assert M.resolve_toxicity_scorer("lmforge.evaluation.metrics:profanity_check_scorer") is M.profanity_check_scorer


@pytest.mark.parametrize("scorer, message", [
    (lambda ts: [0.1], "returned 1 scores for 2 texts"),
    (lambda ts: [2.0, 0.1], "probabilities in [0, 1]"),
    ("no-such-scorer", "unknown toxicity scorer 'no-such-scorer'"),
    ("lmforge.nothing_here:fn", "cannot be imported"),
])
def test_toxicity_bad_scorer(scorer, message):
    with pytest.raises(LmforgeError, match=message.replace("[", r"\[").replace("]", r"\]")):
        M.toxicity(["a", "b"], scorer)


def test_count_mismatch_is_an_error():
    with pytest.raises(LmforgeError, match="3 predictions but 2 references"):
        M.score_generations(["a", "b", "c"], ["a", "b"], ["rouge1"])
    with pytest.raises(LmforgeError, match="2 predictions but 1 references"):
        M.bleu(["a", "b"], ["a"])


def test_unknown_metric_lists_the_known_ones():
    with pytest.raises(LmforgeError) as e:
        M.score_generations(["a"], ["a"], ["rouge1", "meteor"])
    assert "unknown metric 'meteor'" in str(e.value)
    assert all(name in str(e.value) for name in M.KNOWN_METRICS)
    assert M.check_metrics("rouge1, bleu") == ["rouge1", "bleu"]


def test_nothing_to_score_and_missing_references():
    with pytest.raises(LmforgeError, match="no predictions"):
        M.score_generations([], [], ["rouge1"])
    with pytest.raises(LmforgeError, match="need references"):
        M.score_generations(["a"], None, ["rouge1"])
    with pytest.raises(LmforgeError, match="must be a string"):
        M.rouge(["a", None], ["a", "b"])
