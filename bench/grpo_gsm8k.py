"""GRPO on GSM8K within a stated CPU budget: held-out exact-match accuracy before vs after, with a paired bootstrap.

One run of ``lmforge rlhf grpo --config recipes/grpo_gsm8k.yaml`` (the embedded SmolLM2-135M-Instruct with LoRA,
unless extra flags say otherwise) on the first ``limit`` problems of ../shared/data/gsm8k/train.jsonl, of which
``--eval-n`` are held out by the recipe's own seeded split (``data.reward_data.random_split``: training never sees
them). The recipe scores the held-out prompts with the SAME greedy decoding (temperature 0, the recipe's
``max_new_tokens``, the same prompt rendering) before the first step and after the last, and writes each prompt's
completion and scores to ``OUT/run/held_out/step-0.jsonl`` and ``step-N.jsonl``. This script pairs them by prompt:

  - accuracy = the share of held-out prompts whose ``#### N`` answer equals the reference's (the ``exact_match``
    reward term, 0/1 per prompt; ``lmforge.evaluation.answers``),
  - the paired bootstrap 95% interval of accuracy(after) - accuracy(before): the prompts resampled with replacement
    (the same draw for both), 10,000 resamples, seeded (``lmforge.evaluation.significance.paired_bootstrap``),

with the same pairing for every other reward term of the recipe (format: the share of completions ending in
``#### N``), and prints a Markdown block for bench/README.md (also OUT/summary.json, OUT/report.md);
``--report-only`` recomputes them from a finished run in --out without training. It also writes
OUT/sft_train.jsonl: the records GRPO trained on (the held-out ones left out), for the SFT column of
recipes/compare_alignment_gsm8k.yaml.

Budget: ``--steps N`` trains N optimiser steps. ``--minutes M`` instead fits the steps into M minutes of training
(the recipe has no time budget of its own): a 1-step probe run (no held-out evaluation, into OUT/probe) measures
one step's time from its metrics row (rollout tokens / tokens_per_s), and the run takes floor(M * 60 / that)
steps (at least 1). The two held-out evaluations and model loading are not in the budget: they are reported apart.

    HF_HUB_OFFLINE=1 python bench/grpo_gsm8k.py --minutes 45 --eval-n 100 --threads 2 --out out/grpo_gsm8k
    HF_HUB_OFFLINE=1 python bench/grpo_gsm8k.py --steps 50 ...        # a fixed number of steps instead

Any other ``lmforge rlhf grpo`` flag goes after ``--`` (e.g. ``-- -G 4 -n 192 --limit 600``; a plumbing check on a
tiny model: ``-- -m TINY_DIR --template plain --limit 8 -G 2 -n 8``). Run from the repository root (the recipe's
data path is relative to it). ``lmforge compare --config recipes/compare_alignment_gsm8k.yaml`` then compares
base, SFT, DPO and this GRPO run on the same held-out prompts (OUT/run/held_out/step-0.jsonl).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "grpo_gsm8k.yaml"


def grpo(argv: list[str]) -> dict:
    """``lmforge rlhf grpo ARGV`` in this process; its JSON result (a failure exits with its error line)."""
    import contextlib
    import io

    from lmforge.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(argv)
    if code != 0:
        sys.exit(f"lmforge rlhf grpo {shlex.join(argv)} failed (exit status {code})")
    return json.loads(buf.getvalue())


def metric_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if line]


def step_seconds(run: Path) -> list[float]:
    """Each training step's time, from its metrics row: (prompts x G x max_new_tokens) / tokens_per_s (the loop
    logs every step of a GRPO run and counts training time only)."""
    import yaml

    cfg = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    tokens = cfg["batch_size"] * cfg["group_size"] * cfg["max_new_tokens"]
    return [tokens / r["tokens_per_s"] for r in metric_rows(run) if "loss" in r and r.get("tokens_per_s")]


def correctness(path: Path, term: str = "exact_match") -> dict[int, float]:
    """{prompt row: the term's 0/1 score} of one held-out evaluation file."""
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        if term not in r:
            sys.exit(f"{path}: no {term!r} score: the run's rewards must include {term}")
        out[int(r["row"])] = float(r[term])
    return out


def other_terms(run: Path, steps: int, rows: list[int], rewards: list[str], resamples: int, seed: int) -> dict:
    """Each reward term but exact_match (e.g. format: the share of completions ending in '#### N'), held-out mean
    before and after with its paired bootstrap: what moved when exact match could not."""
    from lmforge.evaluation.significance import paired_bootstrap

    out = {}
    for term in rewards:
        if term == "exact_match":
            continue
        before, after = correctness(run / "held_out" / "step-0.jsonl", term), \
            correctness(run / "held_out" / f"step-{steps}.jsonl", term)
        x, y = [before[r] for r in rows], [after[r] for r in rows]
        out[term] = paired_bootstrap(x, y, resamples=resamples, seed=seed).as_dict()
    return out


def write_sft_train(cfg: dict, held_out: list[int], path: Path) -> int:
    """The records GRPO trained on (the first ``limit`` of its prompt file less the held-out rows), as they are
    in that file, to ``path``: an SFT run on them (recipes/compare_alignment_gsm8k.yaml) sees the same problems
    and never the held-out ones. Returns how many (0, nothing written, for a prompt file that is not .jsonl)."""
    from lmforge.io import write_text_atomic

    source = Path(cfg["prompts"])
    if source.suffix != ".jsonl":
        return 0
    skip = set(held_out)
    with source.open(encoding="utf-8") as f:
        lines = [line for line in (next(f, "") for _ in range(cfg["limit"])) if line.strip()] if cfg["limit"] else \
            [line for line in f if line.strip()]
    kept = [line if line.endswith("\n") else line + "\n" for i, line in enumerate(lines) if i not in skip]
    write_text_atomic(path, kept)
    return len(kept)


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def pts(x: float) -> str:
    return f"{100 * x:+.1f}"


def markdown(s: dict) -> str:
    b, c = s["bootstrap"], s["config"]
    steps = f"{s['steps']} step{'s' if s['steps'] != 1 else ''}"
    scope = f"first {c['limit']}" if c["limit"] else "all"
    budget = (f"a {s['minutes']:g}-minute training budget: one probe step took {s['probe_step_s']:.1f} s, so "
              f"{steps}" if s["minutes"] else f"{steps} (fixed)")
    lines = [
        f"### Results ({s['date']}): GRPO on GSM8K, held-out exact match before vs after",
        "",
        f"{s['machine']}, torch {s['torch']}, {s['threads']} thread(s); {s['started']}-{s['ended']} UTC.",
        "",
        f"    {s['command']}",
        "",
        f"Model {c['model'] or 'the embedded SmolLM2-135M-Instruct'} ({c['method']}), {budget} x {c['batch_size']} "
        f"prompts x G={c['group_size']} completions (temperature {c['temperature']}, at most {c['max_new_tokens']} "
        f"new tokens), lr {c['lr']}, beta {c['beta']}, rewards {' + '.join(f'{w:g} {r}' for r, w in s['rewards'])}. "
        f"Training took {s['train_s'] / 60:.1f} min ({s['train_s'] / max(s['steps'], 1):.1f} s/step); the two "
        f"held-out evaluations and loading {s['other_s'] / 60:.1f} min more.",
        "",
        f"| held-out prompts ({scope} of the train split, seeded) | accuracy before | accuracy after "
        "| difference (points) | 95% paired bootstrap interval |",
        "|---|---:|---:|---:|---|",
        f"| {b['n']} | {pct(b['before'])} ({s['right_before']}/{b['n']}) | {pct(b['after'])} ({s['right_after']}/"
        f"{b['n']}) | {pts(b['diff'])} | [{pts(b['low'])}, {pts(b['high'])}] |",
        *(f"| the same, mean {term} reward term | {pct(o['before'])} | {pct(o['after'])} | {pts(o['diff'])} | "
          f"[{pts(o['low'])}, {pts(o['high'])}] |" for term, o in s.get("other_terms", {}).items()),
        "",
        f"Greedy decoding, the same for both; {s['fixed']} held-out answers went wrong -> right and {s['broken']} "
        f"right -> wrong. The interval resamples the {b['n']} prompts with replacement ({b['resamples']:,} "
        f"resamples, seed {b['seed']}); it {'excludes' if b['low'] > 0 or b['high'] < 0 else 'includes'} 0.",
    ]
    return "\n".join(lines)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()}-core {cpu}"


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, extra = argv[:at], argv[at + 1:]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                usage="%(prog)s [options] [-- lmforge rlhf grpo flags]")
    p.add_argument("--config", default=str(RECIPE), help="the GRPO recipe (default: recipes/grpo_gsm8k.yaml)")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps (default: the recipe's)")
    p.add_argument("--minutes", type=float, default=None,
                   help="fit the steps into this much training time, from a measured probe step (overrides --steps)")
    p.add_argument("--eval-n", type=int, default=None, help="held-out prompts (default: the recipe's eval_count)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    p.add_argument("--out", default="out/grpo_gsm8k", help="output folder: run/, probe/, summary.json, report.md")
    p.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples (default: 10000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: 0)")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: recompute the statistics and the report of the run already in --out (its "
                        "timings from OUT/summary.json)")
    a = p.parse_args(argv)
    if a.minutes is not None and a.minutes <= 0:
        p.error("--minutes must be > 0")
    if a.steps is not None and a.steps < 1:
        p.error("--steps must be >= 1")
    import torch
    import yaml


    out = Path(a.out)
    run = out / "run"
    if a.report_only:
        return report_only(out, a.resamples, a.seed)
    base = ["rlhf", "grpo", "--config", a.config, "--threads", str(a.threads), *extra]
    if a.eval_n is not None:
        base += ["--eval-count", str(a.eval_n)]
    started, t0 = datetime.now(timezone.utc), time.perf_counter()
    probe_s = None
    steps = a.steps
    if a.minutes is not None:
        grpo([*base, "--steps", "1", "--eval-count", "0", "--save-every", "0", "-o", str(out / "probe"),
              "--overwrite"])
        probe_s = step_seconds(out / "probe")[0]
        steps = max(1, int(a.minutes * 60 // probe_s))
        print(f"probe: one step took {probe_s:.1f} s -> {steps} steps in {a.minutes:g} min", file=sys.stderr)
    run_args = [*base, *(["--steps", str(steps)] if steps else []), "-o", str(run), "--overwrite"]
    t_run = time.perf_counter()
    result = grpo(run_args)
    run_s = time.perf_counter() - t_run
    cfg = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    steps = int(result["step"])
    stats = paired_stats(run, steps, cfg["rewards"], a.resamples, a.seed)
    rows = stats["held_out_rows"]
    train_s = sum(step_seconds(run))
    sft_records = write_sft_train(cfg, rows, out / "sft_train.jsonl")
    weights = cfg.get("reward_weights") or [1.0] * len(cfg["rewards"])
    shown = [*argv, *(["--", *extra] if extra else [])]
    summary = {
        "date": started.strftime("%Y-%m-%d"), "started": started.strftime("%H:%M"),
        "ended": datetime.now(timezone.utc).strftime("%H:%M"), "machine": machine(), "torch": torch.__version__,
        "threads": a.threads, "command": "HF_HUB_OFFLINE=1 python bench/grpo_gsm8k.py " + shlex.join(shown),
        "minutes": a.minutes,
        "probe_step_s": probe_s, "steps": steps, "train_s": train_s, "other_s": max(0.0, run_s - train_s),
        "total_s": time.perf_counter() - t0, "config": cfg, "rewards": list(zip(cfg["rewards"], weights)),
        **stats, "sft_train_records": sft_records,
    }
    return write_summary(out, summary)


def write_summary(out: Path, summary: dict) -> dict:
    from lmforge.io import write_json_atomic, write_text_atomic

    block = markdown(summary)
    write_json_atomic(out / "summary.json", summary)
    write_text_atomic(out / "report.md", block + "\n")
    print(block)
    return summary


def paired_stats(run: Path, steps: int, rewards: list[str], resamples: int, seed: int) -> dict:
    """The held-out figures of a run: each prompt's exact match before and after (paired by prompt), their
    bootstrap, the counts, and the same pairing for the other reward terms."""
    from lmforge.evaluation.significance import paired_bootstrap

    before = correctness(run / "held_out" / "step-0.jsonl")
    after = correctness(run / "held_out" / f"step-{steps}.jsonl")
    if sorted(before) != sorted(after):
        sys.exit("the held-out evaluations before and after scored different prompts")
    rows = sorted(before)
    x, y = [before[r] for r in rows], [after[r] for r in rows]
    return {"bootstrap": paired_bootstrap(x, y, resamples=resamples, seed=seed).as_dict(),
            "right_before": int(sum(x)), "right_after": int(sum(y)),
            "fixed": sum(1 for u, v in zip(x, y) if v > u), "broken": sum(1 for u, v in zip(x, y) if v < u),
            "held_out_rows": rows, "before": x, "after": y,
            "other_terms": other_terms(run, steps, rows, rewards, resamples, seed)}


def report_only(out: Path, resamples: int, seed: int) -> dict:
    """The statistics of the run in ``out`` again (exact match and the other terms), with its recorded timings."""
    path = out / "summary.json"
    if not path.is_file():
        sys.exit(f"--report-only: {path} does not exist (run the bench first)")
    summary = json.loads(path.read_text(encoding="utf-8"))
    summary.update(paired_stats(out / "run", int(summary["steps"]), summary["config"]["rewards"], resamples, seed))
    return write_summary(out, summary)
