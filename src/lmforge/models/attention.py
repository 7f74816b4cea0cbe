"""Multi-head self-attention with grouped-query heads, optional fused qkv, RoPE and a KV cache.

Prefill and training go through ``torch.nn.functional.scaled_dot_product_attention``. Decode
steps (a handful of queries against the cache) use ``grouped_attention``, a plain matmul/softmax
that lets each group of query heads share its key/value head without copying it: on CPU the
fused kernels cost several times more than the arithmetic for one query.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from lmforge.generation.kv_cache import KVCache
from lmforge.models.positions import apply_rope

SMALL_QUERY = 8  # at most this many queries: grouped_attention instead of the fused kernel


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T / sqrt(hs)) v for q (B, nh, T, hs) over k, v (B, nkv, S, hs); mask (B|1, 1, T, S) bool or None.

    Query head h reads key/value head h // (nh // nkv), as in grouped-query attention.
    """
    B, nh, T, hs = q.shape
    nkv, S = k.shape[1], k.shape[2]
    g = nh // nkv
    qg = q.reshape(B, nkv, g * T, hs)  # (B, nkv, g*T, hs): the g heads of a group, stacked
    scores = (qg @ k.transpose(-1, -2)) * hs**-0.5  # (B, nkv, g*T, S)
    if mask is not None:
        m = mask[:, :, None].expand(mask.shape[0], 1, g, T, S).reshape(mask.shape[0], 1, g * T, S)
        scores = scores.masked_fill(~m, float("-inf"))
    probs = scores.float().softmax(dim=-1).to(v.dtype)
    return (probs @ v).view(B, nh, T, hs)  # (B, nh, T, hs)


class Attention(nn.Module):
    def __init__(self, dim: int, n_head: int, n_kv_head: int, head_dim: int, *,
                 qkv_bias: bool = False, out_bias: bool = False, fused_qkv: bool = False):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, head_dim
        q_size, kv_size = n_head * head_dim, n_kv_head * head_dim
        if fused_qkv:
            self.qkv_proj = nn.Linear(dim, q_size + 2 * kv_size, bias=qkv_bias)
        else:
            self.q_proj = nn.Linear(dim, q_size, bias=qkv_bias)
            self.k_proj = nn.Linear(dim, kv_size, bias=qkv_bias)
            self.v_proj = nn.Linear(dim, kv_size, bias=qkv_bias)
        self.o_proj = nn.Linear(q_size, dim, bias=out_bias)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
        cache: KVCache | None = None,
        start: int = 0,
    ) -> torch.Tensor:
        """x (B, T, C); mask None (causal) or bool (B, 1, T, S) with True = may attend; -> (B, T, C).

        With a cache, keys/values for positions [start, start+T) are written into it and the
        queries attend to everything cached so far (S = start + T).
        """
        B, T, _ = x.shape
        if hasattr(self, "qkv_proj"):
            q, k, v = self.qkv_proj(x).split(
                [self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim], dim=-1
            )
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(start, k, v)  # (B, nkv, S, hs)
        if T <= SMALL_QUERY and (T == 1 or mask is not None):
            y = grouped_attention(q, k, v, mask)  # (B, nh, T, hs)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v,
                attn_mask=mask,
                is_causal=mask is None and T > 1,
                enable_gqa=self.n_kv_head != self.n_head,
            )  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.o_proj(y)
