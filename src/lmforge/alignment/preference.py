"""Preference-optimisation losses (pure functions of summed sequence log-probabilities).

- DPO (Rafailov et al. 2023, "Direct Preference Optimization", eq. 7):
  L = -log sigmoid(beta * h), with optional label smoothing (the "conservative DPO" variant:
  -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h)).
- IPO (Azar et al. 2023, "A General Theoretical Paradigm...", eq. 17): L = (h - 1 / (2 tau))^2.
- Pairwise reward modelling, Bradley-Terry (Ouyang et al. 2022, eq. 1): L = -log sigmoid(r_w - r_l).

where h = [log pi(y_w|x) - log ref(y_w|x)] - [log pi(y_l|x) - log ref(y_l|x)] for the chosen y_w
and rejected y_l responses. The losses take summed sequence log-probabilities, shape (B,)
(``data/tokens.py``'s per-token log-probs summed over the sequence).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from lmforge.errors import LmforgeError


def _margin(pol_chosen: Tensor, pol_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor) -> Tensor:
    return (pol_chosen - ref_chosen) - (pol_rejected - ref_rejected)


def dpo_loss(pol_chosen: Tensor, pol_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
             beta: float = 0.1, label_smoothing: float = 0.0) -> Tensor:
    """Mean DPO loss over the batch (inputs: summed log-probs, each (B,))."""
    if beta <= 0:
        raise LmforgeError(f"DPO beta must be > 0, got {beta}")
    if not 0 <= label_smoothing < 0.5:
        raise LmforgeError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    z = beta * _margin(pol_chosen, pol_rejected, ref_chosen, ref_rejected)
    return (-(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)).mean()


def ipo_loss(pol_chosen: Tensor, pol_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
             tau: float = 0.1) -> Tensor:
    """Mean IPO loss over the batch: the log-ratio margin regressed onto 1 / (2 tau)."""
    if tau <= 0:
        raise LmforgeError(f"IPO tau must be > 0, got {tau}")
    return ((_margin(pol_chosen, pol_rejected, ref_chosen, ref_rejected) - 1 / (2 * tau)) ** 2).mean()


def bradley_terry_loss(reward_chosen: Tensor, reward_rejected: Tensor) -> Tensor:
    """Mean pairwise reward-model loss: the chosen response should out-score the rejected one. (B,) each."""
    return -F.logsigmoid(reward_chosen - reward_rejected).mean()
