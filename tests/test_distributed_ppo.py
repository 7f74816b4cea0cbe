"""PPO on torchrun (issue 14): two ranks, each generating and scoring its half of every global batch of prompts,
log the same steps and end with the same weights as one process on the whole batch (CPU, gloo); a 2-rank
checkpoint resumes on one process; a world size that does not divide the batch is one clear error. Plus the
pieces in this process: whitening across ranks equals whitening the concatenation, per-prompt sampling seeds."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from lmforge.alignment.ppo import PPOHyperparams, PPOTrainer, RankSums, whiten, whiten_across
from lmforge.cli.main import main
from lmforge.errors import LmforgeError
from lmforge.training.distributed import Dist
from test_distributed import assert_same_rows, assert_same_weights, torchrun
from test_ppo import PROMPTS, fraction_of_a, toy_policy


def rows_of(out: Path) -> tuple[list[dict], list[dict]]:
    """metrics.jsonl as (the figures without the step's wall time, the logged samples)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    return ([{k: v for k, v in r.items() if k not in ("step_s", "sample")} for r in rows],
            [r.get("sample") for r in rows])


@pytest.fixture
def vowel_reward(tmp_path, monkeypatch) -> str:
    """``ppo_vowels:share`` importable here and in torchrun's processes (PYTHONPATH)."""
    folder = tmp_path / "reward_module"
    folder.mkdir()
    (folder / "ppo_vowels.py").write_text(
        "def share(prompts, completions):\n"
        "    return [sum(c.count(v) for v in 'aeiou') / max(len(c), 1) for c in completions]\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")])))
    return "ppo_vowels:share"


@pytest.fixture
def prompts_file(tmp_path) -> Path:
    path = tmp_path / "prompts.txt"  # prompts of different lengths: the ranks' halves pad differently
    path.write_text("one two\nfour five six\nseven\nfox dog lazy quick\nthree one\nsix\n", encoding="utf-8")
    return path


def test_lora_ppo_two_ranks_equal_one_process(tiny_lm_dirs, prompts_file, vowel_reward, tmp_path, capsys):
    """LoRA PPO with the adaptive KL coefficient (driven by the global KL) and minibatches that mix the ranks'
    rows: the same figures step for step (reward, KL, losses, clip fractions, entropy) and the same adapter."""
    args = ["rlhf", "ppo", "-m", str(tiny_lm_dirs["plain"]), "--prompts", str(prompts_file), "--reward", vowel_reward,
            "--steps", "3", "--batch-size", "4", "--mini-batch-size", "2", "--ppo-epochs", "2", "-n", "5",
            "--lr", "3e-3", "--target-kl", "0.5", "--horizon", "10", "--seed", "4", "--lora-r", "4"]
    assert main([*args, "-o", str(tmp_path / "one"), "--threads", "1"]) == 0
    capsys.readouterr()
    done = torchrun([*args, "-o", str(tmp_path / "two")])
    assert done.returncode == 0, done.stderr[-3000:]
    one, one_samples = rows_of(tmp_path / "one")
    two, two_samples = rows_of(tmp_path / "two")
    assert [r["step"] for r in one] == [1, 2, 3] and one[2]["kl"] != 0.0  # the later rollouts see the update
    assert_same_rows(two, one)
    assert two_samples == one_samples  # rank 0 logs the global batch's first prompt and its completion
    assert_same_weights(tmp_path / "two" / "final", tmp_path / "one" / "final", name="adapter_model.safetensors")


def test_full_ppo_two_ranks_with_nproc_then_resume_on_one(tiny_lm_dirs, prompts_file, vowel_reward, tmp_path,
                                                          capsys, monkeypatch):
    """--method full through ``--nproc 2``: 2 steps on two ranks (checkpoint at step 2), then resumed on one
    process to step 3: the same steps and weights as a 3-step run on one process."""
    for key, value in {"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "TQDM_DISABLE": "1"}.items():
        monkeypatch.setenv(key, value)
    args = ["rlhf", "ppo", "-m", str(tiny_lm_dirs["plain"]), "--prompts", str(prompts_file), "--reward", vowel_reward,
            "--batch-size", "4", "--mini-batch-size", "4", "--ppo-epochs", "2", "-n", "4", "--method", "full",
            "--lr", "1e-3", "--seed", "1", "--save-every", "2", "--threads", "1"]
    assert main([*args, "--steps", "3", "-o", str(tmp_path / "one")]) == 0
    assert main([*args, "--steps", "2", "--nproc", "2", "-o", str(tmp_path / "half")]) == 0
    assert main([*args, "--steps", "3", "--resume", "-o", str(tmp_path / "half")]) == 0
    capsys.readouterr()
    one, one_samples = rows_of(tmp_path / "one")
    half, half_samples = rows_of(tmp_path / "half")
    assert [r["step"] for r in one] == [1, 2, 3] and one[1]["kl"] != 0.0
    assert_same_rows(half, one)
    assert half_samples == one_samples
    assert_same_weights(tmp_path / "half" / "final", tmp_path / "one" / "final")


def test_batch_not_divisible_by_world_is_one_clear_error(tiny_lm_dirs, prompts_file, vowel_reward, tmp_path):
    done = torchrun(["rlhf", "ppo", "-m", str(tiny_lm_dirs["plain"]), "--prompts", str(prompts_file), "--reward",
                     vowel_reward, "--steps", "1", "--batch-size", "3", "--mini-batch-size", "1", "-n", "2",
                     "-o", str(tmp_path / "bad")])
    assert done.returncode != 0
    message = "batch_size (--batch-size): the PPO batch size 3 does not divide among the world size 2"
    for rank in (0, 1):  # each rank's error as one line naming the rank (cli/main.py words the prefix)
        lines = [line for line in done.stderr.splitlines() if line.startswith("error") and f"rank {rank}" in line]
        assert len(lines) == 1 and message in lines[0], done.stderr[-3000:]
    assert not (tmp_path / "bad" / "final").exists()


# ----------------------------------------------------------------------------- in this process
def test_whitening_across_ranks_equals_whitening_the_concatenation():
    """Three 'ranks' with different row counts, response lengths and masks: each whitened with the summed
    statistics is its slice of ``whiten`` over all rows (the all-reduce replaced by summing the three)."""
    g = torch.Generator().manual_seed(0)
    R = 6
    parts = [(3.0 + 2.0 * torch.randn(n, R, generator=g), (torch.rand(n, R, generator=g) > 0.3).float())
             for n in (2, 3, 1)]
    stats = []

    def collect(t: torch.Tensor) -> torch.Tensor:  # first pass: remember each part's (sum, squares, count)
        stats.append(t)
        return t

    for x, m in parts:
        whiten_across(x, m, collect)
    total = torch.stack(stats).sum(0)
    got = torch.cat([whiten_across(x, m, lambda t: total) for x, m in parts])
    want = whiten(torch.cat([x for x, _ in parts]), torch.cat([m for _, m in parts]))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    alone = whiten_across(*parts[1])  # one process: plain whitening
    torch.testing.assert_close(alone, whiten(*parts[1]), atol=1e-5, rtol=1e-5)
    assert float(alone.abs().sum()) > 0


def test_rollouts_do_not_depend_on_the_split():
    """A rank holding rows 2-3 of a global batch of 4 samples exactly the completions that one process holding
    all 4 samples for them (each prompt's generator is seeded by its global index), and the sums are the
    identity on one process."""
    model, tok, _ = toy_policy(seed=2)
    ids = [tok.encode(p) for p in PROMPTS[:4]]
    cfg = PPOHyperparams(batch_size=4, mini_batch_size=2, max_new_tokens=6, temperature=1.5, seed=7)
    whole = PPOTrainer(model, tok, fraction_of_a, cfg).rollout(PROMPTS[:4], ids)
    second = PPOTrainer(model, tok, fraction_of_a, cfg, dist=Dist(rank=1, world=2))
    assert (second.local_batch, second.offset) == (2, 2)
    half = second.rollout(PROMPTS[2:4], ids[2:4])
    assert half.completions == whole.completions[2:]
    assert len(set(whole.completions)) > 1
    t = torch.arange(3.0)
    assert RankSums(Dist()).__call__(t) is t
    with pytest.raises(LmforgeError, match="PPO batch size 3 does not divide among the world size 2"):
        PPOTrainer(model, tok, fraction_of_a, PPOHyperparams(batch_size=3, mini_batch_size=1),
                   dist=Dist(rank=0, world=2))
