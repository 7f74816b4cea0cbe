"""The encoder-decoder language model (T5 v1.0, v1.1, FLAN-T5).

An ``EncoderModel`` reads the source once; a ``DecoderBody`` with cross-attention writes the
target, attending causally to itself and fully to the encoder output. Both share one token
embedding. With tied embeddings (T5 v1.0) the decoder output is scaled by n_embd**-0.5 before
the LM head, as in the original Mesh TensorFlow code.
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.config import ModelConfig
from lmforge.models.attention import attention_dtype
from lmforge.models.decoder import DecoderBody
from lmforge.models.encoder import EncoderModel
from lmforge.models.kv_cache import KVCache, StaticKV


class Seq2SeqLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.n_embd)
        self.encoder = EncoderModel(config)
        self.decoder = DecoderBody(config, cross_attention=True, n_layer=config.n_decoder_layer)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        self.encoder.embed_tokens.weight = self.shared.weight
        self.decoder.embed_tokens.weight = self.shared.weight
        if self.config.tie_embeddings:
            self.lm_head.weight = self.shared.weight

    def encode(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Source ids (B, S) -> encoder output (B, S, C)."""
        return self.encoder(idx, attention_mask)

    def decode(self, idx: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor | None = None,
               caches: list[KVCache] | None = None, cross_caches: list[StaticKV] | None = None, start: int = 0,
               last_only: bool = False) -> torch.Tensor:
        """Target ids (B, T) at positions [start, start+T) -> logits (B, T, V) (or (B, 1, V) with last_only).

        memory_mask (B, S): 1/True for real source tokens.
        """
        mask = None if memory_mask is None else memory_mask.bool()[:, None, None, :]  # (B, 1, 1, S)
        h = self.decoder(idx, None, None, caches, start, memory, mask, cross_caches)
        if last_only:
            h = h[:, -1:]
        if self.config.scale_decoder_outputs:
            h = h * self.config.n_embd**-0.5
        return self.lm_head(h)

    def forward(self, idx: torch.Tensor, decoder_idx: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher forcing: source (B, S), target inputs (B, T) -> logits (B, T, V)."""
        return self.decode(decoder_idx, self.encode(idx, attention_mask), attention_mask)

    def make_caches(self, batch: int, max_len: int, dtype=None, device=None) -> list[KVCache]:
        p = next(self.parameters())
        c = self.config
        device = device or p.device
        return [KVCache(batch, c.n_kv_head, max_len, c.head_dim, dtype or attention_dtype(p.dtype, device), device)
                for _ in range(c.n_decoder_layer)]

    def make_cross_caches(self) -> list[StaticKV]:
        return [StaticKV() for _ in range(self.config.n_decoder_layer)]
