"""Sampling as pure functions on logits: repetition penalty, temperature, top-k, top-p, the draw.

Each function takes logits (B, V) and returns new logits (B, V) with disallowed tokens at -inf;
``sample_next`` composes them in the usual order (the structured-output mask, penalty, temperature, top-k,
top-p) and draws.
This module also owns the accepted ranges of the sampling settings and of seeds (``SamplingParams``,
``check_seed``), which the server and the CLI validate against: inside them float32 arithmetic
neither overflows nor underflows, so sampling never raises on accepted input. ``sample_next`` falls
back to the most likely token for a row whose distribution still comes out empty or not finite.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lmforge.errors import LmforgeError

# Accepted ranges. A temperature below MIN_TEMPERATURE (or a repetition penalty outside its range) scales
# float32 logits past 3.4e38 into inf; a top_p below MIN_TOP_P rounds to 0 in float32 and drops every token.
MIN_TEMPERATURE = 0.01
MIN_TOP_P = 1e-6
REPETITION_PENALTY_RANGE = (0.01, 100.0)
SEED_LIMIT = 2**63  # seeds are integers in [0, SEED_LIMIT)


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_seed(seed: object, name: str = "seed") -> None:
    """Raise LmforgeError unless ``seed`` is None or an integer in [0, 2**63)."""
    if seed is None:
        return
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < SEED_LIMIT:
        raise LmforgeError(f"{name} must be an integer in [0, 2**63), got {seed!r}")


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token. ``temperature == 0`` means greedy (argmax).

    temperature: 0, or a finite number >= 0.01; top_k: a positive integer; top_p: in [1e-6, 1];
    repetition_penalty: in [0.01, 100] (1 = off).
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        t = self.temperature
        if not _number(t) or t < 0 or 0 < t < MIN_TEMPERATURE:
            raise LmforgeError(f"temperature must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE}, got {t}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or isinstance(self.top_k, bool)
                                       or self.top_k < 1):
            raise LmforgeError(f"top_k must be a positive integer, got {self.top_k}")
        if self.top_p is not None and not (_number(self.top_p) and MIN_TOP_P <= self.top_p <= 1.0):
            raise LmforgeError(f"top_p must be in [{MIN_TOP_P:g}, 1], got {self.top_p}")
        lo, hi = REPETITION_PENALTY_RANGE
        r = self.repetition_penalty
        if not (_number(r) and lo <= r <= hi):
            raise LmforgeError(f"repetition_penalty must be in [{lo:g}, {hi:g}] (1 = off), got {r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty (Keskar et al. 2019, sec. 4.1): divide positive / multiply negative logits of seen tokens.

    seen (B, V) bool marks tokens already in each row's context.
    """
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    assert temperature > 0
    return logits / temperature


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits per row (ties with the k-th are kept too)."""
    if k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering (Holtzman et al. 2020, eq. 3): keep the smallest set of most likely tokens
    whose probability mass reaches p."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # mass of strictly more likely tokens
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False  # the most likely token always survives (p may round to 0 in float32)
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def apply_allowed(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Structured output's hook (``generation.constrained``): tokens where ``allowed`` (B, V) bool is False
    go to -inf, before any other setting, so greedy and sampled decoding both stay inside the constraint."""
    return logits.masked_fill(~allowed, float("-inf"))


def sample_next(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None,
                generator: torch.Generator | None = None, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,). ``allowed`` (B, V) bool: the only tokens each row may take."""
    logits = raw = logits.float() if allowed is None else apply_allowed(logits.float(), allowed)
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return logits.argmax(dim=-1)
    logits = apply_temperature(logits, params.temperature)
    if params.top_k is not None:
        logits = top_k_filter(logits, params.top_k)
    if params.top_p is not None:
        logits = top_p_filter(logits, params.top_p)
    probs = logits.softmax(dim=-1)
    bad = ~(torch.isfinite(probs).all(dim=-1) & (probs.sum(dim=-1) > 0))  # (B,)
    if bool(bad.any()):  # nothing finite left in a row (e.g. NaN logits): take its most likely token
        fallback = torch.nan_to_num(raw, nan=float("-inf")).argmax(dim=-1)  # (B,)
        probs = torch.where(bad[:, None], torch.nn.functional.one_hot(fallback, probs.shape[-1]).to(probs.dtype),
                            probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
