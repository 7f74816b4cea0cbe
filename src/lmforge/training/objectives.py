"""Pretraining objectives, one per transformer variant: the losses (pure functions on logits and
labels) and the corruptions that make their inputs (pure functions of token ids and a numpy
generator, so a batch stream that owns the generator stays resumable).

- decoder-only: next-token prediction (causal LM)
- encoder-only: masked language modelling (BERT)
- encoder-decoder: span corruption (T5)

Labels equal to ``IGNORE_INDEX`` (-100, as in PyTorch and ``transformers``; ``data/tokens.py``) do not count in a
loss.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from lmforge.data.tokens import IGNORE_INDEX
from lmforge.errors import LmforgeError


def token_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy over the positions whose label is not IGNORE_INDEX; logits (B, T, V), labels (B, T).
    Computed in float32 even under bf16 autocast."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of logits = h @ weight^T, with both gradients computed in the forward pass.

    The softmax's gradient (p - onehot(y)) / n is built in place in the log-probability buffer, so the
    logits are written once and read a few times, instead of the separate log-softmax forward, NLL
    backward and log-softmax backward passes of ``F.cross_entropy(h @ weight.T, y)``. Matmuls run in
    the autocast dtype when autocast is on (as ``nn.Linear`` would), the softmax in float32.
    """

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, labels: Tensor) -> Tensor:  # (N, C), (V, C), (N,)
        device = h.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
        with torch.autocast(device, enabled=False):
            hc, wc = h.to(dtype), weight.to(dtype)
            keep = labels != IGNORE_INDEX  # (N,)
            n = keep.sum().clamp(min=1)
            target = labels.clamp(min=0)
            g = torch.log_softmax((hc @ wc.t()).float(), dim=-1)  # (N, V) log-probabilities
            loss = -(g.gather(1, target[:, None]).squeeze(1) * keep).sum() / n
            g.exp_()  # softmax
            g[torch.arange(len(target), device=h.device), target] -= 1.0
            g.mul_((keep / n)[:, None])  # d loss / d logits; rows without a label get 0
            g = g.to(dtype)
            grad_h = (g @ wc).to(h.dtype) if ctx.needs_input_grad[0] else None  # (N, C)
            grad_w = (g.t() @ hc).to(weight.dtype) if ctx.needs_input_grad[1] else None  # (V, C)
        ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        grad_h, grad_w = ctx.saved_tensors
        return (None if grad_h is None else grad_h * grad_loss, None if grad_w is None else grad_w * grad_loss,
                None)


def linear_cross_entropy(h: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
    """``token_cross_entropy(h @ weight.T, labels)`` for an LM head without bias, faster when training:
    h (B, T, C) or (N, C) final hidden states, weight (V, C), labels (B, T) or (N,)."""
    h, labels = h.reshape(-1, h.shape[-1]), labels.reshape(-1)
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(h, weight, labels)
    return token_cross_entropy(F.linear(h, weight)[None], labels[None])


def causal_lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Next-token prediction: -mean log p(x_{t+1} | x_{<=t}) (Radford et al. 2018, eq. 1).

    logits (B, T, V) from inputs x_0..x_{T-1}; labels (B, T) are the inputs shifted by one
    (x_1..x_T), IGNORE_INDEX where a position should not count (padding, prompts in fine-tuning).
    """
    return token_cross_entropy(logits, labels)


def masked_lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """BERT's masked LM loss (Devlin et al. 2019, §3.1 Task #1): cross-entropy on the masked
    positions only. logits (B, T, V); labels (B, T): the original token where masked, else IGNORE_INDEX."""
    return token_cross_entropy(logits, labels)


def span_corruption_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """T5's denoising loss (Raffel et al. 2020, §3.1.4): teacher-forced cross-entropy on the target
    (sentinels followed by the dropped spans). logits (B, T_dec, V), labels (B, T_dec)."""
    return token_cross_entropy(logits, labels)


# ---------------------------------------------------------------------------------------- corruptions


def mask_tokens(ids: np.ndarray, rng: np.random.Generator, mask_id: int, vocab_size: int,
                special_ids: tuple[int, ...] = (), mask_prob: float = 0.15) -> tuple[np.ndarray, np.ndarray]:
    """BERT's masking (Devlin et al. 2019, §3.1 and Appendix C.2): in each row choose
    round(mask_prob * n) of the n non-special tokens (at least 1); replace 80% of the chosen with
    [MASK], 10% with a random token, leave 10% unchanged. ids (B, T) -> (inputs (B, T), labels (B, T)),
    labels holding the original token at chosen positions and IGNORE_INDEX elsewhere."""
    inputs, labels = ids.copy(), np.full_like(ids, IGNORE_INDEX)
    special = np.isin(ids, np.asarray(special_ids, dtype=ids.dtype))
    for b in range(ids.shape[0]):
        candidates = np.flatnonzero(~special[b])
        if len(candidates) == 0:
            continue
        n = max(1, int(round(mask_prob * len(candidates))))
        chosen = rng.choice(candidates, size=n, replace=False)
        labels[b, chosen] = ids[b, chosen]
        u = rng.random(n)
        inputs[b, chosen[u < 0.8]] = mask_id
        rand = chosen[(u >= 0.8) & (u < 0.9)]
        inputs[b, rand] = rng.integers(0, vocab_size, size=len(rand))
    return inputs, labels


def _random_segmentation(n_items: int, n_segments: int, rng: np.random.Generator) -> np.ndarray:
    """Lengths of a uniformly random split of n_items into n_segments non-empty runs (sum = n_items)."""
    cuts = np.sort(rng.choice(np.arange(1, n_items), size=n_segments - 1, replace=False))
    return np.diff(np.concatenate([[0], cuts, [n_items]]))


def span_lengths(length: int, noise_density: float = 0.15, mean_span: float = 3.0) -> tuple[int, int]:
    """(noise tokens, spans) for a sequence of ``length``: round(length * density) noise tokens in
    round(noise / mean_span) spans, as T5's ``random_spans_noise_mask``."""
    n_noise = min(max(int(round(length * noise_density)), 1), length - 1)
    n_spans = min(max(int(round(n_noise / mean_span)), 1), n_noise, length - n_noise)
    return n_noise, n_spans


def check_sentinels(length: int, n_sentinels: int, noise_density: float = 0.15, mean_span: float = 3.0) -> None:
    """Raise ``LmforgeError`` when span corruption of ``length`` tokens needs more sentinels (one per
    span) than the ``n_sentinels`` there are, naming the longest sequence that fits."""
    n_spans = span_lengths(length, noise_density, mean_span)[1]
    if n_spans > n_sentinels:
        longest = max(n for n in range(1, length) if span_lengths(n, noise_density, mean_span)[1] <= n_sentinels)
        raise LmforgeError(f"span corruption of {length} tokens needs {n_spans} sentinel tokens, but only "
                           f"{n_sentinels} exist (<extra_id_0> .. <extra_id_{n_sentinels - 1}>); "
                           f"use --seq-len {longest} or less")


def span_corrupt(ids: np.ndarray, rng: np.random.Generator, sentinel_ids: list[int], eos_id: int | None,
                 noise_density: float = 0.15, mean_span: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """T5's span corruption (Raffel et al. 2020, §3.1.4) of one sequence ids (T,).

    Random spans covering ``noise_density`` of the tokens (mean length ``mean_span``) are each
    replaced by one sentinel in the input; the target lists each sentinel followed by the span it
    replaced. The sequence starts with a kept run. Both end with ``eos_id`` when given.
    Returns (inputs (T - noise + spans [+1],), targets (noise + spans [+1],)).
    """
    T = len(ids)
    check_sentinels(T, len(sentinel_ids), noise_density, mean_span)
    n_noise, n_spans = span_lengths(T, noise_density, mean_span)
    noise_lens = _random_segmentation(n_noise, n_spans, rng)
    keep_lens = _random_segmentation(T - n_noise, n_spans, rng)
    inputs, targets, pos = [], [], 0
    for i in range(n_spans):  # kept run, then noise span
        inputs.extend(ids[pos: pos + keep_lens[i]].tolist())
        pos += keep_lens[i]
        inputs.append(sentinel_ids[i])
        targets.append(sentinel_ids[i])
        targets.extend(ids[pos: pos + noise_lens[i]].tolist())
        pos += noise_lens[i]
    assert pos == T
    if eos_id is not None:
        inputs.append(eos_id)
        targets.append(eos_id)
    return np.asarray(inputs, dtype=ids.dtype), np.asarray(targets, dtype=ids.dtype)


def shift_right(targets: np.ndarray, start_id: int) -> np.ndarray:
    """Decoder inputs for teacher forcing: (B, T) targets -> start token followed by targets[:, :-1]."""
    return np.concatenate([np.full((targets.shape[0], 1), start_id, dtype=targets.dtype), targets[:, :-1]], axis=1)
