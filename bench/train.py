"""Training throughput, lmforge vs Hugging Face transformers, side by side in one process.

Both train the same Llama-shaped model (lmforge's DecoderLM and transformers' LlamaForCausalLM built
from the same config with the same weights) on the same batches: forward, next-token cross-entropy
(the same function on both logits), backward, gradient clipping, fused AdamW step. For each precision
(fp32, bf16 autocast) each engine does --warmup steps, then --rounds rounds alternate between the
engines (--steps steps per round, so a burst of machine noise hits both); the median tokens/s of the
rounds is reported, with the ratio lmforge / transformers. The first-step losses of both are printed:
same weights and batch, so they agree.

    HF_HUB_OFFLINE=1 python bench/train.py [--preset 10m] [--batch 8] [--seq 256] [--steps 5]
        [--rounds 3] [--threads N] [--precision fp32,bf16] [--profile] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import tempfile
import time

import torch

from lmforge.checkpoints.hf import save_hf_dir
from lmforge.config import preset
from lmforge.models.decoder import DecoderLM
from lmforge.training.objectives import causal_lm_loss
from lmforge.training.optim import make_optimizer

SHAPES = {  # ~10M and ~1M parameter Llamas
    "10m": dict(vocab_size=8192, n_layer=6, n_embd=256, n_head=8, n_kv_head=4, intermediate_size=768, max_seq_len=1024),
    "1m": dict(vocab_size=512, n_layer=4, n_embd=128, n_head=4, n_kv_head=4, intermediate_size=384, max_seq_len=1024),
}


def build_pair(shape: str):
    config = preset("tiny-llama", **SHAPES[shape])
    ours = DecoderLM(config).init_weights(seed=0)
    import transformers

    with tempfile.TemporaryDirectory() as d:
        save_hf_dir(ours, d)
        theirs = transformers.LlamaForCausalLM.from_pretrained(d, dtype=torch.float32)
    return ours.train(), theirs.train(), config


def train_steps(model, logits_of, batches, precision: str) -> tuple[float, float]:
    """Run one optimiser step per batch; returns (seconds, first loss)."""
    opt = model._bench_opt
    first = None
    t0 = time.perf_counter()
    for x in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext():
            loss = causal_lm_loss(logits_of(model, x[:, :-1]), x[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        first = loss.item() if first is None else first
    return time.perf_counter() - t0, first


def bench(shape: str, batch: int, seq: int, steps: int, rounds: int, warmup: int, precision: str) -> dict:
    ours, theirs, config = build_pair(shape)
    engines = {"lmforge": (ours, lambda m, x: m(x)), "transformers": (theirs, lambda m, x: m(input_ids=x).logits)}
    gen = torch.Generator().manual_seed(0)
    data = torch.randint(0, config.vocab_size, (warmup + rounds * steps, batch, seq + 1), generator=gen)
    first_loss = {}
    for name, (model, fn) in engines.items():
        model._bench_opt = make_optimizer(model, 1e-4, 0.1, (0.9, 0.95))
        _, first_loss[name] = train_steps(model, fn, data[:warmup], precision)
    times: dict[str, list[float]] = {name: [] for name in engines}
    for r in range(rounds):
        chunk = data[warmup + r * steps: warmup + (r + 1) * steps]
        for name in (engines if r % 2 == 0 else reversed(list(engines))):
            model, fn = engines[name]
            seconds, _ = train_steps(model, fn, chunk, precision)
            times[name].append(batch * seq * steps / seconds)
    tok_s = {name: statistics.median(v) for name, v in times.items()}
    return {"shape": shape, "params": sum(p.numel() for p in ours.parameters()), "precision": precision,
            "batch": batch, "seq": seq, "tokens_per_s": tok_s, "ratio": tok_s["lmforge"] / tok_s["transformers"],
            "first_loss": first_loss, "rounds": times}


def profile(shape: str, batch: int, seq: int, precision: str) -> None:
    """Top operators of a few lmforge and transformers steps (self CPU time)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    ours, theirs, config = build_pair(shape)
    data = torch.randint(0, config.vocab_size, (3, batch, seq + 1))
    for name, model, fn in (("lmforge", ours, lambda m, x: m(x)), ("transformers", theirs,
                                                                    lambda m, x: m(input_ids=x).logits)):
        model._bench_opt = make_optimizer(model, 1e-4, 0.1, (0.9, 0.95))
        train_steps(model, fn, data[:1], precision)
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            train_steps(model, fn, data[1:], precision)
        print(f"--- {name} ({precision}) ---")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(SHAPES), default="10m")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--precision", default="fp32,bf16")
    p.add_argument("--profile", action="store_true", help="print the top operators of each engine instead")
    p.add_argument("--json", help="write the results here")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    cpu = platform.processor() or platform.machine()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu}, pid {os.getpid()}")
    results = []
    for precision in a.precision.split(","):
        if a.profile:
            profile(a.preset, a.batch, a.seq, precision)
            continue
        r = bench(a.preset, a.batch, a.seq, a.steps, a.rounds, a.warmup, precision)
        results.append(r)
        t = r["tokens_per_s"]
        print(f"{r['shape']} ({r['params'] / 1e6:.1f}M params) {precision:4s} batch {a.batch} x seq {a.seq}: "
              f"lmforge {t['lmforge']:,.0f} tok/s, transformers {t['transformers']:,.0f} tok/s, "
              f"ratio {r['ratio']:.2f}x  (first losses {r['first_loss']['lmforge']:.4f} / "
              f"{r['first_loss']['transformers']:.4f})")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
