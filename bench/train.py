"""Training throughput, lmforge vs Hugging Face transformers, side by side in one process.

Both train the same Llama-shaped model (lmforge's DecoderLM and transformers' LlamaForCausalLM built
from the same config with the same weights) on the same batches: forward, each engine's own standard
training loss (lmforge: the next-token loss of ``lmforge pretrain`` with the LM head fused into the
cross-entropy, or for SFT batches the loss of
``lmforge finetune``, whose LM head runs only where a label follows; transformers:
``model(input_ids, attention_mask, labels).loss``), backward, gradient clipping, fused AdamW step.
``--data random`` feeds uniform random tokens, every one labelled (pretraining); ``--data dialogsum``
feeds DialogSum dialogues as SFT batches with the prompts masked (full fine-tuning). For each precision
(fp32, bf16 autocast) each engine does --warmup steps, then --rounds rounds alternate between the
engines (--steps steps per round, so a burst of machine noise hits both); the median tokens/s of the
rounds is reported, with the ratio lmforge / transformers. The first-step losses of both are printed:
same weights and batch, so they agree.

    HF_HUB_OFFLINE=1 python bench/train.py [--preset 10m|1m|smollm2-135m] [--data random|dialogsum]
        [--batch 8] [--seq 256] [--steps 5]
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
from pathlib import Path

import torch

from lmforge.checkpoints.hf import save_hf_dir
from lmforge.config import preset
from lmforge.models.decoder import DecoderLM
from lmforge.training.objectives import linear_cross_entropy
from lmforge.training.optim import make_optimizer
from lmforge.training.sft_losses import decoder_sft_loss

SHAPES = {  # preset, overrides: ~10M and ~1M parameter Llamas, and SmolLM2-135M's shape (random weights)
    "10m": ("tiny-llama", dict(vocab_size=8192, n_layer=6, n_embd=256, n_head=8, n_kv_head=4, intermediate_size=768,
                               max_seq_len=1024)),
    "1m": ("tiny-llama", dict(vocab_size=512, n_layer=4, n_embd=128, n_head=4, n_kv_head=4, intermediate_size=384,
                              max_seq_len=1024)),
    "smollm2-135m": ("smollm2-135m", {}),
}
DIALOGSUM = Path(__file__).resolve().parents[2] / "shared" / "data" / "dialogsum" / "dialogsum.train.jsonl.gz"
PROMPT = "Summarize the following conversation.\n\n{dialogue}\n\nSummary: "


def build_pair(shape: str):
    name, overrides = SHAPES[shape]
    config = preset(name, **overrides)
    ours = DecoderLM(config).init_weights(seed=0)
    import transformers

    with tempfile.TemporaryDirectory() as d:
        save_hf_dir(ours, d)
        theirs = transformers.LlamaForCausalLM.from_pretrained(d, dtype=torch.float32)
    return ours.train(), theirs.train(), config


def make_batches(data: str, config, n: int, batch: int, seq: int) -> list[dict[str, torch.Tensor]]:
    """n batches. random: (batch, seq) uniform tokens, every next token labelled. dialogsum: DialogSum train
    dialogues through lmforge's SFT pipeline (chat template, prompt tokens labelled -100, right padding,
    truncated to seq tokens; needs the SmolLM2 vocabulary). Labels are aligned with the inputs (HF's
    convention: the loss shifts them)."""
    if data == "random":
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, config.vocab_size, (n, batch, seq), generator=gen)
        return [{"input_ids": x, "labels": x, "attention_mask": torch.ones_like(x, dtype=torch.bool)} for x in ids]
    import lmforge
    from lmforge.data.sft import SFTBatches, load_sft_data

    tok = lmforge.load().tokenizer
    if tok.vocab_size > config.vocab_size:
        raise SystemExit("--data dialogsum needs the SmolLM2 vocabulary: use --preset smollm2-135m")
    examples = load_sft_data(str(DIALOGSUM), tok, max_len=seq, prompt_template=PROMPT, response_field="summary",
                             limit=n * batch).examples
    stream = SFTBatches(examples, batch_size=batch, pad_id=tok.pad_id or 0, shuffle=False)
    return [stream.next_batch() for _ in range(n)]


def lmforge_loss(model, b: dict[str, torch.Tensor]) -> torch.Tensor:
    """lmforge's training losses: pretraining's next-token loss when every token is labelled, else the SFT
    loss (whose LM head runs only where a label follows)."""
    if bool((b["labels"] == b["input_ids"]).all()):  # as pretrain.causal_step: LM head fused with the loss
        h = model.hidden_states(b["input_ids"])[:, :-1]  # (B, T-1, C)
        return linear_cross_entropy(h, model.lm_head.weight, b["labels"][:, 1:])
    return decoder_sft_loss(model, b)


def transformers_loss(model, b: dict[str, torch.Tensor]) -> torch.Tensor:
    """transformers' standard training loss: ``model(input_ids, attention_mask, labels).loss``."""
    return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"].long(), labels=b["labels"]).loss


ENGINES = {"lmforge": lmforge_loss, "transformers": transformers_loss}


def train_steps(model, loss_fn, batches, precision: str) -> tuple[float, float]:
    """Run one optimiser step per batch; returns (seconds, first loss)."""
    opt = model._bench_opt
    first = None
    t0 = time.perf_counter()
    for b in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext():
            loss = loss_fn(model, b)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        first = loss.item() if first is None else first
    return time.perf_counter() - t0, first


def bench(shape: str, data: str, batch: int, seq: int, steps: int, rounds: int, warmup: int, precision: str) -> dict:
    ours, theirs, config = build_pair(shape)
    models = {"lmforge": ours, "transformers": theirs}
    batches = make_batches(data, config, warmup + rounds * steps, batch, seq)
    first_loss = {}
    for name, model in models.items():
        model._bench_opt = make_optimizer(model, 1e-4, 0.1, (0.9, 0.95))
        _, first_loss[name] = train_steps(model, ENGINES[name], batches[:warmup], precision)
    times: dict[str, list[float]] = {name: [] for name in models}
    for r in range(rounds):
        chunk = batches[warmup + r * steps: warmup + (r + 1) * steps]
        tokens = sum(b["input_ids"].numel() for b in chunk)
        for name in (models if r % 2 == 0 else reversed(list(models))):
            seconds, _ = train_steps(models[name], ENGINES[name], chunk, precision)
            times[name].append(tokens / seconds)
    tok_s = {name: statistics.median(v) for name, v in times.items()}
    labelled = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    return {"shape": shape, "data": data, "params": sum(p.numel() for p in ours.parameters()),
            "precision": precision, "batch": batch, "seq": seq, "tokens_per_s": tok_s,
            "ratio": tok_s["lmforge"] / tok_s["transformers"], "first_loss": first_loss, "rounds": times,
            "labelled_share": labelled / sum(b["input_ids"].numel() for b in batches)}


def profile(shape: str, data: str, batch: int, seq: int, precision: str) -> None:
    """Top operators of a few lmforge and transformers steps (self CPU time)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    ours, theirs, config = build_pair(shape)
    batches = make_batches(data, config, 3, batch, seq)
    for name, model in (("lmforge", ours), ("transformers", theirs)):
        model._bench_opt = make_optimizer(model, 1e-4, 0.1, (0.9, 0.95))
        train_steps(model, ENGINES[name], batches[:1], precision)
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            train_steps(model, ENGINES[name], batches[1:], precision)
        print(f"--- {name} ({precision}) ---")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(SHAPES), default="10m")
    p.add_argument("--data", choices=("random", "dialogsum"), default="random",
                   help="random tokens, all labelled (pretraining), or DialogSum SFT batches with the prompts "
                        "masked (full fine-tuning; needs --preset smollm2-135m)")
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
            profile(a.preset, a.data, a.batch, a.seq, precision)
            continue
        r = bench(a.preset, a.data, a.batch, a.seq, a.steps, a.rounds, a.warmup, precision)
        results.append(r)
        t = r["tokens_per_s"]
        print(f"{r['shape']} ({r['params'] / 1e6:.1f}M params) {precision:4s} {a.data} batch {a.batch} x seq "
              f"{a.seq} ({r['labelled_share']:.0%} of tokens labelled): "
              f"lmforge {t['lmforge']:,.0f} tok/s, transformers {t['transformers']:,.0f} tok/s, "
              f"ratio {r['ratio']:.2f}x  (first losses {r['first_loss']['lmforge']:.4f} / "
              f"{r['first_loss']['transformers']:.4f})")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
