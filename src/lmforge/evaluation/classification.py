"""Metrics of a classifier's (or a reward model's) scores: accuracy, balanced accuracy, ROC AUC and
calibration (expected calibration error with a reliability table).

Small pure functions on Python lists, checked against scikit-learn in the tests:

- balanced accuracy: the mean recall over the classes present in ``y_true`` (sklearn's
  ``balanced_accuracy_score``).
- ROC AUC: the probability that a random positive scores above a random negative, ties counting
  one half (the Mann-Whitney U statistic / (n_pos * n_neg); Hanley & McNeil 1982).
- ECE (Guo et al. 2017, "On Calibration of Modern Neural Networks", eq. 3): probabilities binned
  into ``bins`` equal-width bins, sum over bins of (n_b / N) * |frequency_b - mean probability_b|.
  A probability on an inner edge goes to the lower bin, as sklearn's ``calibration_curve`` does.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

from lmforge.errors import LmforgeError


def _check(y_true: Sequence, other: Sequence, what: str) -> None:
    if len(y_true) != len(other):
        raise LmforgeError(f"{len(y_true)} labels but {len(other)} {what}")
    if not y_true:
        raise LmforgeError("no examples to score")


def accuracy(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Share of predictions equal to the label."""
    _check(y_true, y_pred, "predictions")
    return sum(t == p for t, p in zip(y_true, y_pred)) / len(y_true)


def balanced_accuracy(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Mean over the classes in ``y_true`` of the share of that class predicted correctly."""
    _check(y_true, y_pred, "predictions")
    recalls = []
    for c in sorted(set(y_true)):
        hits = [p == c for t, p in zip(y_true, y_pred) if t == c]
        recalls.append(sum(hits) / len(hits))
    return sum(recalls) / len(recalls)


def roc_auc(y_true: Sequence[int], scores: Sequence[float]) -> float:
    """Binary ROC AUC of ``scores`` (higher = more likely positive) for labels in {0, 1}."""
    _check(y_true, scores, "scores")
    n_pos = sum(1 for t in y_true if t == 1)
    n_neg = len(y_true) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise LmforgeError("ROC AUC needs both positive and negative examples")
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    rank_sum, i = 0.0, 0
    while i < len(order):  # average 1-based ranks over runs of tied scores
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        mean_rank = (i + j) / 2 + 1
        rank_sum += mean_rank * sum(1 for k in order[i:j + 1] if y_true[k] == 1)
        i = j + 1
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def reliability_table(y_true: Sequence[int], probs: Sequence[float], bins: int = 10) -> list[dict[str, float]]:
    """One row per non-empty bin: {"lo", "hi", "count", "mean_prob", "frequency"} where frequency
    is the share of positives (label 1) among the examples whose probability falls in the bin."""
    _check(y_true, probs, "probabilities")
    if bins < 1:
        raise LmforgeError(f"bins must be >= 1, got {bins}")
    inner = [i / bins for i in range(1, bins)]
    groups: list[list[int]] = [[] for _ in range(bins)]
    for k, p in enumerate(probs):
        if not 0.0 <= p <= 1.0:
            raise LmforgeError(f"probability {k} is {p}, outside [0, 1]")
        groups[bisect.bisect_left(inner, p)].append(k)
    return [{"lo": b / bins, "hi": (b + 1) / bins, "count": len(g),
             "mean_prob": sum(probs[k] for k in g) / len(g), "frequency": sum(y_true[k] == 1 for k in g) / len(g)}
            for b, g in enumerate(groups) if g]


def expected_calibration_error(y_true: Sequence[int], probs: Sequence[float], bins: int = 10) -> float:
    """ECE of P(label = 1): the count-weighted mean gap between frequency and mean probability per bin."""
    table = reliability_table(y_true, probs, bins)
    return sum(r["count"] * abs(r["frequency"] - r["mean_prob"]) for r in table) / len(y_true)
