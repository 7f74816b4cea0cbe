"""The one training loop: every gradient recipe (pretraining, fine-tuning, DPO/IPO, both reward models) runs
``train``, and ``optimizer_step`` is the only place in lmforge that steps an optimiser (PPO calls it too).

``train`` owns the step: gradient accumulation, bf16 autocast, clipping, the AdamW update with the
warmup+cosine schedule (``optim.py``), periodic evaluation, logging (a tqdm bar, tokens/s,
``metrics.jsonl``, ``loss.png``) and crash-safe checkpoints with exact resume, through the run's
folder (``run.py`` ``RunDir``). What is trained and on what is the caller's: a
``step_fn(model, batch) -> loss`` or ``-> (loss, metrics)`` (a scalar tensor and a dict of floats to log)
and a resumable ``BatchSource`` (``sources.py``).

Launched by ``torchrun`` with more than one process (``distributed.py``), ``train`` runs data-parallel: the
model goes into ``DistributedDataParallel`` or FSDP2 (``cfg.strategy``, ``parallel.py``: gradients averaged
over the ranks, communicated only on the last micro-batch of an accumulated step; under FSDP each rank keeps
1/N of the weights and optimiser states, evaluates with the others and saves its own shards,
``sharded.py``), each rank trains on its rows of every global batch
(``sources.ShardedBatches``, weighted so that the averaged gradient is the global batch's), the logged
loss and metrics are averaged over the ranks, and only rank 0 prints, evaluates, logs and writes
(``run.py``). One process is the same code with nothing wrapped.

Nothing non-finite is kept: NaN/inf hyper-parameters are refused by ``TrainConfig``; a NaN or infinite
loss or gradient norm stops the run (``LmforgeError`` naming it and the step) before the update, so
the last checkpoint stays the last good one; checkpoints and the final model refuse non-finite weights.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lmforge.errors import LmforgeError
from lmforge.training.distributed import setup
from lmforge.training.optim import lr_at, make_optimizer, set_lr
from lmforge.training.parallel import STRATEGIES, checkpoint_blocks, is_sharded, no_sync, resolve_strategy, wrap
from lmforge.training.run import MetricsLog, RunDir
from lmforge.training.sources import BatchSource, ShardedBatches

__all__ = ["BatchSource", "MetricsLog", "RunDir", "TrainConfig", "optimizer_step", "train"]

StepFn = Callable[[nn.Module, Any], "Tensor | tuple[Tensor, dict[str, float]]"]
HINT = "lower --lr, raise --warmup, or use fp32"

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
    eval_at_start: bool = False  # also evaluate before the first step (not on resume)
    save_every: int = 0  # 0 = only at the end
    log_every: int = 10
    seed: int = 0
    strategy: str = "auto"  # under torchrun: "ddp" | "fsdp" | "auto" (parallel.py)
    activation_checkpointing: bool = False  # recompute each block's activations in backward
    cpu_offload: bool = False  # FSDP on CUDA: shards and optimiser states in host memory

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
        if self.strategy not in STRATEGIES:
            raise LmforgeError(f"TrainConfig.strategy={self.strategy!r}; choose one of: {', '.join(STRATEGIES)}")


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


def default_tokens(batch: Any) -> int:
    """Tokens in a batch: the size of ``input_ids`` (or of the first tensor); for a list (of indices), its length."""
    if not isinstance(batch, dict):
        return len(batch)
    t = batch.get("input_ids")
    if t is None:
        t = next(v for v in batch.values() if torch.is_tensor(v))
    return int(t.numel())


def to_device(batch: Any, device: torch.device) -> Any:
    """A batch's tensors (a dict of them) on ``device``, where the model computes; other batches (lists of row
    indices that the step function resolves itself) as they are."""
    if isinstance(batch, dict):
        return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    return batch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def optimizer_step(params: Iterable[nn.Parameter], optimizer: torch.optim.Optimizer, clip: float, step: int | str,
                   hint: str = HINT) -> float:
    """Clip the gradients of ``params`` to global norm ``clip`` (0: no clipping, the norm is still measured),
    refuse a NaN or infinite norm (``LmforgeError`` naming ``step``, before the weights change), step
    ``optimizer`` and clear the gradients. Returns the norm before clipping."""
    grad_norm = torch.nn.utils.clip_grad_norm_(list(params), clip if clip > 0 else math.inf)
    norm = check_finite_value(grad_norm, "gradient norm", step, hint)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def _split(out: Tensor | tuple[Tensor, dict[str, float]]) -> tuple[Tensor, dict[str, float]]:
    """A step function's result as (loss, metrics)."""
    return out if isinstance(out, tuple) else (out, {})


def train(model: nn.Module, step_fn: StepFn, batches: BatchSource, cfg: TrainConfig, run: RunDir, *,
          eval_fn: Callable[[nn.Module], dict[str, float]] | None = None,
          tokens_per_batch: Callable[[Any], int] | None = None, save_final: bool = True, desc: str = "train",
          loss_name: str = "loss", hint: str = HINT, progress: bool = True) -> dict:
    """Train the trainable parameters of ``model`` for ``cfg.steps`` optimiser steps; returns the final figures.

    Each step draws ``cfg.grad_accum`` batches, averages ``step_fn(model, batch)``'s loss (and metrics) over
    them and takes one AdamW step (``optimizer_step``); under torchrun see the module docstring.
    ``eval_fn(model)`` (run in eval mode, without gradients) returns metrics such as ``{"val_loss": ...}``:
    every ``cfg.eval_every`` steps and at the end.
    With ``run.resume`` the run continues from ``run``'s checkpoint exactly where it stopped (same losses, step
    for step). Every ``cfg.save_every`` steps and at the end a checkpoint is written; with ``save_final`` the
    model is then written to ``run.path/final``. ``loss_name`` and ``hint`` word the error a non-finite loss
    or gradient norm stops the run with.
    """
    tokens_of = tokens_per_batch or default_tokens
    dist = setup()
    run.dist = dist
    progress = progress and dist.is_main
    seed_everything(cfg.seed)
    model.train()
    strategy = resolve_strategy(cfg.strategy, dist, model)  # None: one process
    if cfg.cpu_offload and strategy != "fsdp":
        raise LmforgeError("--cpu-offload keeps FSDP's shards in host memory: it needs --strategy fsdp under "
                           "torchrun on CUDA")
    if cfg.activation_checkpointing:
        checkpoint_blocks(model)
    fwd_model = torch.compile(model) if cfg.compile else model
    wrapped = wrap(fwd_model, step_fn, strategy, dist, precision=cfg.precision, cpu_offload=cfg.cpu_offload
                   ) if strategy else None
    sharded = is_sharded(model)  # FSDP: every rank evaluates and saves with the others
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, cfg.betas)  # after FSDP made the shards
    state = run.restore(model, optimizer, batches)
    start = 0 if state is None else int(state["step"])
    if start > cfg.steps:
        raise LmforgeError(f"{run.path} holds a checkpoint at step {start}, beyond the {cfg.steps} steps asked for")
    log = run.log
    run.run_config["train"] = asdict(cfg)  # the checkpoints' config.json records how the run optimises
    params = [p for g in optimizer.param_groups for p in g["params"]]
    device = torch.device("cuda", torch.cuda.current_device()) if cfg.cpu_offload else next(model.parameters()).device
    device_type = device.type
    shards = ShardedBatches(batches, dist.rank, dist.world) if dist.enabled else None
    if shards is not None:  # a batch size the ranks cannot split fails now, before any progress bar is drawn
        position = batches.state_dict()
        shards.next_shard()
        batches.load_state_dict(position)

    def autocast():
        return precision_autocast(cfg.precision, device_type)

    def evaluate(step: int) -> dict:  # on rank 0 (the others wait), on every rank under FSDP; rank 0 logs
        metrics: dict[str, float] = {}
        if dist.is_main or sharded:
            model.eval()
            with torch.no_grad(), autocast():
                out = wrapped(None, lambda m, _: eval_fn(m)) if sharded else eval_fn(model)
            metrics = {k: float(v) for k, v in out.items()}
            model.train()
        if dist.is_main:
            log.write({"step": step, **metrics})
            log.plot()
        dist.barrier()
        return metrics

    def micro_step(step: int, last: bool) -> tuple[Any, float, dict[str, float]]:
        """Draw a batch, run the step function and backpropagate; the batch, its loss and its metrics (under
        data parallelism: this rank's share, and the figures of the global batch)."""
        if wrapped is None:
            batch = to_device(batches.next_batch(), device)
            with autocast():
                loss, metrics = _split(step_fn(fwd_model, batch))
            check_finite_value(loss, loss_name, step + 1, hint)
            (loss / cfg.grad_accum).backward()
            return batch, loss.item(), metrics
        batch, weight = shards.next_shard()
        batch = to_device(batch, device)
        with no_sync(wrapped, strategy, last):
            with autocast():
                loss, metrics = _split(wrapped(batch))
            check_finite_value(loss, loss_name, step + 1, hint)
            (loss * (weight / cfg.grad_accum)).backward()
        keys = sorted(metrics)
        values = dist.all_reduce_mean([loss.item() * weight, *(float(metrics[k]) * weight for k in keys)])
        return batch, values[0], dict(zip(keys, values[1:]))

    schedule = {"kind": "linear warmup + cosine", "lr": cfg.lr, "warmup_steps": cfg.warmup_steps,
                "total_steps": cfg.steps, "min_lr_ratio": cfg.min_lr_ratio}

    def checkpoint(step: int) -> None:  # the schedule is a pure function of the step: saved for the record
        run.checkpoint(model, optimizer, step, batches, extra={"schedule": schedule, "train_config": asdict(cfg)})

    final: dict[str, Any] = {"step": start}
    if eval_fn is not None and cfg.eval_at_start and state is None:
        final.update(evaluate(0))
    bar = progress_bar(cfg.steps, start, desc, progress)
    window_tokens, window_t0, loss_sum, loss_n = 0, time.perf_counter(), 0.0, 0
    try:
        for step in range(start, cfg.steps):
            lr = lr_at(step, cfg.lr, cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio)
            set_lr(optimizer, lr)
            step_loss, sums = 0.0, {}
            for micro in range(cfg.grad_accum):
                batch, loss_value, metrics = micro_step(step, micro == cfg.grad_accum - 1)
                window_tokens += tokens_of(batch) * dist.world
                step_loss += loss_value / cfg.grad_accum
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v) / cfg.grad_accum
            grad_norm = optimizer_step(params, optimizer, cfg.clip, step + 1, hint)
            done = step + 1
            loss_sum, loss_n = loss_sum + step_loss, loss_n + 1
            elapsed = time.perf_counter() - window_t0
            tok_s = window_tokens / max(elapsed, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{tok_s:,.0f}", refresh=False)
            final.update(sums, step=done, loss=step_loss, lr=lr)
            if cfg.log_every and (done % cfg.log_every == 0 or done == cfg.steps):
                row = {"step": done, **sums, "loss": step_loss, "avg_loss": loss_sum / loss_n, "lr": lr,
                       "grad_norm": grad_norm, "tokens_per_s": round(tok_s, 1)}  # the norm before clipping
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
    log.close()  # the experiment trackers (run.py MetricsLog, tracking.py)
    if save_final:
        run.save_final(model)
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
