"""Training a pairwise reward model (a decoder + scalar head, ``models/heads.py`` ``RewardModel``)
on chosen/rejected pairs with the Bradley-Terry loss (Ouyang et al. 2022, eq. 1), within a CPU budget.

Every text is cut to its last ``max_len`` tokens (chosen and rejected share the dialogue and
differ in its final turn). The lower ``n_layer - K`` blocks stay frozen: their hidden states are
computed once per text and cached, and only the top K blocks, the final norm and the head train
on the cache, so each epoch costs K blocks instead of the whole model. K = 0 is a linear probe on
the final-norm state of the last token. The cached path is the same computation as
``PairwiseReward.score`` on the saved model (same blocks, same precision; the tests check that
both give the same held-out accuracy).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from lmforge.alignment.preference import bradley_terry_loss
from lmforge.alignment.reward import (
    PairwiseReward,
    autocast,
    by_length,
    check_tokenizer_match,
    encode_tail,
    fit,
    pad_right,
    pairwise_metrics,
    save_reward_model,
)
from lmforge.alignment.reward_recipe import RewardConfig
from lmforge.data.reward_data import load_pairs, random_split
from lmforge.errors import LmforgeError
from lmforge.outputs import claims_output
from lmforge.recipe_config import write_config


def run_blocks(body: nn.Module, x: torch.Tensor, blocks) -> torch.Tensor:
    """x (B, T, C) hidden states at positions 0..T-1 -> (B, T, C) after ``blocks`` (causal, no cache)."""
    B, T, _ = x.shape
    positions = torch.arange(T, device=x.device).expand(B, T)  # (B, T)
    rope = body.rotary(positions, x.dtype) if body.rotary is not None else None
    for block in blocks:
        x = block(x, rope, None)  # mask None = causal; right padding never reaches earlier tokens
    return x


@torch.no_grad()
def frozen_states(model: nn.Module, rows: list[list[int]], n_frozen: int, batch_size: int = 16,
                  precision: str = "bf16", desc: str = "cache") -> list[torch.Tensor]:
    """Hidden states after the first ``n_frozen`` blocks of ``model`` (a RewardModel), one float32
    (T_i, C) tensor per row; with every block frozen, the final-norm state of the last token (1, C)."""
    from tqdm.auto import tqdm

    body = model.decoder.model
    out: list[torch.Tensor] = [torch.empty(0)] * len(rows)
    for batch in tqdm(by_length(rows, batch_size), desc=desc, unit="batch", dynamic_ncols=True, mininterval=0.5):
        idx, _ = pad_right([rows[i] for i in batch], 0)  # (B, T)
        with autocast(precision):
            x = body.embed_tokens(idx)  # (B, T, C)
            if body.embed_positions is not None:
                x = x + body.embed_positions(torch.arange(idx.shape[1]).expand_as(idx))
            x = run_blocks(body, x, body.layers[:n_frozen])
            if n_frozen == len(body.layers):
                x = body.norm(x)
        for j, i in enumerate(batch):
            n = len(rows[i])
            out[i] = (x[j, n - 1:n] if n_frozen == len(body.layers) else x[j, :n]).float().clone()
    return out


def top_rewards(model: nn.Module, states: list[torch.Tensor], n_frozen: int) -> torch.Tensor:
    """Rewards (B,) from cached states: the blocks from ``n_frozen`` on, the final norm, the head."""
    body = model.decoder.model
    if n_frozen == len(body.layers):  # states are final-norm last-token states already
        return model.score(torch.cat(states)).squeeze(-1)  # (B, C) -> (B,)
    lengths = torch.tensor([len(s) for s in states])
    x = torch.zeros(len(states), int(lengths.max()), states[0].shape[-1])  # (B, T, C), right-padded
    for j, s in enumerate(states):
        x[j, :len(s)] = s
    x = body.norm(run_blocks(body, x, body.layers[n_frozen:]))
    return model.score(x[torch.arange(len(states)), lengths - 1]).squeeze(-1)


@claims_output("reward train", inputs=("model", "adapter", "tokenizer"), config="cfg")
def train_pairwise(cfg: RewardConfig, *, resume: bool = False, overwrite: bool = False, force: bool = False) -> dict:
    """Train a Bradley-Terry reward model on (chosen, rejected) pairs of ``cfg.data``; save it to ``cfg.out_dir``
    (``cfg.kind`` must be ``"pairwise"``).

    Held-out pairs are ``eval_file`` or a seeded ``eval_fraction`` of ``data``; ``max_train`` /
    ``max_eval`` cap them. ``train_layers`` = K top blocks trained (see the module docstring).
    ``tokenizer``: a tokenizer folder to use instead of the model's own; it must match the
    model's vocabulary. ``adapter``: a PEFT LoRA adapter for ``model``, merged into the weights first
    (e.g. start the reward model from an SFT policy). Training runs through the training loop (``reward.fit``):
    ``out_dir/metrics.jsonl`` logs every step; every ``save_every`` steps (0: none kept) ``out_dir/checkpoint``
    holds the trained parameters. The resolved recipe is written to ``out_dir/config.yaml`` once the pairs
    have loaded. ``resume`` continues from the checkpoint, step for step as the uninterrupted run;
    ``overwrite``/``force`` as in ``lmforge.outputs``. Returns the held-out metrics (``pairwise_metrics``),
    also kept in ``out_dir/reward_config.json``.
    """
    from lmforge.checkpoints.resolve import build_model
    from lmforge.lm import read_checkpoint
    from lmforge.models.heads import RewardModel
    from lmforge.tokenizer import Tokenizer

    cfg.require("pairwise", "train_pairwise")
    data, model, adapter, tokenizer, train_layers = cfg.data, cfg.base_model, cfg.adapter, cfg.tokenizer, \
        cfg.train_layers
    seed, max_len, batch_size, precision = cfg.seed, cfg.length, cfg.batch_size, cfg.precision
    chosen_field, rejected_field = cfg.chosen_field, cfg.rejected_field
    t0 = time.perf_counter()
    pairs = load_pairs(data, chosen_field, rejected_field)
    if cfg.eval_file is not None:
        held = load_pairs(cfg.eval_file, chosen_field, rejected_field)
        train = pairs
    else:
        train_idx, eval_idx = random_split(len(pairs), cfg.eval_fraction, seed)
        train, held = [pairs[i] for i in train_idx], [pairs[i] for i in eval_idx]
    train, held = train[:cfg.max_train], held[:cfg.max_eval]

    ckpt = read_checkpoint(model)
    if ckpt.config.arch != "decoder":
        raise LmforgeError(f"{model} is a {ckpt.config.arch} model; a pairwise reward model needs a decoder-only one")
    if not 0 <= train_layers <= ckpt.config.n_layer:
        raise LmforgeError(f"--train-layers {train_layers}: {model} has {ckpt.config.n_layer} blocks")
    torch.manual_seed(seed)
    base = build_model(ckpt.config, ckpt.state_dict, source=str(model))
    if adapter is not None:
        from lmforge.peft.adapters import load_adapter
        from lmforge.peft.lora import merge_lora
        from lmforge.peft.prompt_tuning import PromptTunedLM

        base = load_adapter(base, adapter)
        if isinstance(base, PromptTunedLM):
            raise LmforgeError(f"{adapter} is a prompt-tuning adapter; a reward model starts from a LoRA adapter "
                               "merged into its base")
        base = merge_lora(base)
    rm = RewardModel(base)
    tok = ckpt.tokenizer
    if tokenizer is not None:
        tok = Tokenizer.from_dir(tokenizer)
        check_tokenizer_match(PairwiseReward(rm, ckpt.tokenizer, max_len), tok, f"--tokenizer {tokenizer}")
    n_frozen = ckpt.config.n_layer - train_layers
    write_config(cfg, cfg.out_dir)  # once the inputs have loaded: what reruns this run

    texts = [t for pair in train + held for t in pair]  # chosen, rejected, chosen, ...
    states = frozen_states(rm, encode_tail(tok, texts, max_len), n_frozen, precision=precision)
    train_states, held_states = states[: 2 * len(train)], states[2 * len(train):]

    rm.requires_grad_(False)
    trainable = [rm.score.weight]
    if train_layers:
        for m in (*rm.decoder.model.layers[n_frozen:], rm.decoder.model.norm):
            trainable += list(m.parameters())
    for p in trainable:
        p.requires_grad_(True)

    def loss_of(batch: list[int]) -> torch.Tensor:
        r = top_rewards(rm, [train_states[2 * i + k] for i in batch for k in (0, 1)], n_frozen)  # (2B,)
        return bradley_terry_loss(r[0::2].float(), r[1::2].float())

    lr = cfg.learning_rate
    run = dict(data=str(data), eval_file=None if cfg.eval_file is None else str(cfg.eval_file), model=str(model),
               chosen_field=chosen_field, rejected_field=rejected_field, eval_fraction=cfg.eval_fraction,
               max_train=cfg.max_train, max_eval=cfg.max_eval, train_layers=train_layers, epochs=cfg.epochs,
               batch_size=batch_size, lr=lr, seed=seed)
    losses, run_dir = fit(rm, loss_of, len(train), cfg.out_dir, epochs=cfg.epochs, batch_size=batch_size, lr=lr,
                          weight_decay=cfg.weight_decay, warmup=cfg.warmup, precision=precision, seed=seed,
                          save_every=cfg.save_every, resume=resume, run_config={"recipe": "reward pairwise", **run},
                          loggers=cfg.logger)
    rm.eval().requires_grad_(False)
    rewards = []
    with torch.no_grad(), autocast(precision):
        for s in range(0, len(held_states), 2 * batch_size):
            rewards += top_rewards(rm, held_states[s:s + 2 * batch_size], n_frozen).float().tolist()
    metrics = pairwise_metrics(rewards[0::2], rewards[1::2])
    metrics.update(train_pairs=len(train), train_layers=train_layers, max_len=max_len, train_loss_first=losses[0],
                   train_loss_last=sum(losses[-20:]) / len(losses[-20:]), seconds=round(time.perf_counter() - t0, 1))
    save_reward_model(PairwiseReward(rm, tok, max_len, precision), cfg.out_dir,
                      extra={"train": run, "metrics": metrics})
    if not cfg.save_every:  # the reward model is saved; no checkpoint was asked for
        run_dir.discard_checkpoint()
    return metrics
