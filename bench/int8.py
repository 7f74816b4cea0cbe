"""Weight-only int8 vs fp32 on the real embedded model: memory, speed and how close the outputs stay.

Both copies of SmolLM2-135M-Instruct come from one load (the int8 one is ``quantize_linears(model,
"int8")``: every linear layer but the lm_head, one absmax scale per output row). On a fixed set of
chat prompts it reports:

  weight memory     bytes of parameters and buffers (tied tensors once), fp32 vs int8
  logits            max and mean |fp32 - int8| over every position of every prompt (teacher forcing),
                    relative to max |fp32|, and the top-1 (argmax) agreement over those positions
  greedy            --new-tokens greedy tokens per prompt: how many prompts give the identical
                    sequence, and the mean length of the common prefix
  tokens/s          batch-1 greedy decode of --speed-tokens tokens (EOS off), median of --repeats
                    runs alternating fp32 / int8, after one warm-up each

    HF_HUB_OFFLINE=1 python bench/int8.py [--new-tokens 32] [--speed-tokens 64] [--repeats 3]
        [--device cpu] [--threads N] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

import lmforge
from lmforge.generation.generate import generate_tokens
from lmforge.generation.sampling import SamplingParams
from lmforge.models.quantized import model_bytes, quantize_linears

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in two sentences.",
    "List three uses of a paperclip.",
    "Translate 'good morning' into Spanish and German.",
    "Why is the sky blue?",
    "Give me a short tip for learning to program.",
    "What is 12 times 7? Explain your steps.",
    "Summarise the plot of Romeo and Juliet in one sentence.",
    "Name two planets that have rings.",
]


def greedy(model, ids, n, eos=()):
    out = []
    for (tok,) in generate_tokens(model, [ids], n, SamplingParams(), eos_ids=eos, pad_id=0):
        if tok is None:
            break
        out.append(tok)
    return out


def decode_rate(model, ids, n):
    t0 = time.perf_counter()
    greedy(model, ids, n)  # EOS off: exactly n tokens
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--speed-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    lm = lmforge.load(a.model, device=a.device, dtype="float32")
    fp32 = lm.model
    int8 = quantize_linears(copy.deepcopy(fp32), "int8").eval()
    prompts = [lm.encode(p) for p in PROMPTS]
    res = {"model": lm.name, "device": a.device, "threads": torch.get_num_threads(),
           "fp32_bytes": model_bytes(fp32), "int8_bytes": model_bytes(int8)}

    max_diff = mean_sum = count = agree = 0.0
    peak = 0.0
    with torch.inference_mode():
        for ids in prompts:
            x = torch.tensor([ids], device=a.device)
            la, lb = fp32(x)[0].float(), int8(x)[0].float()  # (T, V)
            d = (la - lb).abs()
            max_diff, peak = max(max_diff, float(d.max())), max(peak, float(la.abs().max()))
            mean_sum, count = mean_sum + float(d.sum()), count + d.numel()
            agree += float((la.argmax(-1) == lb.argmax(-1)).sum())
    positions = sum(len(p) for p in prompts)
    res.update(logits_max_abs_diff=max_diff, logits_mean_abs_diff=mean_sum / count, logits_max_abs=peak,
               top1_agreement=agree / positions, positions=positions)

    same, prefix, token_agree, tokens = 0, [], 0, 0
    for ids in prompts:
        ga, gb = greedy(fp32, ids, a.new_tokens, lm.eos_ids), greedy(int8, ids, a.new_tokens, lm.eos_ids)
        same += ga == gb
        k = next((i for i, (x, y) in enumerate(zip(ga, gb)) if x != y), min(len(ga), len(gb)))
        prefix.append(k)
        token_agree += sum(x == y for x, y in zip(ga, gb))
        tokens += max(len(ga), len(gb))
    res.update(greedy_identical=same, prompts=len(prompts), greedy_mean_common_prefix=statistics.mean(prefix),
               greedy_position_agreement=token_agree / tokens)

    speed_ids = prompts[0]
    rates = {"fp32": [], "int8": []}
    for m in (fp32, int8):
        decode_rate(m, speed_ids, 8)  # warm-up
    for _ in range(a.repeats):
        for name, m in (("fp32", fp32), ("int8", int8)):
            rates[name].append(decode_rate(m, speed_ids, a.speed_tokens))
    res.update(fp32_tokens_per_s=statistics.median(rates["fp32"]), int8_tokens_per_s=statistics.median(rates["int8"]))

    mib = 2**20
    print(f"# {res['model']} on {a.device}, {res['threads']} torch threads, {len(prompts)} chat prompts")
    print(f"weight memory     fp32 {res['fp32_bytes'] / mib:7.1f} MiB   int8 {res['int8_bytes'] / mib:7.1f} MiB   "
          f"ratio {res['int8_bytes'] / res['fp32_bytes']:.2f}")
    print(f"logits            max |diff| {max_diff:.4f} (max |logit| {peak:.1f}, relative {max_diff / peak:.2e}), "
          f"mean |diff| {res['logits_mean_abs_diff']:.5f}, top-1 agreement {res['top1_agreement']:.4f} "
          f"over {positions} positions")
    print(f"greedy            {same}/{len(prompts)} prompts identical over {a.new_tokens} new tokens; mean common "
          f"prefix {res['greedy_mean_common_prefix']:.1f} tokens; position agreement "
          f"{res['greedy_position_agreement']:.3f}")
    print(f"tokens/s (b=1)    fp32 {res['fp32_tokens_per_s']:.1f}   int8 {res['int8_tokens_per_s']:.1f}   "
          f"ratio {res['int8_tokens_per_s'] / res['fp32_tokens_per_s']:.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
