"""The decoder: the decoder-only language model (Llama, Mistral, Qwen2, GPT-2 families) and the
causal stack that T5's decoder reuses with cross-attention.

Module names mirror the Hugging Face Llama layout (``model.layers.0.self_attn.q_proj``...), so
Llama-family checkpoints and PEFT adapters map one-to-one; GPT-2 and T5 checkpoints are renamed
on load (see ``checkpoints/names.py``).
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.models.attention import Attention, attention_dtype
from lmforge.models.kv_cache import KVCache
from lmforge.models.layers import Block, make_mlp, make_norm
from lmforge.models.positions import LearnedPositions, RelativePositionBias, RotaryEmbedding


def build_mask(key_mask: torch.Tensor | None, start: int, T: int) -> torch.Tensor | None:
    """The attention mask for T queries at positions [start, start+T) over S = start+T keys.

    key_mask (B, S) bool marks real (non-padding) keys. Returns None when plain causal masking
    (or, for one query, no masking) suffices; otherwise bool (B, 1, T, S), True = may attend.
    A query always sees itself, so rows made only of padding stay finite.
    """
    S = start + T
    if key_mask is None and (start == 0 or T == 1):
        return None
    device = key_mask.device if key_mask is not None else None
    q_pos = torch.arange(start, S, device=device)[:, None]  # (T, 1)
    k_pos = torch.arange(S, device=device)[None, :]  # (1, S)
    mask = (k_pos <= q_pos)[None, None]  # (1, 1, T, S)
    if key_mask is not None:
        mask = (mask & key_mask[:, None, None, :S]) | (k_pos == q_pos)[None, None]  # (B, 1, T, S)
    return mask


def with_bias(mask: torch.Tensor | None, bias: torch.Tensor, start: int, T: int) -> torch.Tensor:
    """Fold a bool mask (or causal masking, when None) into an additive position bias (1|B, nh, T, S)."""
    if mask is None:
        S = start + T
        q_pos = torch.arange(start, S, device=bias.device)[:, None]
        mask = (torch.arange(S, device=bias.device)[None, :] <= q_pos)[None, None]
    return bias.masked_fill(~mask, float("-inf"))


class DecoderBody(nn.Module):
    """Embeddings, the stack of causal blocks and the final norm (HF's ``model.`` prefix).

    With ``cross_attention`` every block also attends to an encoder's output (T5's decoder).
    """

    def __init__(self, config: ModelConfig, cross_attention: bool = False, n_layer: int | None = None):
        super().__init__()
        c = config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.n_embd)
        # exactly one way to encode positions; the other two are None
        self.embed_positions = LearnedPositions(c.max_seq_len, c.n_embd) if c.positions == "learned" else None
        self.rotary = RotaryEmbedding(c.head_dim, c.rope_theta, c.rope_scaling) if c.positions == "rope" else None
        self.rel_bias = RelativePositionBias(c.n_head, c.rel_buckets, c.rel_max_distance, bidirectional=False
                                             ) if c.positions == "relative" else None

        def attention(cross: bool = False) -> Attention:
            return Attention(c.n_embd, c.n_head, c.n_kv_head, c.head_dim, qkv_bias=c.qkv_bias, out_bias=c.out_bias,
                             fused_qkv=c.fused_qkv, scale=c.attention_scale, cross=cross)

        def norm() -> nn.Module:
            return make_norm(c.norm, c.n_embd, c.norm_eps)

        self.layers = nn.ModuleList(
            Block(attention(), make_mlp(c.mlp, c.n_embd, c.intermediate_size, c.mlp_bias), norm(), norm(),
                  *((attention(cross=True), norm()) if cross_attention else ()))
            for _ in range(n_layer or c.n_layer)
        )
        self.norm = norm()

    def forward(self, idx, positions, mask, caches=None, start=0, memory=None, memory_mask=None,
                cross_caches=None, embeds=None) -> torch.Tensor:
        x = self.embed_tokens(idx) if embeds is None else embeds  # (B, T, C)
        rope = None
        if self.embed_positions is not None:
            x = x + self.embed_positions(positions)
        elif self.rotary is not None:
            rope = self.rotary(positions, x.dtype)
        else:
            T = x.shape[1]
            mask = with_bias(mask, self.rel_bias(start, T, start + T), start, T).to(x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, mask, None if caches is None else caches[i], start, memory, memory_mask,
                      None if cross_caches is None else cross_caches[i])
        return self.norm(x)


class DecoderLM(nn.Module):
    """A causal language model: token ids (B, T) -> next-token logits (B, T, vocab)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = DecoderBody(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def init_weights(self, std: float = 0.02, seed: int | None = None) -> DecoderLM:
        from lmforge.models.init import init_weights

        return init_weights(self, std, seed)

    def make_caches(self, batch: int, max_len: int, dtype=None, device=None) -> list[KVCache]:
        p = next(self.parameters())
        c = self.config
        device = device or p.device
        return [KVCache(batch, c.n_kv_head, max_len, c.head_dim, dtype or attention_dtype(p.dtype, device), device)
                for _ in range(c.n_layer)]

    def hidden_states(self, idx, positions=None, key_mask=None, caches=None, start: int = 0,
                      embeds=None, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm hidden states (B, T, C). See ``forward`` for the arguments; ``attn_mask``
        (B, 1, T, start+T) bool replaces the causal + key-padding mask (e.g. block-diagonal for packed
        sequences)."""
        B, T = idx.shape if embeds is None else embeds.shape[:2]
        if start + T > self.config.max_seq_len:
            raise LmforgeError(f"sequence of {start + T} tokens exceeds the context window "
                               f"({self.config.max_seq_len})")
        device = idx.device if embeds is None else embeds.device
        if positions is None:
            positions = torch.arange(start, start + T, device=device).expand(B, T)
        mask = build_mask(key_mask, start, T) if attn_mask is None else attn_mask
        return self.model(idx, positions, mask, caches, start, embeds=embeds)

    def forward(self, idx: torch.Tensor, positions: torch.Tensor | None = None, key_mask: torch.Tensor | None = None,
                caches: list[KVCache] | None = None, start: int = 0, last_only: bool = False,
                embeds: torch.Tensor | None = None) -> torch.Tensor:
        """idx (B, T) token ids -> logits (B, T, V), or (B, 1, V) with ``last_only``.

        positions (B, T): position ids (default start..start+T-1; left-padded batches pass their own).
        key_mask (B, start+T) bool: False marks padding keys. caches/start: KV cache and where idx begins.
        embeds (B, T, C): input vectors used instead of the token embeddings of idx (soft prompts).
        """
        h = self.hidden_states(idx, positions, key_mask, caches, start, embeds)
        if last_only:
            h = h[:, -1:]
        return self.lm_head(h)
