"""LoRA fine-tuning step time and memory, lmforge vs peft + transformers, side by side.

Both fine-tune SmolLM2-135M-Instruct (the embedded GGUF, dequantised once and saved as an HF
directory that both load) with LoRA r=16, alpha=32 on q/k/v/o projections, AdamW lr 1e-4,
float32 (or --precision bf16 autocast), on the same batch of --batch rows. Two kinds of batch:

  --data dialogsum (default)  the job LoRA is for: the first --batch DialogSum train dialogues in the
               chat template with lmforge's SFT pipeline (prompt tokens labelled -100, right padding,
               truncated to --seq-len). Each engine computes its own standard SFT loss: lmforge's
               ``training.sft_losses.decoder_sft_loss`` (the LM head runs only where a label follows), peft's
               ``model(input_ids, attention_mask, labels).loss`` (transformers' loss over all logits).
  --data random  --batch x --seq-len random tokens, every position labelled, cross-entropy computed the
               same way outside both models: the same arithmetic on both sides.

Each case runs in its own subprocess:

  step time    median wall time of --steps optimiser steps after --warmup steps
  peak memory  the highest resident memory while training minus the resident memory right after
               loading (sampled every 5 ms), i.e. what training adds: activations, gradients,
               optimiser state

A full fine-tuning case (lmforge, all parameters, AdamW) is measured for comparison.

    HF_HUB_OFFLINE=1 python bench/peft.py [--data dialogsum|random] [--batch 4] [--seq-len 256] [--steps 5]
        [--warmup 2] [--repeats 1] [--precision fp32|bf16] [--threads N] [--json out.json]
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
DIALOGSUM = Path(__file__).resolve().parents[2] / "shared" / "data" / "dialogsum" / "dialogsum.train.jsonl.gz"
PROMPT = "Summarize the following conversation.\n\n{dialogue}\n\nSummary: "
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
        return (model, [p for p in model.parameters() if p.requires_grad], lambda x: model(input_ids=x).logits,
                lambda b: model(input_ids=b["input_ids"], attention_mask=b["attention_mask"].long(),
                                labels=b["labels"]).loss)
    from lmforge.checkpoints.hf import read_hf_dir
    from lmforge.checkpoints.resolve import build_model
    from lmforge.peft.lora import LoraSpec, add_lora
    from lmforge.training.sft_losses import decoder_sft_loss

    model = build_model(*read_hf_dir(model_dir)[:2]).train()
    if case == "lmforge-lora":
        add_lora(model, LoraSpec(r=16, alpha=32, targets=TARGETS))
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    return model, params, lambda x: model(x), lambda b: decoder_sft_loss(model, b)


def sft_batch(model_dir: str, batch: int, max_len: int) -> dict:
    """The first ``batch`` DialogSum train dialogues as one right-padded SFT batch (prompts labelled -100)."""
    from lmforge.data.sft import SFTBatches, load_sft_data
    from lmforge.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(model_dir)
    data = load_sft_data(str(DIALOGSUM), tok, max_len=max_len, prompt_template=PROMPT, response_field="summary",
                         limit=batch)
    return SFTBatches(data.examples, batch_size=batch, pad_id=tok.pad_id or 0, shuffle=False).next_batch()


def run_case(case: str, model_dir: str, a: argparse.Namespace) -> dict:
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    if a.threads:
        torch.set_num_threads(a.threads)
    model, params, forward, sft_loss = build(case, model_dir)
    model.train()
    opt = torch.optim.AdamW(params, lr=1e-4)
    x = torch.randint(0, 49152, (a.batch, a.seq_len + 1), generator=torch.Generator().manual_seed(0))
    sft = sft_batch(model_dir, a.batch, a.seq_len) if a.data == "dialogsum" else None
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if a.precision == "bf16" else contextlib.nullcontext()

    def step() -> float:
        with autocast:
            if sft is not None:
                loss = sft_loss(sft)
            else:
                logits = forward(x[:, :-1])
        if sft is None:
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
    shape = tuple(sft["input_ids"].shape) if sft is not None else (a.batch, a.seq_len)
    labelled = int((sft["labels"] != -100).sum()) if sft is not None else a.batch * a.seq_len
    return {"case": case, "step_s": statistics.median(times), "peak_mb": sampler.peak - base_rss,
            "shape": shape, "labelled": labelled,
            "trainable": n_train, "first_loss": losses[0], "last_loss": losses[-1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", choices=("dialogsum", "random"), default="dialogsum",
                    help="an SFT batch of DialogSum dialogues (prompts masked), or random tokens all labelled")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1, help="alternating runs of the two LoRA cases (median)")
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
        flags = ["--data", a.data, "--batch", str(a.batch), "--seq-len", str(a.seq_len), "--steps", str(a.steps),
                 "--warmup", str(a.warmup), "--precision", a.precision, "--threads", str(a.threads), "--model-dir", tmp]
        # The two LoRA cases alternate (A B, B A, ...) so that machine noise hits both; full fine-tuning runs once.
        order = [c for r in range(a.repeats) for c in (CASES[:2] if r % 2 == 0 else CASES[1::-1])] + [CASES[2]]
        runs: dict[str, list[dict]] = {case: [] for case in CASES}
        for case in order:
            out = subprocess.run([sys.executable, __file__, "--case", case, *flags], capture_output=True, text=True,
                                 env={**os.environ, "HF_HUB_OFFLINE": "1"})
            if out.returncode:
                sys.exit(f"{case} failed:\n{out.stderr[-3000:]}")
            runs[case].append(json.loads(out.stdout.strip().splitlines()[-1]))
        for case, rs in runs.items():  # the median step time over the runs; memory of the first run
            results[case] = {**rs[0], "step_s": statistics.median(r["step_s"] for r in rs),
                             "step_s_all": [r["step_s"] for r in rs]}
    ours, theirs, full = results["lmforge-lora"], results["peft-lora"], results["lmforge-full"]
    B, T = ours["shape"]
    print(f"LoRA r=16 on {','.join(TARGETS)}; {a.data} batch {B} x {T} tokens ({ours['labelled']} labelled); "
          f"{a.precision}; {a.steps} timed steps after {a.warmup} warm-up")
    print(f"{'case':<14}{'step (s)':>10}{'peak MB':>10}{'trainable':>12}{'loss first->last':>20}")
    for r in results.values():
        print(f"{r['case']:<14}{r['step_s']:>10.3f}{r['peak_mb']:>10.0f}{r['trainable']:>12,}"
              f"{r['first_loss']:>11.3f} -> {r['last_loss']:.3f}")
    print("every run's step time (s): " + "; ".join(f"{c} {', '.join(f'{t:.2f}' for t in r['step_s_all'])}"
                                                     for c, r in results.items()))
    print(f"step time lmforge/peft: {ours['step_s'] / theirs['step_s']:.2f}x (goal <= 0.8)")
    print(f"peak memory lmforge/peft: {ours['peak_mb'] / theirs['peak_mb']:.2f}x (goal <= 1.0); "
          f"full fine-tuning/LoRA (lmforge): {full['peak_mb'] / ours['peak_mb']:.2f}x")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "results": results}, indent=2))


if __name__ == "__main__":
    main()
