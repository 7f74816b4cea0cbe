"""Model log-likelihoods: perplexity of texts and multiple choice by log-likelihood (decoder-only models).

Owns turning token ids into log-probabilities with one forward pass per batch. Batches are
right-padded: with causal attention a token never sees the padding after it, so no mask is
needed and every row scores exactly as it would alone.

- Perplexity = exp(mean NLL over the predicted tokens) (Jelinek et al. 1977; the same quantity
  as ``exp(loss)`` of ``transformers``' causal-LM loss). A text longer than the window is scored
  with a sliding window: windows of ``window`` tokens start every ``stride`` tokens, and each
  window scores only the tokens no earlier window scored, so every token is predicted once, with
  at least ``window - stride`` tokens of context (the first window: all before it).
- Multiple choice: the score of a choice is the sum of its tokens' log-probs given the context;
  the length-normalised score divides by its token count (Brown et al. 2020, GPT-3 §2.4).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lmforge.data.tokens import IGNORE_INDEX, pad_rows, token_logprobs
from lmforge.errors import LmforgeError


def _check_decoder(model: torch.nn.Module, what: str) -> None:
    if getattr(model.config, "arch", "decoder") != "decoder":
        raise LmforgeError(f"{what} needs a decoder-only model; this one is {model.config.arch}")


@torch.no_grad()
def _score_rows(model: torch.nn.Module, rows: Sequence[Sequence[int]],
                targets: Sequence[Sequence[int]], batch_size: int) -> list[list[float]]:
    """For each row of ids and its target positions t (>= 1): log p(ids[t] | ids[:t]).

    Rows are right-padded into batches of ``batch_size``; returns one list of floats per row. The log-softmax
    runs only at the positions that predict a target.
    """
    device = next(model.parameters()).device
    out: list[list[float]] = []
    for b in range(0, len(rows), batch_size):
        chunk, chunk_targets = rows[b: b + batch_size], targets[b: b + batch_size]
        idx = pad_rows(chunk, 0).to(device)  # (B, T)
        labels = torch.full_like(idx, IGNORE_INDEX)  # (B, T): the logits at t-1 predict token t
        for i, ts in enumerate(chunk_targets):
            pos = torch.tensor(ts, dtype=torch.long, device=device)
            labels[i, pos - 1] = idx[i, pos]
        logp = token_logprobs(model(idx), labels)  # (B, T)
        for i, ts in enumerate(chunk_targets):
            out.append(logp[i, torch.tensor(ts, dtype=torch.long, device=device) - 1].tolist())
    return out


def windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """Sliding windows over ``n_tokens``: (begin, end, first scored position) each, scoring [first, end)."""
    if window < 2:
        raise LmforgeError(f"the perplexity window must be >= 2 tokens, got {window}")
    if not 1 <= stride < window:
        raise LmforgeError(f"the perplexity stride must be >= 1 and < the window ({window}), got {stride}")
    out, begin, scored = [], 0, 1  # token 0 has no context: it is never predicted
    while scored < n_tokens:
        end = min(begin + window, n_tokens)
        out.append((begin, end, scored))
        scored, begin = end, begin + stride
    return out


@dataclass
class Perplexity:
    """Token NLLs summed over texts: ``perplexity = exp(nll / tokens)``; ``per_text`` holds each text's own."""

    nll: float
    tokens: int
    per_text: list[float]

    @property
    def value(self) -> float:
        return math.exp(self.nll / self.tokens)


def perplexity(model: torch.nn.Module, texts_ids: Sequence[Sequence[int]], window: int | None = None,
               stride: int | None = None, batch_size: int = 8) -> Perplexity:
    """Perplexity of token sequences (each already tokenised, with BOS if the tokenizer adds one).

    window: tokens per forward pass (default: the model's context); stride: default window // 2.
    """
    _check_decoder(model, "perplexity")
    window = window or model.config.max_seq_len
    if window > model.config.max_seq_len:
        raise LmforgeError(f"the perplexity window {window} is longer than the model's context "
                           f"{model.config.max_seq_len}")
    stride = stride or max(1, window // 2)
    rows, targets, owner = [], [], []
    for n, ids in enumerate(texts_ids):
        if len(ids) < 2:
            raise LmforgeError(f"text {n} has {len(ids)} token(s); perplexity needs at least 2")
        for begin, end, first in windows(len(ids), window, stride):
            rows.append(list(ids[begin:end]))
            targets.append([t - begin for t in range(first, end)])
            owner.append(n)
    scores = _score_rows(model, rows, targets, batch_size)
    nll = [0.0] * len(texts_ids)
    for n, s in zip(owner, scores):
        nll[n] -= sum(s)
    counts = [len(ids) - 1 for ids in texts_ids]
    return Perplexity(sum(nll), sum(counts), [math.exp(x / c) for x, c in zip(nll, counts)])


@dataclass
class ChoiceScores:
    """Log-likelihoods of each choice of one question."""

    logprob: list[float]   # sum of the choice's token log-probs
    n_tokens: list[int]

    @property
    def normalized(self) -> list[float]:
        return [lp / n for lp, n in zip(self.logprob, self.n_tokens)]

    @property
    def best(self) -> int:
        return max(range(len(self.logprob)), key=self.logprob.__getitem__)

    @property
    def best_normalized(self) -> int:
        norm = self.normalized
        return max(range(len(norm)), key=norm.__getitem__)


def choice_logprobs(model: torch.nn.Module, contexts: Sequence[Sequence[int]],
                    choices: Sequence[Sequence[Sequence[int]]], batch_size: int = 8) -> list[ChoiceScores]:
    """For each question, the log-likelihood of every choice given its context.

    contexts[q]: the prompt's ids; choices[q][c]: the ids of choice c (scored right after the context).
    """
    _check_decoder(model, "multiple choice")
    rows, targets = [], []
    for q, (ctx, opts) in enumerate(zip(contexts, choices)):
        if not ctx:
            raise LmforgeError(f"question {q}: the context is empty (0 tokens)")
        for c, opt in enumerate(opts):
            if not opt:
                raise LmforgeError(f"question {q}: choice {c} is empty (0 tokens)")
            if len(ctx) + len(opt) > model.config.max_seq_len:
                raise LmforgeError(f"question {q}: context + choice {c} is {len(ctx) + len(opt)} tokens, longer "
                                   f"than the model's context of {model.config.max_seq_len}")
            rows.append(list(ctx) + list(opt))
            targets.append(list(range(len(ctx), len(ctx) + len(opt))))
    flat = iter(_score_rows(model, rows, targets, batch_size))
    out = []
    for opts in choices:
        lps = [next(flat) for _ in opts]
        out.append(ChoiceScores([sum(s) for s in lps], [len(s) for s in lps]))
    return out
