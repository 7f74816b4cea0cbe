"""What the compiled decode step's options are worth: the same model compiled three ways, timed in alternating rounds.

    HF_HUB_OFFLINE=1 python bench/compile_options.py [--threads 1] [--rounds 7] [--quantize int4|int8|none]

- ``guarded``: ``torch.compile(step)`` as before issue 17's step change: dynamo's guards on the model checked at
  every call, inductor's generated Python wrapper;
- ``unguarded``: the guards on the model dropped (``generation.fast.compile_step``), the Python wrapper;
- ``unguarded + C++ wrapper``: what ``compile_step`` does on CPU now.

Each variant is a separate copy of the embedded SmolLM2-135M-Instruct (bf16), compiled on a first short generation;
then every round decodes 64 greedy tokens after a 101-token prompt with each copy in turn, and the medians are
compared (this VM's speed drifts by tens of percent within an hour, so only alternating rounds compare fairly).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics

import torch

import lmforge
from lmforge.evaluation.deployment import decode_speed
from lmforge.generation import fast

PROMPT = list(range(100, 201))  # 101 token ids: the length of bench/generate.py's batch-1 prompt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--quantize", choices=["int4", "int8", "none"], default="int4")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    new_compile = fast.compile_step
    variants = {
        "guarded": lambda dec: torch.compile(dec, fullgraph=True, dynamic=False),
        "unguarded": lambda dec: _with_options(new_compile, dec, {}),
        "unguarded + C++ wrapper": new_compile,
    }
    models = {}
    for name, compile_step in variants.items():
        fast.compile_step = compile_step  # decoder_for compiles through it on the first generation
        models[name] = lmforge.load(dtype="bfloat16", quantize=None if args.quantize == "none" else args.quantize,
                                    compile=True)
        decode_speed(models[name], PROMPT, 4, repeats=1)
    fast.compile_step = new_compile
    rates = alternate(models, args.rounds, args.new_tokens)
    print(f"SmolLM2-135M-Instruct, bf16, {args.quantize}, {args.threads} thread(s), {args.rounds} alternating rounds")
    report(rates, "guarded")


def alternate(models: dict, rounds: int, new_tokens: int, around=None) -> dict[str, list[float]]:
    """Decode tok/s of each model, ``rounds`` times in turn (``around(name)``: a context each call runs in)."""
    rates = {name: [] for name in models}
    for _ in range(rounds):
        for name, lm in models.items():
            with around(name) if around else contextlib.nullcontext():
                rates[name].append(decode_speed(lm, PROMPT, new_tokens, repeats=1))
    return rates


def report(rates: dict[str, list[float]], base: str) -> None:
    """Each model's median, its ratio to ``base``'s median, and every round."""
    b = statistics.median(rates[base])
    for name, r in rates.items():
        print(f"{name:24s} median {statistics.median(r):6.1f} tok/s  x{statistics.median(r) / b:.3f}  "
              f"({' '.join(f'{x:.1f}' for x in r)})")


def _with_options(compile_step, dec, cpu_options: dict):
    """``compile_step`` with ``fast.CPU_COMPILE_OPTIONS`` replaced by ``cpu_options`` for this one compile."""
    saved = dict(fast.CPU_COMPILE_OPTIONS)
    fast.CPU_COMPILE_OPTIONS.clear()
    fast.CPU_COMPILE_OPTIONS.update(cpu_options)
    try:
        return compile_step(dec)
    finally:
        fast.CPU_COMPILE_OPTIONS.clear()
        fast.CPU_COMPILE_OPTIONS.update(saved)


if __name__ == "__main__":
    main()
