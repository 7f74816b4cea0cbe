"""What the RL recipes (``rlhf ppo``, ``rlhf grpo``) read besides the policy: prompts from a text file or a dataset
field, and reward functions: a reward-model folder (``alignment/reward.py``) or a ``package.module:function``, whose
output is checked to be one number per completion."""

from __future__ import annotations

import importlib
import numbers
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError

REWARD_INPUTS = ("completion", "prompt+completion")


def load_prompts(path: str | Path, field: str = "prompt", limit: int | None = None) -> list[str]:
    """Prompts from a text file (one per non-blank line) or the ``field`` (a key or a dotted path) of each record
    of a dataset (``data/records.load_records``: .jsonl, .json or .csv, optionally gzipped, or .parquet)."""
    from lmforge.data.records import load_records, lookup
    from lmforge.io import read_text

    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"prompts file {path} does not exist")
    if path.suffix == ".txt" or path.name.endswith(".txt.gz"):
        prompts = [line.strip() for line in read_text(path).splitlines() if line.strip()]
    else:
        prompts = []
        for record in load_records(path):
            value = (lookup(record.fields, field, record.where, "--prompt-field")  # a dotted path: dialogue.opening
                     if "." in field and field not in record.fields else record.fields.get(field))
            if not isinstance(value, str) or not value.strip():
                raise LmforgeError(f"{record.where}: no non-empty string field {field!r} (set --prompt-field)")
            prompts.append(value)
    if not prompts:
        raise LmforgeError(f"{path}: no prompts (the file is empty)")
    return prompts[:limit]


def reward_vocab_check(reward: Any, policy_vocab: int, name: str) -> None:
    """A decoder reward model scoring the policy's token ids (``reward.config.arch == "decoder"``) needs the
    policy's vocabulary; classifiers with their own tokenizer read text and need no check."""
    config = getattr(reward, "config", None) or getattr(getattr(reward, "model", None), "config", None)
    if config is None or getattr(config, "arch", None) != "decoder":
        return
    if config.vocab_size != policy_vocab:
        raise LmforgeError(f"reward model {name} has a vocabulary of {config.vocab_size} tokens but the policy has "
                           f"{policy_vocab}: a pairwise decoder reward model shares the policy's token ids, so it "
                           "needs the same tokenizer")


def reward_scores(value: Any, spec: str):
    """What a reward function returned as a float tensor; anything but numbers is a one-line error naming it."""
    import numpy as np
    import torch

    if isinstance(value, torch.Tensor) and not value.is_complex():
        return value.to(torch.float32)
    if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
        return torch.as_tensor(value, dtype=torch.float32)
    items = value.tolist() if isinstance(value, np.ndarray) else value
    if not isinstance(items, (list, tuple)):
        raise LmforgeError(f"reward function {spec} returned a {type(value).__name__}; it must return one number "
                           "per completion (a list, or a 1-D tensor)")
    for x in items:
        if isinstance(x, bool) or not isinstance(x, numbers.Real):
            raise LmforgeError(f"reward function {spec} returned a {type(x).__name__} ({x!r}) for a completion; it "
                               "must return one number per completion")
    return torch.tensor(items, dtype=torch.float32)


def load_reward(spec: str, reward_input: str = "completion"):
    """(``reward_fn(prompts, completions) -> (B,)``, the reward model or None) from a reward-model folder
    (``training/reward.py``'s ``load_reward_model``: higher = better) or a ``package.module:function``
    taking (prompts, completions)."""
    import torch

    if reward_input not in REWARD_INPUTS:
        raise LmforgeError(f"unknown reward input {reward_input!r}; choose one of: {', '.join(REWARD_INPUTS)}")
    if not Path(spec).exists() and ":" in spec:
        module, _, attr = spec.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise LmforgeError(f"reward function {spec!r} cannot be imported: {e}") from None
        return (lambda prompts, completions: reward_scores(fn(prompts, completions), spec)), None
    if not Path(spec).exists():
        raise LmforgeError(f"--reward {spec}: no such reward model folder (or give a 'package.module:function')")
    from lmforge.alignment.reward import load_reward_model

    rm = load_reward_model(spec)

    def reward_fn(prompts: list[str], completions: list[str]) -> torch.Tensor:
        texts = completions if reward_input == "completion" else [p + c for p, c in zip(prompts, completions)]
        return torch.as_tensor(rm.score(texts), dtype=torch.float32)

    return reward_fn, rm
