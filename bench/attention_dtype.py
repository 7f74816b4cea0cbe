"""What float32 attention at inference is worth for a bfloat16 model on CPU (``models.attention.attention_dtype``).

    HF_HUB_OFFLINE=1 python bench/attention_dtype.py [--threads 1] [--rounds 7] [--quantize int4|int8|none]
        [--eager]

Two copies of the embedded SmolLM2-135M-Instruct in bfloat16: one as lmforge runs it (attention and KV cache in
float32), one with ``attention_dtype`` patched to keep bfloat16 (bfloat16 cache and attention: lmforge before
this change, and what transformers does). Each copy builds its caches and compiles its step (``--eager``: no
compile) under its own rule, then every round decodes 64 greedy tokens after a 101-token prompt with each copy in
turn; the medians are compared (alternating rounds: this VM's speed drifts by tens of percent within an hour).
"""

from __future__ import annotations

import argparse
import contextlib

import torch
from compile_options import PROMPT, alternate, report  # bench/compile_options.py (the script's folder is on sys.path)

import lmforge
from lmforge.evaluation.deployment import decode_speed
from lmforge.models import attention, decoder


@contextlib.contextmanager
def model_dtype_attention():
    """Within: attention and new KV caches in the activations' own dtype (the rule before float32 attention)."""
    keep = attention.attention_dtype, decoder.attention_dtype
    attention.attention_dtype = decoder.attention_dtype = lambda dtype, device: dtype
    try:
        yield
    finally:
        attention.attention_dtype, decoder.attention_dtype = keep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--quantize", choices=["int4", "int8", "none"], default="int4")
    ap.add_argument("--eager", action="store_true", help="decode without torch.compile")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rules = {"bfloat16 attention": model_dtype_attention, "float32 attention": contextlib.nullcontext}
    models = {}
    for name, rule in rules.items():
        with rule():
            models[name] = lmforge.load(dtype="bfloat16", compile=not args.eager,
                                        quantize=None if args.quantize == "none" else args.quantize)
            decode_speed(models[name], PROMPT, 4, repeats=1)  # builds the caches and compiles the step
    rates = alternate(models, args.rounds, args.new_tokens, around=lambda name: rules[name]())
    print(f"SmolLM2-135M-Instruct, bf16, {args.quantize}, {'eager' if args.eager else 'compiled'}, "
          f"{args.threads} thread(s), {args.rounds} alternating rounds")
    report(rates, "bfloat16 attention")


if __name__ == "__main__":
    main()
