"""Batch-1 decode, lmforge vs llama.cpp, in alternating rounds: the ratio issue 17 sets a target for (>= 0.8x).

    LLAMA_CPP_BIN=.../llama.cpp/build/bin HF_HUB_OFFLINE=1 python bench/llama_ratio.py [--threads 1] [--rounds 7]
        [--quantize int4|int8|none] [--eager]

``bench/generate.py`` times llama.cpp once, after all of lmforge's columns; on this VM the two engines' speeds
move apart between phases of an hour (llama.cpp ran 1.5x faster at 06:40 than at 04:50 on 2026-12-02, lmforge
did not), so a ratio taken minutes apart can be off by that much. Here every round runs both, one after the
other: lmforge decodes 64 greedy tokens after a 101-token prompt (the embedded SmolLM2-135M-Instruct, bf16,
``--quantize`` weights; int4 takes the GGUF's own Q4_1 blocks), and ``llama-bench`` decodes 64 tokens at a depth
of 101 tokens (``-d 101 -n 64 -p 0``, one repetition) on the embedded Q4_1 GGUF, with the same thread count.
Printed: each round's pair and ratio, and the median of the ratios.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from compile_options import PROMPT  # bench/: 101 token ids, the length of bench/generate.py's batch-1 prompt
from generate import llama_cpp_bin, run_llama_bench  # $LLAMA_CPP_BIN or PATH; llama-bench with the AMX fallback

import lmforge
from lmforge.checkpoints.resolve import resolve
from lmforge.evaluation.deployment import decode_speed


def llama_decode(bench: str, gguf: Path, depth: int, n: int, threads: int, extra: list[str]) -> tuple[float, list]:
    """llama.cpp's decode tok/s for ``n`` tokens after ``depth`` tokens of context (one llama-bench run), and the
    flags it needed (``generate.run_llama_bench``)."""
    tests, needed = run_llama_bench([bench, "-m", str(gguf), "-p", "0", "-n", str(n), "-d", str(depth), "-t",
                                     str(threads), "-r", "1", "-o", "json", *extra])
    return tests[0]["avg_ts"], [*extra, *needed]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--quantize", choices=["int4", "int8", "none"], default="int4")
    ap.add_argument("--eager", action="store_true", help="lmforge without torch.compile")
    args = ap.parse_args()
    bench = llama_cpp_bin("llama-bench")
    if bench is None:
        raise SystemExit("no llama-bench: set LLAMA_CPP_BIN to llama.cpp's build/bin or put it on PATH")
    torch.set_num_threads(args.threads)
    gguf = resolve(None).path  # the embedded default's Q4_1 GGUF
    _, extra = llama_decode(bench, gguf, len(PROMPT), 4, args.threads, [])  # warm-up; finds the flags needed
    lm = lmforge.load(dtype="bfloat16", quantize=None if args.quantize == "none" else args.quantize,
                      compile=not args.eager)
    decode_speed(lm, PROMPT, 4, repeats=1)  # compiles the step
    print(f"SmolLM2-135M-Instruct, batch 1, {len(PROMPT)}-token context, {args.new_tokens} tokens, "
          f"{args.threads} thread(s); lmforge bf16 {args.quantize} {'eager' if args.eager else 'compiled'}, "
          f"llama.cpp Q4_1 {' '.join(extra)}")
    ratios = []
    for r in range(args.rounds):
        ours = decode_speed(lm, PROMPT, args.new_tokens, repeats=1)
        theirs, _ = llama_decode(bench, gguf, len(PROMPT), args.new_tokens, args.threads, extra)
        ratios.append(ours / theirs)
        print(f"round {r + 1}: lmforge {ours:6.1f} tok/s  llama.cpp {theirs:6.1f} tok/s  ratio {ratios[-1]:.2f}",
              flush=True)
    print(f"median ratio lmforge / llama.cpp: {statistics.median(ratios):.2f} "
          f"(range {min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
