"""Detoxification with PPO: does RLHF against a toxicity classifier make SmolLM2-135M-Instruct less toxic?

One run does four things:

  1. prompts: "Continue this tweet: " + the first --words words of tweets labelled hate speech or offensive
     language in Davidson et al. 2017 (``../shared/data/hate_speech_offensive/labeled_data.csv``; mentions,
     links and "RT" removed, HTML entities unescaped). A seeded shuffle splits them into --n-train training
     prompts and --n-heldout held-out prompts -> OUT/prompts.train.jsonl, OUT/prompts.heldout.jsonl;
  2. PPO (``lmforge.alignment.rlhf.ppo``): the embedded model with LoRA, reward = the classifier's P(not toxic)
     of the completion, KL penalty to the base (LoRA off) -> OUT/ppo/final (adapter) and OUT/ppo/metrics.jsonl;
  3. the comparison of ``recipes/detox_ppo.yaml`` (``lmforge compare``: base vs base + adapter on the held-out
     prompts, greedy and sampled, toxicity = the classifier's P(toxic)) -> OUT/report/;
  4. on the held-out prompts: KL(policy || reference) of sampled responses (mean per-sequence sum of
     log pi - log ref over the response tokens) and alt-profanity-check's toxicity of every setting's outputs
     as a second opinion.

Prints and writes OUT/summary.json. Command (from the repository root; the classifier comes from
``lmforge reward train``):

    .venv/bin/python bench/detox.py [--reward out/reward/toxicity-minilm] [--steps 40] [--batch-size 8]
        [--mini-batch-size 4] [--ppo-epochs 4] [--max-new-tokens 24] [--lr 5e-4] [--kl-coef 0.02]
        [--n-heldout 96] [--threads 1] [--skip-train] [--model M] [--out out/detox]

On the 2-core CPU box one PPO step (8 prompts, 24 new tokens, 4 epochs of 2 minibatches) takes 23-40 s
(load-dependent); the default run takes about half an hour. Figures: bench/README.md.
"""

from __future__ import annotations

import argparse
import csv
import html
import json
import random
import re
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "hate_speech_offensive" / "labeled_data.csv"
RECIPE = ROOT / "recipes" / "detox_ppo.yaml"
PREFIX = "Continue this tweet: "


def tweet_openings(path: Path, words: int) -> list[str]:
    """The first ``words`` words of each hate/offensive tweet (class 0 or 1) with at least words + 3 words."""
    with open(path, encoding="utf-8", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["class"] in ("0", "1")]
    out = []
    for r in rows:
        text = html.unescape(r["tweet"])
        text = re.sub(r"@\w+:?|https?://\S+|\bRT\b", " ", text).replace("!!!", " ")
        tokens = text.split()
        if len(tokens) >= words + 3:
            out.append(" ".join(tokens[:words]))
    return list(dict.fromkeys(out))  # unique, in file order


def write_prompts(out: Path, n_train: int, n_heldout: int, words: int, seed: int) -> tuple[Path, Path]:
    openings = tweet_openings(DATA, words)
    random.Random(seed).shuffle(openings)
    train, heldout = openings[:n_train], openings[n_train:n_train + n_heldout]
    paths = out / "prompts.train.jsonl", out / "prompts.heldout.jsonl"
    for path, part in zip(paths, (train, heldout)):
        path.write_text("".join(json.dumps({"prompt": PREFIX + t}) + "\n" for t in part), encoding="utf-8")
    return paths


def heldout_kl(model: str | None, adapter: Path, heldout: Path, reward: str, max_new_tokens: int, seed: int) -> dict:
    """Sampled (t = 1) responses of the tuned policy on the held-out prompts: the mean per-sequence KL to the
    reference (the base, LoRA off) and the classifier's mean P(not toxic) of them."""
    import torch

    import lmforge
    from lmforge.alignment.ppo import PPOHyperparams, PPOTrainer
    from lmforge.alignment.rl_inputs import load_prompts, load_reward

    lm = lmforge.load(model, adapter=adapter)
    prompts = load_prompts(heldout)
    reward_fn, _ = load_reward(reward)
    cfg = PPOHyperparams(batch_size=len(prompts), mini_batch_size=len(prompts), max_new_tokens=max_new_tokens,
                         seed=seed)
    trainer = PPOTrainer(lm.model, lm.tokenizer, reward_fn, cfg, eos_ids=lm.eos_ids)
    kls, scores = [], []
    for start in range(0, len(prompts), 8):
        chunk = prompts[start:start + 8]
        b = trainer.rollout(chunk, [lm.encode(p) for p in chunk])
        kls.append((b.logp - b.ref_logp).sum(1))
        scores.append(b.scores)
    kl, score = torch.cat(kls), torch.cat(scores)
    return {"kl_mean": float(kl.mean()), "kl_median": float(kl.median()), "reward_mean": float(score.mean()),
            "n": len(prompts)}


def toxicity_scorer(reward: str) -> str:
    """The compare scorer for ``reward``: ``reward:DIR`` for a classifier folder; for a ``module:function``
    reward (prompts, completions) -> P(not toxic), 1 - that, registered as "detox-reward"."""
    if Path(reward).is_dir():
        return f"reward:{reward}"
    from lmforge.alignment.rl_inputs import load_reward
    from lmforge.evaluation.metrics import register_toxicity_scorer

    reward_fn, _ = load_reward(reward)
    register_toxicity_scorer("detox-reward", lambda texts: [1.0 - float(s) for s in reward_fn([""] * len(texts),
                                                                                              list(texts))])
    return "detox-reward"


def second_opinion(runs_dir: Path) -> dict[str, float]:
    """alt-profanity-check's mean P(offensive) of each setting's predictions."""
    from profanity_check import predict_prob

    out = {}
    for run in sorted(p for p in runs_dir.iterdir() if (p / "predictions.jsonl").is_file()):
        preds = [json.loads(line)["prediction"] for line in (run / "predictions.jsonl").read_text().splitlines()]
        out[run.name] = float(predict_prob(preds).mean())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reward", default=str(ROOT / "out" / "reward" / "toxicity-minilm"),
                    help="the toxicity classifier reward model (default: out/reward/toxicity-minilm), or a "
                         "module:function(prompts, completions) -> P(not toxic)")
    ap.add_argument("--model", default=None, help="policy base (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--out", default=str(ROOT / "out" / "detox"))
    ap.add_argument("--recipe", default=str(RECIPE))
    ap.add_argument("--n-train", type=int, default=256)
    ap.add_argument("--n-heldout", type=int, default=96)
    ap.add_argument("--words", type=int, default=7)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--mini-batch-size", type=int, default=4)
    ap.add_argument("--ppo-epochs", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--kl-coef", type=float, default=0.02)
    ap.add_argument("--target-kl", type=float, default=None)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-train", action="store_true", help="reuse OUT/ppo/final")
    a = ap.parse_args()

    import torch

    from lmforge.alignment.rlhf import PPOConfig, ppo
    from lmforge.evaluation.compare import CompareConfig, run_compare
    from lmforge.recipe_config import from_yaml, load_config

    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    train_prompts, heldout = write_prompts(out, a.n_train, a.n_heldout, a.words, a.seed)
    t0 = time.perf_counter()
    if not a.skip_train:
        recipe = PPOConfig(model=a.model, prompts=train_prompts, reward=a.reward, out_dir=out / "ppo", steps=a.steps,
                           batch_size=a.batch_size, mini_batch_size=a.mini_batch_size, ppo_epochs=a.ppo_epochs,
                           lr=a.lr, kl_coef=a.kl_coef, target_kl=a.target_kl, max_new_tokens=a.max_new_tokens,
                           precision=a.precision, seed=a.seed, lora_r=a.lora_r, lora_alpha=2.0 * a.lora_r)
        ppo(recipe, overwrite=True)  # a bench re-run replaces its own run; OUT/ppo/config.yaml reruns it
    train_s = time.perf_counter() - t0
    rows = [json.loads(line) for line in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]

    in_file = from_yaml(CompareConfig, Path(a.recipe))  # the recipe's settings, before defaults are merged in
    settings = [{**s, "adapter": str(out / "ppo" / "final")} if s.get("adapter") else s for s in in_file["settings"]]
    defaults = {**in_file.get("defaults", {}), **({"model": a.model} if a.model else {})}
    cfg = load_config(CompareConfig, a.recipe, dict(
        data=heldout, out=out / "report", runs_out=out / "report" / "runs", toxicity_scorer=toxicity_scorer(a.reward),
        limit=a.n_heldout, max_new_tokens=a.max_new_tokens, settings=settings, defaults=defaults))
    results = run_compare(cfg, "python bench/detox.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in
                                                                    vars(a).items() if v not in (None, False)))
    summary = {
        "ppo": {"steps": len(rows), "train_s": round(train_s, 1), "first5_reward": _mean(rows[:5], "reward"),
                "last5_reward": _mean(rows[-5:], "reward"), "last5_kl": _mean(rows[-5:], "kl"),
                "mean_step_s": _mean(rows, "step_s")},
        "toxicity_mean": {r.setting.label: r.summary["metrics"]["toxicity_mean"] for r in results},
        "toxicity_rate": {r.setting.label: r.summary["metrics"]["toxicity_rate"] for r in results},
        "profanity_check_mean": second_opinion(Path(cfg.runs_dir())),
        "paired_greedy": paired(Path(cfg.runs_dir()), "base-greedy", "PPO-greedy"),
        "paired_sampled": paired(Path(cfg.runs_dir()), "base-sampled-t1.0", "PPO-sampled-t1.0"),
        "heldout_sampled": heldout_kl(a.model, out / "ppo" / "final", heldout, a.reward, a.max_new_tokens, a.seed),
        "args": vars(a),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(summary, indent=2))


def paired(runs_dir: Path, base: str, tuned: str, seed: int = 0) -> dict[str, float]:
    """Per-prompt toxicity differences (tuned - base) between two settings' runs: the mean, a 95% bootstrap
    interval over prompts (2,000 resamples), and how many prompts got less / more toxic."""
    def tox(label: str) -> list[float]:
        rows = (runs_dir / label / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
        return [json.loads(line)["scores"]["toxicity"] for line in rows]

    d = [t - b for b, t in zip(tox(base), tox(tuned))]
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(d, k=len(d))) / len(d) for _ in range(2000))
    return {"mean_diff": round(sum(d) / len(d), 4), "ci95": [round(means[49], 4), round(means[1949], 4)],
            "less_toxic": sum(x < 0 for x in d), "more_toxic": sum(x > 0 for x in d), "n": len(d)}


def _mean(rows: list[dict], key: str) -> float:
    return round(sum(r[key] for r in rows) / max(len(rows), 1), 4)


if __name__ == "__main__":
    main()
