"""The paired bootstrap (evaluation/significance.py) against intervals computed by hand, and the GSM8K answer
metric (evaluation/answers.py, ``answer_match`` in metrics.py) that GRPO's exact_match reward shares."""

import pytest

from lmforge.errors import LmforgeError
from lmforge.evaluation.metrics import DEFAULT_METRICS, answer_match, check_metrics, score_generations
from lmforge.evaluation.significance import paired_bootstrap


def test_paired_bootstrap_of_one_fixed_answer_in_four_by_hand():
    """before 0,0,0,0 / after 0,0,0,1: the difference d = (0,0,0,1), mean 1/4. A resample's mean is K/4 with
    K ~ Binomial(4, 1/4): P(K <= 0) = 81/256 = 0.316 > 0.025, so the 2.5% quantile is 0; P(K <= 2) = 243/256 =
    0.949 < 0.975 <= P(K <= 3) = 255/256, so the 97.5% quantile is 3/4. The interval is [0, 0.75]."""
    r = paired_bootstrap([0, 0, 0, 0], [0, 0, 0, 1], resamples=10_000, seed=0)
    assert (r.n, r.before, r.after, r.diff) == (4, 0.0, 0.25, 0.25)
    assert (r.low, r.high) == (0.0, 0.75)
    other = paired_bootstrap([0, 0, 0, 0], [0, 0, 0, 1], seed=7)  # the quantiles sit well inside the steps
    assert (other.low, other.high) == (0.0, 0.75)


def test_paired_bootstrap_pairs_the_examples():
    """Pairing matters: after = before on every example gives a zero-width interval at 0, although the two
    accuracies alone vary across resamples; three of three fixed gives [1, 1]; swapping before/after negates."""
    same = paired_bootstrap([1, 0, 1, 0, 1], [1, 0, 1, 0, 1])
    assert (same.diff, same.low, same.high) == (0.0, 0.0, 0.0)
    assert (paired_bootstrap([0, 0, 0], [1, 1, 1]).low, paired_bootstrap([0, 0, 0], [1, 1, 1]).high) == (1.0, 1.0)
    a = paired_bootstrap([0, 1, 0, 0, 1, 0], [1, 1, 0, 1, 0, 1], seed=3)
    b = paired_bootstrap([1, 1, 0, 1, 0, 1], [0, 1, 0, 0, 1, 0], seed=3)
    assert a.diff == pytest.approx(1 / 3) and (b.low, b.high) == pytest.approx((-a.high, -a.low))
    assert a == paired_bootstrap([0, 1, 0, 0, 1, 0], [1, 1, 0, 1, 0, 1], seed=3)  # seeded: reproducible


@pytest.mark.parametrize("before, after, kwargs, message", [
    ([1, 0], [1], {}, "2 scores before but 1 after"),
    ([], [], {}, "no examples"),
    ([1.0], [float("nan")], {}, "finite"),
    ([1], [0], {"level": 1.0}, "level must be in (0, 1)"),
    ([1], [0], {"resamples": 0}, "resamples must be >= 1"),
])
def test_paired_bootstrap_bad_input(before, after, kwargs, message):
    with pytest.raises(LmforgeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        paired_bootstrap(before, after, **kwargs)


def test_answer_match_compares_the_final_answers_as_grpo_does():
    from lmforge.alignment.grpo import load_rewards, score

    predictions = ["48 / 2 = 24, 48 + 24 = 72\n#### 72", "#### 1,000.00", "the answer is 72", "#### 71"]
    references = ["Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", "1000", "72", "#### 72"]
    value, per = answer_match(predictions, references)
    assert per == [1.0, 1.0, 0.0, 0.0] and value == 0.5  # no '####' in the third: 0, as GRPO's reward
    rewards = load_rewards(["exact_match"], None)
    answers = ["72", "1000", "72", "72"]
    reward, _ = score(rewards, ["q"] * 4, predictions, answers, step=1)
    assert reward.tolist() == per
    corpus, rows = score_generations(predictions, references, ["answer_match", "exact_match"])
    assert corpus["answer_match"] == 0.5 and corpus["exact_match"] == 0.0 and rows[1]["answer_match"] == 1.0
    assert "answer_match" in check_metrics(["answer_match"]) and "answer_match" not in DEFAULT_METRICS
