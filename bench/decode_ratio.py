"""Batch-1 decode speed of two models, measured in alternating rounds in one process, and the ratio.

Issue 16 asks a half-layer student to decode >= 1.7x as fast as its teacher. One figure per model taken minutes apart
(``lmforge compare``'s deployment column) moves by 25% on this shared VM between two runs of the same model, which
is more than the effect measured. Here the two models take turns: each round times the baseline, then the candidate
(``lmforge.evaluation.deployment.decode_speed``: greedy, --new-tokens after a warm-up, EOS ignored, prefill
excluded), on the same prompt (the first DialogSum dev dialogue in the chat template, as bench/optimize.py scores
it); the report is the median of each, the ratio of the medians and the per-round ratios. ``--modes eager compiled``
does it for the eager decode and the torch.compile'd static-shape step (compiled once per shape before timing).

    HF_HUB_OFFLINE=1 python bench/decode_ratio.py --baseline runs/teacher/final --candidate runs/student/final \\
        [--rounds 5] [--threads 2] [--modes eager compiled] [--new-tokens 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from optimize import DATA, PROMPT  # bench/optimize.py's data and prompt: the student is timed on what it is scored on

import lmforge
from lmforge.evaluation.deployment import decode_speed

DEV = DATA / "dialogsum.dev.jsonl"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", required=True, help="model folder the ratio is taken against (e.g. the teacher)")
    p.add_argument("--candidate", required=True, help="model folder measured against it (e.g. the student)")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds (default: 5)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens timed per round (default: 64)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--modes", nargs="+", choices=("eager", "compiled"), default=["eager", "compiled"])
    p.add_argument("--dev", type=Path, default=DEV, help="DialogSum dev file (its first dialogue is the prompt)")
    p.add_argument("--json", type=Path, help="also write the results here")
    a = p.parse_args()
    if a.rounds < 1:
        p.error(f"--rounds must be at least 1, got {a.rounds}")
    if not a.dev.is_file():
        p.error(f"--dev {a.dev}: no such file")
    if a.threads:
        torch.set_num_threads(a.threads)
    models = {"baseline": lmforge.load(a.baseline), "candidate": lmforge.load(a.candidate)}
    record = json.loads(a.dev.open(encoding="utf-8").readline())
    chat = [{"role": "user", "content": PROMPT.format(dialogue=record["dialogue"])}]
    ids = models["baseline"].encode(chat)
    if models["candidate"].encode(chat) != ids:
        p.error("the two models tokenise the prompt differently: compare models that share a tokenizer")
    print(f"prompt: {len(ids)} tokens; {a.new_tokens} new tokens per round; {torch.get_num_threads()} threads")
    results = {}
    for mode in a.modes:
        for lm in models.values():
            lm.compile = mode == "compiled"
            if lm.compile:  # compile every shape the timed rounds use, outside them
                decode_speed(lm, ids, a.new_tokens, repeats=1)
        speeds: dict[str, list[float]] = {"baseline": [], "candidate": []}
        for _ in range(a.rounds):
            for name, lm in models.items():
                speeds[name].append(decode_speed(lm, ids, a.new_tokens, repeats=1))
        base, cand = (statistics.median(speeds[k]) for k in ("baseline", "candidate"))
        per_round = [c / b for b, c in zip(speeds["baseline"], speeds["candidate"])]
        results[mode] = {"baseline_tok_s": speeds["baseline"], "candidate_tok_s": speeds["candidate"],
                         "baseline_median": base, "candidate_median": cand, "ratio_of_medians": cand / base,
                         "per_round_ratios": per_round}
        print(f"{mode:8s} baseline {base:6.1f} tok/s  candidate {cand:6.1f} tok/s  ratio {cand / base:.2f}x  "
              f"(rounds: {', '.join(f'{r:.2f}' for r in per_round)})", flush=True)
    if a.json:
        a.json.write_text(json.dumps({"baseline": a.baseline, "candidate": a.candidate, "threads":
                                      torch.get_num_threads(), "prompt_tokens": len(ids), "results": results},
                                     indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
