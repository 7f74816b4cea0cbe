"""GRPO: group-relative policy optimisation with rewards a program can check (``lmforge rlhf grpo``).

Owns the GRPO math as pure functions, the registered reward functions, ``GRPOTrainer`` (rollouts, scores, the
loss of one batch) and the recipe (``GRPOConfig``, ``grpo``) on the one training loop (``training/loop.py``).

Each step takes ``batch_size`` prompts and samples ``group_size`` (G) completions of each: one batched
``generation.generate_tokens`` call over the G copies of a prompt, seeded by (seed, rollout, the prompt's index
in the prompt file), so a rollout is a function of the step alone. The completions are scored by a weighted sum
of reward functions and each gets the group-relative advantage (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300,
sec. 4.1.2): A_i = (r_i - mean(r_group)) / (std(r_group) + eps), the same for every token of completion i; std is
torch's (Bessel-corrected, as in trl), eps = 1e-4. The loss is the clipped surrogate with an optional KL penalty
to the reference (eq. 3), per token

    l_t = -min(rho_t A, clip(rho_t, 1 - eps_clip, 1 + eps_clip) A) + beta * KL_t,
    rho_t = exp(log pi(y_t) - log pi_old(y_t)),
    KL_t = exp(log ref - log pi) - (log ref - log pi) - 1     (Schulman's k3 estimator, eq. 4),

averaged over each completion's tokens and then over completions (``loss_type="grpo"``). Dr. GRPO (Liu et al.
2025, arXiv:2503.20783, sec. 3.1) drops both biases: no division by the group's std and no per-sequence length
normalisation: the token terms of all completions are summed and divided by (completions x max_new_tokens), a
constant (``loss_type="dr_grpo"``).

There is no value model and rollouts share the policy's weights: the reference is the base with the LoRA
adapters switched off, or a frozen copy for ``--method full`` (none is computed when ``beta == 0``). With
``iterations == 1`` (the default, as in trl) pi_old is the policy itself (rho = 1; the clip never binds);
``iterations = mu > 1`` takes mu optimiser steps on each rollout batch, pi_old being the policy that sampled it.

Rewards (``rewards``, summed with ``reward_weights``): ``exact_match`` (1 when the answer extracted from the
completion equals the record's reference answer), ``format`` (1 when ``format_pattern`` is found), ``length_penalty``
(-max(0, chars - length_target) / length_target), a reward-model folder from ``lmforge reward train`` (e.g. a
toxicity classifier: P(not toxic)), or ``package.module:function(prompts, completions[, answers=...])``. A reward
function that raises, or returns NaN or an infinite number, stops the run with one line naming it and the step.

The run is one process (not data-parallel); exact resume, checkpoints and logging are the loop's: a checkpoint
holds the policy, the optimiser, the prompt order and the rollout count.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from lmforge.alignment.grpo_rewards import (  # noqa: F401 (the rewards are this recipe's API too)
    EXTRACTORS,
    REWARDS,
    Reward,
    extract_answer,
    load_rewards,
    load_tasks,
    normalise_answer,
    reference_answer,
    registered_reward,
    score,
)
from lmforge.alignment.rlhf import PolicyOptions
from lmforge.errors import LmforgeError
from lmforge.io import write_text_atomic
from lmforge.outputs import claims_output
from lmforge.recipe_config import option, write_config
from lmforge.training.tracking import Tracking

if TYPE_CHECKING:
    from torch import Tensor, nn

LOSS_TYPES = ("grpo", "dr_grpo")
STD_EPS = 1e-4
HELD_OUT_DIR = "held_out"  # OUT_DIR/held_out/step-N.jsonl: each held-out prompt's greedy completion and scores
GRPO_HINT = "GRPO keeps its last checkpoint; lower --lr or --beta, or check the rewards"
_DATA, _REWARD, _GRPO, _SAMPLE, _RUN = ("prompts", "rewards", "GRPO", "sampling the rollouts",
                                        "optimisation and output")


# ----------------------------------------------------------------------------- the math (pure functions)
def group_advantages(rewards: Tensor, scale: bool = True, eps: float = STD_EPS) -> Tensor:
    """Group-relative advantages: rewards (N groups, G) -> (N, G) = (r - mean_group) / (std_group + eps)
    (DeepSeekMath sec. 4.1.2; std Bessel-corrected); ``scale=False``: r - mean_group only (Dr. GRPO)."""
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    return centred / (rewards.std(dim=1, keepdim=True) + eps) if scale else centred


def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token KL(pi || ref) estimate, k3 = exp(ref - logp) - (ref - logp) - 1 >= 0 (Schulman 2020; DeepSeekMath
    eq. 4), unbiased for samples of pi."""
    import torch

    d = ref_logp - logp
    return torch.exp(d) - d - 1


def grpo_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, *, ref_logp: Tensor | None = None,
              beta: float = 0.0, clip: float = 0.2, loss_type: str = "grpo", max_len: int | None = None
              ) -> tuple[Tensor, dict[str, Tensor]]:
    """The GRPO loss (to minimise) of n completions: logp, old_logp, ref_logp, mask (n, R), advantages (n,).

    ``loss_type="grpo"``: the mean over each completion's tokens, then over completions; ``"dr_grpo"``: the sum of
    every token term / (n * max_len) (``max_len``: the generation budget, default R). Returns (loss, {"kl": mean
    per-token k3 KL, "clipfrac": share of tokens where the clipped term is taken}); kl is 0 without ``ref_logp``."""
    import torch

    if loss_type not in LOSS_TYPES:
        raise LmforgeError(f"unknown GRPO loss type {loss_type!r}; choose one of: {', '.join(LOSS_TYPES)}")
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None]
    unclipped, clipped = ratio * adv, torch.clamp(ratio, 1.0 - clip, 1.0 + clip) * adv
    per_token = -torch.minimum(unclipped, clipped)
    kl = k3_kl(logp, ref_logp) if ref_logp is not None else torch.zeros_like(logp)
    if beta:
        per_token = per_token + beta * kl
    n_tokens = mask.sum().clamp(min=1)
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    else:
        loss = (per_token * mask).sum() / (logp.shape[0] * (max_len or logp.shape[1]))
    stats = {"kl": (kl.detach() * mask).sum() / n_tokens,
             "clipfrac": ((clipped < unclipped).float() * mask).sum() / n_tokens}
    return loss, stats


# ----------------------------------------------------------------------------- the trainer
@dataclass
class Rollouts:
    """The G completions of each of n prompts, rows grouped by prompt (n * G rows). T = P + R."""

    idx: Tensor  # (n*G, T) left-padded prompts, then the responses (padding after their end)
    key_mask: Tensor  # (n*G, T) bool
    positions: Tensor  # (n*G, T)
    mask: Tensor  # (n*G, R) float: 1 = a response token (EOS included)
    completions: list[str]
    old_logp: Tensor | None = None  # (n*G, R) the sampling policy's log-probs (iterations > 1)
    ref_logp: Tensor | None = None  # (n*G, R)
    advantages: Tensor | None = None  # (n*G,)
    metrics: dict[str, float] | None = None

    @property
    def P(self) -> int:
        return self.idx.shape[1] - self.mask.shape[1]


class GRPOTrainer:
    """A policy (``DecoderLM``), its reference (None: the policy with its LoRA off), the reward terms and the GRPO
    settings; ``loss(model, rows, rollout, iteration)`` is the step function of one batch of prompts."""

    def __init__(self, policy: nn.Module, tokenizer: Any, rewards: Sequence[Reward], prompt_ids: list[list[int]],
                 prompts: list[str], answers: list[str | None], *, group_size: int = 8, max_new_tokens: int = 64,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None, beta: float = 0.0,
                 clip: float = 0.2, loss_type: str = "grpo", ref_model: nn.Module | None = None,
                 eos_ids: Sequence[int] = (), seed: int = 0):
        from lmforge.peft.lora import lora_layers

        if group_size < 2:
            raise LmforgeError(f"group_size (--group-size): GRPO compares completions within a group: it needs at "
                               f"least 2 per prompt, got {group_size}")
        if beta and ref_model is None and next(lora_layers(policy), None) is None:
            raise LmforgeError("GRPO's KL penalty (--beta > 0) needs a reference: a frozen ref_model, or LoRA "
                               "adapters on the policy (the reference is then the base with them off)")
        self.policy, self.tokenizer, self.rewards = policy, tokenizer, list(rewards)
        self.prompt_ids, self.prompts, self.answers = prompt_ids, prompts, answers
        self.G, self.max_new_tokens, self.beta, self.clip, self.loss_type = (group_size, max_new_tokens, beta, clip,
                                                                             loss_type)
        self.temperature, self.top_k, self.top_p, self.seed = temperature, top_k, top_p, seed
        self.ref_model = ref_model
        self.eos_ids = sorted(set(eos_ids) | set(tokenizer.eos_ids) | set(policy.config.eos_token_ids))
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else (self.eos_ids or [0])[0]

    def sample_seed(self, rollout: int, index: int) -> int:
        """The sampling seed of prompt ``index`` (in the prompt file) at rollout ``rollout``."""
        return ((self.seed * 1_000_003 + rollout) * 1_000_003 + index) % 2 ** 63

    def logits(self, model: nn.Module, b: Rollouts) -> Tensor:
        """Logits (n, R, V) over the response positions, scaled by 1 / temperature."""
        h = model.hidden_states(b.idx, b.positions, b.key_mask)[:, b.P - 1:-1]
        return model.lm_head(h).float() / self.temperature

    def logprobs(self, model: nn.Module, b: Rollouts) -> Tensor:
        from lmforge.data.tokens import token_logprobs

        return token_logprobs(self.logits(model, b), b.idx[:, b.P:]) * b.mask

    def ref_logprobs(self, b: Rollouts) -> Tensor:
        import torch

        from lmforge.peft.lora import set_lora_enabled

        with torch.no_grad():
            if self.ref_model is not None:
                return self.logprobs(self.ref_model, b)
            set_lora_enabled(self.policy, False)
            try:
                return self.logprobs(self.policy, b)
            finally:
                set_lora_enabled(self.policy, True)

    def generate(self, rows: Sequence[int], rollout: int, sampling: Any = None, group: int | None = None) -> Rollouts:
        """``group`` (default G) completions of each prompt in ``rows`` (indices into the prompts), each prompt's
        copies in one batched generate call seeded by ``sample_seed``; greedy when ``sampling`` says so."""
        import torch

        from lmforge.data.tokens import pad_left
        from lmforge.generation.generate import generate_tokens
        from lmforge.generation.sampling import SamplingParams

        G = group or self.G
        params = sampling or SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)
        prompt_ids, responses = [], []
        with torch.no_grad():
            for i in rows:
                ids = self.prompt_ids[i]
                out: list[list[int]] = [[] for _ in range(G)]
                for toks in generate_tokens(self.policy, [ids] * G, self.max_new_tokens, params, eos_ids=self.eos_ids,
                                            pad_id=self.pad_id, seed=self.sample_seed(rollout, i)):
                    for g, t in enumerate(toks):
                        if t is not None:
                            out[g].append(t)
                prompt_ids += [ids] * G
                responses += out
        device = next(self.policy.parameters()).device
        n, P, R = len(responses), max(len(p) for p in prompt_ids), max(1, max(len(r) for r in responses))
        idx = torch.full((n, P + R), self.pad_id, dtype=torch.long, device=device)
        key_mask = torch.zeros((n, P + R), dtype=torch.bool, device=device)
        prompt_idx, prompt_mask = pad_left(prompt_ids, self.pad_id)
        idx[:, :P], key_mask[:, :P] = prompt_idx.to(device), prompt_mask.bool().to(device)
        for r, response in enumerate(responses):
            idx[r, P:P + len(response)] = torch.tensor(response, dtype=torch.long, device=device)
            key_mask[r, P:P + len(response)] = True
        positions = (key_mask.long().cumsum(-1) - 1).clamp(min=0)
        eos = set(self.eos_ids)
        completions = [self.tokenizer.decode([t for t in resp if t not in eos]) for resp in responses]
        return Rollouts(idx, key_mask, positions, key_mask[:, P:].float(), completions)

    def rollout(self, rows: Sequence[int], rollout: int, iterations: int = 1) -> Rollouts:
        """Sample and score the completions of ``rows``; their advantages, reference log-probs (beta > 0) and, for
        ``iterations > 1``, the sampling policy's log-probs."""
        import torch

        b = self.generate(rows, rollout)
        prompts = [self.prompts[i] for i in rows for _ in range(self.G)]
        answers = [self.answers[i] for i in rows for _ in range(self.G)]
        rewards, means = score(self.rewards, prompts, b.completions, answers, rollout * iterations + 1)
        scale = self.loss_type == "grpo"
        b.advantages = group_advantages(rewards.view(len(rows), self.G), scale).flatten().to(b.idx.device)
        if self.beta:
            b.ref_logp = self.ref_logprobs(b)
        if iterations > 1:
            with torch.no_grad():
                b.old_logp = self.logprobs(self.policy, b)
        b.metrics = {"reward": float(rewards.mean()),
                     "reward_std": float(rewards.view(len(rows), self.G).std(dim=1).mean()),
                     **{f"reward_{k}": v for k, v in means.items()},
                     "response_len": float(b.mask.sum(1).mean())}
        return b

    def loss(self, model: nn.Module, b: Rollouts) -> tuple[Tensor, dict[str, float]]:
        """The GRPO loss of a scored rollout batch under ``model`` (the policy), and its figures."""
        logp = self.logprobs(model, b)
        old = b.old_logp if b.old_logp is not None else logp.detach()
        loss, stats = grpo_loss(logp, old, b.advantages, b.mask, ref_logp=b.ref_logp, beta=self.beta, clip=self.clip,
                                loss_type=self.loss_type, max_len=self.max_new_tokens)
        return loss, {**(b.metrics or {}), **{k: float(v) for k, v in stats.items()}}

    def evaluate(self, rows: Sequence[int], batch: int = 16, per_prompt: list[dict] | None = None
                 ) -> dict[str, float]:
        """Greedy completions of the prompts ``rows``, scored: {"eval_reward": the weighted sum's mean,
        "eval_<reward>": each term's mean (eval_exact_match: the exact-match accuracy)}. ``per_prompt``, when
        given, receives one record per prompt: {"row": its index in the prompt file, "prompt", "answer",
        "completion", "reward": the weighted sum, <reward>: each term's score}."""
        from lmforge.generation.sampling import SamplingParams

        sums: dict[str, float] = {}
        for start in range(0, len(rows), batch):
            chunk = list(rows[start:start + batch])
            b = self._greedy(chunk, SamplingParams(temperature=0.0))
            terms: dict[str, Tensor] = {}
            total, means = score(self.rewards, [self.prompts[i] for i in chunk], b.completions,
                                 [self.answers[i] for i in chunk], "eval", terms)
            for k, v in {"reward": float(total.mean()), **means}.items():
                sums[k] = sums.get(k, 0.0) + v * len(chunk)
            if per_prompt is not None:
                per_prompt += [{"row": i, "prompt": self.prompts[i], "answer": self.answers[i],
                                "completion": b.completions[j], "reward": float(total[j]),
                                **{name: float(s[j]) for name, s in terms.items()}} for j, i in enumerate(chunk)]
        return {f"eval_{k}": v / len(rows) for k, v in sums.items()}

    def _greedy(self, rows: list[int], params: Any) -> Rollouts:
        """One greedy completion of each prompt in ``rows``, in one batched generate call."""
        from lmforge.generation.generate import generate_tokens

        outs: list[list[int]] = [[] for _ in rows]
        for toks in generate_tokens(self.policy, [self.prompt_ids[i] for i in rows], self.max_new_tokens, params,
                                    eos_ids=self.eos_ids, pad_id=self.pad_id):
            for r, t in enumerate(toks):
                if t is not None:
                    outs[r].append(t)
        eos = set(self.eos_ids)
        completions = [self.tokenizer.decode([t for t in o if t not in eos]) for o in outs]
        return Rollouts(None, None, None, None, completions)  # type: ignore[arg-type]


class RolloutBatches:
    """The batch source of a GRPO run: ``(rollout number, prompt rows, iteration)``; each batch of prompt rows
    (from a ``ShuffledIndices``) is given ``iterations`` times in a row. Its state is the order's and the count."""

    def __init__(self, order: Any, iterations: int = 1):
        self.order, self.iterations, self.draws = order, iterations, 0
        self.rows: list[int] = []

    def next_batch(self) -> tuple[int, list[int], int]:
        if self.draws % self.iterations == 0:
            self.rows = self.order.next_batch()
        batch = (self.draws // self.iterations, list(self.rows), self.draws % self.iterations)
        self.draws += 1
        return batch

    def state_dict(self) -> dict:
        return {"order": self.order.state_dict(), "draws": self.draws}

    def load_state_dict(self, state: dict) -> None:
        self.order.load_state_dict(state["order"])
        self.draws = int(state["draws"])


# ----------------------------------------------------------------------------- the recipe
@dataclass
class GRPOConfig(PolicyOptions, Tracking):
    """Everything ``lmforge rlhf grpo`` needs: prompts (with answers), rewards, GRPO and sampling settings, the
    policy, the output. Defaults < ``--config FILE.yaml`` < flags; every run writes ``OUT_DIR/config.yaml``."""

    recipe: ClassVar[str] = "rlhf grpo"

    prompts: Path | None = option(None, group=_DATA)
    """Prompts: a .txt file (one per line; no answers) or records (.jsonl, .json, .csv, optionally gzipped, or
    .parquet) (required)."""
    prompt_field: str = option("prompt", group=_DATA)
    """The prompt field of the records (unless --prompt-template is given)."""
    prompt_template: str | None = option(None, group=_DATA)
    """Build each prompt from its record's fields, e.g. 'Question: {question}\\nAnswer:' (none: --prompt-field)."""
    answer_field: str | None = option("answer", group=_DATA)
    """The field holding the reference answer (a GSM8K solution counts by its '#### N')."""
    limit: int | None = option(None, min=1, group=_DATA)
    """Use only the first N records (none: all)."""
    eval_count: int = option(0, min=0, group=_DATA)
    """Hold out this many prompts (seeded; training never sees them) and log their greedy rewards (eval_reward,
    eval_exact_match = accuracy, ...) before training, every --eval-every steps and at the end, each prompt's in
    OUT_DIR/held_out/step-N.jsonl; 0 = none."""
    eval_every: int = option(0, min=0, group=_DATA)
    """Steps between held-out evaluations; 0 = only before and after."""
    rewards: tuple[str, ...] = option(("exact_match",), group=_REWARD)
    """Reward terms, summed: exact_match, format, length_penalty, a reward-model folder (e.g. a toxicity
    classifier: P(not toxic)), or package.module:function(prompts, completions[, answers])."""
    reward_weights: tuple[float, ...] | None = option(None, group=_REWARD)
    """One weight per reward (none: all 1)."""
    extractor: Literal["hashes", "last_number"] = option("hashes", group=_REWARD)
    """How exact_match finds a completion's answer: the number after '####', or the last number."""
    format_pattern: str = option(r"####\s*-?[\d,]*\.?\d+", group=_REWARD)
    """The regular expression the format reward looks for (1 when found)."""
    length_target: int = option(200, min=1, group=_REWARD)
    """length_penalty: -(characters beyond this) / this."""
    reward_input: Literal["completion", "prompt+completion"] = option("completion", group=_REWARD)
    """What a reward-model folder reads."""
    steps: int = option(20, min=1, group=_GRPO)
    """Optimiser steps."""
    batch_size: int = option(4, min=1, group=_GRPO)
    """Prompts per rollout batch."""
    group_size: int = option(8, min=2, flags=("-G", "--group-size"), group=_GRPO)
    """Completions sampled per prompt (G >= 2)."""
    iterations: int = option(1, min=1, group=_GRPO)
    """Optimiser steps on each rollout batch (mu); --steps and --save-every must be multiples of it."""
    loss_type: Literal["grpo", "dr_grpo"] = option("grpo", group=_GRPO)
    """grpo: advantages divided by the group's std, token mean per completion; dr_grpo: neither (Liu et al. 2025)."""
    beta: float = option(0.0, min=0.0, group=_GRPO)
    """Weight of the k3 KL penalty to the reference (0: no reference forward)."""
    clip_range: float = option(0.2, positive=True, group=_GRPO)
    """Ratio clip epsilon (binds only with --iterations > 1)."""
    warmup: int = option(0, min=0, group=_GRPO)
    """Linear warmup steps, then a cosine to --lr * --min-lr-ratio."""
    min_lr_ratio: float = option(1.0, min=0.0, max=1.0, group=_GRPO)
    """Where the cosine ends, as a share of --lr; 1 = constant."""
    max_grad_norm: float = option(1.0, min=0.0, group=_GRPO)
    """Clip the gradient norm (0: no clipping)."""
    max_new_tokens: int = option(64, min=1, flags=("-n", "--max-new-tokens"), group=_SAMPLE)
    """Completion length limit."""
    temperature: float = option(1.0, min=0.01, flags=("-t", "--temperature"), group=_SAMPLE)
    """Sampling temperature."""
    top_k: int | None = option(None, min=1, group=_SAMPLE)
    """Sample from the k most likely tokens (none: all)."""
    top_p: float | None = option(None, positive=True, max=1.0, group=_SAMPLE)
    """Nucleus sampling mass (none: off)."""
    save_every: int = option(0, min=0, group=_RUN)
    """Write OUT_DIR/checkpoint atomically every N steps (and at the end); 0 = only at the end."""
    out_dir: Path = option(Path("runs/grpo"), flags=("-o", "--out-dir"), group=_RUN)
    """Output folder: metrics.jsonl, config.yaml, checkpoint and final/ (the adapter or model)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.prompts is None:
            raise LmforgeError("prompts (--prompts): no prompts given (--prompts FILE)")
        if not self.rewards:
            raise LmforgeError("rewards (--rewards): no reward given")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.rewards):
            raise LmforgeError(f"reward_weights (--reward-weights): {len(self.reward_weights)} weights for "
                               f"{len(self.rewards)} rewards; give one weight per reward")
        for name in ("steps", "save_every"):
            if getattr(self, name) % self.iterations:
                raise LmforgeError(f"{name} (--{name.replace('_', '-')}): {getattr(self, name)} is not a multiple of "
                                   f"iterations (--iterations) {self.iterations}: checkpoints fall between rollouts")


@claims_output("rlhf grpo", inputs=("model", "adapter", "ref"), config="cfg")
def grpo(cfg: GRPOConfig, *, resume: bool = False, overwrite: bool = False, force: bool = False,
         progress: bool = True) -> dict[str, Any]:
    """Optimise ``cfg.model`` with GRPO against ``cfg.rewards`` on ``cfg.prompts`` (see the module docstring).

    ``eval_count`` prompts are held out (seeded) and scored greedily before training, every ``eval_every`` steps
    and at the end; each evaluation's per-prompt results go to ``OUT_DIR/held_out/step-N.jsonl`` (N: the steps
    done). ``resume`` continues from ``OUT_DIR/checkpoint`` step for step; ``overwrite``/``force`` as in
    ``lmforge.outputs``. Returns the last step's figures and where the policy was saved."""
    from lmforge.alignment.rl_inputs import reward_vocab_check
    from lmforge.alignment.rlhf import policy_of, report_trainable, run_config
    from lmforge.data.reward_data import random_split
    from lmforge.training.loop import RunDir, TrainConfig, seed_everything, train
    from lmforge.training.sources import ShuffledIndices

    c = cfg
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise LmforgeError("rlhf grpo runs in one process (it is not data-parallel yet): run it without torchrun")
    rewards = load_rewards(c.rewards, c.reward_weights, extractor=c.extractor, format_pattern=c.format_pattern,
                           length_target=c.length_target, reward_input=c.reward_input)
    need = any(r.needs_answers for r in rewards)
    prompts, answers = load_tasks(c.prompts, prompt_field=c.prompt_field, template=c.prompt_template,
                                  answer_field=c.answer_field, need_answers=need, limit=c.limit)
    train_rows, held = list(range(len(prompts))), []
    if c.eval_count:
        if c.eval_count >= len(prompts):
            raise LmforgeError(f"eval_count (--eval-count): {c.eval_count} held-out prompts leave none of the "
                               f"{len(prompts)} to train on")
        train_rows, held = random_split(len(prompts), c.eval_count / len(prompts), c.seed)
    seed_everything(c.seed)
    lm, reference = policy_of(c)
    for term in rewards:
        if term.model is not None:
            reward_vocab_check(term.model, lm.config.vocab_size, term.name)
    encoded = [lm.encode(p, c.chat) for p in prompts]
    write_config(cfg, c.out_dir)
    report_trainable(lm.model, c.method)
    trainer = GRPOTrainer(lm.model, lm.tokenizer, rewards, encoded, prompts, answers, group_size=c.group_size,
                          max_new_tokens=c.max_new_tokens, temperature=c.temperature, top_k=c.top_k, top_p=c.top_p,
                          beta=c.beta, clip=c.clip_range, loss_type=c.loss_type,
                          ref_model=reference if c.beta else None, eos_ids=lm.eos_ids, seed=c.seed)
    train_cfg = TrainConfig(steps=c.steps, lr=c.learning_rate, min_lr_ratio=c.min_lr_ratio, warmup_steps=c.warmup,
                            weight_decay=0.0, betas=(0.9, 0.999), clip=c.max_grad_norm, precision=c.precision,
                            eval_every=c.eval_every, eval_at_start=bool(held), save_every=c.save_every, log_every=1,
                            seed=c.seed)
    run = RunDir(c.out_dir, {**run_config(cfg, "grpo"), "prompts": len(train_rows), "held_out": len(held)},
                 resume=resume, tokenizer=lm.tokenizer, loggers=c.logger)
    order = ShuffledIndices(len(train_rows), c.batch_size, c.seed)
    batches = RolloutBatches(order, c.iterations)
    cache: dict[int, Rollouts] = {}

    def step_fn(model: nn.Module, batch: tuple[int, list[int], int]) -> tuple[Tensor, dict[str, float]]:
        number, rows, _ = batch
        model.eval()  # no dropout: sampling, pi_old and the loss see one policy
        if number not in cache:
            cache.clear()
            cache[number] = trainer.rollout([train_rows[r] for r in rows], number, c.iterations)
        return trainer.loss(model, cache[number])

    def eval_fn(model: nn.Module) -> dict[str, float]:  # one batch drawn per optimiser step: draws = steps done
        per_prompt: list[dict] = []
        metrics = trainer.evaluate(held, per_prompt=per_prompt)
        write_text_atomic(run.path / HELD_OUT_DIR / f"step-{batches.draws}.jsonl",
                          (json.dumps(r, ensure_ascii=False) + "\n" for r in per_prompt))
        return metrics

    result = train(lm.model, step_fn, batches, train_cfg, run, eval_fn=eval_fn if held else None,
                   tokens_per_batch=lambda batch: len(batch[1]) * c.group_size * c.max_new_tokens, desc="grpo",
                   loss_name="GRPO loss", hint=GRPO_HINT, progress=progress)
    return {**result, "step": c.steps, "prompts": len(train_rows), "held_out": len(held),
            "out_dir": str(run.path / "final")}
