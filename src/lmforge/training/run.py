"""The output folder of a training run, and everything the loop keeps there.

``RunDir`` owns the folder: the run's configuration (inside every checkpoint, and optionally as
``config.json`` beside it), ``metrics.jsonl`` and ``loss.png`` (``MetricsLog``), crash-safe checkpoints
and exact resume (``checkpoint.py``) and the final save (``final/``: a Hugging Face directory, or a PEFT
adapter for a model with a frozen base). The training loop and the PPO recipe both write through it.

``metrics.jsonl`` gets whole appended lines, and is rewritten on resume through a renamed temporary file.
``MetricsLog`` also hands every row to the experiment trackers the run asks for (``--logger``: csv, tensorboard,
wandb, mlflow; ``tracking.py``).

Under data parallelism (``distributed.py``) only rank 0 writes: the log, the plot, checkpoints (the model's
state is the same on every rank, the batch source's position global) and the final save; the other ranks
wait for it at a barrier and, on resume, read the checkpoint rank 0 has recovered. Under FSDP every rank writes
its own shards of each checkpoint (``sharded.py``) and the final model is gathered whole to rank 0.
Joining a job (``run.dist = dist``, before any other collective) checks that every rank holds the same run
configuration (``Dist.check_same``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.io import atomic_path, write_text_atomic
from lmforge.training.checkpoint import NAME, check_finite, load_checkpoint, recover_checkpoint, save_checkpoint
from lmforge.training.distributed import Dist, env_rank
from lmforge.training.parallel import gathered, is_sharded
from lmforge.training.sharded import is_sharded_checkpoint, load_sharded, save_sharded
from lmforge.training.sources import BatchSource
from lmforge.training.tracking import Tracker, check_available, open_trackers


class MetricsLog:
    """``metrics.jsonl`` (one JSON object per event) and ``loss.png`` (written when matplotlib is installed), and
    every row fanned out to the ``loggers`` backends (``tracking.py``; ``run_config`` is what they record as the
    run's configuration). ``writes=False`` (a data-parallel rank other than 0): the rows are kept in memory only
    and no backend is opened."""

    def __init__(self, out_dir: Path, resume_step: int | None, writes: bool = True, loggers: tuple[str, ...] = (),
                 run_config: dict | None = None):
        self.path = out_dir / "metrics.jsonl"
        self.png = out_dir / "loss.png"
        self.rows: list[dict] = []
        self.writes = writes
        self.trackers: list[Tracker] = []
        if resume_step is not None and self.path.is_file():  # drop events the crashed run logged after its checkpoint
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by the crash
                if row.get("step", 0) <= resume_step:
                    self.rows.append(row)
        if not writes:
            return
        if self.rows or self.path.exists():  # else nothing to keep or empty: the file appears with the first row
            # rewritten whole (lmforge.io: a temporary file renamed over it): a crash leaves the old or the new file
            write_text_atomic(self.path, (json.dumps(r) + "\n" for r in self.rows))
        self.trackers = open_trackers(loggers, out_dir, self.rows, resume_step=resume_step, run_config=run_config)

    def write(self, row: dict) -> None:
        """Append ``row`` as one whole line (a single write, flushed before returning), then give it to each
        tracker."""
        self.rows.append(row)
        if not self.writes:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
        for tracker in self.trackers:
            tracker.log(row)

    def close(self) -> None:
        """Close the trackers (finish the wandb/mlflow run, flush TensorBoard); the log stays readable."""
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            tracker.close()

    def plot(self) -> None:
        if not self.writes:
            return
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return
        keys = {k for r in self.rows for k, v in r.items() if isinstance(v, (int, float))}
        held = sorted(k for k in keys if k.startswith(("val_", "eval_")) and k.endswith("loss"))
        losses = sorted(k for k in keys if k.endswith("loss") and k not in held and k != "avg_loss")  # PPO: two
        rl = [k for k in ("reward", "kl") if k in keys]  # PPO: the reward and the KL to the reference, beside
        fig, axes = plt.subplots(1, 2 if rl else 1, figsize=(12 if rl else 7, 4), squeeze=False)
        ax = axes[0][0]
        for key in losses:
            pts = [(r["step"], r[key]) for r in self.rows if key in r]
            ax.plot(*zip(*pts), label="train loss" if key == "loss" else key.replace("_", " "))
        for key in held:
            pts = [(r["step"], r[key]) for r in self.rows if key in r]
            ax.plot(*zip(*pts), marker="o", label=key.replace("_", " "))
        ax.set_ylabel("loss")
        for key in rl:
            pts = [(r["step"], r[key]) for r in self.rows if key in r]
            axes[0][1].plot(*zip(*pts), label=key)
        for a in axes[0]:
            a.set_xlabel("step")
            a.grid(alpha=0.3)
            if a.get_legend_handles_labels()[0]:
                a.legend()
        fig.tight_layout()
        try:
            with atomic_path(self.png) as tmp:
                fig.savefig(tmp, dpi=100, format="png")
        finally:
            plt.close(fig)


class RunDir:
    """A training run's output folder ``path``.

    ``run_config``: what produced the run (plain JSON), kept in every checkpoint and, with ``write_config``,
    as ``path/config.json``. ``resume``: ``restore`` continues from the newest complete checkpoint.
    ``tokenizer``: saved beside the final model. ``dist``: this process's place in a data-parallel job (set by
    the training loop; single-process by default): only rank 0 writes. ``loggers``: the experiment trackers the
    metrics also go to (``tracking.py``; a missing package is refused here, before the folder is made)."""

    def __init__(self, path: str | os.PathLike, run_config: dict | None = None, *, resume: bool = False,
                 tokenizer: Any = None, write_config: bool = False, loggers: tuple[str, ...] = ()):
        check_available(loggers)
        self.loggers = tuple(loggers)
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.run_config = json.loads(json.dumps(run_config or {}, default=str))
        self.resume, self.tokenizer = resume, tokenizer
        self.log: MetricsLog | None = None
        self._dist = Dist()
        if write_config and env_rank() == 0:
            from lmforge.io import write_json_atomic

            write_json_atomic(self.path / "config.json", self.run_config)

    @property
    def dist(self) -> Dist:
        return self._dist

    @dist.setter
    def dist(self, dist: Dist) -> None:
        """Join the run to a data-parallel job (the training loop does, right after the process group is set up
        and before any other collective, so ranks that differ in their strategy or data fail here rather than in
        a mismatched collective): every rank must hold the same ``run_config`` (``Dist.check_same``)."""
        dist.check_same("run config", self.run_config)
        self._dist = dist

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer, batches: BatchSource | None) -> dict | None:
        """Open ``metrics.jsonl``; when resuming, first put ``model``, ``optimizer``, the RNGs and ``batches`` back
        as the newest checkpoint left them and return its state (``step`` and the recipe's extras), else None.
        The log keeps only the rows up to the checkpoint's step."""
        state = None
        if self.resume:
            path = recover_checkpoint(self.path) if self.dist.is_main else None
            if self.dist.enabled:  # the others read what rank 0 recovered
                found = self.dist.all_reduce_mean(float(path is not None) if self.dist.is_main else 0.0) > 0
                path = self.path / NAME if found else None
            if path is None:
                raise LmforgeError(f"--resume: no checkpoint in {self.path} (expected {self.path / NAME})")
            if is_sharded(model) or is_sharded_checkpoint(path):  # written by an FSDP run, or resuming into one
                state = load_sharded(path, model, optimizer)
            else:
                state = load_checkpoint(path, model, optimizer)
            if batches is not None:
                batches.load_state_dict(state["batches"])
        self.log = MetricsLog(self.path, None if state is None else int(state["step"]), writes=self.dist.is_main,
                              loggers=self.loggers, run_config=self.run_config)
        return state

    def checkpoint(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int, batches: BatchSource,
                   extra: dict | None = None) -> Path:
        """Write ``path/checkpoint`` atomically (``checkpoint.save_checkpoint``) at ``step`` (rank 0; the others
        wait for it)."""
        path = self.path / NAME
        if is_sharded(model):  # FSDP: every rank writes its shards
            return save_sharded(self.path, model, optimizer, step, batches.state_dict(), self.run_config, extra,
                                self.dist)
        if self.dist.is_main:
            path = save_checkpoint(self.path, model, optimizer, step, batches.state_dict(), self.run_config, extra)
        self.dist.barrier()
        return path

    def discard_checkpoint(self) -> None:
        """Remove ``path/checkpoint`` (a run whose final save makes it redundant, and that asked for none)."""
        if self.dist.is_main:
            shutil.rmtree(self.path / NAME, ignore_errors=True)

    def save_final(self, model: nn.Module) -> Path:
        """``path/final``: see ``save_final`` (rank 0; the others wait for it, and under FSDP first help gather
        the whole weights to rank 0)."""
        path = self.path / "final"
        with gathered(model, self.dist) if is_sharded(model) else contextlib.nullcontext(model) as whole:
            if self.dist.is_main:
                save_final(whole, path, self.tokenizer, base_model=self.run_config.get("model"))
        self.dist.barrier()
        return path


def save_final(model: nn.Module, path: Path, tokenizer: Any, base_model: str | None = None) -> Path:
    """The trained model as a Hugging Face directory; adapted models (LoRA, prompt tuning) save just the
    adapter, in PEFT's format, with the tokenizer, recording ``base_model`` (the name or path the run loaded; None:
    the embedded default) as its base. Refuses (``LmforgeError``) NaN or infinite weights."""
    from lmforge.peft.lora import lora_layers
    from lmforge.peft.prompt_tuning import PromptTunedLM

    check_finite(model.named_parameters(), f"the final model to {path}")
    if isinstance(model, PromptTunedLM) or next(lora_layers(model), None) is not None:
        from lmforge.peft.adapters import base_model_reference, save_adapter

        save_adapter(model, path, base_name=base_model_reference(base_model))
        if tokenizer is not None:
            tokenizer.save(path)
        return path
    from lmforge.checkpoints.hf import save_hf_dir  # every architecture, a MaskedLM as BertForMaskedLM

    return save_hf_dir(model, path, tokenizer=tokenizer)
