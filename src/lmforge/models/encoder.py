"""The encoder: a bidirectional stack that turns token ids into contextual hidden states.

One class serves BERT (learned absolute positions, token-type embeddings, a norm on the
embeddings, post-norm blocks, an optional pooler) and T5's encoder (no absolute positions, a
bucketed relative position bias shared by all layers, pre-norm blocks and a final norm).
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.models.attention import Attention
from lmforge.models.layers import Block, PostNormBlock, make_mlp, make_norm
from lmforge.models.positions import LearnedPositions, RelativePositionBias


class EncoderModel(nn.Module):
    """token ids (B, T) [+ attention mask, token types] -> hidden states (B, T, C)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = self.config = config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.n_embd)
        # the optional parts are None when the config has none (BERT has the first, third and fourth; T5 the second)
        self.embed_positions = LearnedPositions(c.max_seq_len, c.n_embd) if c.positions == "learned" else None
        self.rel_bias = RelativePositionBias(c.n_head, c.rel_buckets, c.rel_max_distance, bidirectional=True
                                             ) if c.positions == "relative" else None
        self.embed_types = nn.Embedding(c.type_vocab_size, c.n_embd) if c.type_vocab_size else None
        self.embed_norm = make_norm(c.norm, c.n_embd, c.norm_eps) if not c.norm_first else None

        def block() -> nn.Module:
            attn = Attention(c.n_embd, c.n_head, c.n_kv_head, c.head_dim, qkv_bias=c.qkv_bias, out_bias=c.out_bias,
                             causal=False, scale=c.attention_scale)
            mlp = make_mlp(c.mlp, c.n_embd, c.intermediate_size, c.mlp_bias)
            norms = make_norm(c.norm, c.n_embd, c.norm_eps), make_norm(c.norm, c.n_embd, c.norm_eps)
            return Block(attn, mlp, *norms) if c.norm_first else PostNormBlock(attn, mlp, *norms)

        self.layers = nn.ModuleList(block() for _ in range(c.n_layer))
        self.norm = make_norm(c.norm, c.n_embd, c.norm_eps) if c.norm_first else None  # post-norm blocks end normed
        self.pooler = nn.Linear(c.n_embd, c.n_embd) if c.pooler else None

    def forward(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, embeds: torch.Tensor | None = None) -> torch.Tensor:
        """idx (B, T); attention_mask (B, T), 1/True = real token; -> hidden states (B, T, C).

        ``embeds`` replaces the token embeddings (e.g. with soft prompts prepended).
        """
        B, T = idx.shape if embeds is None else embeds.shape[:2]
        if T > self.config.max_seq_len and self.embed_positions is not None:
            raise LmforgeError(f"an input of {T} tokens exceeds the encoder's {self.config.max_seq_len} positions "
                               f"(max_seq_len); cut inputs to at most {self.config.max_seq_len} tokens")
        x = self.embed_tokens(idx) if embeds is None else embeds  # (B, T, C)
        if self.embed_positions is not None:
            x = x + self.embed_positions(torch.arange(T, device=x.device).expand(B, T))
        if self.embed_types is not None:
            types = token_type_ids if token_type_ids is not None else torch.zeros(B, T, dtype=torch.long,
                                                                                device=x.device)
            x = x + self.embed_types(types)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
        if self.rel_bias is not None:
            bias = self.rel_bias(0, T, T)  # (1, nh, T, T)
            mask = (bias if mask is None else bias.masked_fill(~mask, float("-inf"))).to(x.dtype)
        for layer in self.layers:
            x = layer(x, None, mask)
        return self.norm(x) if self.norm is not None else x

    def pooled(self, hidden: torch.Tensor) -> torch.Tensor:
        """BERT's pooler: tanh(dense(first token's hidden state)) -> (B, C); the first token's state
        itself when the encoder has no pooler."""
        if self.pooler is None:
            return hidden[:, 0]
        return torch.tanh(self.pooler(hidden[:, 0]))
