"""BERT's masked-language-model head and the encoder that carries it (``BertForMaskedLM``).

The head (``BertLMPredictionHead``): dense -> erf-gelu -> LayerNorm -> a decoder tied to the word
embeddings, plus an output bias. Names map to ``transformers`` as
``predictions.transform.dense`` -> ``cls.predictions.transform.dense``,
``predictions.transform.LayerNorm`` -> ``cls.predictions.transform.LayerNorm``,
``predictions.bias`` -> ``cls.predictions.bias`` (the decoder weight is the tied
``bert.embeddings.word_embeddings.weight``), and the encoder's names get the ``bert.`` prefix.
lmforge's loader skips ``cls.predictions.*`` (a saved MLM loads as a plain encoder too) unless asked
for the head (``read_hf_dir(..., with_mlm_head=True)``): continued pretraining starts from it.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from lmforge.config import ModelConfig
from lmforge.models.encoder import EncoderModel


class _Transform(nn.Module):
    def __init__(self, n_embd: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(n_embd, n_embd)
        self.LayerNorm = nn.LayerNorm(n_embd, eps=eps)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(F.gelu(self.dense(h)))


class MaskedLMHead(nn.Module):
    """hidden (B, T, C) -> vocabulary logits (B, T, V), decoding with the (tied) word embeddings."""

    def __init__(self, config: ModelConfig, embedding: nn.Embedding):
        super().__init__()
        self.transform = _Transform(config.n_embd, config.norm_eps)
        self.decoder = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.decoder.weight = embedding.weight
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(h)) + self.bias


class MaskedLM(nn.Module):
    """An ``EncoderModel`` with the MLM head: token ids (B, T) -> logits (B, T, V)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.encoder = EncoderModel(config)
        self.predictions = MaskedLMHead(config, self.encoder.embed_tokens)

    def forward(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.predictions(self.encoder(idx, attention_mask, token_type_ids))
