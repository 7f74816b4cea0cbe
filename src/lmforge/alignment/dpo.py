"""DPO / IPO training from preference pairs (Rafailov et al. 2023; Azar et al. 2023).

Owns reading preference files, turning pairs into token batches, the summed response log-probs a
pair is judged by, and ``DPOTrainer``: the batch loss and figures (``loss_and_metrics``, the step function
the ``dpo`` recipe hands to the training loop), held-out evaluation, and a stand-alone ``step``. The losses
themselves are the pure functions of ``alignment/preference.py``.

A preference file is any record file ``data/records.load_records`` reads (JSON lines, a JSON list, CSV,
optionally gzipped, or parquet) of records, either

- ``{"prompt": ..., "chosen": ..., "rejected": ...}`` (responses without the prompt), or
- HH-RLHF style ``{"chosen": ..., "rejected": ...}`` full dialogues ("\\n\\nHuman: ...\\n\\nAssistant: ...");
  the prompt is the shared prefix up to and including the last "\\n\\nAssistant:".

The reference log-probs come from the policy with its LoRA adapters off, a frozen copy of the base,
or a table computed once before training (``precompute_reference``). Pairs whose prompt leaves no room for a
response within ``max_len`` are dropped with one counted warning (as SFT drops its examples). A NaN or infinite
loss or gradient norm stops a step with an ``LmforgeError`` before the optimiser touches the weights.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn

from lmforge.alignment.preference import dpo_loss, ipo_loss
from lmforge.data.records import load_records
from lmforge.data.tokens import IGNORE_INDEX, labelled_logprobs, pad_rows
from lmforge.errors import LmforgeError
from lmforge.peft.lora import set_lora_enabled

ASSISTANT = "\n\nAssistant:"
LOSSES = ("dpo", "ipo")
PreferenceLoss = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
DPO_HINT = "the weights are left as they were; lower --lr or check --beta"


@dataclass
class Pair:
    """One preference: the prompt and the two responses (texts), and where it came from."""

    prompt: str
    chosen: str
    rejected: str
    where: str


def split_dialogue(chosen: str, rejected: str, where: str) -> tuple[str, str, str]:
    """HH-RLHF style: (prompt, chosen reply, rejected reply), split at the last "\\n\\nAssistant:" of
    ``chosen``; the rejected dialogue must share that prompt."""
    cut = chosen.rfind(ASSISTANT)
    if cut < 0:
        raise LmforgeError(f"{where}: no 'prompt' field and no {ASSISTANT.strip()!r} turn in 'chosen' to split "
                           "the dialogue at; give prompt/chosen/rejected fields")
    prompt = chosen[:cut + len(ASSISTANT)]
    if not rejected.startswith(prompt):
        raise LmforgeError(f"{where}: 'chosen' and 'rejected' do not share the dialogue up to the last "
                           f"{ASSISTANT.strip()!r} turn; give prompt/chosen/rejected fields")
    return prompt, chosen[cut + len(ASSISTANT):], rejected[len(prompt):]


def load_preference_pairs(path: str | Path, limit: int | None = None) -> list[Pair]:
    """Preference pairs from a record file (.jsonl, .json, .csv, .parquet...: ``data/records.load_records``);
    errors name the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"preference file {path} does not exist")
    pairs = []
    for record in load_records(path):
        rec, where = record.fields, record.where
        for key in ("chosen", "rejected"):
            if key not in rec:
                raise LmforgeError(f"{where}: no {key!r} field (a preference record needs 'chosen' and 'rejected', "
                                   "plus 'prompt' unless they are whole Human/Assistant dialogues)")
        for key in ("prompt", "chosen", "rejected"):
            if key in rec and not isinstance(rec[key], str):
                raise LmforgeError(f"{where}: {key!r} must be a string, got {type(rec[key]).__name__}")
        if "prompt" in rec:
            pairs.append(Pair(rec["prompt"], rec["chosen"], rec["rejected"], where))
        else:
            pairs.append(Pair(*split_dialogue(rec["chosen"], rec["rejected"], where), where))
        if limit is not None and len(pairs) >= limit:
            break
    if not pairs:
        raise LmforgeError(f"{path}: no preference records")
    return pairs


@dataclass
class TokenPair:
    """A pair as token ids: the prompt's and each response's (responses end with EOS when there is one)."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]


def tokenize_pairs(pairs: list[Pair], encode_prompt, tokenizer, max_len: int) -> tuple[list[TokenPair], int]:
    """Token pairs, and how many were dropped because their prompt leaves no room for a response.

    ``encode_prompt(text) -> ids`` renders the prompt (chat template or plain); responses are cut to fit
    ``max_len`` tokens in all."""
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    out, dropped = [], 0
    for p in pairs:
        prompt = encode_prompt(p.prompt)
        room = max_len - len(prompt)
        if room < 1:
            dropped += 1
            continue
        chosen, rejected = (tokenizer.encode(r, add_special_tokens=False) + eos for r in (p.chosen, p.rejected))
        out.append(TokenPair(prompt, chosen[:room], rejected[:room]))
    if dropped and out:  # none left is the caller's error to raise
        warnings.warn(f"dropped {dropped} of {len(pairs)} preference pairs whose prompt leaves no room for a response "
                      f"within max_len={max_len} tokens", stacklevel=2)
    return out, dropped


def show_pair(data: str | Path, model: str | None, chat: bool | None, max_len: int | None, limit: int | None = None,
              *, color: bool = False) -> str:
    """The first preference pair of ``data`` as ``rlhf dpo`` would score it: each response after the prompt, the
    prompt tokens (no log-prob counted) marked as ``data/sft.mark_untrained`` does, and how many pairs there are.
    Reads ``model``'s config and tokenizer and the whole file; builds no model, writes nothing."""
    from lmforge.data.sft import mark_untrained
    from lmforge.lm import LM, read_checkpoint

    pairs = load_preference_pairs(data, limit)
    ckpt = read_checkpoint(model)
    tok = ckpt.tokenizer
    encoder = LM(None, tok, str(model))  # type: ignore[arg-type]  # encode() reads the tokenizer only
    max_len = max_len or min(512, ckpt.config.max_seq_len)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the count is in the header
        items, dropped = tokenize_pairs(pairs, lambda p: encoder.encode(p, chat), tok, max_len)
    if not items:
        raise LmforgeError(f"{data}: every prompt is longer than max_len={max_len} tokens")
    first = items[0]
    kept = next(p for p in pairs if len(encoder.encode(p.prompt, chat)) < max_len)
    out = [f"pair 1 of {len(items)} ({kept.where}; max_len={max_len}"
           f"{f', {dropped} dropped as too long' if dropped else ''}); the prompt's {len(first.prompt)} tokens "
           f"count no log-prob, shown {'dim' if color else 'in [[ ]]'}:"]
    for name, response in (("chosen", first.chosen), ("rejected", first.rejected)):
        ids = first.prompt + response
        out.append(f"{name} ({len(response)} response tokens scored):")
        out.append(mark_untrained(ids, [False] * len(first.prompt) + [True] * len(response), tok, color))
    return "\n".join(out) + "\n"


def collate(items: list[TokenPair], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-padded input ids (2B, T) and labels (2B, T): rows 0..B-1 chosen, B..2B-1 rejected; labels are
    ``IGNORE_INDEX`` on prompt and padding tokens."""
    seqs = [(it.prompt, it.chosen) for it in items] + [(it.prompt, it.rejected) for it in items]
    idx = pad_rows([p + r for p, r in seqs], pad_id)
    labels = pad_rows([[IGNORE_INDEX] * len(p) + r for p, r in seqs], IGNORE_INDEX)
    return idx, labels


def response_logprobs(model: nn.Module, idx: Tensor, labels: Tensor) -> Tensor:
    """Summed log p(response) per row: idx, labels (N, T) right-padded -> (N,). Equals
    ``token_logprobs(model(idx)[:, :-1], labels[:, 1:]).sum(-1)`` but runs the LM head only on response tokens."""
    h = model.hidden_states(idx)[:, :-1]  # (N, T-1, C); right padding never affects earlier tokens
    return labelled_logprobs(h, model.lm_head, labels[:, 1:]).sum(-1)


@torch.no_grad()
def reference_logprobs(policy: nn.Module, ref_model: nn.Module | None, idx: Tensor, labels: Tensor) -> Tensor:
    """(N,) response log-probs under the reference: ``ref_model``, or (None) the policy with LoRA off."""
    if ref_model is not None:
        return response_logprobs(ref_model, idx, labels)
    set_lora_enabled(policy, False)
    try:
        return response_logprobs(policy, idx, labels)
    finally:
        set_lora_enabled(policy, True)


def precompute_reference(policy: nn.Module, ref_model: nn.Module | None, items: list[TokenPair], pad_id: int,
                         batch_size: int = 8) -> Tensor:
    """Reference log-probs of every pair, computed once: (n_pairs, 2) = (chosen, rejected)."""
    device = next(policy.parameters()).device
    out = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        idx, labels = collate(chunk, pad_id)
        ref = reference_logprobs(policy, ref_model, idx.to(device), labels.to(device))  # (2b,)
        out.append(torch.stack([ref[:len(chunk)], ref[len(chunk):]], dim=1))  # (b, 2)
    return torch.cat(out)


def preference_loss(name: str, beta: float, label_smoothing: float = 0.0) -> PreferenceLoss:
    """``loss(pol_chosen, pol_rejected, ref_chosen, ref_rejected)`` for ``name``: DPO with ``beta`` and label
    smoothing, or IPO with tau = ``beta``."""
    from lmforge.training.loop import check_finite_number

    if name not in LOSSES:
        raise LmforgeError(f"unknown preference loss {name!r}; choose one of: {', '.join(LOSSES)}")
    check_finite_number(beta, "beta")
    check_finite_number(label_smoothing, "label_smoothing")
    if name == "ipo" and label_smoothing:
        raise LmforgeError("label smoothing applies to the DPO loss only, not IPO")
    if name == "ipo":
        return partial(ipo_loss, tau=beta)
    return partial(dpo_loss, beta=beta, label_smoothing=label_smoothing)


class DPOTrainer:
    """Optimises the policy on batches of pairs with the DPO or IPO loss against a frozen reference.

    ``ref_model=None``: the reference is the policy with its LoRA adapters off. With ``ref_table`` (from
    ``precompute_reference``) no reference forward runs during training. ``optimizer`` is needed by ``step``
    only: the ``dpo`` recipe trains through the training loop with ``loss_and_metrics`` as its step function.
    """

    def __init__(self, policy: nn.Module, optimizer: torch.optim.Optimizer | None, *, loss: str = "dpo",
                 beta: float = 0.1,
                 label_smoothing: float = 0.0, ref_model: nn.Module | None = None, ref_table: Tensor | None = None,
                 pad_id: int = 0):
        self.loss_fn = preference_loss(loss, beta, label_smoothing)
        self.policy, self.optimizer, self.beta = policy, optimizer, beta
        self.ref_model, self.ref_table = ref_model, ref_table
        self.pad_id = pad_id

    def loss_and_metrics(self, items: list[TokenPair], indices: list[int]) -> tuple[Tensor, dict[str, float]]:
        """The batch loss and its figures: implicit rewards beta * (log pi - log ref) of chosen and rejected,
        their margin, and the share of pairs where chosen out-scores rejected (reward accuracy)."""
        device = next(self.policy.parameters()).device
        idx, labels = (t.to(device) for t in collate(items, self.pad_id))
        B = len(items)
        pol = response_logprobs(self.policy, idx, labels)  # (2B,)
        if self.ref_table is not None:
            ref = self.ref_table[indices].to(device).T.reshape(-1)  # (2B,): chosen rows, then rejected rows
        else:
            ref = reference_logprobs(self.policy, self.ref_model, idx, labels)
        loss = self.loss_fn(pol[:B], pol[B:], ref[:B], ref[B:])
        with torch.no_grad():
            r_chosen, r_rejected = self.beta * (pol[:B] - ref[:B]), self.beta * (pol[B:] - ref[B:])
            metrics = {"loss": float(loss), "reward_chosen": float(r_chosen.mean()),
                       "reward_rejected": float(r_rejected.mean()),
                       "reward_margin": float((r_chosen - r_rejected).mean()),
                       "reward_accuracy": float((r_chosen > r_rejected).float().mean())}
        return loss, metrics

    @torch.no_grad()
    def evaluate(self, items: list[TokenPair], batch_size: int = 8) -> dict[str, float]:
        """The pair-weighted mean of ``loss_and_metrics`` over held-out pairs (reference computed on the fly),
        as ``eval_loss``, ``eval_reward_accuracy``..."""
        self.policy.eval()
        sums: dict[str, float] = {}
        table, self.ref_table = self.ref_table, None  # the table covers the training pairs only
        try:
            for start in range(0, len(items), batch_size):
                chunk = items[start:start + batch_size]
                _, metrics = self.loss_and_metrics(chunk, [])
                for key, value in metrics.items():
                    sums[key] = sums.get(key, 0.0) + value * len(chunk)
        finally:
            self.ref_table = table
        return {f"eval_{key}": value / len(items) for key, value in sums.items()}

    def step(self, items: list[TokenPair], indices: list[int], max_grad_norm: float = 1.0,
             step: int | None = None) -> dict[str, float]:
        """One optimiser step on a batch of pairs (``optimizer_step`` of the training loop); returns its figures
        (before the update). A NaN or infinite loss or gradient norm raises ``LmforgeError`` (naming ``step``)
        before the update."""
        from lmforge.training.loop import check_finite_value, optimizer_step

        if self.optimizer is None:
            raise LmforgeError("DPOTrainer.step needs the optimizer it was built without")
        where = step if step is not None else "this"
        self.policy.train()
        loss, metrics = self.loss_and_metrics(items, indices)
        check_finite_value(loss, "DPO loss", where, DPO_HINT)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        grad_norm = optimizer_step(params, self.optimizer, max_grad_norm, where, DPO_HINT)
        if max_grad_norm > 0:
            metrics["grad_norm"] = grad_norm
        return metrics
