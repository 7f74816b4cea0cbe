"""The training loop every recipe (pretraining, fine-tuning) runs.

It owns the step: gradient accumulation, bf16 autocast, clipping, the AdamW update with the
warmup+cosine schedule (``optim.py``), periodic evaluation, logging (a tqdm bar, ``metrics.jsonl``,
``loss.png``) and crash-safe checkpoints with exact resume (``checkpoint.py``). What is trained
and on what is the caller's: a ``loss_fn(model, batch) -> scalar`` and a resumable ``BatchSource``.

Nothing non-finite is kept: NaN/inf hyper-parameters are refused by ``TrainConfig``; a NaN or infinite
loss or gradient norm stops the run (``LmforgeError`` naming it and the step) before the update, so
the last checkpoint stays the last good one; checkpoints and the final model refuse non-finite weights.
``metrics.jsonl`` gets whole appended lines, and is rewritten on resume through a renamed temporary file.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from lmforge.errors import LmforgeError
from lmforge.training.checkpoint import load_checkpoint, recover_checkpoint, save_checkpoint
from lmforge.training.optim import lr_at, make_optimizer, set_lr

PRECISIONS = ("fp32", "bf16")


@dataclass
class TrainConfig:
    """How to optimise: the schedule, batching, precision and how often to evaluate/save/log."""

    steps: int  # optimiser steps
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    warmup_steps: int = 0  # linear warmup from 0, then cosine
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_accum: int = 1  # micro-batches per optimiser step
    clip: float = 1.0  # max global grad norm; 0 = no clipping
    precision: str = "fp32"  # "fp32" | "bf16" (torch.autocast to bfloat16, on CPU too)
    compile: bool = False  # torch.compile the model for the loss
    eval_every: int = 0  # 0 = only at the end (when an eval_fn is given)
    save_every: int = 0  # 0 = only at the end
    log_every: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "grad_accum"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise LmforgeError(f"TrainConfig.{name} must be an integer >= 1, got {getattr(self, name)!r}")
        for name in ("warmup_steps", "eval_every", "save_every", "log_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise LmforgeError(f"TrainConfig.{name} must be an integer >= 0, got {getattr(self, name)!r}")
        self.betas = tuple(self.betas)
        for name in ("lr", "min_lr_ratio", "weight_decay", "clip"):
            check_finite_number(getattr(self, name), name)
        for b in self.betas:
            check_finite_number(b, "betas")
        if not self.lr > 0:
            raise LmforgeError(f"TrainConfig.lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise LmforgeError(f"TrainConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.precision not in PRECISIONS:
            raise LmforgeError(f"TrainConfig.precision={self.precision!r}; choose one of: {', '.join(PRECISIONS)}")


def check_finite_number(value: Any, name: str) -> None:
    """Raise ``LmforgeError`` when the hyper-parameter ``name`` is NaN or infinite (None is left alone)."""
    if value is not None and isinstance(value, (int, float)) and not math.isfinite(value):
        raise LmforgeError(f"{name} must be a finite number, got {value}")


def check_finite_value(value: Any, what: str, step: int, hint: str = "") -> float:
    """``value`` (a number or a tensor, reduced to a float) or ``LmforgeError`` naming ``what`` and ``step``
    when it is NaN or infinite: the run stops there, keeping its last checkpoint."""
    x = float(value.detach().float().sum()) if torch.is_tensor(value) else float(value)
    if not math.isfinite(x):
        raise LmforgeError(f"the {what} became {x} at step {step}; stopping without saving"
                           + (f": {hint}" if hint else ""))
    return x


class BatchSource(Protocol):
    """A resumable stream of training batches."""

    def next_batch(self) -> dict[str, torch.Tensor]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def default_tokens(batch: dict[str, Tensor]) -> int:
    """Tokens in a batch: the size of ``input_ids`` (or of the first tensor)."""
    t = batch.get("input_ids")
    if t is None:
        t = next(v for v in batch.values() if torch.is_tensor(v))
    return int(t.numel())


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class MetricsLog:
    """``metrics.jsonl`` (one JSON object per event) and ``loss.png`` (written when matplotlib is installed)."""

    def __init__(self, out_dir: Path, resume_step: int | None):
        self.path = out_dir / "metrics.jsonl"
        self.png = out_dir / "loss.png"
        self.rows: list[dict] = []
        if resume_step is not None and self.path.is_file():  # drop events the crashed run logged after its checkpoint
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by the crash
                if row.get("step", 0) <= resume_step:
                    self.rows.append(row)
        # rewritten whole (a temporary file renamed over it): a crash now leaves the old file or the new one
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write("".join(json.dumps(r) + "\n" for r in self.rows))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def write(self, row: dict) -> None:
        """Append ``row`` as one whole line (a single write, flushed before returning)."""
        self.rows.append(row)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()

    def plot(self) -> None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return
        fig, ax = plt.subplots(figsize=(7, 4))
        train = [(r["step"], r["loss"]) for r in self.rows if "loss" in r]
        if train:
            ax.plot(*zip(*train), label="train loss")
        for key in sorted({k for r in self.rows for k in r if k.startswith("val_") and k.endswith("loss")}):
            pts = [(r["step"], r[key]) for r in self.rows if key in r]
            ax.plot(*zip(*pts), marker="o", label=key.replace("_", " "))
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        tmp = self.png.with_name(".loss.tmp.png")
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        tmp.replace(self.png)


def train(model: nn.Module, loss_fn: Callable[[nn.Module, dict[str, Tensor]], Tensor], batches: BatchSource,
          cfg: TrainConfig, out_dir: str | Path, *, eval_fn: Callable[[nn.Module], dict[str, float]] | None = None,
          resume: bool = False, run_config: dict | None = None, tokenizer: Any = None,
          tokens_per_batch: Callable[[dict], int] | None = None) -> dict:
    """Train ``model`` for ``cfg.steps`` optimiser steps; returns the final metrics.

    Each step draws ``cfg.grad_accum`` batches, averages ``loss_fn(model, batch)`` over them and
    takes one AdamW step. ``eval_fn(model)`` (run in eval mode, without gradients) returns metrics
    such as ``{"val_loss": ..., "val_ppl": ...}``. ``resume=True`` continues from
    ``out_dir/checkpoint`` exactly where it stopped (same losses, step for step). The final model is
    written to ``out_dir/final`` as a Hugging Face directory (with ``tokenizer`` when given).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokens_of = tokens_per_batch or default_tokens
    seed_everything(cfg.seed)
    model.train()
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, cfg.betas)
    start = 0
    if resume:
        ckpt = recover_checkpoint(out_dir)
        if ckpt is None:
            raise LmforgeError(f"--resume: no checkpoint in {out_dir} (expected {out_dir / 'checkpoint'})")
        state = load_checkpoint(ckpt, model, optimizer)
        batches.load_state_dict(state["batches"])
        start = int(state["step"])
        if start > cfg.steps:
            raise LmforgeError(f"{ckpt} is at step {start}, beyond the {cfg.steps} steps asked for")
    log = MetricsLog(out_dir, start if resume else None)
    run_config = {**(run_config or {}), "train": asdict(cfg)}
    fwd_model = torch.compile(model) if cfg.compile else model
    device_type = next(model.parameters()).device.type
    def autocast():
        return precision_autocast(cfg.precision, device_type)

    def evaluate(step: int) -> dict:
        model.eval()
        with torch.no_grad(), autocast():
            metrics = {k: float(v) for k, v in eval_fn(model).items()}
        model.train()
        log.write({"step": step, **metrics})
        log.plot()
        return metrics

    schedule = {"kind": "linear warmup + cosine", "lr": cfg.lr, "warmup_steps": cfg.warmup_steps,
                "total_steps": cfg.steps, "min_lr_ratio": cfg.min_lr_ratio}

    def checkpoint(step: int) -> None:  # the schedule is a pure function of the step: saved for the record
        save_checkpoint(out_dir, model, optimizer, step, batches.state_dict(), run_config,
                        extra={"schedule": schedule, "train_config": asdict(cfg)})

    final: dict[str, Any] = {"step": start}
    bar = progress_bar(cfg.steps, start)
    window_tokens, window_t0, loss_sum, loss_n = 0, time.perf_counter(), 0.0, 0
    try:
        for step in range(start, cfg.steps):
            lr = lr_at(step, cfg.lr, cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio)
            set_lr(optimizer, lr)
            step_loss = 0.0
            for _ in range(cfg.grad_accum):
                batch = batches.next_batch()
                window_tokens += tokens_of(batch)
                with autocast():
                    loss = loss_fn(fwd_model, batch)
                check_finite_value(loss, "loss", step + 1, "lower --lr, raise --warmup, or use fp32")
                (loss / cfg.grad_accum).backward()
                step_loss += loss.item() / cfg.grad_accum
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip if cfg.clip > 0 else math.inf)
            check_finite_value(grad_norm, "gradient norm", step + 1, "lower --lr, raise --warmup, or use fp32")
            if not cfg.clip > 0:
                grad_norm = None  # measured for the check only; logged when clipping
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            loss_sum, loss_n = loss_sum + step_loss, loss_n + 1
            elapsed = time.perf_counter() - window_t0
            tok_s = window_tokens / max(elapsed, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{tok_s:,.0f}", refresh=False)
            final.update(step=done, loss=step_loss, lr=lr)
            if cfg.log_every and (done % cfg.log_every == 0 or done == cfg.steps):
                row = {"step": done, "loss": step_loss, "avg_loss": loss_sum / loss_n, "lr": lr,
                       "tokens_per_s": round(tok_s, 1)}
                if grad_norm is not None:
                    row["grad_norm"] = float(grad_norm)
                log.write(row)
                final["tokens_per_s"] = row["tokens_per_s"]
                window_tokens, window_t0, loss_sum, loss_n = 0, time.perf_counter(), 0.0, 0
            if eval_fn is not None and cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.steps:
                t_eval = time.perf_counter()
                final.update(evaluate(done))
                window_t0 += time.perf_counter() - t_eval  # tokens/s counts training time only
            if cfg.save_every and done % cfg.save_every == 0 and done != cfg.steps:
                checkpoint(done)
    finally:  # on an error too: the error line must not land on the bar
        bar.close()
    if eval_fn is not None and start < cfg.steps:
        final.update(evaluate(cfg.steps))
    elif eval_fn is not None:  # resumed from the final checkpoint: its evaluation was logged before it
        for row in log.rows:
            if row.get("step") == cfg.steps and "loss" not in row:
                final.update({k: v for k, v in row.items() if k != "step"})
    if start < cfg.steps:
        checkpoint(cfg.steps)
    log.plot()
    _save_final(model, out_dir / "final", tokenizer)
    return final


def precision_autocast(precision: str, device: str = "cpu"):
    """bf16 autocast on ``device`` (a device or its type) for ``precision == "bf16"``, nothing for fp32."""
    if precision not in ("fp32", "bf16"):
        raise LmforgeError(f"precision must be fp32 or bf16, got {precision!r}")
    if precision == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def progress_bar(total: int, start: int = 0, desc: str = "train", enabled: bool = True):
    """A steps progress bar (tqdm) starting at ``start`` (a resumed run)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc=desc, unit="step", dynamic_ncols=True, mininterval=0.5,
                disable=not enabled)


def _save_final(model: nn.Module, path: Path, tokenizer: Any) -> None:
    """The trained model as a Hugging Face directory;
    adapted models (LoRA, prompt tuning) save just the adapter, in PEFT's format, with the tokenizer."""
    from lmforge.peft.lora import lora_layers
    from lmforge.peft.prompt_tuning import PromptTunedLM
    from lmforge.training.checkpoint import check_finite

    check_finite(model.named_parameters(), f"the final model to {path}")
    if isinstance(model, PromptTunedLM) or next(lora_layers(model), None) is not None:
        from lmforge.peft.adapters import save_adapter

        save_adapter(model, path)
        if tokenizer is not None:
            tokenizer.save(path)
        return
    from lmforge.checkpoints.hf import save_hf_dir  # every architecture, a MaskedLM as BertForMaskedLM

    save_hf_dir(model, path, tokenizer=tokenizer)
