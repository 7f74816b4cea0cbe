"""SFT evaluation: the response-token dev loss and ROUGE-L of greedy generations (``finetune``'s ``val_loss``,
``val_ppl`` and ``val_rougeL``), also used by ``bench/sft_dialogsum.py``."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from lmforge.training.sft_losses import loss_for

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn

    from lmforge.data.sft import SFTBatches, SFTExample
    from lmforge.tokenizer import Tokenizer


def _to(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def _labelled(batch: dict[str, Tensor], seq2seq: bool) -> int:
    from lmforge.data.tokens import IGNORE_INDEX

    labels = batch["labels"] if seq2seq else batch["labels"][:, 1:]
    return int((labels != IGNORE_INDEX).sum())


def response_loss(model: nn.Module, batches: Iterable[dict[str, Tensor]]) -> float:
    """Token-weighted mean loss over the response tokens of all ``batches``."""
    import torch

    loss_fn, seq2seq = loss_for(model), model.config.arch == "encoder-decoder"
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            n = _labelled(batch, seq2seq)
            total += float(loss_fn(model, _to(batch, device))) * n
            count += n
    return total / max(count, 1)


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F1 (Lin 2004; ``rouge-score`` with stemming, via ``evaluation/metrics.py``)."""
    from lmforge.evaluation.metrics import rouge

    return rouge(predictions, references, ["rougeL"])[0]["rougeL"]


def generate_responses(model: nn.Module, tokenizer: Tokenizer, examples: Sequence[SFTExample], *,
                       max_new_tokens: int = 64, batch_size: int = 8, eos_ids: Sequence[int] = ()) -> list[str]:
    """Greedy responses to each example's prompt (the exact prompt ids it was trained on)."""
    from lmforge.generation.generate import generate_tokens

    eos = set(eos_ids) | set(tokenizer.eos_ids) | set(getattr(model.config, "eos_token_ids", []))
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else min(eos, default=0)
    was_training = model.training
    model.eval()
    out: list[str] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        tokens: list[list[int]] = [[] for _ in chunk]
        for step in generate_tokens(model, [e.prompt_ids for e in chunk], max_new_tokens, eos_ids=sorted(eos),
                                    pad_id=pad):
            for i, t in enumerate(step):
                if t is not None and t not in eos:
                    tokens[i].append(t)
        out += [tokenizer.decode(t).strip() for t in tokens]
    model.train(was_training)
    return out


def evaluate_sft(model: nn.Module, tokenizer: Tokenizer, dev: SFTBatches, *, loss_examples: int | None = None,
                 generate_examples: int = 0, max_new_tokens: int = 64, batch_size: int = 8) -> dict[str, float]:
    """``val_loss`` (response tokens of the first ``loss_examples`` dev examples) and, with
    ``generate_examples`` > 0, ``val_rougeL`` of greedy generations on the first N dev examples."""
    from lmforge.data.sft import SFTBatches

    n = len(dev.examples) if loss_examples is None else min(loss_examples, len(dev.examples))
    sub = SFTBatches(dev.examples[:n], batch_size=batch_size, pad_id=dev.pad_id, seq2seq=dev.seq2seq,
                     decoder_start_id=dev.decoder_start_id, shuffle=False)
    metrics = {"val_loss": response_loss(model, sub.iter_once())}
    metrics["val_ppl"] = math.exp(min(metrics["val_loss"], 50.0))
    if generate_examples > 0:
        exs = dev.examples[:generate_examples]
        preds = generate_responses(model, tokenizer, exs, max_new_tokens=max_new_tokens, batch_size=batch_size)
        metrics["val_rougeL"] = rouge_l(preds, [e.reference for e in exs])
    return metrics
