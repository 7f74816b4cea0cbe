"""Prompt tuning (Lester et al. 2021): N trainable "virtual token" embeddings prepended to every input.

``PromptTunedLM`` wraps a frozen ``DecoderLM`` and keeps its calling convention, so training
and generation use it unchanged: the virtual tokens sit at positions 0..N-1 (and in the KV
cache), the real tokens follow, and the logits returned are those of the real tokens only. Random
virtual tokens are drawn from a ``torch.Generator`` when one is given (a run's seed).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from lmforge.errors import LmforgeError


class PromptTunedLM(nn.Module):
    def __init__(self, base: nn.Module, num_virtual_tokens: int, init_ids: list[int] | None = None,
                 generator: torch.Generator | None = None):
        super().__init__()
        if base.config.arch != "decoder":
            raise LmforgeError("prompt tuning is implemented for decoder-only models; use LoRA for "
                               f"{base.config.arch} models")
        if not isinstance(num_virtual_tokens, int) or num_virtual_tokens < 1:
            raise LmforgeError(f"num_virtual_tokens must be a positive integer, got {num_virtual_tokens!r}")
        self.base, self.n = base, num_virtual_tokens
        for p in base.parameters():
            p.requires_grad_(False)
        emb = base.model.embed_tokens.weight
        if init_ids:  # "TEXT" init: start from the embeddings of a text, repeated to length N
            ids = torch.tensor((init_ids * num_virtual_tokens)[:num_virtual_tokens], device=emb.device)
            init = emb[ids].detach().clone()
        else:
            noise = torch.randn(num_virtual_tokens, emb.shape[1], generator=generator)  # on the CPU generator
            init = noise.to(device=emb.device, dtype=emb.dtype) * emb.detach().std()
        self.prompt_embeddings = nn.Parameter(init)
        # the window left for real tokens is N shorter
        self.config = dataclasses.replace(base.config, max_seq_len=base.config.max_seq_len - num_virtual_tokens)

    def make_caches(self, batch: int, max_len: int, dtype=None, device=None):
        return self.base.make_caches(batch, max_len + self.n, dtype, device)

    def forward(self, idx: torch.Tensor, positions: torch.Tensor | None = None, key_mask: torch.Tensor | None = None,
                caches=None, start: int = 0, last_only: bool = False) -> torch.Tensor:
        """As ``DecoderLM.forward``, with positions and cache offsets counted from the real tokens."""
        B, T = idx.shape
        N = self.n
        if positions is None:
            positions = torch.arange(start, start + T, device=idx.device).expand(B, T)
        if key_mask is not None:
            key_mask = torch.cat([key_mask.new_ones(B, N), key_mask], dim=1)
        if start > 0:  # decoding: the virtual tokens are already in the cache
            return self.base(idx, positions + N, key_mask, caches, start + N, last_only)
        embeds = torch.cat([self.prompt_embeddings.expand(B, N, -1), self.base.model.embed_tokens(idx)], dim=1)
        virtual = torch.arange(N, device=idx.device).expand(B, N)
        logits = self.base(idx, torch.cat([virtual, positions + N], dim=1), key_mask, caches, 0, last_only,
                           embeds=embeds)
        return logits if last_only else logits[:, N:]
