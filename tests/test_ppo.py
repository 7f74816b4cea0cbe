"""PPO: the math on hand-computed cases, a toy task that PPO learns with a bounded KL, the reference
being exactly the adapter-disabled base, EOS masking, and bad input."""

import json
import math

import pytest
import torch

import lmforge
from lmforge.alignment.ppo import (
    PPOHyperparams,
    PPOTrainer,
    adaptive_kl_coef,
    gae,
    kl_shaped_rewards,
    policy_loss,
    value_loss,
    whiten,
)
from lmforge.config import preset
from lmforge.data.tokens import token_logprobs
from lmforge.errors import LmforgeError
from lmforge.models.decoder import DecoderLM
from lmforge.peft.lora import LoraSpec, add_lora
from lmforge.training.tokenizer_train import char_tokenizer

CHARS = "abcdefghijklmnop "


def t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_gae_by_hand():
    # gamma 0.9, lambda 0.5. Row 0: three real tokens. Row 1: the last token is padding (after EOS).
    rewards, values = t([1, 0, 2], [1, 3, 5]), t([0.5, 1.0, 0.0], [0.5, 1.0, 7.0])
    mask = t([1, 1, 1], [1, 1, 0])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # row 0: d2 = 2, A2 = 2; d1 = 0 + 0.9*0 - 1 = -1, A1 = -1 + 0.45*2 = -0.1; d0 = 1 + 0.9 - 0.5 = 1.4, A0 = 1.355
    # row 1: A2 = 0 (padding); d1 = 3 - 1 = 2, A1 = 2; d0 = 1.4, A0 = 1.4 + 0.45*2 = 2.3
    torch.testing.assert_close(adv, t([1.355, -0.1, 2.0], [2.3, 2.0, 0.0]))
    torch.testing.assert_close(ret, t([1.855, 0.9, 2.0], [2.8, 3.0, 0.0]))  # A + V, 0 on padding


def test_whiten_by_hand():
    out = whiten(t([1, 2, 3, 100]), t([1, 1, 1, 0]))  # mean 2, variance 2/3 over the 3 real values
    torch.testing.assert_close(out, t([-1, 0, 1, 0]) / math.sqrt(2 / 3 + 1e-8))


def test_kl_shaped_rewards_put_the_score_on_the_last_real_token():
    rewards, kl = kl_shaped_rewards(t([-1, -2, -3]), t([-1.5, -2, -2]), t(5.0), t([1, 1, 0]), kl_coef=0.1)
    torch.testing.assert_close(kl, t([0.5, 0, 0]))
    torch.testing.assert_close(rewards, t([-0.05, 5.0, 0.0]))  # -beta*kl, + score at index 1 (the last real one)


def test_clipped_policy_loss_by_hand():
    logp = torch.log(t([1.5, 0.5, 1.1]))
    old, adv, mask = t([0, 0, 0]), t([1, -1, 2]), t([1, 1, 1])
    loss, clipfrac, approx_kl = policy_loss(logp, old, adv, mask, clip=0.2)
    # token 0: max(-1.5, -1.2) = -1.2 (clipped); token 1: max(0.5, 0.8) = 0.8 (clipped); token 2: -2.2 (inside)
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 2.2) / 3)
    assert clipfrac.item() == pytest.approx(2 / 3)
    assert approx_kl.item() == pytest.approx(0.5 * sum(math.log(r) ** 2 for r in (1.5, 0.5, 1.1)) / 3)
    masked, _, _ = policy_loss(logp, old, adv, t([1, 1, 0]), clip=0.2)
    assert masked.item() == pytest.approx((-1.2 + 0.8) / 2)


def test_clipped_value_loss_by_hand():
    loss, clipfrac = value_loss(t([1.0, 0.0]), t([0.5, 0.5]), t([2.0, 0.0]), t([1, 1]), clip=0.2)
    # token 0: max((1-2)^2, (0.7-2)^2) = 1.69; token 1: max(0, (0.3-0)^2) = 0.09
    assert loss.item() == pytest.approx(0.5 * (1.69 + 0.09) / 2)
    assert clipfrac.item() == 1.0


def test_value_clip_fraction_counts_only_values_outside_the_range():
    """Values within the clip range of the old ones are not clipped: V_old + (V - V_old) rounds to another float32
    for values of mixed signs near 0 (the zero-initialised head's), which used to count as clipped (and made
    the figure depend on the batch layout)."""
    g = torch.Generator().manual_seed(0)
    values, old = 0.05 * torch.randn(4, 50, generator=g), 0.05 * torch.randn(4, 50, generator=g)
    returns, mask = torch.randn(4, 50, generator=g), torch.ones(4, 50)
    assert (old + (values - old) != values).any()  # the rounding the old code counted
    loss, clipfrac = value_loss(values, old, returns, mask, clip=0.2)
    assert clipfrac.item() == 0.0
    assert loss.item() == pytest.approx(0.5 * ((values - returns) ** 2).mean().item(), rel=1e-6)
    values[0, -1] = returns[0, -1] = old[0, -1] + 1.0  # outside the range, and the clipped error is larger
    _, clipfrac = value_loss(values, old, returns, mask, clip=0.2)
    assert clipfrac.item() == pytest.approx(1 / 200)


def test_adaptive_kl_controller_by_hand():
    assert adaptive_kl_coef(0.1, kl=12, target=6, horizon=100, n_steps=10) == pytest.approx(0.1 * 1.02)  # e clipped
    assert adaptive_kl_coef(0.1, kl=6, target=6, horizon=100, n_steps=10) == pytest.approx(0.1)
    assert adaptive_kl_coef(0.1, kl=5.7, target=6, horizon=100, n_steps=10) == pytest.approx(0.1 * (1 - 0.005))


def toy_policy(seed=0, eos=None):
    """A tiny random Llama over a character vocabulary, with LoRA on every linear layer."""
    tok = char_tokenizer(CHARS)
    model = DecoderLM(preset("tiny-llama", vocab_size=tok.vocab_size, max_seq_len=64,
                             eos_token_id=eos)).init_weights(seed=seed, std=0.1)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    add_lora(model, LoraSpec(r=8, alpha=16, targets="all-linear"))
    return model, tok, base_state


def fraction_of_a(prompts, completions):
    """The toy reward: the share of generated characters that are 'a'."""
    return torch.tensor([c.count("a") / max(len(c), 1) for c in completions])


PROMPTS = ["bcd", "ef", "ghij", "klm", "nop", "b c", "dd", "fgh"] * 2


def test_ppo_learns_the_toy_task_with_a_bounded_kl():
    torch.manual_seed(0)
    model, tok, base_state = toy_policy()
    cfg = PPOHyperparams(batch_size=16, mini_batch_size=8, ppo_epochs=4, lr=3e-3, kl_coef=0.05, max_new_tokens=8, seed=0)
    ppo = PPOTrainer(model, tok, fraction_of_a, cfg)
    ids = [tok.encode(p) for p in PROMPTS]
    stats = [ppo.step(PROMPTS, ids) for _ in range(30)]
    first = sum(s["reward"] for s in stats[:5]) / 5
    last = sum(s["reward"] for s in stats[-5:]) / 5
    # stated margin: the share of 'a' at least triples and rises by >= 0.1 (seen: 0.06 -> 0.22; chance: 1/18)
    assert first < 0.1 and last > max(3 * first, first + 0.1), [round(s["reward"], 2) for s in stats]
    # KL(policy || reference) per sequence stays bounded: under 8 nats over 8 tokens (seen: <= 6.3), where
    # an all-'a' policy would be ~8 log 18 = 23 nats away
    assert max(s["kl"] for s in stats) < 8.0, [round(s["kl"], 2) for s in stats]
    assert all(0 <= s["clipfrac"] <= 1 and s["entropy"] > 0 for s in stats)

    # The reference really is the adapter-disabled base: rebuild the base alone and compare log-probs.
    base = DecoderLM(model.config)
    base.load_state_dict(base_state)
    b = ppo.last_rollout
    with torch.no_grad():
        logits = base(b.idx, b.positions, b.key_mask)[:, b.P - 1:-1].float()
    ref = token_logprobs(logits, b.idx[:, b.P:]) * b.mask
    torch.testing.assert_close(b.ref_logp, ref, atol=1e-5, rtol=1e-5)
    assert (b.logp - b.ref_logp).abs().max() > 0.1  # and the policy has moved away from it


def test_tokens_after_eos_are_masked():
    model, tok, _ = toy_policy(seed=1, eos=tok_id("e"))
    ppo = PPOTrainer(model, tok, fraction_of_a, PPOHyperparams(batch_size=8, mini_batch_size=4, max_new_tokens=12,
                                                          temperature=2.0, seed=3))
    b = ppo.rollout(PROMPTS[:8], [tok.encode(p) for p in PROMPTS[:8]])
    response, mask = b.idx[:, b.P:], b.mask.bool()
    ended = (response == tok_id("e")) & mask
    assert ended.any(), "the high temperature should make some rows emit EOS"
    for m, e in zip(mask, ended):
        if e.any():
            stop = int(e.nonzero()[0])  # the EOS itself is a real token; everything after it is padding
            assert m[:stop + 1].all() and not m[stop + 1:].any()
    assert (b.logp[~mask] == 0).all() and (b.values[~mask] == 0).all()
    assert all("e" not in c for c in b.completions)  # EOS is not part of the text the reward sees


def tok_id(ch):
    return char_tokenizer(CHARS).token_to_id(ch)


def test_bad_configs():
    with pytest.raises(LmforgeError, match="batch size 10 is not divisible by the mini-batch size 4"):
        PPOHyperparams(batch_size=10, mini_batch_size=4)
    with pytest.raises(LmforgeError, match="temperature must be > 0"):
        PPOHyperparams(temperature=0)
    tok = char_tokenizer(CHARS)
    plain = DecoderLM(preset("tiny-llama", vocab_size=tok.vocab_size)).init_weights(seed=0)
    with pytest.raises(LmforgeError, match="PPO needs a reference"):
        PPOTrainer(plain, tok, fraction_of_a, PPOHyperparams())
    model, tok, _ = toy_policy()
    ppo = PPOTrainer(model, tok, lambda p, c: torch.zeros(3), PPOHyperparams(batch_size=4, mini_batch_size=2))
    with pytest.raises(LmforgeError, match=r"reward function returned shape \(3,\) for 4 completions"):
        ppo.step(PROMPTS[:4], [tok.encode(p) for p in PROMPTS[:4]])


# ----------------------------------------------------------------------------- the command line
def test_reward_model_vocabulary_check():
    from types import SimpleNamespace

    from lmforge.alignment.rl_inputs import reward_vocab_check

    pairwise = SimpleNamespace(config=SimpleNamespace(arch="decoder", vocab_size=300))
    with pytest.raises(LmforgeError, match="vocabulary of 300 tokens but the policy has 320: a pairwise decoder"):
        reward_vocab_check(pairwise, 320, "rm/")
    reward_vocab_check(pairwise, 300, "rm/")  # same vocabulary: fine
    reward_vocab_check(SimpleNamespace(config=SimpleNamespace(arch="encoder", vocab_size=30522)), 320, "clf/")


def run(capsys, *args):
    from lmforge.cli import main

    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def toy_reward(tmp_path, monkeypatch):
    """A reward function importable as ``toy_reward:share_of_vowels`` (of each completion's characters)."""
    (tmp_path / "toy_reward.py").write_text(
        "def share_of_vowels(prompts, completions):\n"
        "    return [sum(c.count(v) for v in 'aeiou') / max(len(c), 1) for c in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "toy_reward:share_of_vowels"


def test_cli_ppo_full_method_trains_every_weight_against_a_frozen_copy(tiny_lm_dirs, tmp_path, capsys, toy_reward):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one two\nfour five\nsix seven\nfox dog\n")
    out = tmp_path / "full"
    code, _, err = run(capsys, "rlhf", "ppo", "-m", tiny_lm_dirs["plain"], "--prompts", prompts, "--reward",
                       toy_reward, "-o", out, "--steps", "2", "--batch-size", "4", "--mini-batch-size", "4",
                       "--ppo-epochs", "1", "-n", "4", "--method", "full", "--lr", "1e-3", "--threads", "1", "--seed", "1")
    assert code == 0, err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-5) and rows[1]["kl"] != 0.0  # the copy stays put
    tuned, base = lmforge.load(out / "final").model, lmforge.load(tiny_lm_dirs["plain"]).model
    assert not torch.equal(tuned.model.layers[0].mlp.down_proj.weight, base.model.layers[0].mlp.down_proj.weight)


def test_cli_ppo_end_to_end(tiny_lm_dirs, tmp_path, capsys, toy_reward):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(f'{{"prompt": "{w} two three"}}\n' for w in ("one", "four", "five", "six", "fox")))
    out = tmp_path / "run"
    code, stdout, err = run(capsys, "rlhf", "ppo", "-m", tiny_lm_dirs["plain"], "--prompts", prompts, "--reward",
                            toy_reward, "-o", out, "--steps", "3", "--batch-size", "4", "--mini-batch-size", "2",
                            "--ppo-epochs", "2", "-n", "6", "--target-kl", "1.0", "--horizon", "10", "--threads", "1")
    assert code == 0, err
    assert json.loads(stdout)["step"] == 3
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    keys = {"reward", "kl", "entropy", "clipfrac", "value_loss", "policy_loss", "kl_coef", "approx_kl"}
    assert [r["step"] for r in rows] == [1, 2, 3] and all(keys <= set(r) for r in rows)
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # the first rollout comes from the untouched base
    assert rows[1]["kl_coef"] == pytest.approx(0.05 * (1 - 0.2 * 4 / 10))  # adaptive: KL 0 < target, e = -0.2
    assert [r["lr"] for r in rows] == [1e-4] * 3  # the defaults: no warmup, min_lr_ratio 1 = a constant rate
    assert (out / "final" / "adapter_config.json").is_file()
    from lmforge.alignment.rlhf import PPOConfig
    from lmforge.recipe_config import load_config

    assert load_config(PPOConfig, out / "config.yaml") == PPOConfig(
        model=str(tiny_lm_dirs["plain"]), prompts=prompts, reward=str(toy_reward), out_dir=out, steps=3, batch_size=4,
        mini_batch_size=2, ppo_epochs=2, max_new_tokens=6, target_kl=1.0, horizon=10)
    assert lmforge.load(tiny_lm_dirs["plain"], adapter=out / "final").model is not None


def test_cli_ppo_resume_continues_step_for_step(tiny_lm_dirs, tmp_path, capsys, toy_reward):
    """A run stopped after its step-2 checkpoint and resumed logs the same steps 3-4 as an uninterrupted run
    (adaptive KL, shuffled prompts, LoRA and value head all restored); resuming into another model is refused."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one two\nfour five\nsix seven\nfox dog\nthree one\n")
    args = ["rlhf", "ppo", "-m", tiny_lm_dirs["plain"], "--prompts", prompts, "--reward", toy_reward,
            "--batch-size", "2", "--mini-batch-size", "1", "--ppo-epochs", "2", "-n", "4", "--target-kl", "0.5",
            "--horizon", "10", "--lr", "3e-3", "--threads", "1", "--save-every", "2"]
    assert run(capsys, *args, "-o", tmp_path / "straight", "--steps", "4")[0] == 0
    assert run(capsys, *args, "-o", tmp_path / "stopped", "--steps", "2")[0] == 0
    assert run(capsys, *args, "-o", tmp_path / "stopped", "--steps", "4", "--resume")[0] == 0

    def rows(name):
        return [{k: v for k, v in json.loads(line).items() if k != "step_s"}
                for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    straight, resumed = rows("straight"), rows("stopped")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert resumed == straight
    assert straight[2]["kl"] != 0.0  # the later steps really depend on the restored adapter
    code, _, err = run(capsys, *args, "-m", tiny_lm_dirs["chat"], "-o", tmp_path / "stopped", "--steps", "6",
                       "--resume")
    assert code == 2 and "cannot resume" in err


def test_cli_ppo_warmup_and_cosine_schedule_resumes_exactly(tiny_lm_dirs, tmp_path, capsys, toy_reward,
                                                            monkeypatch):
    """--warmup and --min-lr-ratio give PPO the shared schedule (training/optim.py), one rate per PPO step, logged
    as lr; a run that dies during step 3 (after its step-2 checkpoint) and is resumed logs exactly the steps of an
    uninterrupted run, rates included."""
    from lmforge.alignment.ppo import PPOTrainer

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one two\nfour five\nsix seven\nfox dog\nthree one\n")
    args = ["rlhf", "ppo", "-m", tiny_lm_dirs["plain"], "--prompts", prompts, "--reward", toy_reward,
            "--batch-size", "2", "--mini-batch-size", "1", "--ppo-epochs", "2", "-n", "4", "--lr", "3e-3",
            "--warmup", "2", "--min-lr-ratio", "0.1", "--steps", "5", "--threads", "1", "--save-every", "2"]
    assert run(capsys, *args, "-o", tmp_path / "straight")[0] == 0
    real_step, calls = PPOTrainer.step, []

    def dies_at_step_3(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed")
        return real_step(self, *a, **k)

    monkeypatch.setattr(PPOTrainer, "step", dies_at_step_3)
    with pytest.raises(RuntimeError, match="killed"):
        run(capsys, *args, "-o", tmp_path / "stopped")
    monkeypatch.setattr(PPOTrainer, "step", real_step)
    assert run(capsys, *args, "-o", tmp_path / "stopped", "--resume")[0] == 0

    def rows(name):
        return [{k: v for k, v in json.loads(line).items() if k != "step_s"}
                for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    straight, resumed = rows("straight"), rows("stopped")
    # warmup 1.5e-3, 3e-3; then the cosine from 3e-3 (step 3) through the midpoint to 3e-3 * 0.1 at step 5
    assert [r["lr"] for r in straight] == pytest.approx([1.5e-3, 3e-3, 3e-3, 1.65e-3, 3e-4], rel=1e-12)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5]
    assert resumed == straight
    assert straight[3]["kl"] != 0.0  # the later steps really depend on the restored adapter


def test_cli_ppo_bad_input(tiny_lm_dirs, tmp_path, capsys, toy_reward):
    def error_of(*args):
        code, _, err = run(capsys, "rlhf", "ppo", "-m", tiny_lm_dirs["plain"], "-o", tmp_path / "o", *args)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
        return lines[0]

    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    assert "empty.txt: no prompts" in error_of("--prompts", empty, "--reward", toy_reward)
    good = tmp_path / "p.txt"
    good.write_text("one two\nfour five\n")
    assert "batch size 6 is not divisible by the mini-batch size 4" in error_of(
        "--prompts", good, "--reward", toy_reward, "--batch-size", "6", "--mini-batch-size", "4")
    fields = tmp_path / "p.jsonl"
    fields.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    assert "p.jsonl, line 2: no non-empty string field 'prompt'" in error_of("--prompts", fields, "--reward", toy_reward)
    assert "no such reward model folder" in error_of("--prompts", good, "--reward", tmp_path / "missing")
    assert "no reward given" in error_of("--prompts", good)


def test_cli_ppo_refuses_a_pairwise_reward_model_with_another_vocabulary(tiny_lm_dirs, tmp_path, capsys):
    from lmforge.alignment.reward import PairwiseReward, save_reward_model
    from lmforge.models.heads import RewardModel

    tok = char_tokenizer(CHARS)  # 18 tokens; the policy's byte-level BPE has a few hundred
    decoder = DecoderLM(preset("tiny-llama", vocab_size=tok.vocab_size)).init_weights(seed=0)
    rm = save_reward_model(PairwiseReward(RewardModel(decoder), tok, max_len=32), tmp_path / "rm")
    prompts = tmp_path / "p.txt"
    prompts.write_text("one two\nfour five\n")
    code, _, err = run(capsys, "rlhf", "ppo", "-m", tiny_lm_dirs["plain"], "--prompts", prompts, "--reward", rm,
                       "-o", tmp_path / "o")
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert f"vocabulary of {tok.vocab_size} tokens but the policy has" in err and "needs the same tokenizer" in err


# ----------------------------------------------------------------------------- nothing non-finite is saved
def small_ppo_args(tiny_lm_dirs, tmp_path, reward):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one two\nfour five\nsix seven\nfox dog\n")
    return ["rlhf", "ppo", "-m", tiny_lm_dirs["plain"], "--prompts", prompts, "--reward", reward, "--batch-size", "2",
            "--mini-batch-size", "2", "--ppo-epochs", "1", "-n", "3", "--threads", "1"]


@pytest.mark.parametrize("flag,value", [("--kl-coef", "nan"), ("--gamma", "nan"), ("--vf-coef", "nan"),
                                        ("--lam", "nan"), ("--lr", "inf")])
def test_cli_ppo_refuses_non_finite_hyper_parameters(tiny_lm_dirs, tmp_path, capsys, toy_reward, flag, value):
    """A NaN/inf hyper-parameter is refused before anything runs (it used to train to an all-NaN adapter and
    exit 0)."""
    out = tmp_path / "o"
    code, _, err = run(capsys, *small_ppo_args(tiny_lm_dirs, tmp_path, toy_reward), "-o", out, "--steps", "1",
                       flag, value)
    lines = [line for line in err.splitlines() if line.strip() and "trainable" not in line]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "must be a finite number" in lines[0] and value in lines[0], lines[0]
    assert not (out / "final").exists()


@pytest.mark.parametrize("field", ["kl_coef", "gamma", "lam", "vf_coef", "lr", "clip_range", "target_kl"])
def test_ppo_config_refuses_non_finite_values(field):
    """The same through the Python API (``rlhf.ppo`` builds its PPOHyperparams before loading anything)."""
    with pytest.raises(LmforgeError, match=f"PPO {field} must be a finite number, got nan"):
        PPOHyperparams(**{field: float("nan")})


def test_cli_ppo_stops_on_a_nan_reward_and_keeps_the_last_checkpoint(tiny_lm_dirs, tmp_path, capsys, monkeypatch):
    (tmp_path / "nan_at_step_2.py").write_text(
        "calls = []\n"
        "def reward(prompts, completions):\n"
        "    calls.append(1)\n"
        "    return [float('nan') if len(calls) == 2 else 0.5 for _ in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "o"
    code, _, err = run(capsys, *small_ppo_args(tiny_lm_dirs, tmp_path, "nan_at_step_2:reward"), "-o", out,
                       "--steps", "3", "--save-every", "1")
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and len(errors) == 1 and errors[0].startswith("error: the reward became nan at PPO step 2"), err
    assert not (out / "final").exists()
    from safetensors.torch import load_file

    from lmforge.training.checkpoint import read_state

    assert read_state(out / "checkpoint")["step"] == 1
    assert all(torch.isfinite(t).all() for t in load_file(str(out / "checkpoint" / "model.safetensors")).values())
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]


def test_a_nan_kl_coefficient_stops_the_step_before_the_update():
    model, tok, _ = toy_policy()
    ppo = PPOTrainer(model, tok, fraction_of_a, PPOHyperparams(batch_size=4, mini_batch_size=2, max_new_tokens=4))
    before = {k: v.clone() for k, v in model.named_parameters() if v.requires_grad}
    ppo.kl_coef = float("nan")  # e.g. an adaptive controller gone wrong
    with pytest.raises(LmforgeError, match="KL coefficient became nan at step 1"):
        ppo.step(PROMPTS[:4], [tok.encode(p) for p in PROMPTS[:4]])
    assert all(torch.equal(before[k], v) for k, v in model.named_parameters() if v.requires_grad)
