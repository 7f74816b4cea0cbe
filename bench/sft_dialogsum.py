"""Instruction fine-tuning pays off: SFT (full, LoRA or QLoRA) of SmolLM2-135M-Instruct on DialogSum,
ROUGE-L before vs after.

One run does three things on the same --eval-n dev dialogues, greedy, with the same prompt:

  1. the base model's zero-shot summaries -> ROUGE-L (and its response-token dev loss),
  2. fine-tuning (``lmforge.training.sft.finetune``, --method full | lora | qlora) on the first
     --train-limit DialogSum train dialogues,
  3. the fine-tuned model's summaries -> ROUGE-L (and dev loss),

and prints both side by side with the training time and throughput. The prompt (chat template, user turn):
"Summarize the following conversation.\\n\\n{dialogue}\\n\\nSummary: ". ROUGE-L is the F1 of the
``rouge-score`` package with stemming, averaged over dialogues (as the DialogSum paper reports it).

    HF_HUB_OFFLINE=1 python bench/sft_dialogsum.py [--method full|lora|qlora|full,lora] [--steps 100] [--batch-size 8]
        [--max-len 512]
        [--train-limit 800] [--eval-n 100] [--lr 1e-4] [--precision bf16] [--threads N] [--json out.json]

On the 2-core CPU box the defaults take about half an hour; numbers only mean something relative to
each other (same machine, same run).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "dialogsum"
PROMPT = "Summarize the following conversation.\n\n{dialogue}\n\nSummary: "


def score(model, tokenizer, examples, max_new_tokens: int, batch_size: int) -> dict[str, float]:
    from lmforge.data.sft import SFTBatches
    from lmforge.training.sft_eval import generate_responses, response_loss, rouge_l

    t0 = time.perf_counter()
    model.eval()
    preds = generate_responses(model, tokenizer, examples, max_new_tokens=max_new_tokens, batch_size=batch_size)
    rouge = rouge_l(preds, [e.reference for e in examples])
    gen_s = time.perf_counter() - t0
    batches = SFTBatches(examples, batch_size=batch_size, pad_id=tokenizer.pad_id or 0, shuffle=False)
    return {"rougeL": rouge, "dev_loss": response_loss(model, batches.iter_once()), "generate_s": gen_s,
            "example": preds[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", default=str(DATA / "dialogsum.train.jsonl.gz"), help="DialogSum train file")
    p.add_argument("--dev", default=str(DATA / "dialogsum.dev.jsonl"), help="DialogSum dev file")
    p.add_argument("--train-limit", type=int, default=800, help="first N train dialogues (default: 800)")
    p.add_argument("--steps", type=int, default=100, help="optimiser steps (default: 100)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per optimiser step (default: 8)")
    p.add_argument("--max-len", type=int, default=1024,
                   help="tokens per dev example: long enough that none of the scored dialogues is dropped "
                        "(default: 1024)")
    p.add_argument("--train-max-len", type=int, default=512,
                   help="tokens per training example; longer ones are dropped (default: 512)")
    p.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches per optimiser step (same effective batch, less memory) (default: 1)")
    p.add_argument("--method", default="full",
                   help="full fine-tuning, or LoRA r=16 on q/k/v/o (qlora: over an NF4 base); a comma list "
                        "(e.g. full,lora) fine-tunes each from the base and scores the base once (default: full)")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default: 1e-4 full, 2e-4 LoRA/QLoRA)")
    p.add_argument("--warmup", type=int, default=10, help="warmup steps (default: 10)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="bf16", help="training precision (default: bf16)")
    p.add_argument("--pack", action="store_true", help="pack examples into max-len rows")
    p.add_argument("--eval-n", type=int, default=100, help="dev dialogues scored (default: 100)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="summary length cap (default: 64)")
    p.add_argument("--gen-batch", type=int, default=8, help="prompts generated together (default: 8)")
    p.add_argument("--out-dir", default="runs/bench-sft-dialogsum", help="where the fine-tuned model goes")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", help="also write the results to this JSON file")
    a = p.parse_args()

    import torch

    import lmforge
    from lmforge.data.sft import load_sft_data
    from lmforge.training.sft import FinetuneConfig, finetune

    if a.threads:
        torch.set_num_threads(a.threads)
    if a.grad_accum < 1 or a.batch_size % a.grad_accum:
        p.error(f"--batch-size {a.batch_size} must be a multiple of --grad-accum {a.grad_accum}")
    methods = a.method.split(",")
    bad = [m for m in methods if m not in ("full", "lora", "qlora")]
    if bad:
        p.error(f"--method {bad[0]!r}: choose from full, lora, qlora")
    fields = dict(prompt_template=PROMPT, response_field="summary", max_len=a.max_len)
    base = lmforge.load(device=a.device, dtype="float32")
    dev = load_sft_data(a.dev, base.tokenizer, limit=a.eval_n, **fields).examples
    print(f"scoring the base model zero-shot on {len(dev)} dev dialogues ...", flush=True)
    before = score(base.model, base.tokenizer, dev, a.max_new_tokens, a.gen_batch)
    print(f"  base: ROUGE-L {before['rougeL']:.4f}, dev loss {before['dev_loss']:.4f} "
          f"({before['generate_s']:.0f} s)", flush=True)
    del base

    rows, runs = [("base (zero-shot)", before)], {}
    for method in methods:
        lr = a.lr if a.lr is not None else (1e-4 if method == "full" else 2e-4)
        out_dir = Path(a.out_dir) / method
        t0 = time.perf_counter()
        cfg = FinetuneConfig(train=a.train, out_dir=out_dir, limit=a.train_limit, steps=a.steps,
                             batch_size=a.batch_size // a.grad_accum, grad_accum=a.grad_accum, lr=lr,
                             warmup=a.warmup, precision=a.precision, pack=a.pack, log_every=10, device=a.device,
                             method=method, **{**fields, "max_len": a.train_max_len})
        result = finetune(cfg, overwrite=True)
        train_s = time.perf_counter() - t0
        if method == "full":
            tuned = lmforge.load(out_dir / "final", device=a.device, dtype="float32")
        else:  # the base with the trained PEFT adapter on top
            tuned = lmforge.load(None, device=a.device, dtype="float32", adapter=out_dir / "final")
        after = score(tuned.model, tuned.tokenizer, dev, a.max_new_tokens, a.gen_batch)
        del tuned
        rows.append((f"{method} SFT", after))
        runs[method] = {"lr": lr, "train": result, "train_s": train_s, "tuned": after}
        print(f"\n{method} SFT {a.steps} steps x {a.batch_size} examples (first {result['train_examples']} train "
              f"dialogues, {result['dropped']} dropped), max_len {a.train_max_len}, {a.precision}, lr {lr}; "
              f"{train_s:.0f} s training at {result.get('tokens_per_s', 0):,.0f} tokens/s", flush=True)
        print(f"  {method}: ROUGE-L {after['rougeL']:.4f}, dev loss {after['dev_loss']:.4f}", flush=True)

    print(f"\nSmolLM2-135M-Instruct, DialogSum, {len(dev)} dev dialogues, greedy, {a.max_new_tokens} new tokens max")
    print(f"{'model':<18} {'ROUGE-L':>8} {'dev loss':>9} {'vs base':>8}")
    for name, r in rows:
        print(f"{name:<18} {r['rougeL']:>8.4f} {r['dev_loss']:>9.4f} {r['rougeL'] - before['rougeL']:>+8.4f}")
    print(f"\nreference: {dev[0].reference}")
    for name, r in rows:
        print(f"{name + ':':<18} {r['example']}")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "base": before, "runs": runs,
                                            "threads": torch.get_num_threads(), "cpu_count": os.cpu_count()},
                                           indent=2))

if __name__ == "__main__":
    main()
