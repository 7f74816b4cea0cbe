"""Preference-optimisation losses (pure functions of summed sequence log-probabilities).

- DPO (Rafailov et al. 2023, "Direct Preference Optimization", eq. 7):
  L = -log sigmoid(beta * h), with optional label smoothing (the "conservative DPO" variant:
  -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h)).
- IPO (Azar et al. 2023, "A General Theoretical Paradigm...", eq. 17): L = (h - 1 / (2 tau))^2.
- Pairwise reward modelling, Bradley-Terry (Ouyang et al. 2022, eq. 1): L = -log sigmoid(r_w - r_l).

The reference-free and unpaired losses (``orpo_loss``, ``simpo_loss``, ``kto_loss``; the recipes of
``alignment/preference_recipes.py``):

- ORPO (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model",
  arXiv:2403.07691, eqs. 4-7): L = NLL(y_w) + lambda * -log sigmoid(log odds(y_w) - log odds(y_l)), where
  odds(y) = P(y) / (1 - P(y)) and log P(y) is the length-normalised log-prob (1/|y|) log pi(y|x).
- SimPO (Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward",
  arXiv:2405.14734, eq. 6): L = -log sigmoid(beta/|y_w| log pi(y_w|x) - beta/|y_l| log pi(y_l|x) - gamma).
- KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization",
  arXiv:2402.01306, eq. 8): with r = log pi(y|x) - log ref(y|x), v = lambda_D sigmoid(beta (r - z0)) for a
  desirable y and lambda_U sigmoid(beta (z0 - r)) for an undesirable one, L = mean(lambda_y - v). The
  reference point z0 is the paper's batch estimate of KL(pi || ref): the mean of log pi(y'|x) - log ref(y'|x)
  over *mismatched* prompt/completion pairs of the batch (prompt i with completion i+1), clamped at 0 and not
  differentiated through (``kto_reference_point``).

where h = [log pi(y_w|x) - log ref(y_w|x)] - [log pi(y_l|x) - log ref(y_l|x)] for the chosen y_w
and rejected y_l responses. The losses take summed sequence log-probabilities, shape (B,)
(``data/tokens.py``'s per-token log-probs summed over the sequence).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
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


def mean_logprob(summed: Tensor, lengths: Tensor) -> Tensor:
    """Length-normalised log-probs: summed response log-probs (B,) over the response lengths (B,) in tokens."""
    return summed / lengths.clamp(min=1).to(summed.dtype)


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends (Maechler 2012: expm1 near 0, log1p far from it)."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_log_odds_ratio(chosen_mean: Tensor, rejected_mean: Tensor) -> Tensor:
    """log odds(y_w) - log odds(y_l) from length-normalised log-probs (ORPO eq. 5), (B,) each."""
    return (chosen_mean - log1mexp(chosen_mean)) - (rejected_mean - log1mexp(rejected_mean))


def orpo_loss(chosen_logp: Tensor, rejected_logp: Tensor, chosen_len: Tensor, rejected_len: Tensor,
              lam: float = 0.1) -> Tensor:
    """Mean ORPO loss: the chosen response's per-token NLL plus ``lam`` * -log sigmoid(log odds ratio).

    Inputs: summed response log-probs and response lengths in tokens, (B,) each. The NLL is each chosen
    response's mean per-token NLL, averaged over the pairs (equal to a token-level mean when lengths are equal)."""
    if lam <= 0:
        raise LmforgeError(f"ORPO lambda must be > 0, got {lam}")
    chosen, rejected = mean_logprob(chosen_logp, chosen_len), mean_logprob(rejected_logp, rejected_len)
    return (-chosen - lam * F.logsigmoid(orpo_log_odds_ratio(chosen, rejected))).mean()


def simpo_loss(chosen_logp: Tensor, rejected_logp: Tensor, chosen_len: Tensor, rejected_len: Tensor,
               beta: float = 2.0, gamma: float = 1.0) -> Tensor:
    """Mean SimPO loss: -log sigmoid(beta * (mean log-prob of y_w - that of y_l) - gamma); no reference model.
    Inputs as for ``orpo_loss``."""
    if beta <= 0:
        raise LmforgeError(f"SimPO beta must be > 0, got {beta}")
    if gamma < 0:
        raise LmforgeError(f"SimPO gamma must be >= 0, got {gamma}")
    margin = beta * (mean_logprob(chosen_logp, chosen_len) - mean_logprob(rejected_logp, rejected_len))
    return -F.logsigmoid(margin - gamma).mean()


def kto_reference_point(mismatched_policy: Tensor, mismatched_ref: Tensor,
                        all_reduce: Callable[[Tensor], None] | None = None) -> Tensor:
    """KTO's z0: the batch KL estimate mean(log pi(y'|x) - log ref(y'|x)) over mismatched pairs (x, y'),
    clamped at 0 and detached (the paper does not back-propagate through it). No pairs give 0. ``all_reduce``
    (in place, a sum over processes) makes the mean one over the whole data-parallel batch."""
    diff = (mismatched_policy - mismatched_ref).detach()
    total = torch.stack([diff.sum(), diff.new_tensor(float(diff.numel()))])
    if all_reduce is not None:
        all_reduce(total)
    if total[1] == 0:
        return total[0].new_zeros(())
    return (total[0] / total[1]).clamp(min=0)


def kto_loss(policy_logp: Tensor, ref_logp: Tensor, desirable: Tensor, z0: Tensor | float, beta: float = 0.1,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> Tensor:
    """Mean KTO loss over the examples: summed response log-probs under the policy and the reference (B,),
    ``desirable`` (B,) bool, the reference point ``z0`` (``kto_reference_point``)."""
    if beta <= 0:
        raise LmforgeError(f"KTO beta must be > 0, got {beta}")
    if desirable_weight <= 0 or undesirable_weight <= 0:
        raise LmforgeError(f"KTO weights must be > 0, got desirable {desirable_weight}, "
                           f"undesirable {undesirable_weight}")
    r = policy_logp - ref_logp
    value = torch.where(desirable, desirable_weight * torch.sigmoid(beta * (r - z0)),
                        undesirable_weight * torch.sigmoid(beta * (z0 - r)))
    weight = torch.where(desirable, desirable_weight, undesirable_weight)
    return (weight - value).mean()
