"""The alignment recipes: ``ppo`` (RLHF's RL step against a reward) and ``dpo`` (DPO / IPO on preference pairs).

Each takes its recipe config (``PPOConfig`` / ``DPOConfig``: one field per setting, a docstring each, the flags
of ``lmforge rlhf ppo`` / ``rlhf dpo`` derived from them), builds the policy (LoRA by default, or every weight),
its frozen reference (the base with the adapters off, a frozen copy, or a separate ``ref`` model of the same
architecture), runs the trainer of ``ppo.py`` / ``dpo.py`` (DPO through the training loop, ``training/loop.py``;
PPO's rollout/epoch step through its ``optimizer_step``), keeps ``OUT_DIR/metrics.jsonl``, ``OUT_DIR/config.yaml``
(the resolved recipe: ``--config`` reruns it) and the checkpoints in a ``training/run.py`` ``RunDir``, and saves
``OUT_DIR/final``: a PEFT adapter (with the tokenizer) or a Hugging Face directory. New LoRA adapters are
initialised from ``seed``. A NaN or infinite hyper-parameter is refused when the config is built; a NaN or
infinite reward, KL, advantage, loss or gradient stops the run with an ``LmforgeError`` naming it and the step:
the last checkpoint is kept and no ``final`` is written (``RunDir.save_final`` refuses non-finite weights).
Both run data-parallel under ``torchrun`` (``--nproc N``): DPO through the loop, PPO as ``ppo.py`` describes.

The module imports torch only inside its functions, so that building the command line (which reads the
config classes) stays fast.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from lmforge.errors import LmforgeError
from lmforge.outputs import claims_output
from lmforge.recipe_config import TRAINING_SEED_MAX, option, validate, write_config
from lmforge.training.scale import ScaleOut
from lmforge.training.tracking import Tracking

if TYPE_CHECKING:
    import torch
    from torch import nn

METHODS = ("lora", "full")
DEFAULT_LR = {"lora": 1e-4, "full": 1e-6}
_POLICY, _LORA, _RUN = "policy and reference", "LoRA (as in lmforge finetune)", "optimisation and output"


# ----------------------------------------------------------------------------- the recipe configs
@dataclass
class PolicyOptions:
    """The policy, its reference and LoRA settings that ``PPOConfig`` and ``DPOConfig`` share."""

    model: str | None = option(None, flags=("-m", "--model"), group=_POLICY)
    """The policy's base: a model name or path (none: the embedded smollm2-135m-instruct)."""
    adapter: Path | None = option(None, group=_POLICY)
    """Continue training this PEFT LoRA adapter (with --method lora); the reference stays the base without it:
    to use an SFT adapter as the reference, `lmforge merge` it and pass the merged model as --model."""
    method: Literal["lora", "full"] = option("lora", group=_POLICY)
    """lora: train low-rank adapters, the reference is the base with them switched off (no second copy); full:
    train every weight against a frozen copy."""
    ref: str | None = option(None, group=_POLICY)
    """A separate reference model (same architecture as the policy; none: the base with LoRA off, or a frozen
    copy for --method full)."""
    template: Literal["auto", "chat", "plain"] = option("auto", group=_POLICY)
    """Render prompts with the model's chat template or as plain text (auto: chat when the tokenizer has a
    template)."""
    lora_r: int = option(16, min=1, group=_LORA)
    """LoRA rank."""
    lora_alpha: float = option(32.0, positive=True, group=_LORA)
    """LoRA alpha; the update is scaled by alpha/r."""
    lora_dropout: float = option(0.0, min=0.0, max=0.99, group=_LORA)
    """Dropout on the LoRA input."""
    lora_targets: str = option("q_proj,k_proj,v_proj,o_proj", group=_LORA)
    """Comma-separated layer names, 'all-linear', or a regex over full names."""
    rslora: bool = option(False, group=_LORA)
    """Scale by alpha/sqrt(r) (rank-stabilised LoRA)."""
    lr: float | None = option(None, positive=True, group=_RUN)
    """Learning rate (none: 1e-4 LoRA, 1e-6 full)."""
    precision: Literal["fp32", "bf16"] = option("fp32", group=_RUN)
    """fp32, or bf16 autocast."""
    seed: int = option(0, min=0, max=TRAINING_SEED_MAX, group=_RUN)
    """Seed for sampling, shuffling and init, in [0, 2**32)."""
    device: str = option("cpu", group=_RUN)
    """cpu, cuda, ..."""

    def __post_init__(self) -> None:
        validate(self)
        if self.adapter is not None and self.method != "lora":
            raise LmforgeError("--adapter continues training a LoRA adapter: use it with --method lora")

    @property
    def chat(self) -> bool | None:
        """``template`` as ``LM.encode``'s ``chat`` argument (None = auto)."""
        return {"auto": None, "chat": True, "plain": False}[self.template]

    @property
    def learning_rate(self) -> float:
        """``lr``, or the method's default."""
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]


@dataclass
class PPOConfig(PolicyOptions, Tracking):
    """Everything ``lmforge rlhf ppo`` needs: prompts, reward, PPO and sampling settings, the policy, the output.

    Defaults < ``--config FILE.yaml`` < flags; ``--print-config`` prints the resolved YAML, and every run writes
    it to ``OUT_DIR/config.yaml``. (``alignment.ppo.PPOHyperparams``, the trainer's hyper-parameters, is built
    from this.)
    """

    recipe: ClassVar[str] = "rlhf ppo"

    prompts: Path | None = option(None, group="prompts and reward")
    """Prompts: a .txt file (one per line) or records (.jsonl, .json, .csv, optionally gzipped, or .parquet) with a
    prompt field (required)."""
    prompt_field: str = option("prompt", group="prompts and reward")
    """The prompt field of JSON records."""
    reward: str | None = option(None, group="prompts and reward")
    """A reward-model folder from `lmforge reward train` (higher = better; a toxicity classifier gives
    P(not toxic)), or package.module:function(prompts, completions) -> scores (required)."""
    reward_input: Literal["completion", "prompt+completion"] = option("completion", group="prompts and reward")
    """What the reward model reads: the completion alone (classifiers) or prompt + completion (pairwise models
    trained on whole dialogues)."""
    steps: int = option(20, min=1, group="PPO")
    """PPO steps."""
    batch_size: int = option(8, min=1, group="PPO")
    """Prompts (rollouts) per PPO step."""
    mini_batch_size: int = option(4, min=1, group="PPO")
    """Rollouts per optimiser step; must divide --batch-size."""
    ppo_epochs: int = option(4, min=1, group="PPO")
    """Passes over each rollout."""
    kl_coef: float = option(0.05, min=0.0, group="PPO")
    """Beta: the per-token KL penalty (the starting value with --target-kl)."""
    target_kl: float | None = option(None, positive=True, group="PPO")
    """Adapt beta towards this KL per sequence (Ziegler et al.'s controller; none: a fixed beta)."""
    horizon: int = option(10000, min=1, group="PPO")
    """The adaptive controller's horizon in samples."""
    gamma: float = option(1.0, min=0.0, max=1.0, group="PPO")
    """Discount."""
    lam: float = option(0.95, min=0.0, max=1.0, group="PPO")
    """GAE lambda."""
    clip_range: float = option(0.2, positive=True, group="PPO")
    """PPO ratio clip epsilon, also used for the value clip."""
    vf_coef: float = option(0.1, min=0.0, group="PPO")
    """Weight of the value loss."""
    warmup: int = option(0, min=0, group="PPO")
    """Linear warmup over this many PPO steps, then a cosine from --lr down to --lr * --min-lr-ratio at the last
    step (the schedule of training/optim.py)."""
    min_lr_ratio: float = option(1.0, min=0.0, max=1.0, group="PPO")
    """Where the cosine ends, as a share of --lr; 1 = a constant learning rate after the warmup."""
    max_new_tokens: int = option(32, min=1, flags=("-n", "--max-new-tokens"), group="sampling the rollouts")
    """Response length limit."""
    temperature: float = option(1.0, positive=True, flags=("-t", "--temperature"), group="sampling the rollouts")
    """Sampling temperature, > 0."""
    top_k: int | None = option(None, min=1, group="sampling the rollouts")
    """Sample from the k most likely tokens (none: all)."""
    top_p: float | None = option(None, positive=True, max=1.0, group="sampling the rollouts")
    """Nucleus sampling probability mass, in (0, 1] (none: off)."""
    save_every: int = option(0, min=0, group=_RUN)
    """Write OUT_DIR/checkpoint (policy, value head, optimiser, KL coefficient, prompt order) atomically every N
    steps and at the end; 0 = never."""
    out_dir: Path = option(Path("runs/ppo"), flags=("-o", "--out-dir"), group=_RUN)
    """Output folder: metrics.jsonl, config.yaml and final/ (the adapter or model)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.prompts is None:
            raise LmforgeError("prompts (--prompts): no prompts given (--prompts FILE)")
        if self.reward is None:
            raise LmforgeError("no reward given: --reward PATH (a reward-model folder) or --reward "
                               "package.module:function")
        if self.batch_size % self.mini_batch_size:
            raise LmforgeError(f"batch_size (--batch-size): PPO batch size {self.batch_size} is not divisible by "
                               f"the mini-batch size {self.mini_batch_size} (--mini-batch-size)")


@dataclass
class DPOConfig(PolicyOptions, ScaleOut, Tracking):
    """Everything ``lmforge rlhf dpo`` needs: the pairs, the preference loss, the policy, the schedule, the output.

    Defaults < ``--config FILE.yaml`` < flags; ``--print-config`` prints the resolved YAML, and every run writes
    it to ``OUT_DIR/config.yaml``.
    """

    recipe: ClassVar[str] = "rlhf dpo"

    data: Path | None = option(None, group="data")
    """Preference pairs: .jsonl, .json or .csv, optionally gzipped, or .parquet (required)."""
    limit: int | None = option(None, min=1, group="data")
    """Use only the first N pairs (none: all)."""
    eval_fraction: float = option(0.0, min=0.0, max=1.0, group="data")
    """Hold out this share of the pairs (seeded) and report their loss, implicit-reward margin and accuracy
    before training, every --eval-every steps and at the end; 0 = none."""
    eval_every: int = option(0, min=0, group="data")
    """Steps between held-out evaluations; 0 = only before and after."""
    max_len: int | None = option(None, min=1, group="data")
    """Tokens per prompt + response; longer responses are cut, pairs whose prompt fills it dropped (none: 512 or
    the context window)."""
    loss: Literal["dpo", "ipo"] = option("dpo", group="preference loss")
    """dpo (sigmoid) or ipo (squared)."""
    beta: float = option(0.1, positive=True, group="preference loss")
    """DPO beta (for IPO: tau)."""
    label_smoothing: float = option(0.0, min=0.0, max=0.49, group="preference loss")
    """Conservative DPO: the assumed share of flipped labels."""
    precompute_ref: bool = option(False, group="preference loss")
    """Compute the reference log-probs once before training (no reference forward per step)."""
    batch_size: int = option(4, min=1, group="preference loss")
    """Pairs per step."""
    steps: int | None = option(None, min=1, group="preference loss")
    """Optimiser steps (none: --epochs, else one epoch)."""
    epochs: float | None = option(None, positive=True, group="preference loss")
    """Passes over the pairs (instead of --steps)."""
    warmup: int = option(0, min=0, group="preference loss")
    """Linear warmup steps."""
    save_every: int = option(0, min=0, group=_RUN)
    """Write OUT_DIR/checkpoint (policy, optimiser, pair order) atomically every N steps and at the end;
    0 = never."""
    out_dir: Path = option(Path("runs/dpo"), flags=("-o", "--out-dir"), group=_RUN)
    """Output folder: metrics.jsonl, config.yaml and final/ (the adapter or model)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.data is None:
            raise LmforgeError("data (--data): no preference pairs given (--data FILE)")
        if self.steps is not None and self.epochs is not None:
            raise LmforgeError("give either steps (--steps) or epochs (--epochs), not both")


# ----------------------------------------------------------------------------- building blocks
def check_same_architecture(policy_config, ref_config, ref_name: str) -> None:
    """A separate reference must be the policy's architecture: name the fields that differ."""
    a, b = policy_config.to_dict(), ref_config.to_dict()
    diff = [k for k in sorted(set(a) | set(b)) if k != "name" and a.get(k) != b.get(k)]
    if diff:
        shown = ", ".join(f"{k}: policy {a.get(k)!r} vs reference {b.get(k)!r}" for k in diff[:6])
        raise LmforgeError(f"the reference model {ref_name} has a different architecture from the policy ({shown})")


def load_policy(model: str | None, *, adapter: str | None, method: str, ref: str | None, device: str,
                lora: dict[str, Any], seed: int | None = None, with_reference: bool = True):
    """(LM whose model is the trainable policy, frozen reference model or None = the policy with LoRA off).
    New LoRA adapters are initialised from ``seed``. ``with_reference=False`` (reference-free losses): no frozen
    copy is made for ``method="full"``."""
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
    elif method == "full" and with_reference:
        reference = copy.deepcopy(lm.model)
    if reference is not None:
        reference.requires_grad_(False).eval()
    return lm, reference


def report_trainable(model: nn.Module, method: str) -> None:
    from lmforge.peft.lora import trainable_report

    print(f"{method}: {trainable_report(model)}", file=sys.stderr)


# ----------------------------------------------------------------------------- the recipes
def lora_args(cfg: PolicyOptions) -> dict[str, Any]:
    """A recipe config's LoRA settings as ``apply_method`` keywords."""
    from lmforge.training.sft import parse_lora_targets

    return dict(lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                lora_targets=parse_lora_targets(cfg.lora_targets), rslora=cfg.rslora)


def policy_of(cfg: PolicyOptions):
    """``load_policy`` with a recipe config's model, adapter, method, reference, device, LoRA settings and seed."""
    return load_policy(cfg.model, adapter=cfg.adapter, method=cfg.method, ref=cfg.ref, device=cfg.device,
                       lora=lora_args(cfg), seed=cfg.seed)


def run_config(cfg: PolicyOptions, recipe: str) -> dict[str, Any]:
    """The config as plain JSON for the checkpoints (Paths as text)."""
    return {"recipe": recipe, **json.loads(json.dumps(dataclasses.asdict(cfg), default=str))}


@claims_output("rlhf ppo", inputs=("model", "adapter", "ref"), config="cfg")
def ppo(cfg: PPOConfig, *, resume: bool = False, overwrite: bool = False, force: bool = False,
        progress: bool = True) -> dict[str, Any]:
    """Optimise ``cfg.model`` (None: the embedded default) with PPO against ``cfg.reward`` on ``cfg.prompts``.

    Each of ``steps`` PPO steps samples ``batch_size`` prompts (shuffled, cycling), generates up to
    ``max_new_tokens`` with ``temperature``/``top_k``/``top_p``, scores them with the reward (a reward-model
    folder or a ``module:function``), shapes the reward with ``kl_coef`` * KL to the reference (adaptive
    towards ``target_kl`` when set) and runs ``ppo_epochs`` epochs of ``mini_batch_size`` minibatches.
    The learning rate of each PPO step (all its minibatch updates) follows ``training/optim.py``'s schedule:
    ``warmup`` steps of linear warmup, then a cosine to ``lr * min_lr_ratio`` (1: constant); it is logged as
    ``lr``. Every ``save_every`` steps (0: never) ``OUT_DIR/checkpoint`` is written atomically: policy, value
    head, optimiser, KL coefficient and prompt order. The resolved recipe is written to ``OUT_DIR/config.yaml``
    once the inputs have loaded.

    How a run starts is not part of the recipe: ``resume`` continues from ``OUT_DIR/checkpoint``, step for
    step as the uninterrupted run (rollouts and minibatches are seeded by the step); an ``out_dir`` that holds
    a run needs ``resume`` or ``overwrite``; one with other files needs ``force`` (``lmforge.outputs``).
    ``progress``: show a progress bar. Returns the last step's figures and where the policy was saved.

    Under ``torchrun`` (or ``lmforge rlhf ppo --nproc N``) the run is data-parallel: each rank generates and
    scores its ``batch_size / world`` prompts of every global batch, advantages are whitened over all ranks and
    gradients summed before each update (``ppo.py``'s module docstring), so N ranks log the steps of one
    process; ``batch_size`` must be a multiple of the world size. Only rank 0 writes; the checkpoint's prompt
    position is global.
    """
    from torch import nn

    from lmforge.alignment.ppo import PPOHyperparams, PPOTrainer, batch_not_divisible
    from lmforge.alignment.rl_inputs import load_prompts, load_reward, reward_vocab_check
    from lmforge.training.distributed import setup
    from lmforge.training.loop import RunDir, precision_autocast, progress_bar, seed_everything
    from lmforge.training.optim import lr_at, set_lr
    from lmforge.training.sources import ShardedBatches, ShuffledIndices

    c = cfg
    dist = setup()  # under torchrun: this rank of the data-parallel job (ppo.py's module docstring)
    if c.batch_size % dist.world:
        raise LmforgeError(batch_not_divisible(c.batch_size, dist.world))
    trainer_cfg = PPOHyperparams(batch_size=c.batch_size, mini_batch_size=c.mini_batch_size,
                                 ppo_epochs=c.ppo_epochs, lr=c.learning_rate, kl_coef=c.kl_coef,
                                 target_kl=c.target_kl, horizon=c.horizon, gamma=c.gamma, lam=c.lam,
                                 clip_range=c.clip_range, vf_coef=c.vf_coef, max_new_tokens=c.max_new_tokens,
                                 temperature=c.temperature, top_k=c.top_k, top_p=c.top_p, seed=c.seed)
    texts = load_prompts(c.prompts, c.prompt_field)
    reward_fn, reward_model = load_reward(c.reward, c.reward_input)
    seed_everything(c.seed)
    lm, reference = policy_of(c)
    if reward_model is not None:
        reward_vocab_check(reward_model, lm.config.vocab_size, c.reward)
    encoded = [lm.encode(p, c.chat) for p in texts]
    write_config(cfg, c.out_dir)  # once the inputs have loaded: what reruns this run
    report_trainable(lm.model, c.method)
    trainer = PPOTrainer(lm.model, lm.tokenizer, reward_fn, trainer_cfg, ref_model=reference, eos_ids=lm.eos_ids,
                         dist=dist)
    run = RunDir(c.out_dir, run_config(cfg, "ppo"), resume=resume, tokenizer=lm.tokenizer, loggers=c.logger)
    run.dist = dist  # only rank 0 writes
    order = ShuffledIndices(len(texts), c.batch_size, c.seed)  # a fresh shuffle of all prompts whenever one runs out
    shard = ShardedBatches(order, dist.rank, dist.world)  # this rank's rows of each global batch (all of it alone)
    state = nn.ModuleDict({"policy": lm.model, "value_head": trainer.value_head})  # what a checkpoint holds
    state.config = lm.model.config  # lets a resume refuse another architecture
    saved = run.restore(state, trainer.optimizer, order)
    start = 0 if saved is None else int(saved["step"])
    if saved is not None:
        trainer.kl_coef, trainer.steps_done = saved["kl_coef"], start
    log = run.log
    bar = progress_bar(c.steps, start, "ppo", progress and dist.is_main)
    stats: dict[str, float] = {}
    try:
        for step in range(start + 1, c.steps + 1):
            rows = shard.next_batch()  # on rank 0 the global batch's first prompt is rows[0] (the logged sample)
            lr = lr_at(step - 1, trainer_cfg.lr, c.steps, c.warmup, c.min_lr_ratio)  # a function of the step
            set_lr(trainer.optimizer, lr)
            t0 = time.perf_counter()
            with precision_autocast(c.precision, c.device):
                stats = trainer.step([texts[i] for i in rows], [encoded[i] for i in rows])
            stats["lr"] = lr
            stats["step_s"] = round(time.perf_counter() - t0, 2)
            log.write({"step": step, **stats,
                       "sample": {"prompt": texts[rows[0]], "completion": trainer.last_rollout.completions[0]}})
            bar.update(1)
            bar.set_postfix(reward=f"{stats['reward']:.3f}", kl=f"{stats['kl']:.2f}", refresh=False)
            if c.save_every and (step % c.save_every == 0 or step == c.steps):
                run.checkpoint(state, trainer.optimizer, step, order, {"kl_coef": trainer.kl_coef})
    finally:  # on an error too: the error line must not land on the bar
        bar.close()
    log.plot()  # loss.png: the policy and value losses, and the reward and KL beside them
    log.close()
    final = run.save_final(lm.model)
    return {"step": c.steps, **stats, "out_dir": str(final)}


@claims_output("rlhf dpo", inputs=("model", "adapter", "ref"), config="cfg")
def dpo(cfg: DPOConfig, *, resume: bool = False, overwrite: bool = False, force: bool = False,
        progress: bool = True) -> dict[str, Any]:
    """Train ``cfg.model`` with DPO (or IPO: ``loss="ipo"``, ``beta`` is tau) on the preference file ``cfg.data``.

    Runs ``steps`` optimiser steps (or ``epochs`` passes; one epoch when neither is given) of ``batch_size``
    pairs, with linear warmup then cosine decay of ``lr``. Responses are cut to fit ``max_len`` tokens
    (default: 512 or the context window); pairs whose prompt fills it are dropped. With ``precompute_ref``
    the reference log-probs are computed once before training. ``eval_fraction`` of the pairs (a seeded
    split) are held out and scored before training, every ``eval_every`` steps and at the end
    (``eval_loss``, ``eval_reward_accuracy``, ``eval_reward_margin``...). ``save_every``: atomic checkpoints in
    ``OUT_DIR/checkpoint``; ``resume``, ``overwrite``, ``force`` and ``progress`` as for ``ppo``. The resolved
    recipe is written to ``OUT_DIR/config.yaml`` once the pairs have loaded. Returns the last step's figures.
    """
    import math

    from lmforge.alignment.dpo import DPO_HINT, DPOTrainer, load_preference_pairs, precompute_reference, tokenize_pairs
    from lmforge.training.loop import RunDir, TrainConfig, seed_everything, train
    from lmforge.training.sources import ShuffledIndices

    c = cfg
    pairs = load_preference_pairs(c.data, c.limit)
    if c.steps is None and c.epochs is not None and c.epochs * len(pairs) < 1:
        raise LmforgeError(f"epochs (--epochs): {c.epochs:g} passes over {len(pairs)} pairs is less than one pair; "
                           "give a larger --epochs, or --steps N for a short run")
    seed_everything(c.seed)
    lm, reference = policy_of(c)
    tok = lm.tokenizer
    max_len = c.max_len or min(512, lm.config.max_seq_len)
    items, dropped = tokenize_pairs(pairs, lambda p: lm.encode(p, c.chat), tok, max_len)
    if not items:
        raise LmforgeError(f"{c.data}: every prompt is longer than max_len={max_len} tokens")
    held: list = []
    if c.eval_fraction:
        from lmforge.data.reward_data import random_split

        train_idx, held_idx = random_split(len(items), c.eval_fraction, c.seed)
        items, held = [items[i] for i in train_idx], [items[i] for i in held_idx]
    write_config(cfg, c.out_dir)  # once the pairs have loaded: what reruns this run
    report_trainable(lm.model, c.method)
    pad = tok.pad_id if tok.pad_id is not None else (tok.eos_id if tok.eos_id is not None else 0)
    steps = c.steps if c.steps is not None else max(1, math.ceil((c.epochs or 1.0) * len(items) / c.batch_size))
    train_cfg = TrainConfig(steps=steps, lr=c.learning_rate, warmup_steps=c.warmup, weight_decay=0.0,
                            betas=(0.9, 0.999), precision=c.precision, eval_every=c.eval_every,
                            eval_at_start=bool(held), save_every=c.save_every, log_every=1, seed=c.seed,
                            **c.train_kwargs())
    table = precompute_reference(lm.model, reference, items, pad) if c.precompute_ref else None
    trainer = DPOTrainer(lm.model, None, loss=c.loss, beta=c.beta, label_smoothing=c.label_smoothing,
                         ref_model=reference, ref_table=table, pad_id=pad)
    run = RunDir(c.out_dir, {**run_config(cfg, "dpo"), "pairs": len(items), "dropped": dropped}, resume=resume,
                 tokenizer=tok, loggers=c.logger)

    def step_fn(policy: nn.Module, rows: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
        return trainer.loss_and_metrics([items[i] for i in rows], rows)

    def tokens(rows: list[int]) -> int:
        return sum(2 * len(items[i].prompt) + len(items[i].chosen) + len(items[i].rejected) for i in rows)

    result = train(lm.model, step_fn, ShuffledIndices(len(items), c.batch_size, c.seed), train_cfg, run,
                   eval_fn=(lambda policy: trainer.evaluate(held)) if held else None, tokens_per_batch=tokens,
                   desc=c.loss, loss_name="DPO loss", hint=DPO_HINT, progress=progress)
    return {**result, "step": steps, "pairs": len(items), "held_out": len(held), "dropped": dropped,
            "out_dir": str(run.path / "final")}
