"""Building blocks shared by the three transformer variants: norms, feed-forward networks, blocks.

Layers receive sizes and flags as explicit arguments, never a config object.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from lmforge.models.attention import Attention


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019): x / rms(x) * weight, computed in float32.

    T5's "layer norm" is this same operation (no mean subtraction, no bias).
    """

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


ACTIVATIONS = {
    "silu": F.silu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),  # GPT-2's and T5 v1.1's "gelu_new"
    "gelu": F.gelu,  # exact (erf), BERT's
    "relu": F.relu,
}


class GatedMLP(nn.Module):
    """Gated feed-forward (Shazeer 2020, "GLU Variants", eq. 6): down(act(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int, act: str = "silu", bias: bool = False):
        super().__init__()
        self.act = ACTIVATIONS[act]
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class MLP(nn.Module):
    """Two-layer feed-forward: down(act(up(x)))."""

    def __init__(self, dim: int, hidden: int, act: str = "gelu_tanh", bias: bool = True):
        super().__init__()
        self.act = ACTIVATIONS[act]
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.up_proj(x)))


def make_mlp(kind: str, dim: int, hidden: int, bias: bool) -> nn.Module:
    """The feed-forward network named by ``ModelConfig.mlp``."""
    if kind == "swiglu":
        return GatedMLP(dim, hidden, "silu", bias)
    if kind == "geglu":
        return GatedMLP(dim, hidden, "gelu_tanh", bias)
    return MLP(dim, hidden, {"gelu": "gelu_tanh", "gelu_exact": "gelu", "relu": "relu"}[kind], bias)


class Block(nn.Module):
    """Pre-norm block: x + attn(norm(x)) [+ cross_attn(norm(x), memory)], then x + mlp(norm(x)).

    The decoder-only models use it without cross-attention; T5's encoder and decoder with and
    without it.
    """

    def __init__(self, attn: Attention, mlp: nn.Module, input_norm: nn.Module, post_attention_norm: nn.Module,
                 cross_attn: Attention | None = None, cross_norm: nn.Module | None = None):
        super().__init__()
        self.input_layernorm = input_norm
        self.self_attn = attn
        self.cross_attn_layernorm = cross_norm  # both None in a block without cross-attention
        self.cross_attn = cross_attn
        self.post_attention_layernorm = post_attention_norm
        self.mlp = mlp

    def forward(self, x, rope, mask, cache=None, start: int = 0, memory=None, memory_mask=None, cross_cache=None):
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, cache, start)
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.cross_attn_layernorm(x), None, memory_mask, cross_cache, memory=memory)
        return x + self.mlp(self.post_attention_layernorm(x))


class PostNormBlock(nn.Module):
    """Post-norm block (the original Transformer, BERT): norm(x + attn(x)), then norm(x + mlp(x))."""

    def __init__(self, attn: Attention, mlp: nn.Module, attn_norm: nn.Module, mlp_norm: nn.Module):
        super().__init__()
        self.self_attn = attn
        self.attn_layernorm = attn_norm
        self.mlp = mlp
        self.mlp_layernorm = mlp_norm

    def forward(self, x, rope, mask, cache=None, start: int = 0):
        x = self.attn_layernorm(x + self.self_attn(x, rope, mask, cache, start))
        return self.mlp_layernorm(x + self.mlp(x))
