"""DPO / IPO losses on hand-computed cases, and a tiny DPO run that widens the preference margin."""

import math

import pytest
import torch

from lmforge.alignment.preference import dpo_loss, ipo_loss
from lmforge.config import preset
from lmforge.data.tokens import IGNORE_INDEX, token_logprobs
from lmforge.errors import LmforgeError
from lmforge.models.decoder import DecoderLM
from lmforge.peft.lora import LoraSpec, add_lora, set_lora_enabled


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def test_dpo_and_ipo_match_the_formulas_by_hand():
    # h = (-1.0 - -1.5) - (-2.0 - -1.5) = 0.5 + 0.5 = 1.0
    args = t(-1.0), t(-2.0), t(-1.5), t(-1.5)
    assert dpo_loss(*args, beta=0.1).item() == pytest.approx(math.log(1 + math.exp(-0.1)))  # -log sigmoid(0.1)
    assert dpo_loss(*args, beta=2.0).item() == pytest.approx(math.log(1 + math.exp(-2.0)))
    smoothed = 0.9 * math.log(1 + math.exp(-0.1)) + 0.1 * math.log(1 + math.exp(0.1))
    assert dpo_loss(*args, beta=0.1, label_smoothing=0.1).item() == pytest.approx(smoothed)
    assert ipo_loss(*args, tau=0.1).item() == pytest.approx((1.0 - 5.0) ** 2)  # (h - 1/(2 tau))^2
    assert ipo_loss(*args, tau=0.5).item() == pytest.approx(0.0)  # h already equals 1/(2 tau)
    batch = t(-1.0, -3.0), t(-2.0, -1.0), t(-1.5, -2.0), t(-1.5, -2.0)  # h = 1.0 and -2.0
    expected = (math.log(1 + math.exp(-0.1)) + math.log(1 + math.exp(0.2))) / 2
    assert dpo_loss(*batch, beta=0.1).item() == pytest.approx(expected)


def test_bad_hyperparameters():
    args = t(-1.0), t(-2.0), t(-1.5), t(-1.5)
    with pytest.raises(LmforgeError, match="beta must be > 0"):
        dpo_loss(*args, beta=0)
    with pytest.raises(LmforgeError, match="label_smoothing"):
        dpo_loss(*args, label_smoothing=0.7)
    with pytest.raises(LmforgeError, match="tau must be > 0"):
        ipo_loss(*args, tau=-1)


def test_tiny_dpo_run_raises_the_chosen_over_rejected_margin():
    """LoRA policy; the reference is the same model with the adapter switched off (no second copy)."""
    torch.manual_seed(0)
    model = DecoderLM(preset("tiny-llama")).init_weights(seed=0, std=0.1)
    add_lora(model, LoraSpec(r=4, alpha=8, targets="all-linear"))
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 256, (4, 6), generator=g)
    chosen, rejected = torch.randint(0, 256, (4, 5), generator=g), torch.randint(0, 256, (4, 5), generator=g)

    def logps(response):
        seq = torch.cat([prompt, response], dim=1)  # (B, 11)
        labels = seq.clone()
        labels[:, : prompt.shape[1]] = IGNORE_INDEX  # score the response only
        return token_logprobs(model(seq)[:, :-1], labels[:, 1:]).sum(-1)

    with torch.no_grad():
        set_lora_enabled(model, False)
        ref_c, ref_r = logps(chosen), logps(rejected)
        set_lora_enabled(model, True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    margins = []
    for _ in range(25):
        pol_c, pol_r = logps(chosen), logps(rejected)
        loss = dpo_loss(pol_c, pol_r, ref_c, ref_r, beta=0.1)
        margins.append(float(((pol_c - ref_c) - (pol_r - ref_r)).mean().detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert abs(margins[0]) < 1e-4  # B = 0 at the start: policy == reference
    assert margins[-1] > 1.0, margins[-5:]


def test_bradley_terry_by_hand_and_a_tiny_reward_model_learns_to_rank():
    from lmforge.alignment.preference import bradley_terry_loss
    from lmforge.models.heads import RewardModel

    assert bradley_terry_loss(t(2.0, 0.0), t(1.0, 1.0)).item() == pytest.approx(
        (math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(1.0))) / 2)
    torch.manual_seed(0)
    rm = RewardModel(DecoderLM(preset("tiny-llama")).init_weights(seed=0, std=0.1))
    g = torch.Generator().manual_seed(2)

    def pairs(n):  # chosen sequences hold the "good" token 7 a few times; rejected ones hold none
        chosen = torch.randint(10, 256, (n, 12), generator=g)
        chosen[:, torch.randperm(12, generator=g)[:3]] = 7
        return chosen, torch.randint(10, 256, (n, 12), generator=g)

    train_c, train_r = pairs(64)
    test_c, test_r = pairs(64)
    opt = torch.optim.AdamW(rm.parameters(), lr=3e-3)
    for step in range(40):
        i = torch.arange(16) + (step % 4) * 16
        loss = bradley_terry_loss(rm(train_c[i]), rm(train_r[i]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        accuracy = (rm(test_c) > rm(test_r)).float().mean().item()
    assert accuracy > 0.9, accuracy
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0  # right padding: the reward is read at the last real token
    with torch.no_grad():
        padded = rm(test_c[:2], mask)
        torch.testing.assert_close(padded[1], rm(test_c[1:2, :8])[0])
