"""The SFT losses: masked next-token cross-entropy on the response tokens of a decoder-only model (the LM head run
only where a label follows), target cross-entropy of an encoder-decoder one, and the same through a prompt-tuned
model; ``loss_for(model)`` picks one. Used by ``finetune`` (``sft.py``), its evaluation (``sft_eval.py``) and
distillation."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lmforge.errors import LmforgeError

if TYPE_CHECKING:
    from torch import Tensor, nn


def decoder_hidden(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Final hidden states (B, T, C) of a ``DecoderLM`` for an SFT batch.

    Packed batches (with ``segment_ids``) get a block-diagonal causal mask, so each example only sees
    itself. Left-padded batches pass the padding mask; right padding needs none (causal).
    """
    import torch

    idx, positions, mask = batch["input_ids"], batch.get("positions"), batch.get("attention_mask")
    if "segment_ids" in batch:
        seg = batch["segment_ids"]  # (B, T), 0 = padding
        T = idx.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()  # (T, T)
        attend = (seg[:, :, None] == seg[:, None, :]) & causal  # (B, T, T): same example, not the future
        return model.hidden_states(idx, positions=positions, attn_mask=attend[:, None])  # mask (B, 1, T, T)
    key_mask = None if mask is None or bool(mask[:, 0].all()) else mask.bool()
    return model.hidden_states(idx, positions=positions, key_mask=key_mask)


def decoder_logits(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Logits (B, T, V) of a ``DecoderLM`` for an SFT batch (see ``decoder_hidden``)."""
    return model.lm_head(decoder_hidden(model, batch))


def masked_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy over the tokens whose label is not ``IGNORE_INDEX``; logits (N, V), labels (N,).
    A batch with no labelled token gives 0 (not NaN)."""
    import torch.nn.functional as F

    from lmforge.data.tokens import IGNORE_INDEX

    total = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (labels != IGNORE_INDEX).sum().clamp(min=1)


def decoder_sft_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Next-token loss on response tokens: logits at t predict labels at t+1 (labels are aligned with inputs).

    The LM head runs only where a label follows (prompts are usually most of the tokens, and the head
    over a large vocabulary is a good share of the compute and most of the activation memory).
    """
    from lmforge.data.tokens import select_labelled

    h, labels = select_labelled(decoder_hidden(model, batch)[:, :-1], batch["labels"][:, 1:])  # (N, C), (N,)
    return masked_cross_entropy(model.lm_head(h), labels)  # (N, V), (N,)


def seq2seq_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Cross-entropy over the target given the source (teacher forcing)."""
    logits = model(batch["input_ids"], batch["decoder_input_ids"], batch["attention_mask"])  # (B, T, V)
    return masked_cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())


def prompt_tuned_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """``decoder_sft_loss`` through a ``PromptTunedLM``, whose logits cover the real tokens only."""
    from lmforge.data.tokens import select_labelled

    if "segment_ids" in batch:
        raise LmforgeError("packing (--pack) is not supported with prompt tuning")
    mask = batch.get("attention_mask")
    key_mask = None if mask is None or bool(mask[:, 0].all()) else mask.bool()
    logits = model(batch["input_ids"], batch.get("positions"), key_mask)[:, :-1]  # (B, T-1, V)
    return masked_cross_entropy(*select_labelled(logits, batch["labels"][:, 1:]))  # (N, V), (N,)


def loss_for(model: nn.Module):
    from lmforge.peft.prompt_tuning import PromptTunedLM

    if isinstance(model, PromptTunedLM):
        return prompt_tuned_loss
    return seq2seq_loss if model.config.arch == "encoder-decoder" else decoder_sft_loss
