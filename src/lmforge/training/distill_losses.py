"""The divergences knowledge distillation minimises (``distill.py`` runs them): forward KL (Hinton et al. 2015),
reverse KL and the generalised Jensen-Shannon divergence JSD(beta) (Agarwal et al. 2024, eq. 2), on
temperature-softened distributions scaled by T^2, optionally mixed with the label cross-entropy; and the same
on a teacher's top-k logits (``TopK``), compared over k+1 outcomes (the k tokens and "any other token").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lmforge.errors import LmforgeError

if TYPE_CHECKING:  # torch is imported inside the functions so that building the CLI parser stays fast
    from torch import Tensor

LOSSES = ("forward", "reverse", "jsd")


def _kl(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(p || q) over the last dimension from log-probabilities; outcomes with p = 0 add nothing."""
    import torch

    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(-1)


def divergence(teacher_logp: Tensor, student_logp: Tensor, kind: str, beta: float = 0.5) -> Tensor:
    """Per-position divergence (..., K) -> (...) between the teacher's and the student's log-probabilities.

    ``forward``: KL(p || q); ``reverse``: KL(q || p); ``jsd``: beta * KL(p || m) + (1 - beta) * KL(q || m)
    with m = beta * p + (1 - beta) * q (Agarwal et al. 2024, eq. 2). p = teacher, q = student.
    """
    import torch

    p, q = teacher_logp.float(), student_logp.float()
    if kind == "forward":
        return _kl(p, q)
    if kind == "reverse":
        return _kl(q, p)
    if kind == "jsd":
        logm = torch.logsumexp(torch.stack([p + math.log(beta), q + math.log(1 - beta)]), dim=0)
        return beta * _kl(p, logm) + (1 - beta) * _kl(q, logm)
    raise LmforgeError(f"unknown distillation loss {kind!r}; allowed: {', '.join(LOSSES)}")


REST_FLOOR = 1e-10  # the smallest probability of "any other token" (float32 rounds 1 - sum to 0 for peaked logits)


def _with_rest(logp_k: Tensor) -> Tensor:
    """k log-probabilities (..., k) -> k + 1 (..., k+1): the last outcome is everything else, log(1 - sum),
    at least ``REST_FLOOR`` (so that neither side of a KL gives the other's rest outcome probability 0)."""
    import torch

    rest = torch.log((1.0 - torch.logsumexp(logp_k, -1).exp()).clamp(min=REST_FLOOR))
    return torch.cat([logp_k, rest.unsqueeze(-1)], -1)


@dataclass
class TopK:
    """The teacher at N positions, as cached: its k largest logits, their token ids and logsumexp(logits / T)."""

    values: Tensor  # (N, k) float32 raw logits
    indices: Tensor  # (N, k) int64
    lse: Tensor  # (N,) float32: logsumexp(logits / T) over the whole vocabulary


def teacher_topk(logits: Tensor, k: int, temperature: float) -> TopK:
    """The top-k view of teacher logits (N, V) at ``temperature``."""
    logits = logits.float()
    values, indices = logits.topk(min(k, logits.shape[-1]), dim=-1)
    return TopK(values, indices, (logits / temperature).logsumexp(-1))


def divergence_from_logits(teacher: Tensor | TopK, student_logits: Tensor, kind: str, temperature: float,
                           beta: float = 0.5) -> Tensor:
    """Per-position divergence (N,) between the softened teacher (full logits (N, V) or a ``TopK``) and the
    softened student logits (N, V) (see the module docstring for the k + 1 outcomes of a ``TopK``)."""
    student_logp = (student_logits.float() / temperature).log_softmax(-1)
    if isinstance(teacher, TopK) and teacher.values.shape[-1] >= student_logits.shape[-1]:  # every token: no rest
        teacher_logp = teacher.values.gather(-1, teacher.indices.argsort(-1)) / temperature - teacher.lse[..., None]
    elif isinstance(teacher, TopK):
        teacher_logp = _with_rest(teacher.values / temperature - teacher.lse.unsqueeze(-1))
        student_logp = _with_rest(student_logp.gather(-1, teacher.indices))
    else:
        teacher_logp = (teacher.float() / temperature).log_softmax(-1)
    return divergence(teacher_logp, student_logp, kind, beta)


def distill_loss(student_logits: Tensor, teacher: Tensor | TopK, labels: Tensor, *, kind: str = "forward",
                 temperature: float = 2.0, beta: float = 0.5, alpha: float = 0.0) -> tuple[Tensor, dict[str, float]]:
    """``alpha * CE(student, labels) + (1 - alpha) * T^2 * mean divergence`` over N positions, and the parts.
    student_logits (N, V), labels (N,)."""
    from lmforge.training.sft_losses import masked_cross_entropy

    kd = divergence_from_logits(teacher, student_logits, kind, temperature, beta).mean() * temperature ** 2
    if alpha > 0:
        ce = masked_cross_entropy(student_logits, labels)
        return alpha * ce + (1 - alpha) * kd, {"kd": float(kd.detach()), "ce": float(ce.detach())}
    return kd, {"kd": float(kd.detach())}
