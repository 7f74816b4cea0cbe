"""The scale-out options every gradient recipe shares (pretrain, finetune, rlhf dpo, reward train).

A recipe config inherits ``ScaleOut`` (keyword-only fields, so they sit after the recipe's own in
``__init__`` and need no defaults order), gets ``--strategy``, ``--activation-checkpointing`` and
``--cpu-offload`` on its command line and in its YAML, and hands ``train_kwargs()`` to ``TrainConfig``.
What each strategy does is ``parallel.py``'s; this module imports nothing heavy, so building the
command-line parser stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from lmforge.recipe_config import option


@dataclass(kw_only=True)
class ScaleOut:
    """Options for running under torchrun (``--nproc N``) and for saving activation memory."""

    strategy: Literal["auto", "ddp", "fsdp"] = option("auto", group="scale out")
    """Under torchrun: ddp (every rank a whole copy of the model; fastest while it fits), fsdp (FSDP2: every rank
    1/N of the weights, gradients and AdamW states), auto (ddp, unless the training state would take over 40% of
    one GPU)."""
    activation_checkpointing: bool = option(False, group="scale out")
    """Recompute each block's activations during backward instead of keeping them: less memory, about a third
    more compute."""
    cpu_offload: bool = option(False, group="scale out")
    """With --strategy fsdp on CUDA: keep the parameter shards and AdamW states in host memory."""

    def train_kwargs(self) -> dict[str, Any]:
        """These options as ``TrainConfig`` fields."""
        return {"strategy": self.strategy, "activation_checkpointing": self.activation_checkpointing,
                "cpu_offload": self.cpu_offload}
