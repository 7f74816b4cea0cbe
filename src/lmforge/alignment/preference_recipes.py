"""The reference-free and unpaired preference recipes: ``lmforge rlhf orpo``, ``rlhf simpo`` and ``rlhf kto``.

Owns their configs (``ORPOConfig``, ``SimPOConfig``, ``KTOConfig``: the data and schedule settings of
``PreferenceOptions`` plus each loss's own), KTO's example files, the step functions (``PairLossTrainer`` for
ORPO/SimPO, ``KTOTrainer``) and the recipes, which hand them to the one training loop (``training/loop.py``
``train``: checkpoints, exact ``--resume``, finite checks, ``--nproc``). The losses are the pure functions of
``alignment/preference.py``; pairs are read and tokenised as for DPO (``alignment/dpo.py``); the policy is loaded
as for DPO (``rlhf.load_policy``: LoRA by default, or every weight).

- ORPO and SimPO need no reference model: none is loaded (``--ref`` is refused), and with ``--method full`` no
  frozen copy is made. Their figures: ``reward_chosen``/``reward_rejected`` = beta (SimPO) or 1 (ORPO) times the
  length-normalised response log-prob, ``reward_margin`` (chosen - rejected), ``reward_accuracy`` (the share of
  pairs where chosen out-scores rejected); ORPO also logs ``nll`` and ``log_odds_ratio``.
- KTO trains on single examples judged desirable or undesirable, against a reference (the base with LoRA off,
  a frozen copy, or ``--ref``). Its data is either the pairs of DPO (each pair gives its chosen response as a
  desirable example and its rejected one as an undesirable example) or an *unpaired* file: records
  ``{"prompt": ..., "completion": ..., "desirable": true|false}`` (``label`` is accepted for ``desirable``, as
  TRL names it). The file needs both kinds. Its figures: ``kl`` (the reference point z0 of the batch),
  ``reward_desirable``/``reward_undesirable`` (mean beta * (log pi - log ref) of each kind; 0 when a batch has
  none) and ``reward_margin`` (their difference). The reference point is estimated per batch from prompt i
  paired with completion i+1 (the paper's mismatched pairs); a batch of one example has no mismatched pair and
  uses z0 = 0. Under torchrun the pairs are formed within each rank's share of the batch and their mean is taken
  over all ranks (one z0 for the global batch, as the paper's batch estimate); held-out evaluation (rank 0
  alone) estimates it per evaluation batch.

``eval_fraction`` holds out a seeded share (of pairs; of KTO records, a pair staying whole) and logs the same
figures as ``eval_*`` before training, every ``eval_every`` steps and at the end.

The module imports torch only inside its functions (the command line reads the config classes).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from lmforge.alignment.rlhf import _RUN, PolicyOptions, load_policy, lora_args, report_trainable, run_config
from lmforge.errors import LmforgeError
from lmforge.outputs import claims_output
from lmforge.recipe_config import option, write_config
from lmforge.training.scale import ScaleOut
from lmforge.training.tracking import Tracking

if TYPE_CHECKING:
    from torch import Tensor, nn

_DATA, _LOSS = "data", "preference loss"
PREFERENCE_HINT = "the weights are left as they were; lower --lr or check --beta"


# ----------------------------------------------------------------------------- the recipe configs
@dataclass
class PreferenceOptions(PolicyOptions, ScaleOut, Tracking):
    """The data, schedule and output settings ``ORPOConfig``, ``SimPOConfig`` and ``KTOConfig`` share."""

    data: Path | None = option(None, group=_DATA)
    """Preference pairs (prompt/chosen/rejected, or HH-RLHF dialogues), as for rlhf dpo; for kto also unpaired
    prompt/completion/desirable records: .jsonl, .json or .csv, optionally gzipped, or .parquet (required)."""
    limit: int | None = option(None, min=1, group=_DATA)
    """Use only the first N records (none: all)."""
    eval_fraction: float = option(0.0, min=0.0, max=1.0, group=_DATA)
    """Hold out this share of the records (seeded) and report their loss and reward margin before training,
    every --eval-every steps and at the end; 0 = none."""
    eval_every: int = option(0, min=0, group=_DATA)
    """Steps between held-out evaluations; 0 = only before and after."""
    max_len: int | None = option(None, min=1, group=_DATA)
    """Tokens per prompt + response; longer responses are cut, records whose prompt fills it dropped (none: 512
    or the context window)."""
    batch_size: int = option(4, min=1, group=_LOSS)
    """Pairs (kto: examples) per step."""
    steps: int | None = option(None, min=1, group=_LOSS)
    """Optimiser steps (none: --epochs, else one epoch)."""
    epochs: float | None = option(None, positive=True, group=_LOSS)
    """Passes over the data (instead of --steps)."""
    warmup: int = option(0, min=0, group=_LOSS)
    """Linear warmup steps."""
    save_every: int = option(0, min=0, group=_RUN)
    """Write OUT_DIR/checkpoint (policy, optimiser, data order) atomically every N steps and at the end;
    0 = never."""
    out_dir: Path = option(Path("runs/preference"), flags=("-o", "--out-dir"), group=_RUN)
    """Output folder: metrics.jsonl, config.yaml and final/ (the adapter or model)."""

    uses_reference: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.data is None:
            raise LmforgeError("data (--data): no preference data given (--data FILE)")
        if self.steps is not None and self.epochs is not None:
            raise LmforgeError("give either steps (--steps) or epochs (--epochs), not both")
        if not self.uses_reference and self.ref is not None:
            raise LmforgeError(f"ref (--ref): {self.recipe} uses no reference model; leave --ref out")


@dataclass
class ORPOConfig(PreferenceOptions):
    """Everything ``lmforge rlhf orpo`` needs (Hong et al. 2024): NLL on the chosen response plus an odds-ratio
    preference term; no reference model. Defaults < ``--config FILE.yaml`` < flags."""

    recipe: ClassVar[str] = "rlhf orpo"
    uses_reference: ClassVar[bool] = False

    lam: float = option(0.1, positive=True, group=_LOSS)
    """Lambda: the weight of the odds-ratio term against the chosen response's NLL (TRL calls it beta)."""
    out_dir: Path = option(Path("runs/orpo"), flags=("-o", "--out-dir"), group=_RUN)
    """Output folder: metrics.jsonl, config.yaml and final/ (the adapter or model)."""


@dataclass
class SimPOConfig(PreferenceOptions):
    """Everything ``lmforge rlhf simpo`` needs (Meng et al. 2024): a margin loss on length-normalised
    log-probs; no reference model. Defaults < ``--config FILE.yaml`` < flags."""

    recipe: ClassVar[str] = "rlhf simpo"
    uses_reference: ClassVar[bool] = False

    beta: float = option(2.0, positive=True, group=_LOSS)
    """Beta: the scale of the length-normalised log-prob reward."""
    gamma: float = option(1.0, min=0.0, group=_LOSS)
    """Gamma: the target reward margin (the paper tunes gamma / beta in 0.3-0.8)."""
    out_dir: Path = option(Path("runs/simpo"), flags=("-o", "--out-dir"), group=_RUN)
    """Output folder: metrics.jsonl, config.yaml and final/ (the adapter or model)."""


@dataclass
class KTOConfig(PreferenceOptions):
    """Everything ``lmforge rlhf kto`` needs (Ethayarajh et al. 2024): desirable/undesirable examples (pairs or
    unpaired records) against a frozen reference. Defaults < ``--config FILE.yaml`` < flags."""

    recipe: ClassVar[str] = "rlhf kto"

    beta: float = option(0.1, positive=True, group=_LOSS)
    """Beta: the scale of the implicit reward log pi - log ref."""
    desirable_weight: float = option(1.0, positive=True, group=_LOSS)
    """Lambda_D, the weight of desirable examples (the paper keeps lambda_D n_D / (lambda_U n_U) in [1, 4/3])."""
    undesirable_weight: float = option(1.0, positive=True, group=_LOSS)
    """Lambda_U, the weight of undesirable examples."""
    out_dir: Path = option(Path("runs/kto"), flags=("-o", "--out-dir"), group=_RUN)
    """Output folder: metrics.jsonl, config.yaml and final/ (the adapter or model)."""


# ----------------------------------------------------------------------------- KTO's examples
@dataclass
class Example:
    """One KTO example: a prompt, a completion, whether it is desirable, and where it came from."""

    prompt: str
    completion: str
    desirable: bool
    where: str


@dataclass
class TokenExample:
    """A KTO example as token ids (the completion ends with EOS when there is one)."""

    prompt: list[int]
    completion: list[int]
    desirable: bool


def load_kto_examples(path: str | Path, limit: int | None = None) -> list[list[Example]]:
    """KTO examples in groups that are held out together: a preference pair gives [chosen (desirable),
    rejected (undesirable)], an unpaired record one example. The first record decides the layout (a
    ``completion`` field: unpaired). Errors name the file and line; a file without desirable or without
    undesirable examples is refused."""
    from lmforge.alignment.dpo import load_preference_pairs
    from lmforge.data.records import load_records

    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"KTO data file {path} does not exist")
    records = load_records(path)
    if not records:
        raise LmforgeError(f"{path}: no records")
    if "completion" not in records[0].fields:
        groups = [[Example(p.prompt, p.chosen, True, p.where), Example(p.prompt, p.rejected, False, p.where)]
                  for p in load_preference_pairs(path, limit)]
    else:
        groups = []
        for record in records[:limit]:
            rec, where = record.fields, record.where
            for key in ("prompt", "completion"):
                if not isinstance(rec.get(key), str):
                    raise LmforgeError(f"{where}: no string {key!r} field (an unpaired KTO record needs prompt, "
                                       "completion and desirable: true/false)")
            label = rec.get("desirable", rec.get("label"))
            if not isinstance(label, bool):
                raise LmforgeError(f"{where}: 'desirable' must be true or false, got "
                                   f"{'nothing' if label is None else repr(label)} (an unpaired KTO record needs "
                                   "prompt, completion and desirable)")
            groups.append([Example(rec["prompt"], rec["completion"], label, where)])
    check_both_kinds([e.desirable for g in groups for e in g], str(path))
    return groups


def check_both_kinds(flags: list[bool], where: str) -> None:
    """KTO needs desirable and undesirable examples: name the missing kind."""
    for kind, wanted in (("desirable", True), ("undesirable", False)):
        if wanted not in flags:
            raise LmforgeError(f"{where}: no {kind} examples among {len(flags)}; KTO needs both desirable and "
                               "undesirable examples")


def tokenize_examples(examples: list[Example], encode_prompt, tokenizer, max_len: int) -> tuple[list[TokenExample],
                                                                                                 int]:
    """Token examples, and how many were dropped because their prompt leaves no room for a completion."""
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    out, dropped = [], 0
    for e in examples:
        prompt = encode_prompt(e.prompt)
        room = max_len - len(prompt)
        if room < 1:
            dropped += 1
            continue
        out.append(TokenExample(prompt, (tokenizer.encode(e.completion, add_special_tokens=False) + eos)[:room],
                                e.desirable))
    return out, dropped


# ----------------------------------------------------------------------------- the step functions
def _sequences(rows: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-padded ids and labels (``IGNORE_INDEX`` on prompt and padding) of (prompt, response) rows."""
    from lmforge.data.tokens import IGNORE_INDEX, pad_rows

    return (pad_rows([p + r for p, r in rows], pad_id),
            pad_rows([[IGNORE_INDEX] * len(p) + r for p, r in rows], IGNORE_INDEX))


def _weighted_mean(batches: list[tuple[int, dict[str, float]]]) -> dict[str, float]:
    total = sum(n for n, _ in batches)
    return {f"eval_{k}": sum(n * m[k] for n, m in batches) / total for k in batches[0][1]}


class PairLossTrainer:
    """ORPO or SimPO on token pairs (``dpo.TokenPair``): the step function and the held-out evaluation."""

    def __init__(self, policy: nn.Module, loss: str, *, lam: float = 0.1, beta: float = 2.0, gamma: float = 1.0,
                 pad_id: int = 0):
        if loss not in ("orpo", "simpo"):
            raise LmforgeError(f"unknown reference-free loss {loss!r}; choose orpo or simpo")
        self.policy, self.loss, self.lam, self.beta, self.gamma, self.pad_id = policy, loss, lam, beta, gamma, pad_id

    def loss_and_metrics(self, items: list) -> tuple[Tensor, dict[str, float]]:
        """The batch loss and its figures (the module docstring)."""
        import torch

        from lmforge.alignment.dpo import collate, response_logprobs
        from lmforge.alignment.preference import mean_logprob, orpo_log_odds_ratio, orpo_loss, simpo_loss
        from lmforge.data.tokens import IGNORE_INDEX

        device = next(self.policy.parameters()).device
        idx, labels = (t.to(device) for t in collate(items, self.pad_id))
        B = len(items)
        logp = response_logprobs(self.policy, idx, labels)  # (2B,) chosen rows, then rejected rows
        lengths = (labels[:, 1:] != IGNORE_INDEX).sum(-1)
        args = (logp[:B], logp[B:], lengths[:B], lengths[B:])
        loss = orpo_loss(*args, lam=self.lam) if self.loss == "orpo" else simpo_loss(*args, beta=self.beta,
                                                                                      gamma=self.gamma)
        with torch.no_grad():
            mean = mean_logprob(logp, lengths)
            scale = self.beta if self.loss == "simpo" else 1.0
            chosen, rejected = scale * mean[:B], scale * mean[B:]
            metrics = {"reward_chosen": float(chosen.mean()), "reward_rejected": float(rejected.mean()),
                       "reward_margin": float((chosen - rejected).mean()),
                       "reward_accuracy": float((chosen > rejected).float().mean())}
            if self.loss == "orpo":
                metrics["nll"] = float(-mean[:B].mean())
                metrics["log_odds_ratio"] = float(orpo_log_odds_ratio(mean[:B], mean[B:]).mean())
        return loss, {"loss": float(loss.detach()), **metrics}

    def evaluate(self, items: list, batch_size: int = 8) -> dict[str, float]:
        """The pair-weighted mean of ``loss_and_metrics`` over held-out pairs, as ``eval_*``."""
        return _weighted_mean([(len(items[s:s + batch_size]), self.loss_and_metrics(items[s:s + batch_size])[1])
                               for s in range(0, len(items), batch_size)])


def _sum_over_ranks():
    """An in-place sum over the data-parallel ranks under torchrun; None in one process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.all_reduce
    return None


class KTOTrainer:
    """KTO on token examples (``TokenExample``) against a frozen reference (``ref_model``; None: the policy with
    its LoRA adapters off): the step function and the held-out evaluation."""

    def __init__(self, policy: nn.Module, *, ref_model: nn.Module | None = None, beta: float = 0.1,
                 desirable_weight: float = 1.0, undesirable_weight: float = 1.0, max_len: int = 512, pad_id: int = 0):
        self.policy, self.ref_model, self.beta = policy, ref_model, beta
        self.weights = (desirable_weight, undesirable_weight)
        self.max_len, self.pad_id = max_len, pad_id

    def _rewards(self, items: list[TokenExample]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(policy log-probs (B,), reference log-probs (B,), desirable (B,), z0) of a batch."""
        import torch

        from lmforge.alignment.dpo import reference_logprobs, response_logprobs
        from lmforge.alignment.preference import kto_reference_point

        device = next(self.policy.parameters()).device
        B = len(items)
        matched = [(it.prompt, it.completion) for it in items]
        # the paper's mismatched pairs: prompt i with completion i+1, cut to fit max_len
        mismatched = [(it.prompt, items[(i + 1) % B].completion[:self.max_len - len(it.prompt)])
                      for i, it in enumerate(items)] if B > 1 else []
        idx, labels = (t.to(device) for t in _sequences(matched + mismatched, self.pad_id))
        reduce = _sum_over_ranks() if torch.is_grad_enabled() else None  # training steps run on every rank
        policy = response_logprobs(self.policy, idx[:B], labels[:B])
        ref = reference_logprobs(self.policy, self.ref_model, idx, labels)  # (B or 2B,), no gradient
        with torch.no_grad():
            z0 = kto_reference_point(response_logprobs(self.policy, idx[B:], labels[B:]) if mismatched
                                     else policy.new_zeros(0), ref[B:], reduce)
        desirable = torch.tensor([it.desirable for it in items], device=device)
        return policy, ref[:B], desirable, z0

    def loss_and_metrics(self, items: list[TokenExample]) -> tuple[Tensor, dict[str, float]]:
        """The batch loss and its figures (the module docstring)."""
        import torch

        from lmforge.alignment.preference import kto_loss

        policy, ref, desirable, z0 = self._rewards(items)
        loss = kto_loss(policy, ref, desirable, z0, self.beta, *self.weights)
        with torch.no_grad():
            r = self.beta * (policy - ref)
            good = float(r[desirable].mean()) if desirable.any() else 0.0
            bad = float(r[~desirable].mean()) if (~desirable).any() else 0.0
        return loss, {"loss": float(loss.detach()), "kl": float(z0), "reward_desirable": good,
                      "reward_undesirable": bad, "reward_margin": good - bad}

    def evaluate(self, items: list[TokenExample], batch_size: int = 8) -> dict[str, float]:
        """Held-out figures as ``eval_*``: loss and kl weighted by batch size, the rewards over all examples."""
        import torch

        from lmforge.alignment.preference import kto_loss

        batches, rewards, flags = [], [], []
        for s in range(0, len(items), batch_size):
            chunk = items[s:s + batch_size]
            policy, ref, desirable, z0 = self._rewards(chunk)
            batches.append((len(chunk), {"loss": float(kto_loss(policy, ref, desirable, z0, self.beta,
                                                                *self.weights)), "kl": float(z0)}))
            rewards.append(self.beta * (policy - ref))
            flags.append(desirable)
        out = _weighted_mean(batches)
        r, d = torch.cat(rewards), torch.cat(flags)
        good = float(r[d].mean()) if d.any() else 0.0
        bad = float(r[~d].mean()) if (~d).any() else 0.0
        return {**out, "eval_reward_desirable": good, "eval_reward_undesirable": bad,
                "eval_reward_margin": good - bad}


# ----------------------------------------------------------------------------- the recipes
def _train(cfg: PreferenceOptions, method: str, *, resume: bool, progress: bool) -> dict[str, Any]:
    """Load, tokenise, split, then run the training loop with ``method``'s step function."""
    import math
    import warnings

    from lmforge.training.loop import RunDir, TrainConfig, seed_everything, train
    from lmforge.training.sources import ShuffledIndices

    c = cfg
    if method == "kto":
        groups: list = load_kto_examples(c.data, c.limit)
    else:
        from lmforge.alignment.dpo import load_preference_pairs

        groups = [[p] for p in load_preference_pairs(c.data, c.limit)]
    unit = "examples" if method == "kto" else "pairs"
    n_records = sum(len(g) for g in groups)
    if c.steps is None and c.epochs is not None and c.epochs * n_records < 1:
        raise LmforgeError(f"epochs (--epochs): {c.epochs:g} passes over {n_records} {unit} is less than one; "
                           "give a larger --epochs, or --steps N for a short run")
    seed_everything(c.seed)
    lm, reference = load_policy(c.model, adapter=c.adapter, method=c.method, ref=c.ref, device=c.device,
                                lora=lora_args(c), seed=c.seed, with_reference=c.uses_reference)
    tok = lm.tokenizer
    max_len = c.max_len or min(512, lm.config.max_seq_len)
    held_groups: list = []
    if c.eval_fraction:
        from lmforge.data.reward_data import random_split

        train_idx, held_idx = random_split(len(groups), c.eval_fraction, c.seed)
        groups, held_groups = [groups[i] for i in train_idx], [groups[i] for i in held_idx]

    def tokenize(gs: list) -> tuple[list, int]:
        flat = [x for g in gs for x in g]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # counted below
            if method == "kto":
                return tokenize_examples(flat, lambda p: lm.encode(p, c.chat), tok, max_len)
            from lmforge.alignment.dpo import tokenize_pairs

            return tokenize_pairs(flat, lambda p: lm.encode(p, c.chat), tok, max_len)

    items, dropped = tokenize(groups)
    held, held_dropped = tokenize(held_groups)
    dropped += held_dropped
    if not items:
        raise LmforgeError(f"{c.data}: no training {unit} left: every prompt is longer than max_len={max_len} "
                           "tokens" + (" or all were held out" if held_groups else ""))
    if dropped:
        warnings.warn(f"dropped {dropped} {unit} whose prompt leaves no room for a response within "
                      f"max_len={max_len} tokens", stacklevel=2)
    if method == "kto":
        check_both_kinds([it.desirable for it in items], f"{c.data} (the training share)")
    write_config(cfg, c.out_dir)  # once the data has loaded: what reruns this run
    report_trainable(lm.model, c.method)
    pad = tok.pad_id if tok.pad_id is not None else (tok.eos_id if tok.eos_id is not None else 0)
    steps = c.steps if c.steps is not None else max(1, math.ceil((c.epochs or 1.0) * len(items) / c.batch_size))
    train_cfg = TrainConfig(steps=steps, lr=c.learning_rate, warmup_steps=c.warmup, weight_decay=0.0,
                            betas=(0.9, 0.999), precision=c.precision, eval_every=c.eval_every,
                            eval_at_start=bool(held), save_every=c.save_every, log_every=1, seed=c.seed,
                            **c.train_kwargs())
    trainer: PairLossTrainer | KTOTrainer
    if isinstance(c, KTOConfig):
        trainer = KTOTrainer(lm.model, ref_model=reference, beta=c.beta, desirable_weight=c.desirable_weight,
                             undesirable_weight=c.undesirable_weight, max_len=max_len, pad_id=pad)
    else:
        trainer = PairLossTrainer(lm.model, method, lam=getattr(c, "lam", 0.1), beta=getattr(c, "beta", 2.0),
                                  gamma=getattr(c, "gamma", 1.0), pad_id=pad)
    run = RunDir(c.out_dir, {**run_config(cfg, method), unit: len(items), "dropped": dropped}, resume=resume,
                 tokenizer=tok, loggers=c.logger)

    def step_fn(policy: nn.Module, rows: list[int]) -> tuple[Tensor, dict[str, float]]:
        return trainer.loss_and_metrics([items[i] for i in rows])

    def tokens(rows: list[int]) -> int:
        if method == "kto":
            return sum(len(items[i].prompt) + len(items[i].completion) for i in rows)
        return sum(2 * len(items[i].prompt) + len(items[i].chosen) + len(items[i].rejected) for i in rows)

    result = train(lm.model, step_fn, ShuffledIndices(len(items), c.batch_size, c.seed), train_cfg, run,
                   eval_fn=(lambda policy: trainer.evaluate(held)) if held else None, tokens_per_batch=tokens,
                   desc=method, loss_name=f"{method.upper()} loss", hint=PREFERENCE_HINT, progress=progress)
    return {**result, "step": steps, unit: len(items), "held_out": len(held), "dropped": dropped,
            "out_dir": str(run.path / "final")}


@claims_output("rlhf orpo", inputs=("model", "adapter"), config="cfg")
def orpo(cfg: ORPOConfig, *, resume: bool = False, overwrite: bool = False, force: bool = False,
         progress: bool = True) -> dict[str, Any]:
    """Train ``cfg.model`` with ORPO on the preference pairs ``cfg.data`` (no reference model); schedule,
    held-out evaluation, checkpoints and ``resume``/``overwrite``/``force``/``progress`` as ``rlhf.dpo``."""
    return _train(cfg, "orpo", resume=resume, progress=progress)


@claims_output("rlhf simpo", inputs=("model", "adapter"), config="cfg")
def simpo(cfg: SimPOConfig, *, resume: bool = False, overwrite: bool = False, force: bool = False,
          progress: bool = True) -> dict[str, Any]:
    """Train ``cfg.model`` with SimPO on the preference pairs ``cfg.data`` (no reference model); otherwise as
    ``orpo``."""
    return _train(cfg, "simpo", resume=resume, progress=progress)


@claims_output("rlhf kto", inputs=("model", "adapter", "ref"), config="cfg")
def kto(cfg: KTOConfig, *, resume: bool = False, overwrite: bool = False, force: bool = False,
        progress: bool = True) -> dict[str, Any]:
    """Train ``cfg.model`` with KTO on ``cfg.data`` (pairs, or unpaired desirable/undesirable records) against
    a frozen reference; otherwise as ``orpo``."""
    return _train(cfg, "kto", resume=resume, progress=progress)


RECIPES = {"orpo": (ORPOConfig, orpo), "simpo": (SimPOConfig, simpo), "kto": (KTOConfig, kto)}
