"""The optimiser and the learning-rate schedule of the training loop.

AdamW (Loshchilov & Hutter 2019) with weight decay on matrices only, and the schedule most
pretraining recipes use (GPT-3, Brown et al. 2020 §B; nanoGPT): a linear warmup from 0 to ``lr``
over ``warmup_steps``, then a half-cosine down to ``lr * min_lr_ratio`` at the last step.
The schedule is a pure function of the step, so resuming only needs the step number.
"""

from __future__ import annotations

import inspect
import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: every parameter with >= 2 dims (weights, embeddings) decays; 1-D ones
    (biases, norm scales) do not. Tied parameters appear once."""
    decay, no_decay = [], []
    for p in dict.fromkeys(p for p in model.parameters() if p.requires_grad):  # dedupe tied weights, keep order
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float]) -> torch.optim.AdamW:
    """AdamW over ``param_groups``, fused (one kernel for all parameters) where this torch and device allow."""
    groups = param_groups(model, weight_decay)
    kwargs: dict = {}
    device = next(model.parameters()).device
    if "fused" in inspect.signature(torch.optim.AdamW).parameters and device.type in ("cpu", "cuda"):
        kwargs["fused"] = True
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), **kwargs)
    except RuntimeError:  # e.g. a dtype the fused kernel does not take
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas))


def lr_at(step: int, lr: float, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.1) -> float:
    """Learning rate for optimiser step ``step`` (0-based): linear warmup, then cosine decay to
    ``lr * min_lr_ratio`` reached at the last step (``total_steps - 1``)."""
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_steps = max(total_steps - 1 - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / decay_steps, 1.0)
    min_lr = lr * min_lr_ratio
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
