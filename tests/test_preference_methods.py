"""ORPO, SimPO and KTO (`lmforge rlhf orpo|simpo|kto`): each loss against a hand computation from the papers'
formulas, KTO's data (pairs or unpaired records), a tiny run that widens the held-out preference margin, exact
resume after a kill, no reference model for the reference-free losses, and bad input as one error line."""

import json
import math

import pytest
import torch

from lmforge.alignment.preference import (
    kto_loss,
    kto_reference_point,
    log1mexp,
    orpo_log_odds_ratio,
    orpo_loss,
    simpo_loss,
)
from lmforge.alignment.preference_recipes import KTOTrainer, PairLossTrainer, load_kto_examples
from lmforge.errors import LmforgeError
from test_dpo import WORDS, assert_one_line_error, pairs_file, run, write_jsonl


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def log_odds(mean_logp):  # log(p / (1 - p)) with log p = mean_logp
    p = math.exp(mean_logp)
    return math.log(p / (1 - p))


# ----------------------------------------------------------------------------- the losses, by hand
def test_orpo_loss_by_hand():
    # pair 1: chosen -2 over 2 tokens (mean -1), rejected -6 over 3 (mean -2); pair 2: chosen -1.5/3, rejected -0.9/1
    chosen, rejected = torch.tensor([-2.0, -1.5]), torch.tensor([-6.0, -0.9])
    c_len, r_len = torch.tensor([2, 3]), torch.tensor([3, 1])
    expected = []
    for cw, cl, rw, rl in ((-2.0, 2, -6.0, 3), (-1.5, 3, -0.9, 1)):
        ratio = log_odds(cw / cl) - log_odds(rw / rl)
        expected.append(-cw / cl + 0.25 * -math.log(sigmoid(ratio)))
    got = orpo_loss(chosen, rejected, c_len, r_len, lam=0.25)
    assert got.item() == pytest.approx(sum(expected) / 2, rel=1e-6)
    torch.testing.assert_close(orpo_log_odds_ratio(torch.tensor([-1.0]), torch.tensor([-2.0])),
                               torch.tensor([log_odds(-1.0) - log_odds(-2.0)]))


def test_log1mexp_is_exact_and_stable_near_zero():
    x = torch.tensor([-5.0, -0.7, -0.1], dtype=torch.float64)
    torch.testing.assert_close(log1mexp(x), torch.log(1 - torch.exp(x)))
    tiny = log1mexp(torch.tensor([-1e-9]))  # 1 - exp(-1e-9) rounds to 0 in float32: the naive form gives -inf
    assert tiny.item() == pytest.approx(math.log(1e-9), rel=1e-4)
    assert torch.isinf(torch.log(1 - torch.exp(torch.tensor([-1e-9])))).all()


def test_simpo_loss_by_hand():
    chosen, rejected = torch.tensor([-2.0, -3.0]), torch.tensor([-6.0, -1.0])
    c_len, r_len = torch.tensor([2, 3]), torch.tensor([3, 2])
    # pair 1: 2 * (-1 - -2) - 0.5 = 1.5; pair 2: 2 * (-1 - -0.5) - 0.5 = -1.5
    expected = (-math.log(sigmoid(1.5)) - math.log(sigmoid(-1.5))) / 2
    assert simpo_loss(chosen, rejected, c_len, r_len, beta=2.0, gamma=0.5).item() == pytest.approx(expected, rel=1e-6)


def test_kto_reference_point_and_loss_by_hand():
    # mismatched pairs: policy - reference = 0.5, 0.5, 0 -> z0 = 1/3 (positive: not clamped)
    z0 = kto_reference_point(torch.tensor([-2.0, -3.0, -4.0], requires_grad=True), torch.tensor([-2.5, -3.5, -4.0]))
    assert z0.item() == pytest.approx(1 / 3) and not z0.requires_grad  # no gradient through z0
    assert kto_reference_point(torch.tensor([-3.0]), torch.tensor([-2.0])).item() == 0.0  # KL estimate < 0: clamped
    assert kto_reference_point(torch.zeros(0), torch.zeros(0)).item() == 0.0  # a batch of one: no mismatched pair
    # under torchrun: (sum, count) summed over ranks; here rank 0 has no pair and the other rank diffs 1 and 2
    other = torch.tensor([3.0, 2.0])

    def add_other_rank(t):
        t += other

    assert kto_reference_point(torch.zeros(0), torch.zeros(0), add_other_rank).item() == pytest.approx(1.5)
    policy, ref = torch.tensor([-3.0, -5.0, -4.0]), torch.tensor([-4.0, -4.0, -4.0])  # r = 1, -1, 0
    desirable = torch.tensor([True, False, True])
    beta, w_d, w_u = 0.5, 1.0, 2.0
    expected = ((w_d - w_d * sigmoid(beta * (1 - 1 / 3)))  # desirable: lambda_D - lambda_D sigma(beta (r - z0))
                + (w_u - w_u * sigmoid(beta * (1 / 3 + 1)))  # undesirable: lambda_U - lambda_U sigma(beta (z0 - r))
                + (w_d - w_d * sigmoid(beta * (0 - 1 / 3)))) / 3
    got = kto_loss(policy, ref, desirable, z0, beta=beta, desirable_weight=w_d, undesirable_weight=w_u)
    assert got.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("call, message", [
    (lambda t: orpo_loss(t, t, t, t, lam=0.0), "ORPO lambda must be > 0"),
    (lambda t: simpo_loss(t, t, t, t, beta=-1.0), "SimPO beta must be > 0"),
    (lambda t: simpo_loss(t, t, t, t, gamma=-0.1), "SimPO gamma must be >= 0"),
    (lambda t: kto_loss(t, t, t > 0, 0.0, beta=0.0), "KTO beta must be > 0"),
    (lambda t: kto_loss(t, t, t > 0, 0.0, undesirable_weight=0.0), "KTO weights must be > 0"),
])
def test_losses_refuse_bad_hyper_parameters(call, message):
    with pytest.raises(LmforgeError, match=message):
        call(torch.tensor([-1.0]))


# ----------------------------------------------------------------------------- the trainers on a tiny policy
def test_pair_trainer_figures_match_the_loss_functions():
    from lmforge.alignment.dpo import collate, response_logprobs
    from test_dpo import random_pairs, tiny_policy

    model, items = tiny_policy(), random_pairs(3, seed=0)
    idx, labels = collate(items, 0)
    with torch.no_grad():
        logp = response_logprobs(model, idx, labels)
        lengths = (labels[:, 1:] != -100).sum(-1)
        for name, fn in (("orpo", lambda: orpo_loss(logp[:3], logp[3:], lengths[:3], lengths[3:], lam=0.2)),
                         ("simpo", lambda: simpo_loss(logp[:3], logp[3:], lengths[:3], lengths[3:], 2.0, 1.0))):
            loss, metrics = PairLossTrainer(model, name, lam=0.2, beta=2.0, gamma=1.0).loss_and_metrics(items)
            assert loss.item() == pytest.approx(fn().item()) and metrics["loss"] == pytest.approx(loss.item())
    assert [len(r) for r in (items[0].chosen, items[1].rejected)] == [5, 4]  # ragged lengths are normalised
    assert lengths.tolist() == [5, 5, 5, 3, 4, 5]


def test_kto_trainer_starts_at_a_zero_margin_and_uses_mismatched_pairs():
    """LoRA B = 0: the policy equals the reference, so rewards, z0 and the margin start at 0 and the loss is
    lambda - lambda * sigmoid(0) for every example."""
    from lmforge.alignment.preference_recipes import TokenExample
    from test_dpo import random_pairs, tiny_policy

    model = tiny_policy()
    items = [TokenExample(p.prompt, p.chosen, i % 2 == 0) for i, p in enumerate(random_pairs(4, seed=3))]
    loss, m = KTOTrainer(model, beta=0.1, desirable_weight=1.0, undesirable_weight=3.0).loss_and_metrics(items)
    assert loss.item() == pytest.approx((2 * 0.5 + 2 * 1.5) / 4, abs=1e-5)
    assert m["kl"] == pytest.approx(0.0, abs=1e-5) and m["reward_margin"] == pytest.approx(0.0, abs=1e-5)
    loss.backward()  # the matched policy log-probs carry the gradient
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------- KTO's data
def test_kto_data_pairs_and_unpaired_records(tmp_path):
    groups = load_kto_examples(pairs_file(tmp_path))
    assert len(groups) == len(WORDS) and [e.desirable for e in groups[0]] == [True, False]
    assert (groups[0][0].completion, groups[0][1].completion) == (" one", " four dog")
    unpaired = write_jsonl(tmp_path / "u.jsonl", [{"prompt": "a", "completion": " b", "desirable": True},
                                                  {"prompt": "c", "completion": " d", "label": False}])
    assert [(g[0].prompt, g[0].desirable) for g in load_kto_examples(unpaired)] == [("a", True), ("c", False)]


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "a", "completion": " b", "desirable": False}] * 2,
     "u.jsonl: no desirable examples among 2; KTO needs both"),
    ([{"prompt": "a", "completion": " b", "desirable": True}], "no undesirable examples among 1"),
    ([{"prompt": "a", "completion": " b", "desirable": True}, {"prompt": "a", "completion": " b"}],
     r"u.jsonl, line 2: 'desirable' must be true or false, got nothing"),
    ([{"prompt": "a", "completion": " b", "desirable": "yes"}], "'desirable' must be true or false, got 'yes'"),
    ([{"prompt": "a", "completion": " b", "desirable": True}, {"prompt": "a", "desirable": False}],
     r"line 2: no string 'completion' field"),
])
def test_bad_kto_files_name_the_problem(tmp_path, rows, message):
    with pytest.raises(LmforgeError, match=message):
        load_kto_examples(write_jsonl(tmp_path / "u.jsonl", rows))


# ----------------------------------------------------------------------------- the command line
def echo_pairs(tmp_path):
    """Pairs with a pattern a tiny model generalises to held-out prompts: the chosen answer stops after the
    word, the rejected one goes on with ' dog'. (test_dpo's pairs_file, whose chosen words reappear as rejected
    answers, suits DPO's reference-relative margin but not an absolute, length-normalised one.)"""
    words = [w for w in WORDS if w != "dog"] + ["cat", "red"]
    return write_jsonl(tmp_path / "echo.jsonl", [{"prompt": f"Say {w}:", "chosen": f" {w}", "rejected": f" {w} dog"}
                                                 for w in words])


def metric_rows(out):
    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method, extra", [("orpo", ["--lam", "0.5"]), ("simpo", ["--beta", "2", "--gamma", "0.5"]),
                                           ("kto", ["--beta", "0.1"])])
def test_tiny_run_raises_the_held_out_margin(tiny_lm_dirs, tmp_path, capsys, method, extra):
    """The held-out pairs (rejected answers go on with ' dog') are scored before, midway and after; the margin
    grows. KTO learns from the pairs split into desirable and undesirable examples."""
    out = tmp_path / "run"
    code, stdout, err = run(capsys, "rlhf", method, "-m", tiny_lm_dirs["plain"], "--data", echo_pairs(tmp_path),
                            "-o", out, "--steps", "8", "--batch-size", "3", "--lr", "3e-3", "--threads", "1",
                            "--eval-fraction", "0.34", "--eval-every", "4", *extra)
    assert code == 0, err
    result = json.loads(stdout)
    assert result["held_out"] == (6 if method == "kto" else 3)
    rows = metric_rows(out)
    evals = [r for r in rows if "eval_reward_margin" in r]
    assert [r["step"] for r in evals] == [0, 4, 8]
    margins = [r["eval_reward_margin"] for r in evals]
    if method == "kto":  # LoRA B = 0: the policy starts as the reference
        assert margins[0] == pytest.approx(0.0, abs=1e-6)
    assert margins[0] < margins[1] < margins[2], evals
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"], evals
    assert [r["step"] for r in rows if "loss" in r and "eval_loss" not in r] == list(range(1, 9))
    assert (out / "final" / "adapter_config.json").is_file() and (out / "config.yaml").is_file()


def test_kto_trains_on_unpaired_records(tiny_lm_dirs, tmp_path, capsys):
    """Unpaired records (each prompt once desirable, once undesirable, never in one record): the held-out
    margin between desirable and undesirable implicit rewards starts at 0 and grows."""
    words = [w for w in WORDS if w != "dog"] + ["cat", "red"]
    records = [{"prompt": f"Say {w}:", "completion": f" {w}" if i % 2 else f" {w} dog", "desirable": bool(i % 2)}
               for i, w in enumerate(words * 2)]
    out = tmp_path / "run"
    code, stdout, err = run(capsys, "rlhf", "kto", "-m", tiny_lm_dirs["plain"], "--data",
                            write_jsonl(tmp_path / "u.jsonl", records), "-o", out, "--steps", "8",
                            "--batch-size", "4", "--lr", "3e-3", "--threads", "1", "--eval-fraction", "0.25")
    assert code == 0, err
    assert json.loads(stdout)["examples"] + json.loads(stdout)["held_out"] == 20
    rows = metric_rows(out)
    evals = [r for r in rows if "eval_reward_margin" in r]
    assert evals[0]["eval_reward_margin"] == pytest.approx(0.0, abs=1e-6)
    assert evals[-1]["eval_reward_margin"] > 0.1, evals  # seen: 0.21
    assert all("kl" in r for r in rows if "eval_loss" not in r)


@pytest.mark.parametrize("method", ["orpo", "simpo", "kto"])
def test_resume_after_a_kill_gives_the_same_steps(tiny_lm_dirs, tmp_path, capsys, monkeypatch, method):
    from lmforge.alignment import preference_recipes

    cls = preference_recipes.KTOTrainer if method == "kto" else preference_recipes.PairLossTrainer
    args = ["rlhf", method, "-m", tiny_lm_dirs["plain"], "--data", pairs_file(tmp_path), "--batch-size", "2",
            "--lr", "1e-3", "--warmup", "1", "--threads", "1", "--save-every", "2", "--steps", "5"]
    assert run(capsys, *args, "-o", tmp_path / "straight")[0] == 0
    real_step, calls = cls.loss_and_metrics, []

    def dies_at_step_3(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed")
        return real_step(self, *a, **k)

    monkeypatch.setattr(cls, "loss_and_metrics", dies_at_step_3)
    with pytest.raises(RuntimeError, match="killed"):
        run(capsys, *args, "-o", tmp_path / "stopped")
    monkeypatch.setattr(cls, "loss_and_metrics", real_step)
    assert run(capsys, *args, "-o", tmp_path / "stopped", "--resume")[0] == 0
    assert [r["step"] for r in metric_rows(tmp_path / "stopped")] == [1, 2, 3, 4, 5]
    assert metric_rows(tmp_path / "stopped") == metric_rows(tmp_path / "straight")


def test_reference_free_methods_load_no_reference(tiny_lm_dirs, tmp_path, capsys, monkeypatch):
    """--method full with ORPO makes no frozen copy (DPO's --method full deep-copies the policy)."""
    from lmforge.alignment import preference_recipes

    real, references = preference_recipes.load_policy, []

    def spy(*a, **k):
        lm, reference = real(*a, **k)
        references.append(reference)
        return lm, reference

    monkeypatch.setattr(preference_recipes, "load_policy", spy)
    code, _, err = run(capsys, "rlhf", "orpo", "-m", tiny_lm_dirs["plain"], "--data", pairs_file(tmp_path),
                       "-o", tmp_path / "o", "--steps", "1", "--batch-size", "3", "--method", "full",
                       "--threads", "1")
    assert code == 0, err
    assert references == [None] and (tmp_path / "o" / "final" / "config.json").is_file()


@pytest.mark.parametrize("method, flags, needles", [
    ("simpo", ["--beta", "0"], ["beta (--beta)"]),
    ("kto", ["--beta", "-1"], ["beta (--beta)"]),
    ("orpo", ["--lam", "nan"], ["lam (--lam)", "finite"]),
    ("kto", ["--desirable-weight", "0"], ["desirable_weight (--desirable-weight)"]),
    ("simpo", ["--gamma", "-1"], ["gamma (--gamma)"]),
    ("orpo", ["--ref", "somewhere"], ["ref (--ref): rlhf orpo uses no reference model"]),
])
def test_bad_settings_are_one_line(tiny_lm_dirs, tmp_path, capsys, method, flags, needles):
    code, _, err = run(capsys, "rlhf", method, "-m", tiny_lm_dirs["plain"], "--data", pairs_file(tmp_path),
                       "-o", tmp_path / "o", *flags)
    assert_one_line_error(code, err, *needles)
    assert not (tmp_path / "o").exists()


def test_bad_kto_data_is_one_line(tiny_lm_dirs, tmp_path, capsys):
    bad = write_jsonl(tmp_path / "u.jsonl", [{"prompt": "a", "completion": " b", "desirable": False}] * 3)
    code, _, err = run(capsys, "rlhf", "kto", "-m", tiny_lm_dirs["plain"], "--data", bad, "-o", tmp_path / "o")
    assert_one_line_error(code, err, "u.jsonl: no desirable examples among 3")
    code, _, err = run(capsys, "rlhf", "orpo", "-m", tiny_lm_dirs["plain"], "--data", bad, "-o", tmp_path / "o")
    assert_one_line_error(code, err, "u.jsonl, line 1: no 'chosen' field")


@pytest.mark.parametrize("method", ["orpo", "kto"])
def test_two_ranks_under_torchrun(tiny_lm_dirs, tmp_path, capsys, method):
    """ORPO's loss is a mean over pairs: two ranks (half of every batch each) log the steps of one process. KTO's
    mismatched pairs are formed within each rank's share (its reference point is then averaged over the ranks),
    so its two-rank run is checked to train and log every step, not to equal one process."""
    from lmforge.cli import main
    from test_distributed import assert_same_rows, losses, torchrun

    args = ["rlhf", method, "-m", str(tiny_lm_dirs["plain"]), "--data", str(echo_pairs(tmp_path)), "--steps", "3",
            "--batch-size", "4", "--lr", "1e-3", "--eval-fraction", "0.34", "--seed", "2"]
    done = torchrun([*args, "-o", str(tmp_path / "two")])
    assert done.returncode == 0, done.stderr[-3000:]
    two = losses(tmp_path / "two")
    assert [r["step"] for r in two] == [0, 1, 2, 3, 3] and "eval_reward_margin" in two[0]
    if method == "orpo":
        assert main([*args, "-o", str(tmp_path / "one")]) == 0
        capsys.readouterr()
        assert_same_rows(two, losses(tmp_path / "one"))
    else:
        assert all(math.isfinite(r["kl"]) for r in two if "kl" in r)
