"""The alignment recipes: ``ppo`` (RLHF's RL step against a reward) and ``dpo`` (DPO / IPO on preference pairs).

Each builds the policy (LoRA by default, or every weight), its frozen reference (the base with the
adapters off, a frozen copy, or a separate ``ref`` model of the same architecture), runs the trainer of
``ppo.py`` / ``dpo.py`` (DPO through the training loop, ``training/loop.py``; PPO's rollout/epoch step through
its ``optimizer_step``), keeps ``OUT_DIR/metrics.jsonl``, ``OUT_DIR/config.json`` and the checkpoints in a
``training/run.py`` ``RunDir``, and saves ``OUT_DIR/final``: a PEFT adapter (with the tokenizer) or a Hugging
Face directory. New LoRA adapters are initialised from ``seed``. A NaN or infinite hyper-parameter is refused
up front; a NaN or infinite reward, KL, advantage, loss or gradient stops the run with an ``LmforgeError``
naming it and the step: the last checkpoint is kept and no ``final`` is written (``RunDir.save_final`` refuses
non-finite weights).
"""

from __future__ import annotations

import copy
import importlib
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.outputs import claims_output
from lmforge.training.loop import precision_autocast, progress_bar

METHODS = ("lora", "full")
DEFAULT_LR = {"lora": 1e-4, "full": 1e-6}
REWARD_INPUTS = ("completion", "prompt+completion")


# ----------------------------------------------------------------------------- building blocks
def check_same_architecture(policy_config, ref_config, ref_name: str) -> None:
    """A separate reference must be the policy's architecture: name the fields that differ."""
    a, b = policy_config.to_dict(), ref_config.to_dict()
    diff = [k for k in sorted(set(a) | set(b)) if k != "name" and a.get(k) != b.get(k)]
    if diff:
        shown = ", ".join(f"{k}: policy {a.get(k)!r} vs reference {b.get(k)!r}" for k in diff[:6])
        raise LmforgeError(f"the reference model {ref_name} has a different architecture from the policy ({shown})")


def load_policy(model: str | None, *, adapter: str | None, method: str, ref: str | None, device: str,
                lora: dict[str, Any], seed: int | None = None):
    """(LM whose model is the trainable policy, frozen reference model or None = the policy with LoRA off).
    New LoRA adapters are initialised from ``seed``."""
    from lmforge.lm import LM, load
    from lmforge.training.sft import apply_method

    if method not in METHODS:
        raise LmforgeError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    if adapter is not None and method != "lora":
        raise LmforgeError("--adapter continues training a LoRA adapter: use it with --method lora")
    lm = load(model, device=device, dtype="float32", adapter=adapter)
    if not isinstance(lm, LM) or lm.config.arch != "decoder":
        raise LmforgeError(f"{lm.name} is not a decoder-only model; PPO and DPO need one")
    if adapter is None and method == "lora":
        apply_method(lm.model, "lora", quant="nf4", num_virtual_tokens=0, seed=seed, **lora)
    # with --adapter, load_adapter has frozen the base and left the adapter's weights trainable
    reference = None
    if ref is not None:
        reference = load(ref, device=device, dtype="float32").model
        check_same_architecture(lm.config, reference.config, str(ref))
    elif method == "full":
        reference = copy.deepcopy(lm.model)
    if reference is not None:
        reference.requires_grad_(False).eval()
    return lm, reference


def report_trainable(model: nn.Module, method: str) -> None:
    from lmforge.peft.lora import trainable_report

    print(f"{method}: {trainable_report(model)}", file=sys.stderr)


def load_prompts(path: str | Path, field: str = "prompt", limit: int | None = None) -> list[str]:
    """Prompts from a text file (one per non-blank line) or JSON lines / a JSON list (``field`` of each record)."""
    from lmforge.data.records import parse_json_records, read_text

    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"prompts file {path} does not exist")
    text = read_text(path)
    if path.suffix == ".txt" or path.name.endswith(".txt.gz"):
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    else:
        prompts = []
        for line, rec in parse_json_records(text, str(path), lines_only=".jsonl" in path.name):
            value = rec.get(field) if isinstance(rec, dict) else None
            if not isinstance(value, str) or not value.strip():
                raise LmforgeError(f"{path}, line {line}: no non-empty string field {field!r} (set --prompt-field)")
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


def load_reward(spec: str, reward_input: str = "completion"):
    """(``reward_fn(prompts, completions) -> (B,)``, the reward model or None) from a reward-model folder
    (``training/reward.py``'s ``load_reward_model``: higher = better) or a ``package.module:function``
    taking (prompts, completions)."""
    if reward_input not in REWARD_INPUTS:
        raise LmforgeError(f"unknown reward input {reward_input!r}; choose one of: {', '.join(REWARD_INPUTS)}")
    if not Path(spec).exists() and ":" in spec:
        module, _, attr = spec.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise LmforgeError(f"reward function {spec!r} cannot be imported: {e}") from None
        return (lambda prompts, completions: torch.as_tensor(fn(prompts, completions), dtype=torch.float32)), None
    if not Path(spec).exists():
        raise LmforgeError(f"--reward {spec}: no such reward model folder (or give a 'package.module:function')")
    from lmforge.alignment.reward import load_reward_model

    rm = load_reward_model(spec)

    def reward_fn(prompts: list[str], completions: list[str]) -> torch.Tensor:
        texts = completions if reward_input == "completion" else [p + c for p, c in zip(prompts, completions)]
        return torch.as_tensor(rm.score(texts), dtype=torch.float32)

    return reward_fn, rm


def _lora_args(lora_r, lora_alpha, lora_dropout, lora_targets, rslora) -> dict[str, Any]:
    targets = list(lora_targets) if isinstance(lora_targets, tuple) else lora_targets
    return dict(lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, lora_targets=targets, rslora=rslora)


# ----------------------------------------------------------------------------- the recipes
@claims_output("rlhf ppo", inputs=("model", "adapter", "ref"))
def ppo(model: str | None = None, prompts: str | Path = "", reward: str = "", *, adapter: str | None = None,
        method: str = "lora", ref: str | None = None, out_dir: str | Path = "runs/ppo", steps: int = 20,
        batch_size: int = 8, mini_batch_size: int = 4, ppo_epochs: int = 4, lr: float | None = None,
        kl_coef: float = 0.05, target_kl: float | None = None, horizon: int = 10000, gamma: float = 1.0,
        lam: float = 0.95, clip_range: float = 0.2, vf_coef: float = 0.1, max_new_tokens: int = 32,
        temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None, chat: bool | None = None,
        prompt_field: str = "prompt", reward_input: str = "completion", precision: str = "fp32", seed: int = 0,
        device: str = "cpu", lora_r: int = 16, lora_alpha: float = 32.0, lora_dropout: float = 0.0,
        lora_targets: str | Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj"), rslora: bool = False,
        save_every: int = 0, resume: bool = False, progress: bool = True, overwrite: bool = False,
        force: bool = False) -> dict[str, Any]:
    """Optimise ``model`` (None: the embedded default) with PPO against ``reward`` on ``prompts``.

    Each of ``steps`` PPO steps samples ``batch_size`` prompts (shuffled, cycling), generates up to
    ``max_new_tokens`` with ``temperature``/``top_k``/``top_p``, scores them with the reward (a reward-model
    folder or a ``module:function``), shapes the reward with ``kl_coef`` * KL to the reference (adaptive
    towards ``target_kl`` when set) and runs ``ppo_epochs`` epochs of ``mini_batch_size`` minibatches.
    Every ``save_every`` steps (0: never) ``OUT_DIR/checkpoint`` is written atomically: policy, value
    head, optimiser, KL coefficient and prompt order; ``resume`` continues from it, step for step as
    the uninterrupted run (rollouts and minibatches are seeded by the step). An ``out_dir`` that holds a run
    needs ``resume`` or ``overwrite``; one with other files needs ``force`` (``lmforge.outputs``).
    Returns the last step's figures and where the policy was saved.
    """
    from lmforge.alignment.ppo import PPOConfig, PPOTrainer
    from lmforge.training.loop import RunDir, seed_everything
    from lmforge.training.sources import ShuffledIndices

    run_config = json.loads(json.dumps(locals(), default=str))
    cfg = PPOConfig(batch_size=batch_size, mini_batch_size=mini_batch_size, ppo_epochs=ppo_epochs,
                    lr=lr if lr is not None else DEFAULT_LR.get(method, 1e-4), kl_coef=kl_coef, target_kl=target_kl,
                    horizon=horizon, gamma=gamma, lam=lam, clip_range=clip_range, vf_coef=vf_coef,
                    max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    texts = load_prompts(prompts, prompt_field)
    reward_fn, reward_model = load_reward(reward, reward_input)
    seed_everything(seed)
    lm, reference = load_policy(model, adapter=adapter, method=method, ref=ref, device=device,
                                lora=_lora_args(lora_r, lora_alpha, lora_dropout, lora_targets, rslora), seed=seed)
    if reward_model is not None:
        reward_vocab_check(reward_model, lm.config.vocab_size, reward)
    encoded = [lm.encode(p, chat) for p in texts]
    report_trainable(lm.model, method)
    trainer = PPOTrainer(lm.model, lm.tokenizer, reward_fn, cfg, ref_model=reference, eos_ids=lm.eos_ids)
    run = RunDir(out_dir, {"recipe": "ppo", **run_config}, resume=resume, tokenizer=lm.tokenizer, write_config=True)
    order = ShuffledIndices(len(texts), batch_size, seed)  # a fresh shuffle of all prompts whenever one runs out
    state = nn.ModuleDict({"policy": lm.model, "value_head": trainer.value_head})  # what a checkpoint holds
    state.config = lm.model.config  # lets a resume refuse another architecture
    saved = run.restore(state, trainer.optimizer, order)
    start = 0 if saved is None else int(saved["step"])
    if saved is not None:
        trainer.kl_coef, trainer.steps_done = saved["kl_coef"], start
    log = run.log
    bar = progress_bar(steps, start, "ppo", progress)
    stats: dict[str, float] = {}
    try:
        for step in range(start + 1, steps + 1):
            rows = order.next_batch()
            t0 = time.perf_counter()
            with precision_autocast(precision, device):
                stats = trainer.step([texts[i] for i in rows], [encoded[i] for i in rows])
            stats["step_s"] = round(time.perf_counter() - t0, 2)
            log.write({"step": step, **stats,
                       "sample": {"prompt": texts[rows[0]], "completion": trainer.last_rollout.completions[0]}})
            bar.update(1)
            bar.set_postfix(reward=f"{stats['reward']:.3f}", kl=f"{stats['kl']:.2f}", refresh=False)
            if save_every and (step % save_every == 0 or step == steps):
                run.checkpoint(state, trainer.optimizer, step, order, {"kl_coef": trainer.kl_coef})
    finally:  # on an error too: the error line must not land on the bar
        bar.close()
    final = run.save_final(lm.model)
    return {"step": steps, **stats, "out_dir": str(final)}


@claims_output("rlhf dpo", inputs=("model", "adapter", "ref"))
def dpo(model: str | None = None, data: str | Path = "", *, adapter: str | None = None, method: str = "lora",
        ref: str | None = None, out_dir: str | Path = "runs/dpo", loss: str = "dpo", beta: float = 0.1,
        label_smoothing: float = 0.0, precompute_ref: bool = False, steps: int | None = None,
        epochs: float | None = None, batch_size: int = 4, lr: float | None = None, warmup_steps: int = 0,
        max_len: int | None = None, chat: bool | None = None, limit: int | None = None, eval_fraction: float = 0.0,
        eval_every: int = 0, precision: str = "fp32",
        seed: int = 0, device: str = "cpu", lora_r: int = 16, lora_alpha: float = 32.0, lora_dropout: float = 0.0,
        lora_targets: str | Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj"), rslora: bool = False,
        save_every: int = 0, resume: bool = False, progress: bool = True, overwrite: bool = False,
        force: bool = False) -> dict[str, Any]:
    """Train ``model`` with DPO (or IPO: ``loss="ipo"``, ``beta`` is tau) on the preference file ``data``.

    Runs ``steps`` optimiser steps (or ``epochs`` passes; one epoch when neither is given) of ``batch_size``
    pairs, with linear warmup then cosine decay of ``lr``. Responses are cut to fit ``max_len`` tokens
    (default: 512 or the context window); pairs whose prompt fills it are dropped. With ``precompute_ref``
    the reference log-probs are computed once before training. ``eval_fraction`` of the pairs (a seeded
    split) are held out and scored before training, every ``eval_every`` steps and at the end
    (``eval_loss``, ``eval_reward_accuracy``, ``eval_reward_margin``...). ``save_every`` / ``resume``: atomic
    checkpoints in ``OUT_DIR/checkpoint`` and an exact continuation, as for ``ppo``.
    Returns the last step's figures.
    """
    import math

    from lmforge.alignment.dpo import DPO_HINT, DPOTrainer, load_preference_pairs, precompute_reference, tokenize_pairs
    from lmforge.training.loop import RunDir, TrainConfig, check_finite_number, seed_everything, train
    from lmforge.training.sources import ShuffledIndices

    run_config = json.loads(json.dumps(locals(), default=str))
    if steps is not None and epochs is not None:
        raise LmforgeError("give either steps or epochs, not both")
    for name, value in (("--beta", beta), ("--label-smoothing", label_smoothing), ("--lr", lr),
                        ("--epochs", epochs), ("--eval-fraction", eval_fraction), ("--lora-alpha", lora_alpha)):
        check_finite_number(value, name)
    if not beta > 0:
        raise LmforgeError(f"--beta must be > 0, got {beta}")
    if lr is not None and not lr > 0:
        raise LmforgeError(f"--lr must be > 0, got {lr}")
    pairs = load_preference_pairs(data, limit)
    seed_everything(seed)
    lm, reference = load_policy(model, adapter=adapter, method=method, ref=ref, device=device,
                                lora=_lora_args(lora_r, lora_alpha, lora_dropout, lora_targets, rslora), seed=seed)
    tok = lm.tokenizer
    max_len = max_len or min(512, lm.config.max_seq_len)
    items, dropped = tokenize_pairs(pairs, lambda p: lm.encode(p, chat), tok, max_len)
    if not items:
        raise LmforgeError(f"{data}: every prompt is longer than max_len={max_len} tokens")
    held: list = []
    if eval_fraction:
        from lmforge.data.reward_data import random_split

        train_idx, held_idx = random_split(len(items), eval_fraction, seed)
        items, held = [items[i] for i in train_idx], [items[i] for i in held_idx]
    report_trainable(lm.model, method)
    pad = tok.pad_id if tok.pad_id is not None else (tok.eos_id if tok.eos_id is not None else 0)
    if steps is None:
        steps = max(1, math.ceil((epochs or 1.0) * len(items) / batch_size))
    lr = lr if lr is not None else DEFAULT_LR[method]
    cfg = TrainConfig(steps=steps, lr=lr, warmup_steps=warmup_steps, weight_decay=0.0, betas=(0.9, 0.999),
                      precision=precision, eval_every=eval_every, eval_at_start=bool(held), save_every=save_every,
                      log_every=1, seed=seed)
    table = precompute_reference(lm.model, reference, items, pad) if precompute_ref else None
    trainer = DPOTrainer(lm.model, None, loss=loss, beta=beta, label_smoothing=label_smoothing,
                         ref_model=reference, ref_table=table, pad_id=pad)
    run = RunDir(out_dir, {"recipe": "dpo", **run_config, "pairs": len(items), "dropped": dropped}, resume=resume,
                 tokenizer=tok, write_config=True)

    def step_fn(policy: nn.Module, rows: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
        return trainer.loss_and_metrics([items[i] for i in rows], rows)

    def tokens(rows: list[int]) -> int:
        return sum(2 * len(items[i].prompt) + len(items[i].chosen) + len(items[i].rejected) for i in rows)

    result = train(lm.model, step_fn, ShuffledIndices(len(items), batch_size, seed), cfg, run,
                   eval_fn=(lambda policy: trainer.evaluate(held)) if held else None, tokens_per_batch=tokens,
                   desc=loss, loss_name="DPO loss", hint=DPO_HINT, progress=progress)
    return {**result, "step": steps, "pairs": len(items), "held_out": len(held), "dropped": dropped,
            "out_dir": str(run.path / "final")}
