"""A preallocated key/value cache, one per attention layer (the gpt-fast layout).

Keys and values live in fixed (B, n_kv_head, max_len, head_dim) buffers allocated once per
generation; prefill writes the prompt's positions, each decode step writes one more.

``update`` takes where the new keys start either as an int (the eager path: the filled prefix
comes back, its length grows each step) or as a 1-element long tensor (the static path of
``generation.fast``: the column is data, not Python, the whole buffer comes back at a fixed shape and
the attention mask hides the columns not written yet, so one compiled graph serves every step).
"""

from __future__ import annotations

import torch
from torch import nn


class KVCache(nn.Module):
    def __init__(self, batch: int, n_kv_head: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        super().__init__()
        shape = (batch, n_kv_head, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def update(self, start: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, nkv, T, hs) at [start, start+T); return the filled prefix (B, nkv, start+T, hs).

        With ``start`` a long tensor of shape (1,) (and T == 1): write column ``start`` in place and return
        the whole buffers (B, nkv, max_len, hs), a shape that does not depend on ``start``.
        """
        if isinstance(start, torch.Tensor):
            self.k.index_copy_(2, start, k.to(self.k.dtype))
            self.v.index_copy_(2, start, v.to(self.v.dtype))
            return self.k, self.v
        end = start + k.shape[2]
        assert end <= self.max_len, f"KV cache overflow: {end} > {self.max_len}"
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class StaticKV:
    """Cross-attention keys/values: computed from the encoder output on the first decode call,
    then read on every later step."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    @property
    def filled(self) -> bool:
        return self.k is not None

    def fill(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k, self.v = k, v
