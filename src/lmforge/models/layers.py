"""Building blocks shared by the transformer variants: norms, feed-forward networks, a pre-norm block.

Layers receive sizes and flags as explicit arguments, never a config object.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from lmforge.models.attention import Attention


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019): x / rms(x) * weight, computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    if kind == "rmsnorm":
        return RMSNorm(dim, eps)
    assert kind == "layernorm", kind
    return nn.LayerNorm(dim, eps=eps)


class SwiGLU(nn.Module):
    """Gated feed-forward (Shazeer 2020, eq. 6): down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class GeluMLP(nn.Module):
    """GPT-2 feed-forward: down(gelu_tanh(up(x)))."""

    def __init__(self, dim: int, hidden: int, bias: bool = True):
        super().__init__()
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, attn: Attention, mlp: nn.Module, input_norm: nn.Module, post_attention_norm: nn.Module):
        super().__init__()
        self.input_layernorm = input_norm
        self.self_attn = attn
        self.post_attention_layernorm = post_attention_norm
        self.mlp = mlp

    def forward(self, x, rope, mask, cache=None, start: int = 0):
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, cache, start)
        return x + self.mlp(self.post_attention_layernorm(x))
