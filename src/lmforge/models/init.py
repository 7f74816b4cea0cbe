"""Random initialisation for training from scratch (the models' own ``init_weights`` and ``pretrain`` use it)."""

from __future__ import annotations

import torch
from torch import nn

from lmforge.models.layers import RMSNorm


def init_weights(model: nn.Module, std: float = 0.02, seed: int | None = None) -> nn.Module:
    """Random init for training from scratch: N(0, std) matrices and embeddings, zero biases, unit norm scales.

    Norm scales are found by module type (LayerNorm, RMSNorm), not by name: BERT's ``LayerNorm``
    modules are spelt in mixed case.
    """
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    scales = {id(m.weight) for m in model.modules()
              if isinstance(m, (nn.LayerNorm, nn.RMSNorm, RMSNorm)) and m.weight is not None}
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            elif id(p) in scales:
                p.fill_(1.0)
            else:
                p.zero_()
    return model
