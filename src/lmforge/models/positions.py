"""Position information: rotary embeddings (RoPE, with linear and Llama-3 scaling), learned
absolute positions, and T5's bucketed relative position bias.

RoPE follows Su et al. 2021 ("RoFormer", eq. 34) in the half-split layout used by the Llama
checkpoints on the Hugging Face hub: the first and second halves of each head are rotated as
pairs. Llama-3 frequency scaling is from Meta's Llama 3.1 reference code (the published
wavelength bands); linear scaling divides every frequency by ``factor``. T5's relative buckets
follow Raffel et al. 2020 (sec. 2.1): half the buckets map exact small distances, the rest
cover distances logarithmically up to ``max_distance``; bidirectional attention spends half
the buckets on each direction.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from lmforge.errors import LmforgeError


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None = None) -> torch.Tensor:
    """Inverse frequencies, shape (head_dim // 2,), float32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)  # long waves: slow down
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, blended, scaled)
    raise LmforgeError(f"rope_scaling type {kind!r} is not supported; supported: default, linear, llama3")


class RotaryEmbedding(nn.Module):
    """Computes (cos, sin) for given positions; applied inside attention by ``apply_rope``.

    The inverse frequencies are a plain float32 tensor, not a buffer, so ``model.to(bfloat16)``
    cannot round them (angles at long positions would drift).
    """

    def __init__(self, head_dim: int, theta: float, scaling: dict[str, Any] | None = None):
        super().__init__()
        self.inv_freq = rope_inv_freq(head_dim, theta, scaling)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, T) int -> cos, sin each (B, 1, T, head_dim), in ``dtype``."""
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = positions[:, :, None].float() * self.inv_freq[None, None, :]  # (B, T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, hd)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, nh, T, hd) by the angles in cos/sin (B, 1, T, hd)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class LearnedPositions(nn.Module):
    """GPT-2 style absolute position embeddings, added to the token embeddings."""

    def __init__(self, max_seq_len: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(max_seq_len, dim))

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        """positions (B, T) -> (B, T, dim)."""
        return nn.functional.embedding(positions, self.weight)


def relative_position_bucket(rel: torch.Tensor, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> torch.Tensor:
    """Bucket index for each relative position rel = key_pos - query_pos (any shape, int)."""
    bucket = torch.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (rel > 0).long() * num_buckets  # keys after the query use the upper half
        dist = rel.abs()
    else:
        dist = (-rel).clamp(min=0)  # a causal query only looks back
    exact = num_buckets // 2
    log_bucket = exact + (
        torch.log(dist.float().clamp(min=1) / exact) / math.log(max_distance / exact) * (num_buckets - exact)
    ).long()
    log_bucket = log_bucket.clamp(max=num_buckets - 1)
    return bucket + torch.where(dist < exact, dist, log_bucket)


class RelativePositionBias(nn.Module):
    """A learned per-head scalar for each relative-position bucket, added to the attention scores."""

    def __init__(self, n_head: int, num_buckets: int, max_distance: int, bidirectional: bool):
        super().__init__()
        self.num_buckets, self.max_distance, self.bidirectional = num_buckets, max_distance, bidirectional
        self.weight = nn.Parameter(torch.empty(num_buckets, n_head))

    def forward(self, start: int, T: int, S: int) -> torch.Tensor:
        """Bias for queries at positions [start, start+T) over keys [0, S): (1, nh, T, S)."""
        q_pos = torch.arange(start, start + T, device=self.weight.device)[:, None]
        k_pos = torch.arange(S, device=self.weight.device)[None, :]
        buckets = relative_position_bucket(k_pos - q_pos, self.bidirectional, self.num_buckets, self.max_distance)
        return nn.functional.embedding(buckets, self.weight).permute(2, 0, 1)[None]  # (1, nh, T, S)
