"""Multi-head attention: self or cross, causal or not, grouped-query heads, optional fused qkv,
RoPE, and a KV cache.

Prefill and training go through ``torch.nn.functional.scaled_dot_product_attention``. Decode
steps (a handful of queries against the cache) use ``grouped_attention``, a plain matmul/softmax
that lets each group of query heads share its key/value head without copying it: on CPU the
fused kernels cost several times more than the arithmetic for one query. Short bfloat16 sequences
on CPU (at most ``SHORT_BF16`` keys) use it too: there torch 2.13's fused kernel is ~3x slower
forward + backward than the plain matmuls (measured up to 128 keys; level at ~200; slower beyond).

Masks are either bool (True = may attend) or float (added to the scores: T5's position bias,
with -inf where attention is not allowed).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from lmforge.models.kv_cache import KVCache, StaticKV
from lmforge.models.positions import apply_rope

SMALL_QUERY = 8  # at most this many queries: grouped_attention instead of the fused kernel
SHORT_BF16 = 128  # at most this many keys, bfloat16 on CPU: grouped_attention too


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                      scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v for q (B, nh, T, hs) over k, v (B, nkv, S, hs).

    mask: None, or bool/float (B|1, 1|nh, T, S). Query head h reads key/value head h // (nh // nkv),
    as in grouped-query attention.
    """
    B, nh, T, hs = q.shape
    nkv, S = k.shape[1], k.shape[2]
    g = nh // nkv
    qg = q.reshape(B, nkv, g * T, hs)  # (B, nkv, g*T, hs): the g heads of a group, stacked
    scores = (qg @ k.transpose(-1, -2)) * (hs**-0.5 if scale is None else scale)  # (B, nkv, g*T, S)
    if mask is not None:
        Bm = mask.shape[0]
        if mask.shape[1] == 1:
            m = mask[:, :, None].expand(Bm, 1, g, T, S).reshape(Bm, 1, g * T, S)
        else:
            m = mask.reshape(Bm, nkv, g * T, S)  # per-head masks, grouped like the queries
        scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m
    probs = scores.float().softmax(dim=-1).to(v.dtype)
    return (probs @ v).view(B, nh, T, hs)  # (B, nh, T, hs)


def attention_dtype(dtype: torch.dtype, device: torch.device | str | None) -> torch.dtype:
    """The dtype attention runs in, and KV caches are kept in, for activations of ``dtype`` on ``device``:
    float32 for bfloat16/float16 on CPU, else ``dtype``. At decode time attention's matmuls over the cache are
    tiny (one query row per head group) and on CPU cost far more than their arithmetic in bfloat16 (oneDNN's
    per-call work): for SmolLM2's shapes 33 + 30 us a layer against 16 + 8 us in float32, +7-14% decode tok/s for
    the compiled int4 step at one thread. ``Attention`` applies it to inference (a KV cache, or autograd off), with
    or without a cache, so cached decoding stays equal to uncached; float32 is also the closer to a float32 model.
    Training keeps the model's dtype (its saved activations would grow). The cost: a cache twice the size of a
    bfloat16 one (SmolLM2-135M: 46 KB a token instead of 23), which is why the serving engine, whose cache is
    preallocated for every slot and the whole context, keeps its cache in the model's dtype; attention over a
    cache runs in the cache's dtype."""
    if dtype in (torch.bfloat16, torch.float16) and torch.device(device or "cpu").type == "cpu":
        return torch.float32
    return dtype


def causal_mask(T: int, S: int, device: torch.device | None = None) -> torch.Tensor:
    """Bool (1, 1, T, S), True = may attend: T queries at positions S-T..S-1 see the keys up to themselves."""
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(S - T)[None, None]


def _bf16_on_cpu(x: torch.Tensor) -> bool:
    """Whether attention on x runs in bfloat16 on CPU: x is bf16, or bf16 autocast is on."""
    return x.device.type == "cpu" and (x.dtype == torch.bfloat16 or (
        torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16))


class Attention(nn.Module):
    def __init__(self, dim: int, n_head: int, n_kv_head: int, head_dim: int, *,
                 qkv_bias: bool = False, out_bias: bool = False, fused_qkv: bool = False,
                 causal: bool = True, scale: float | None = None, cross: bool = False):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, head_dim
        self.causal, self.scale, self.cross = causal and not cross, scale, cross
        q_size, kv_size = n_head * head_dim, n_kv_head * head_dim
        # either one fused projection (qkv_proj) or three (q_proj, k_proj, v_proj); the unused ones are None
        self.qkv_proj = self.q_proj = self.k_proj = self.v_proj = None
        if fused_qkv:
            assert not cross, "cross-attention takes keys/values from another sequence: no fused qkv"
            self.qkv_proj = nn.Linear(dim, q_size + 2 * kv_size, bias=qkv_bias)
        else:
            self.q_proj = nn.Linear(dim, q_size, bias=qkv_bias)
            self.k_proj = nn.Linear(dim, kv_size, bias=qkv_bias)
            self.v_proj = nn.Linear(dim, kv_size, bias=qkv_bias)
        self.o_proj = nn.Linear(q_size, dim, bias=out_bias)

    def _heads(self, t: torch.Tensor, n: int) -> torch.Tensor:
        B, T, _ = t.shape
        return t.view(B, T, n, self.head_dim).transpose(1, 2)  # (B, n, T, hs)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
        cache: KVCache | StaticKV | None = None,
        start: int = 0,
        memory: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C).

        Self-attention: mask None means causal (or, if not causal, unmasked); with a KVCache the
        keys/values of positions [start, start+T) are written and query i (position start+i) sees
        keys 0..start+i of all S = start+T.
        Cross-attention: keys/values come from ``memory`` (B, S, C), or from ``cache`` (a
        StaticKV) once it has been filled on the first call.
        """
        B, T, _ = x.shape
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x).split(
                [self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim], dim=-1
            )
            q, k, v = self._heads(q, self.n_head), self._heads(k, self.n_kv_head), self._heads(v, self.n_kv_head)
        else:
            q = self._heads(self.q_proj(x), self.n_head)  # (B, nh, T, hs)
            if self.cross and cache is not None and cache.filled:
                k, v = cache.k, cache.v  # (B, nkv, S, hs), computed on the first step
            else:
                src = memory if self.cross else x
                k, v = self._heads(self.k_proj(src), self.n_kv_head), self._heads(self.v_proj(src), self.n_kv_head)
        dtype, work = q.dtype, attention_dtype(q.dtype, q.device)
        if work != dtype and (cache is not None or not torch.is_grad_enabled()) and not torch.is_autocast_enabled(
                q.device.type):  # inference; training keeps the model's dtype (and under autocast, autocast's)
            q, k, v = q.to(work), k.to(work), v.to(work)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if self.cross:
            if cache is not None and not cache.filled:
                cache.fill(k, v)
        elif cache is not None:
            k, v = cache.update(start, k, v)  # (B, nkv, S, hs)
        if k.dtype != q.dtype:  # a cache kept in another dtype (the serving engine's, in the model's): attend in it
            q = q.to(k.dtype)
        S = k.shape[2]
        if mask is None and self.causal and 1 < T < S:  # the cache holds earlier keys: SDPA's is_causal
            mask = causal_mask(T, S, q.device)  # would align the mask top-left, this one is bottom-right
        if T <= SMALL_QUERY and (T == 1 or mask is not None or not self.causal):
            y = grouped_attention(q, k, v, mask, self.scale)  # (B, nh, T, hs)
        elif S <= SHORT_BF16 and _bf16_on_cpu(q):
            if mask is None and self.causal:
                mask = causal_mask(T, S, q.device)
            y = grouped_attention(q, k, v, mask, self.scale)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v,
                attn_mask=mask,
                is_causal=self.causal and mask is None,
                scale=self.scale,
                enable_gqa=self.n_kv_head != self.n_head,
            )  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim).to(dtype)
        return self.o_proj(y)
