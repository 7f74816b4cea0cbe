"""Token-level helpers shared by data, evaluation, training and alignment: the "no label" value, padding
rows of token ids into batches, and the log-probabilities of labelled tokens.

- ``IGNORE_INDEX`` (-100, PyTorch's ``cross_entropy`` default and ``transformers``' convention): the label of
  a position that carries no loss and no log-prob (prompts, padding).
- ``pad_rows`` / ``pad_right`` / ``pad_left``: lists of token ids -> one (B, T) tensor (and a 1 = real mask).
- ``token_logprobs(logits, labels)``: log p(label) at every position, 0 where the label is ``IGNORE_INDEX``;
  ``labelled_logprobs(hidden, head, labels)`` is the same from final hidden states, running the LM head only
  on the labelled positions (the head over a large vocabulary is a good share of the compute and most of the
  activation memory, and prompts are often most of the tokens). Both compute the softmax in float32, also
  under autocast. Sum over the last axis for sequence log-probs. Labels sit at the same positions as the
  logits / states that predict them: for a causal LM shift first (``hidden[:, :-1]``, ``labels[:, 1:]``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor

from lmforge.errors import LmforgeError

IGNORE_INDEX = -100
SIDES = ("right", "left")


def pad_rows(rows: Sequence[Sequence[int]], value: int, side: Literal["right", "left"] = "right") -> Tensor:
    """Rows of token ids (or labels, positions, ...) -> a (B, T) long tensor, T the longest row, the rest
    filled with ``value`` after (``side="right"``) or before (``"left"``) each row."""
    if side not in SIDES:
        raise LmforgeError(f"padding side must be one of {', '.join(SIDES)}, got {side!r}")
    if not rows:
        raise LmforgeError("cannot pad an empty list of rows into a batch")
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        start = 0 if side == "right" else width - len(r)
        out[i, start:start + len(r)] = torch.tensor(list(r), dtype=torch.long)
    return out


def _pad_with_mask(rows: Sequence[Sequence[int]], pad: int, side: Literal["right", "left"]) -> tuple[Tensor, Tensor]:
    """ids (B, T) padded with ``pad`` on ``side``, and the mask (B, T) long, 1 = real token."""
    return pad_rows(rows, pad, side), pad_rows([[1] * len(r) for r in rows], 0, side)


def pad_right(rows: Sequence[Sequence[int]], pad: int) -> tuple[Tensor, Tensor]:
    """Token rows -> ids (B, T) right-padded with ``pad``, attention mask (B, T) long, 1 = real token."""
    return _pad_with_mask(rows, pad, "right")


def pad_left(rows: Sequence[Sequence[int]], pad: int) -> tuple[Tensor, Tensor]:
    """Token rows -> ids (B, T) left-padded with ``pad`` (generation's layout: every row ends at column T-1),
    attention mask (B, T) long, 1 = real token."""
    return _pad_with_mask(rows, pad, "left")


def select_labelled(x: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """The positions that carry a label: x (..., T, D) and labels (..., T) -> x (K, D), labels (K,), in
    row-major order, K the number of labels that are not ``IGNORE_INDEX``."""
    keep = labels != IGNORE_INDEX
    return x[keep], labels[keep]


def _picked(logits: Tensor, targets: Tensor) -> Tensor:
    """log softmax(logits) at targets, in float32: (K, V), (K,) -> (K,)."""
    return logits.float().log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)


def _spread(picked: Tensor, labels: Tensor) -> Tensor:
    """(K,) values of the labelled positions -> labels' shape, 0 at the positions without a label."""
    out = torch.zeros(labels.shape, dtype=picked.dtype, device=picked.device)
    return out.masked_scatter(labels != IGNORE_INDEX, picked)


def token_logprobs(logits: Tensor, labels: Tensor) -> Tensor:
    """log p(labels) under logits: (..., T, V), (..., T) -> (..., T) float32, 0 where the label is
    ``IGNORE_INDEX``. The log-softmax runs on the labelled positions only."""
    return _spread(_picked(*select_labelled(logits, labels)), labels)


def labelled_logprobs(hidden: Tensor, head: Callable[[Tensor], Tensor], labels: Tensor) -> Tensor:
    """``token_logprobs(head(hidden), labels)`` with ``head`` (the LM head) run only on the labelled positions:
    hidden (..., T, C), labels (..., T) -> (..., T) float32, 0 where the label is ``IGNORE_INDEX``."""
    h, targets = select_labelled(hidden, labels)  # (K, C), (K,)
    return _spread(_picked(head(h), targets), labels)
