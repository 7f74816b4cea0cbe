"""LoRA fine-tuning step time and memory, lmforge vs peft + transformers, side by side.

Both fine-tune SmolLM2-135M-Instruct (the embedded GGUF, dequantised once and saved as an HF
directory that both load) with LoRA r=16, alpha=32 on q/k/v/o projections, AdamW lr 1e-4,
on the same random token batch (--batch x --seq-len), float32 (or --precision bf16 autocast),
cross-entropy computed the same way outside the model. Each case runs in its own subprocess:

  step time    median wall time of --steps optimiser steps after --warmup steps
  peak memory  the highest resident memory while training minus the resident memory right after
               loading (sampled every 5 ms), i.e. what training adds: activations, gradients,
               optimiser state

A full fine-tuning case (lmforge, all parameters, AdamW) is measured for comparison.

    HF_HUB_OFFLINE=1 python bench/peft.py [--batch 4] [--seq-len 256] [--steps 5] [--warmup 2]
        [--precision fp32|bf16] [--threads N] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# This file is named like the package it measures: keep bench/ off the import path so `import peft`
# finds the real peft.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
CASES = ("lmforge-lora", "peft-lora", "lmforge-full")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakSampler:
    def __init__(self) -> None:
        self.peak, self._stop = rss_mb(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb())
            time.sleep(0.005)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def build(case: str, model_dir: str):
    """(model, trainable params, forward returning logits) for one case."""
    import torch

    if case == "peft-lora":
        import peft
        import transformers

        base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        model = peft.get_peft_model(base, peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS,
                                                          lora_dropout=0.0))
        return model, [p for p in model.parameters() if p.requires_grad], lambda x: model(input_ids=x).logits
    from lmforge.checkpoints.hf import read_hf_dir
    from lmforge.checkpoints.resolve import build_model
    from lmforge.peft.lora import LoraSpec, add_lora

    model = build_model(*read_hf_dir(model_dir)[:2]).train()
    if case == "lmforge-lora":
        add_lora(model, LoraSpec(r=16, alpha=32, targets=TARGETS))
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    return model, [p for p in model.parameters() if p.requires_grad], lambda x: model(x)


def run_case(case: str, model_dir: str, a: argparse.Namespace) -> dict:
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    if a.threads:
        torch.set_num_threads(a.threads)
    model, params, forward = build(case, model_dir)
    model.train()
    opt = torch.optim.AdamW(params, lr=1e-4)
    x = torch.randint(0, 49152, (a.batch, a.seq_len + 1), generator=torch.Generator().manual_seed(0))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if a.precision == "bf16" else contextlib.nullcontext()

    def step() -> float:
        with autocast:
            logits = forward(x[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    import gc

    gc.collect()
    base_rss = rss_mb()
    times, losses = [], []
    with PeakSampler() as sampler:
        for i in range(a.warmup + a.steps):
            t0 = time.perf_counter()
            losses.append(step())
            if i >= a.warmup:
                times.append(time.perf_counter() - t0)
    n_train = sum(p.numel() for p in params)
    return {"case": case, "step_s": statistics.median(times), "peak_mb": sampler.peak - base_rss,
            "trainable": n_train, "first_loss": losses[0], "last_loss": losses[-1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json")
    ap.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # internal: run one case in this process
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.case:
        print(json.dumps(run_case(a.case, a.model_dir, a)))
        return

    import lmforge
    from lmforge.checkpoints.hf import save_hf_dir

    with tempfile.TemporaryDirectory() as tmp:
        lm = lmforge.load()  # the embedded GGUF, dequantised; saved once so both frameworks read the same files
        save_hf_dir(lm.model, tmp, tokenizer=lm.tokenizer)
        del lm
        results = {}
        flags = ["--batch", str(a.batch), "--seq-len", str(a.seq_len), "--steps", str(a.steps), "--warmup",
                 str(a.warmup), "--precision", a.precision, "--threads", str(a.threads), "--model-dir", tmp]
        for case in CASES:
            out = subprocess.run([sys.executable, __file__, "--case", case, *flags], capture_output=True, text=True,
                                 env={**os.environ, "HF_HUB_OFFLINE": "1"})
            if out.returncode:
                sys.exit(f"{case} failed:\n{out.stderr[-3000:]}")
            results[case] = json.loads(out.stdout.strip().splitlines()[-1])
    ours, theirs, full = results["lmforge-lora"], results["peft-lora"], results["lmforge-full"]
    print(f"LoRA r=16 on {','.join(TARGETS)}; batch {a.batch} x seq {a.seq_len}; {a.precision}; "
          f"{a.steps} timed steps after {a.warmup} warm-up")
    print(f"{'case':<14}{'step (s)':>10}{'peak MB':>10}{'trainable':>12}{'loss first->last':>20}")
    for r in results.values():
        print(f"{r['case']:<14}{r['step_s']:>10.3f}{r['peak_mb']:>10.0f}{r['trainable']:>12,}"
              f"{r['first_loss']:>11.3f} -> {r['last_loss']:.3f}")
    print(f"step time lmforge/peft: {ours['step_s'] / theirs['step_s']:.2f}x (goal <= 0.8)")
    print(f"peak memory lmforge/peft: {ours['peak_mb'] / theirs['peak_mb']:.2f}x (goal <= 1.0); "
          f"full fine-tuning/LoRA (lmforge): {full['peak_mb'] / ours['peak_mb']:.2f}x")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "results": results}, indent=2))


if __name__ == "__main__":
    main()
