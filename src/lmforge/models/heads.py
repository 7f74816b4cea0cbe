"""Heads: pooling encoder states into sentence vectors, sequence classification, and a scalar
reward head on a decoder."""

from __future__ import annotations

import torch
from torch import nn

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.models.encoder import EncoderModel

POOLING = ("mean", "cls")


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, how: str = "mean") -> torch.Tensor:
    """hidden (B, T, C), attention_mask (B, T) -> (B, C): the mean over real tokens, or the first token."""
    if how == "cls":
        return hidden[:, 0]
    if how != "mean":
        raise LmforgeError(f"unknown pooling {how!r}; choose one of: {', '.join(POOLING)}")
    m = attention_mask.to(hidden.dtype)[..., None]  # (B, T, 1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


class SequenceClassifier(nn.Module):
    """Encoder + pooler + linear classifier: (B, T) -> class logits (B, num_labels). BERT's
    ``BertForSequenceClassification`` layout."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        if not config.labels:
            raise LmforgeError("a sequence classifier needs config.labels (one name per class)")
        self.config = config
        self.encoder = EncoderModel(config)
        self.classifier = nn.Linear(config.n_embd, len(config.labels))

    def forward(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.encoder(idx, attention_mask, token_type_ids)
        pooled = self.encoder.pooled(hidden)  # the first token's state when the encoder has no pooler
        return self.classifier(pooled)


class RewardModel(nn.Module):
    """A decoder with a scalar head: the reward of a sequence is the head's value at its last real
    token (the pairwise reward model of Ouyang et al. 2022, sec. 3.5)."""

    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.decoder = decoder
        self.config = decoder.config
        self.score = nn.Linear(decoder.config.n_embd, 1, bias=False)
        nn.init.normal_(self.score.weight, std=decoder.config.n_embd**-0.5)

    def forward(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """idx (B, T) right-padded, attention_mask (B, T) -> rewards (B,)."""
        hidden = self.decoder.hidden_states(idx)  # (B, T, C); right padding never affects earlier tokens
        last = (attention_mask.long().sum(1) - 1) if attention_mask is not None else torch.full(
            (idx.shape[0],), idx.shape[1] - 1, device=idx.device)
        return self.score(hidden[torch.arange(idx.shape[0], device=idx.device), last]).squeeze(-1)
