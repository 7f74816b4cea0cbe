"""GRPO (alignment/grpo.py, `lmforge rlhf grpo`): the advantages and the loss against values computed by hand,
the answer extractor and rewards, a toy task whose programmatic reward rises with a bounded KL, exact resume,
the GSM8K recipe on a tiny model, and bad input as one error line."""

import json
import math
from pathlib import Path

import pytest
import torch

from lmforge.alignment.grpo import (
    GRPOConfig,
    extract_answer,
    group_advantages,
    grpo_loss,
    k3_kl,
    load_rewards,
    reference_answer,
    score,
)
from lmforge.errors import LmforgeError

RECIPES = Path(__file__).parent.parent / "recipes"
GSM8K = Path(__file__).parent.parent.parent / "shared" / "data" / "gsm8k" / "train.jsonl"


# ----------------------------------------------------------------------------- the math by hand
def test_group_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0], [3.0, 1.0, 2.0, 2.0]])
    std0 = math.sqrt(4 * 0.25 / 3)  # Bessel-corrected: sum of squared deviations / (G - 1)
    std2 = math.sqrt((1 + 1 + 0 + 0) / 3)
    expected = torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.0] * 4, [1.0, -1.0, 0.0, 0.0]])
    expected[0] /= std0 + 1e-4
    expected[2] /= std2 + 1e-4
    torch.testing.assert_close(group_advantages(rewards), expected)
    # Dr. GRPO: centred only; a group whose completions all score alike teaches nothing either way
    torch.testing.assert_close(group_advantages(rewards, scale=False),
                               torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.0] * 4, [1.0, -1.0, 0.0, 0.0]]))


def test_k3_kl_by_hand():
    logp, ref = torch.tensor([math.log(0.5), math.log(0.2)]), torch.tensor([math.log(0.25), math.log(0.2)])
    # k3 = ref/pi - log(ref/pi) - 1: 0.5 - log 0.5 - 1 = 0.19315; 0 where they agree
    torch.testing.assert_close(k3_kl(logp, ref), torch.tensor([0.5 - math.log(0.5) - 1, 0.0]))


LOGP = torch.tensor([[math.log(1.5), math.log(0.5)], [math.log(1.1), 0.0]])  # old_logp = 0: ratio = exp(logp)
MASK = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
ADV = torch.tensor([1.0, -1.0])


def test_grpo_loss_by_hand():
    old = torch.zeros(2, 2)
    # row 0 (A = 1): ratio 1.5 -> min(1.5, 1.2) = 1.2; ratio 0.5 -> min(0.5, 0.8) = 0.5: terms -1.2, -0.5
    # row 1 (A = -1): ratio 1.1 -> min(-1.1, -1.1): term 1.1; its second token is padding
    loss, stats = grpo_loss(LOGP, old, ADV, MASK, clip=0.2)
    assert float(loss) == pytest.approx(((-1.2 - 0.5) / 2 + 1.1) / 2)
    assert float(stats["clipfrac"]) == pytest.approx(1 / 3)  # only the 1.5 ratio is clipped
    assert float(stats["kl"]) == 0.0
    # Dr. GRPO: the sum of every token term over (completions x generation budget), no per-sequence mean
    loss, _ = grpo_loss(LOGP, old, ADV, MASK, clip=0.2, loss_type="dr_grpo", max_len=4)
    assert float(loss) == pytest.approx((-1.2 - 0.5 + 1.1) / (2 * 4))
    # the k3 KL to a reference (here log ref = 0) joins each token's term with weight beta
    k = [1 / 1.5 + math.log(1.5) - 1, 1 / 0.5 + math.log(0.5) - 1, 1 / 1.1 + math.log(1.1) - 1]
    loss, stats = grpo_loss(LOGP, old, ADV, MASK, ref_logp=torch.zeros(2, 2), beta=0.1, clip=0.2)
    assert float(loss) == pytest.approx(((-1.2 + 0.1 * k[0] - 0.5 + 0.1 * k[1]) / 2 + 1.1 + 0.1 * k[2]) / 2)
    assert float(stats["kl"]) == pytest.approx(sum(k) / 3)


def test_grpo_loss_gradient_is_the_advantage_weighted_score_function():
    """With pi_old = pi (one update per rollout) the ratio is 1 and d loss / d log pi_t = -A / |o| per token."""
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.2, -0.1]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    loss, _ = grpo_loss(logp, logp.detach(), torch.tensor([2.0, -1.0]), mask)
    loss.backward()
    expected = torch.tensor([[-2.0 / 2, -2.0 / 2, 0.0], [1.0 / 3, 1.0 / 3, 1.0 / 3]]) / 2  # / 2 completions
    torch.testing.assert_close(logp.grad, expected)


# ----------------------------------------------------------------------------- answers and rewards
def test_answer_extraction_and_exact_match():
    assert extract_answer("She sold 48 + 24 = 72 clips.\n#### 72") == "72"
    assert extract_answer("#### 3\nno wait\n#### $1,000.00") == "1000"  # the last one; $ and commas dropped
    assert extract_answer("the answer is 72") is None  # hashes needs '####'
    assert extract_answer("48 then 72.", "last_number") == "72"
    assert reference_answer("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72") == "72"
    assert reference_answer(" 5.0 ") == "5"
    rewards = load_rewards(["exact_match", "format", "length_penalty"], [1.0, 0.5, 2.0], length_target=10)
    completions = ["so\n#### 72", "#### 71", "it is 72" + "x" * 12]
    total, means = score(rewards, ["q"] * 3, completions, ["72"] * 3, step=1)
    # exact: 1, 0, 0; format: 1, 1, 0; length: 0, 0, -(20 - 10) / 10
    torch.testing.assert_close(total, torch.tensor([1 + 0.5, 0.5, 2 * -1.0]))
    assert means == pytest.approx({"exact_match": 1 / 3, "format": 2 / 3, "length_penalty": -1 / 3})


@pytest.fixture
def toy_rewards(tmp_path, monkeypatch):
    """Reward functions importable as ``grpo_toy:...``."""
    (tmp_path / "grpo_toy.py").write_text(
        "def vowels(prompts, completions):\n"
        "    return [sum(c.count(v) for v in 'aeiou') / max(len(c), 1) for c in completions]\n"
        "def boom(prompts, completions):\n"
        "    raise ValueError('cannot score this')\n"
        "def nan(prompts, completions):\n"
        "    return [float('nan')] * len(completions)\n"
        "def echo_answer(prompts, completions, answers):\n"
        "    return [float(a is not None and a in c) for c, a in zip(completions, answers)]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "grpo_toy"


def test_module_function_rewards_may_take_the_answers(toy_rewards):
    rewards = load_rewards([f"{toy_rewards}:echo_answer", f"{toy_rewards}:vowels"], None)
    total, _ = score(rewards, ["q", "q"], ["it is 7", "xyz"], ["7", "7"], step=1)
    torch.testing.assert_close(total, torch.tensor([1.0 + 2 / 7, 0.0]))


# ----------------------------------------------------------------------------- runs
def run(capsys, *args):
    from lmforge.cli import main

    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def rows(out: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("one two\nfour five\nsix seven\nfox dog\nthree one\n")
    return path


def test_toy_task_reward_rises_with_a_bounded_kl(tiny_lm_dirs, tmp_path, capsys, toy_rewards, prompts):
    """A programmatic reward (the share of vowels among the generated characters) rises clearly within 16
    steps; the k3 KL to the adapter-off base stays bounded."""
    out = tmp_path / "toy"
    code, _, err = run(capsys, "rlhf", "grpo", "-m", tiny_lm_dirs["plain"], "--prompts", prompts, "--rewards",
                       f"{toy_rewards}:vowels", "-o", out, "--steps", "16", "--batch-size", "4", "-G", "8", "-n", "6",
                       "--lr", "1e-2", "--beta", "0.05", "--lora-targets", "all-linear", "--threads", "1")
    assert code == 0, err
    r = rows(out)
    reward = [x["reward"] for x in r]
    first, last = sum(reward[:4]) / 4, sum(reward[-4:]) / 4
    # stated margin: the vowel share rises by >= 0.08 and by half (seen: 0.15 -> 0.30)
    assert last > max(first + 0.08, 1.5 * first), [round(x, 2) for x in reward]
    # the per-token KL to the reference stays under 4 nats (seen: <= 2.3)
    assert r[0]["kl"] == pytest.approx(0.0, abs=1e-6) and max(x["kl"] for x in r) < 4.0, [x["kl"] for x in r]
    assert all(x["clipfrac"] == 0.0 for x in r)  # one update per rollout: pi_old = pi, the ratio is 1


@pytest.mark.parametrize("iterations", [1, 2])
def test_resume_after_a_stop_gives_the_same_steps(tiny_lm_dirs, tmp_path, capsys, toy_rewards, prompts, iterations):
    args = ["rlhf", "grpo", "-m", tiny_lm_dirs["plain"], "--prompts", prompts, "--rewards", f"{toy_rewards}:vowels",
            "--batch-size", "2", "-G", "3", "-n", "4", "--lr", "1e-2", "--beta", "0.1", "--threads", "1",
            "--save-every", "2", "--iterations", str(iterations)]
    assert run(capsys, *args, "-o", tmp_path / "straight", "--steps", "4")[0] == 0
    assert run(capsys, *args, "-o", tmp_path / "stopped", "--steps", "2")[0] == 0
    code, _, err = run(capsys, *args, "-o", tmp_path / "stopped", "--steps", "4", "--resume")
    assert code == 0, err
    straight, resumed = rows(tmp_path / "straight"), rows(tmp_path / "stopped")
    assert [x["step"] for x in resumed] == [1, 2, 3, 4]
    assert resumed == straight
    assert straight[3]["kl"] > 0  # the later steps depend on the restored adapter
    if iterations == 2:  # the second update on a rollout batch sees the same rewards, and a moved policy
        assert straight[0]["reward"] == straight[1]["reward"] and straight[1]["kl"] > 0


@pytest.fixture
def gsm8k_model(tiny_lm_dirs, tmp_path):
    """A tiny model with room for a GSM8K question (skips when the shared GSM8K split is not here)."""
    if not GSM8K.is_file():
        pytest.skip(f"{GSM8K} is not here")
    import lmforge
    from lmforge.checkpoints.hf import save_hf_dir
    from lmforge.config import preset
    from lmforge.models.decoder import DecoderLM

    tok = lmforge.load(tiny_lm_dirs["plain"]).tokenizer
    config = preset("tiny-llama", vocab_size=tok.vocab_size, max_seq_len=1024, eos_token_id=tok.eos_id)
    return save_hf_dir(DecoderLM(config).init_weights(seed=0, std=0.2), tmp_path / "tiny", tokenizer=tok)


def test_gsm8k_recipe_smoke_run_logs_held_out_accuracy_before_and_after(gsm8k_model, tmp_path, capsys):
    """recipes/grpo_gsm8k.yaml, one step on 2 GSM8K prompts (the tiny model, not the recipe's): held-out exact-match
    accuracy is logged before training (step 0) and after it, and each held-out prompt's completion and scores are
    in held_out/step-0.jsonl and step-1.jsonl (the recipe's seeded split; their mean is the logged accuracy)."""
    from lmforge.data.reward_data import random_split

    out = tmp_path / "gsm8k"
    code, stdout, err = run(capsys, "rlhf", "grpo", "--config", RECIPES / "grpo_gsm8k.yaml", "--prompts", GSM8K,
                            "-m", gsm8k_model, "--template", "plain", "--limit", "4", "--eval-count", "2",
                            "--steps", "1", "--batch-size", "2", "-G", "2", "-n", "4", "-o", out, "--threads", "1")
    assert code == 0, err
    r = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [x for x in r if "eval_exact_match" in x]
    assert [x["step"] for x in evals] == [0, 1] and all(0 <= x["eval_exact_match"] <= 1 for x in evals)
    assert "reward_exact_match" in r[1] and json.loads(stdout)["held_out"] == 2
    questions = [json.loads(line)["question"] for line in GSM8K.read_text().splitlines()[:4]]
    for logged in evals:
        per = [json.loads(line) for line in (out / "held_out" / f"step-{logged['step']}.jsonl").read_text()
               .splitlines()]
        assert [x["row"] for x in per] == random_split(4, 2 / 4, 0)[1]
        assert all(x["prompt"].startswith(questions[x["row"]]) and x["answer"] for x in per)
        assert set(per[0]) == {"row", "prompt", "answer", "completion", "reward", "exact_match", "format"}
        assert sum(x["exact_match"] for x in per) / 2 == pytest.approx(logged["eval_exact_match"])
        assert sum(x["reward"] for x in per) / 2 == pytest.approx(logged["eval_reward"])

    # recipes/compare_alignment_gsm8k.yaml reads such a file: its base column gives GRPO's step-0 completions
    import yaml

    recipe = yaml.safe_load((RECIPES / "compare_alignment_gsm8k.yaml").read_text())
    recipe.update(data=str(out / "held_out" / "step-0.jsonl"), max_new_tokens=4, out=str(tmp_path / "cmp"),
                  runs_out=str(tmp_path / "cmp" / "runs"), defaults={"model": str(gsm8k_model), "temperature": 0.0},
                  settings=[{"label": "base"}])
    (tmp_path / "cmp.yaml").write_text(yaml.safe_dump(recipe))
    code, _, err = run(capsys, "compare", "--config", tmp_path / "cmp.yaml")
    assert code == 0, err
    grpo_eval = [json.loads(line) for line in (out / "held_out" / "step-0.jsonl").read_text().splitlines()]
    compared = [json.loads(line) for line in (tmp_path / "cmp" / "runs" / "base" / "predictions.jsonl")
                .read_text().splitlines()]
    assert [x["prediction"] for x in compared] == [x["completion"].strip() for x in grpo_eval]
    assert [x["scores"]["answer_match"] for x in compared] == [x["exact_match"] for x in grpo_eval]


# ----------------------------------------------------------------------------- bad input: one line each
def test_bad_input_is_one_error_line(tiny_lm_dirs, tmp_path, capsys, toy_rewards, prompts):
    no_answers = tmp_path / "no_answers.jsonl"
    no_answers.write_text('{"prompt": "2 + 2?", "answer": "4"}\n{"prompt": "3 + 3?"}\n')
    base = ["rlhf", "grpo", "-m", tiny_lm_dirs["plain"], "--steps", "1", "--batch-size", "2", "-G", "2", "-n", "2",
            "--threads", "1"]
    cases = [
        (["--prompts", prompts, "--rewards", f"{toy_rewards}:boom"],
         f"reward function {toy_rewards}:boom raised ValueError: cannot score this (at GRPO step 1)"),
        (["--prompts", prompts, "--rewards", f"{toy_rewards}:nan"], f"reward function {toy_rewards}:nan returned nan"),
        (["--prompts", prompts, "--rewards", f"{toy_rewards}:vowels", "-G", "1"], "group_size (--group-size)"),
        (["--prompts", no_answers], "no_answers.jsonl, line 2: no answer (field 'answer')"),
        (["--prompts", prompts], "a text file holds prompts without answers"),
        (["--prompts", prompts, "--rewards", "exact_match", "format", "--reward-weights", "1"],
         "reward_weights (--reward-weights): 1 weights for 2 rewards"),
        (["--prompts", prompts, "--rewards", "exact_mtach"], "unknown reward 'exact_mtach'"),
        (["--prompts", no_answers, "--prompt-template", "Q: {prompt"], "prompt_template (--prompt-template): not a"),
        (["--prompts", no_answers, "--prompt-template", "Q: {question}"], "names the field 'question'"),
    ]
    for i, (args, expected) in enumerate(cases):
        code, _, err = run(capsys, *base, "-o", tmp_path / f"o{i}", *args)
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2 and len(lines) == 1 and expected in lines[0], (args, err)
        assert not (tmp_path / f"o{i}" / "final").exists()


def test_config_refuses_a_group_of_one_and_misaligned_iterations():
    with pytest.raises(LmforgeError, match=r"group_size \(--group-size\)"):
        GRPOConfig(prompts=Path("p.txt"), group_size=1)
    with pytest.raises(LmforgeError, match=r"save_every \(--save-every\): 3 is not a multiple of iterations"):
        GRPOConfig(prompts=Path("p.txt"), iterations=2, steps=4, save_every=3)


def test_checkpoint_fingerprint_of_a_tensor_beyond_float32_integers():
    """A frozen tensor of more than 2**24 elements (SmolLM2's 49152 x 576 embedding) can be fingerprinted: the
    sample positions, spaced in float32, used to round past the end (IndexError at the end of every GRPO, PPO
    or DPO run on the embedded model)."""
    from lmforge.training.checkpoint import fingerprint

    big = torch.zeros(49152 * 576, dtype=torch.uint8)
    big[-1] = 7
    assert fingerprint([("embed", big)]) != fingerprint([("embed", torch.zeros_like(big))])


def test_full_method_against_a_frozen_copy_and_print_config_reruns_the_run(tiny_lm_dirs, tmp_path, capsys,
                                                                           toy_rewards, prompts):
    """--method full trains every weight against a frozen copy (KL 0 at the first step, then not); the
    --print-config YAML given back as --config reproduces metrics.jsonl."""
    import lmforge

    args = ["rlhf", "grpo", "-m", tiny_lm_dirs["plain"], "--prompts", prompts, "--rewards", f"{toy_rewards}:vowels",
            "--steps", "2", "--batch-size", "2", "-G", "3", "-n", "4", "--method", "full", "--lr", "1e-3",
            "--beta", "0.1", "--loss-type", "dr_grpo"]
    code, printed, _ = run(capsys, *args, "-o", tmp_path / "a", "--print-config")
    assert code == 0 and not (tmp_path / "a").exists()
    (tmp_path / "recipe.yaml").write_text(printed)
    assert run(capsys, *args, "-o", tmp_path / "a", "--threads", "1")[0] == 0
    assert run(capsys, "rlhf", "grpo", "--config", tmp_path / "recipe.yaml", "-o", tmp_path / "b", "--threads",
               "1")[0] == 0
    a, b = rows(tmp_path / "a"), rows(tmp_path / "b")
    assert a == b and a[0]["kl"] == pytest.approx(0.0, abs=1e-6) and a[1]["kl"] > 0
    tuned, base = lmforge.load(tmp_path / "a" / "final").model, lmforge.load(tiny_lm_dirs["plain"]).model
    assert not torch.equal(tuned.model.layers[0].mlp.down_proj.weight, base.model.layers[0].mlp.down_proj.weight)


def test_a_reward_model_folder_is_a_weighted_reward_term(tmp_path):
    """A folder from `lmforge reward train` scores the completions (higher = better) like its own .score()."""
    from lmforge.alignment.reward import PairwiseReward, load_reward_model, save_reward_model
    from lmforge.config import preset
    from lmforge.models.decoder import DecoderLM
    from lmforge.models.heads import RewardModel
    from lmforge.training.tokenizer_train import char_tokenizer

    tok = char_tokenizer("abcdefghijklmnop ")
    decoder = DecoderLM(preset("tiny-llama", vocab_size=tok.vocab_size)).init_weights(seed=0)
    folder = save_reward_model(PairwiseReward(RewardModel(decoder), tok, max_len=32), tmp_path / "rm")
    completions = ["abc", "hello", "fed cba"]
    total, means = score(load_rewards([str(folder), "length_penalty"], [2.0, 1.0], length_target=4),
                         ["p"] * 3, completions, [None] * 3, step=1)
    expected = 2.0 * torch.as_tensor(load_reward_model(folder).score(completions), dtype=torch.float32)
    torch.testing.assert_close(total, expected + torch.tensor([0.0, -0.25, -0.75]))


def _bench():
    import importlib.util

    path = Path(__file__).parent.parent / "bench" / "grpo_gsm8k.py"
    spec = importlib.util.spec_from_file_location("bench_grpo_gsm8k", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gsm8k_bench_pairs_held_out_prompts_before_and_after(gsm8k_model, tmp_path, capsys):
    """bench/grpo_gsm8k.py's plumbing on the tiny model (2 steps, 3 held-out prompts of 6): before/after come
    from the run's per-prompt files (the same prompts, the recipe's split), the bootstrap from those pairs, the
    Markdown block from the summary. --minutes: a 1-step probe sets the steps."""
    from lmforge.data.reward_data import random_split
    from lmforge.evaluation.significance import paired_bootstrap

    bench = _bench()
    flags = ["--", "--prompts", str(GSM8K), "-m", str(gsm8k_model), "--template", "plain", "--limit", "6",
             "--batch-size", "2", "-G", "2", "-n", "4"]
    out = tmp_path / "bench"
    s = bench.main(["--steps", "2", "--eval-n", "3", "--threads", "1", "--out", str(out), "--resamples", "500",
                    *flags])
    printed = capsys.readouterr().out
    run_dir = out / "run"
    assert s["steps"] == 2 and s["held_out_rows"] == random_split(6, 3 / 6, 0)[1]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = {x["step"]: x["eval_exact_match"] for x in metrics if "eval_exact_match" in x}
    assert evals == {0: pytest.approx(sum(s["before"]) / 3), 2: pytest.approx(sum(s["after"]) / 3)}
    assert s["bootstrap"] == paired_bootstrap(s["before"], s["after"], resamples=500, seed=0).as_dict()
    assert s["train_s"] > 0 and s["config"]["limit"] == 6 and s["config"]["group_size"] == 2
    assert printed.strip() == (out / "report.md").read_text().strip()
    assert "| 3 | " in printed and "95% paired bootstrap interval" in printed and "2 steps (fixed)" in printed
    assert json.loads((out / "summary.json").read_text())["bootstrap"]["resamples"] == 500
    fmt = s["other_terms"]["format"]  # the recipe's second reward term, paired the same way
    after_rows = [json.loads(x) for x in (run_dir / "held_out" / "step-2.jsonl").read_text().splitlines()]
    assert fmt["after"] == pytest.approx(sum(r["format"] for r in after_rows) / 3)
    assert "mean format reward term" in printed
    again = bench.main(["--report-only", "--out", str(out), "--resamples", "500"])  # no training: the same figures
    assert again["bootstrap"] == s["bootstrap"] and again["other_terms"] == s["other_terms"]
    first6 = GSM8K.read_text().splitlines()[:6]  # the SFT file: the records GRPO trained on, as in the source
    assert (out / "sft_train.jsonl").read_text().splitlines() == [x for i, x in enumerate(first6)
                                                                   if i not in s["held_out_rows"]]

    timed = bench.main(["--minutes", "0.001", "--eval-n", "3", "--threads", "1", "--out", str(tmp_path / "timed"),
                        "--resamples", "100", *flags])
    probe = bench.step_seconds(tmp_path / "timed" / "probe")
    assert len(probe) == 1 and timed["probe_step_s"] == probe[0]
    assert timed["steps"] == max(1, int(0.001 * 60 // probe[0])) and "training budget" in capsys.readouterr().out
