"""PPO for language models: the RL step of RLHF (Ziegler et al. 2019; Ouyang et al. 2022, sec. 3.5).

Owns the PPO math as small pure functions (KL-shaped per-token rewards, GAE, whitening, the clipped
policy and value losses, the adaptive KL coefficient) and ``PPOTrainer``, which runs one PPO step:

1. rollout: sample a response for each prompt with lmforge's generation engine (left-padded prompts);
2. score: ``reward_fn(prompts, completions) -> (B,)``; per-token log-probs of the policy and of the
   frozen reference (the same base with LoRA switched off, or a separate frozen copy) and the values;
3. rewards r_t = -beta (log pi - log ref)_t, plus the scalar score at the last response token;
4. GAE advantages (whitened) and returns;
5. ``ppo_epochs`` passes of shuffled minibatches over the clipped policy + value loss.

Tokens after a response's EOS are padding: they are masked out of every sum and mean. The value head
is a linear layer on the policy's final hidden states (zero-initialised). A NaN or infinite reward, KL,
shaped reward, advantage, loss or gradient norm stops the step with an ``LmforgeError`` naming it and
the step, before the optimiser touches the weights. Dropout stays off (eval mode) so the first
minibatch's probability ratio is exactly 1. Log-probs use the sampling temperature (logits / T);
top-k / top-p truncation is ignored in them, as in most RLHF code.

Data parallelism (``torchrun``; ``PPOTrainer(dist=...)``, ``training/distributed.py``): every rank holds the
same policy, value head and optimiser; each rank generates, scores and evaluates the rollouts of its own share
of every global batch of prompts (rows ``[rank * b / world, (rank + 1) * b / world)``, the same global order
at any world size). Each prompt is sampled alone, with a generator seeded from (seed, PPO step, the prompt's
index in the global batch), so that N ranks of b / N prompts generate exactly what one process of b prompts
generates (``sample_seed``). Advantages are whitened with the mean and variance over every rank's response
tokens (``whiten_across``: one all-reduce of sum, sum of squares and count). The minibatches are the same
shuffled slices of the global batch on every rank; each rank backpropagates the rows of a minibatch it holds,
weighted by its share of the minibatch's response tokens, and the gradients are summed over the ranks
(``RankSums.grads``) before ``training/loop.py``'s ``optimizer_step``: the update is the one-process update
on the whole minibatch. The logged figures and the KL that drives the adaptive coefficient are the global
batch's (sums and counts all-reduced), so every rank takes the same decisions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lmforge.data.tokens import pad_left, token_logprobs
from lmforge.errors import LmforgeError
from lmforge.generation.generate import generate_tokens
from lmforge.generation.sampling import SamplingParams
from lmforge.peft.lora import lora_layers, set_lora_enabled
from lmforge.training.distributed import Dist
from lmforge.training.loop import check_finite_value, optimizer_step
from lmforge.training.optim import make_optimizer

RewardFn = Callable[[list[str], list[str]], Tensor]


# ----------------------------------------------------------------------------- the math (pure functions)
def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of x over the positions where mask is 1 (any shape; mask broadcastable)."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """(x - mean) / sqrt(var + 1e-8) over the masked positions (advantage normalisation, as in OpenAI's
    baselines ppo2 and lm-human-preferences). ``shift_mean=False`` only rescales. Masked positions -> 0."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def whiten_across(x: Tensor, mask: Tensor, all_sum: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """``whiten(x, mask)`` with the mean and variance of the masked positions of every data-parallel rank's ``x``:
    ``all_sum`` sums a float64 tensor (sum, sum of squares, count) over the ranks (``RankSums``; None: this
    process only). Equals ``whiten`` of the ranks' rows concatenated, up to rounding. Masked positions -> 0."""
    xd, md = x.double(), mask.double()
    stats = torch.stack([(xd * md).sum(), (xd * xd * md).sum(), md.sum()])
    if all_sum is not None:
        stats = all_sum(stats)
    total, squares, n = stats.tolist()
    n = max(n, 1.0)
    mean = total / n
    var = max(squares / n - mean * mean, 0.0)
    return (x - mean) * (var + 1e-8) ** -0.5 * mask


class RankSums:
    """Sums over the ranks of a data-parallel job (``torch.distributed`` all-reduce); the identity on one process.

    ``rs(t)`` returns the sum of ``t`` over the ranks (on ``t``'s device); ``rs.grads(params)`` replaces each
    parameter's gradient by its sum over the ranks, in one collective (a missing gradient counts as zeros)."""

    def __init__(self, dist: Dist):
        self.dist = dist

    def _device(self, t: Tensor) -> torch.device:
        return torch.device("cuda", self.dist.local_rank) if self.dist.backend == "nccl" else torch.device("cpu")

    def __call__(self, t: Tensor) -> Tensor:
        if not self.dist.enabled:
            return t
        import torch.distributed as tdist

        buf = t.detach().to(self._device(t), copy=True)
        tdist.all_reduce(buf, op=tdist.ReduceOp.SUM)
        return buf.to(t.device)

    def grads(self, params: Sequence[nn.Parameter]) -> None:
        if not self.dist.enabled:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = self(torch.cat([p.grad.reshape(-1) for p in params]))
        offset = 0
        for p in params:
            n = p.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n


def kl_shaped_rewards(logp: Tensor, ref_logp: Tensor, scores: Tensor, mask: Tensor, kl_coef: float
                      ) -> tuple[Tensor, Tensor]:
    """Per-token rewards (B, R) and per-token KL estimates (B, R) (Ziegler et al. 2019, eq. 2;
    Ouyang et al. 2022, eq. 2): r_t = -beta * (log pi(y_t) - log ref(y_t)), plus the sequence score
    at the last real response token. logp/ref_logp/mask (B, R), scores (B,)."""
    kl = (logp - ref_logp) * mask  # (B, R)
    rewards = -kl_coef * kl
    last = mask.long().sum(1).clamp(min=1) - 1  # (B,) index of the last real token
    rewards[torch.arange(len(scores)), last] += scores
    return rewards, kl


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95
        ) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16): with
    delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lambda A_{t+1}; returns R_t = A_t + V_t.

    rewards, values, mask (B, R); the episode ends after the last masked-in token (V beyond it = 0).
    Returns (advantages, returns), both (B, R), zero where mask is 0."""
    rewards, values = rewards * mask, values * mask
    R = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])  # A_{t+1}
    for t in reversed(range(R)):
        next_value = values[:, t + 1] if t + 1 < R else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    return advantages * mask, (advantages + values) * mask


def policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, clip: float = 0.2
                ) -> tuple[Tensor, Tensor, Tensor]:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), as a loss to minimise:
    L = mean_t max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps)), rho_t = exp(log pi - log pi_old).

    All inputs (b, R). Returns (loss, clip fraction: share of tokens where the clipped term is taken,
    approx KL(pi_old || pi) = mean 0.5 (log pi - log pi_old)^2 (Schulman's k2 estimator))."""
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).float(), mask)
    approx_kl = masked_mean(0.5 * log_ratio.detach() ** 2, mask)
    return loss, clipfrac, approx_kl


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float = 0.2
               ) -> tuple[Tensor, Tensor]:
    """Clipped value loss (OpenAI baselines ppo2, used by Ziegler et al. 2019):
    L = 0.5 mean_t max((V_t - R_t)^2, (V_old + clip(V_t - V_old, -eps, eps) - R_t)^2).
    All inputs (b, R). Returns (loss, clip fraction). Inside the clip range the clipped value is ``values`` itself
    (V_old + (V_t - V_old) can round to another float, which would count as clipped)."""
    delta = values - old_values
    clipped_values = torch.where(delta.abs() > clip, old_values + torch.clamp(delta, -clip, clip), values)
    err, err_clipped = (values - returns) ** 2, (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    return loss, masked_mean((err_clipped > err).float(), mask)


def adaptive_kl_coef(coef: float, kl: float, target: float, horizon: int, n_steps: int) -> float:
    """Ziegler et al. 2019 (sec. 2.2) adaptive KL controller: e = clip(KL / KL_target - 1, -0.2, 0.2),
    beta <- beta * (1 + e * n_steps / horizon), for a batch of ``n_steps`` samples (lm-human-preferences'
    form; K_beta = n_steps / horizon)."""
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return coef * (1.0 + error * n_steps / horizon)


def entropy(logits: Tensor) -> Tensor:
    """Entropy of the softmax over the last axis: logits (..., V) -> (...)."""
    logp = logits.float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


# ----------------------------------------------------------------------------- the trainer
def batch_not_divisible(batch_size: int, world: int) -> str:
    """The error for a PPO batch that does not split evenly among ``world`` data-parallel ranks."""
    return (f"batch_size (--batch-size): the PPO batch size {batch_size} does not divide among the world size "
            f"{world} (torchrun --nproc-per-node): choose a batch size that is a multiple of {world}")


@dataclass
class PPOHyperparams:
    """The PPO trainer's hyper-parameters (the ``rlhf ppo`` recipe's ``alignment.rlhf.PPOConfig`` builds them);
    defaults follow Ziegler et al. 2019 / trl where they apply."""

    batch_size: int = 16  # prompts (rollouts) per PPO step
    mini_batch_size: int = 4  # rollouts per optimiser step
    ppo_epochs: int = 4  # passes over each rollout batch
    lr: float = 1e-4
    kl_coef: float = 0.05  # beta (the initial value when adaptive)
    target_kl: float | None = None  # set: adaptive beta towards this per-sequence KL
    horizon: int = 10000  # adaptive controller horizon, in samples
    gamma: float = 1.0
    lam: float = 0.95
    clip_range: float = 0.2
    clip_range_value: float = 0.2
    vf_coef: float = 0.1
    max_grad_norm: float = 1.0
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        from lmforge.training.loop import check_finite_number

        for name in ("lr", "kl_coef", "target_kl", "gamma", "lam", "clip_range", "clip_range_value", "vf_coef",
                     "max_grad_norm", "temperature", "top_p"):
            check_finite_number(getattr(self, name), f"PPO {name}")
        if not self.lr > 0:
            raise LmforgeError(f"PPO lr must be > 0, got {self.lr}")
        for name in ("batch_size", "mini_batch_size", "ppo_epochs", "max_new_tokens", "horizon"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise LmforgeError(f"PPO {name} must be an integer >= 1, got {value!r}")
        if self.batch_size % self.mini_batch_size:
            raise LmforgeError(f"PPO batch size {self.batch_size} is not divisible by the mini-batch size "
                               f"{self.mini_batch_size}")
        if self.temperature <= 0:
            raise LmforgeError(f"PPO samples its rollouts: temperature must be > 0, got {self.temperature}")
        if self.kl_coef < 0 or (self.target_kl is not None and self.target_kl <= 0):
            raise LmforgeError(f"kl_coef must be >= 0 and target_kl > 0, got {self.kl_coef}, {self.target_kl}")


@dataclass
class Rollout:
    """One batch of experience. T = P + R: left-padded prompts (P) then responses (R), pad after EOS."""

    idx: Tensor  # (B, T) token ids
    key_mask: Tensor  # (B, T) bool, False = padding
    positions: Tensor  # (B, T) position ids (real tokens only)
    mask: Tensor  # (B, R) float, 1 = a real response token (EOS included)
    logp: Tensor  # (B, R) policy log-probs at sampling time
    ref_logp: Tensor  # (B, R)
    values: Tensor  # (B, R)
    scores: Tensor  # (B,) reward_fn's scores
    completions: list[str]
    entropy: float  # mean per-token entropy of the policy over the response tokens

    @property
    def P(self) -> int:
        return self.idx.shape[1] - self.mask.shape[1]


class PPOTrainer:
    """A policy (``DecoderLM``, usually with LoRA), its value head, a frozen reference and a reward function.

    ``ref_model=None`` means: the policy with its LoRA adapters switched off (the policy must have LoRA).
    ``dist``: this process's place in a data-parallel job (see the module docstring; None: one process); each
    ``step`` then takes this rank's ``batch_size / world`` prompts of the global batch.
    """

    def __init__(self, policy: nn.Module, tokenizer, reward_fn: RewardFn, cfg: PPOHyperparams,
                 ref_model: nn.Module | None = None, eos_ids: Sequence[int] = (), dist: Dist | None = None):
        self.dist = dist or Dist()
        if cfg.batch_size % self.dist.world:
            raise LmforgeError(batch_not_divisible(cfg.batch_size, self.dist.world))
        self.local_batch = cfg.batch_size // self.dist.world
        self.offset = self.dist.rank * self.local_batch  # the global index of this rank's first prompt
        self.sums = RankSums(self.dist)
        if ref_model is None and next(lora_layers(policy), None) is None:
            raise LmforgeError("PPO needs a reference: pass a frozen ref_model, or give the policy LoRA adapters "
                               "(the reference is then the base with the adapters off)")
        self.policy, self.tokenizer, self.reward_fn, self.cfg = policy, tokenizer, reward_fn, cfg
        self.ref_model = ref_model
        p = next(policy.parameters())
        self.value_head = nn.Linear(policy.config.n_embd, 1, device=p.device, dtype=torch.float32)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        self.params = [q for q in policy.parameters() if q.requires_grad] + list(self.value_head.parameters())
        both = nn.ModuleDict({"policy": policy, "value_head": self.value_head})  # AdamW's betas, no decay
        self.optimizer = make_optimizer(both, cfg.lr, 0.0, (0.9, 0.999))
        self.eos_ids = sorted(set(eos_ids) | set(tokenizer.eos_ids) | set(policy.config.eos_token_ids))
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else (self.eos_ids or [0])[0]
        self.kl_coef = cfg.kl_coef
        self.steps_done = 0
        policy.eval()  # no dropout: the first minibatch's ratio is exactly 1

    def forward(self, model: nn.Module, idx: Tensor, positions: Tensor, key_mask: Tensor, P: int,
                with_values: bool = True) -> tuple[Tensor, Tensor | None]:
        """idx/positions/key_mask (b, T) -> logits (b, R, V) over the response positions (scaled by
        1/temperature) and values (b, R); the response starts at column P."""
        h = model.hidden_states(idx, positions, key_mask)  # (b, T, C)
        h = h[:, P - 1:-1]  # (b, R, C): the states that predict each response token
        logits = model.lm_head(h).float() / self.cfg.temperature
        values = self.value_head(h.float()).squeeze(-1) if with_values else None
        return logits, values

    def sample_seed(self, index: int) -> int:
        """The sampling seed of the prompt at ``index`` in the global batch of the current PPO step: a function of
        (seed, step, index) only, so the rollouts do not depend on how the batch is split among ranks."""
        return ((self.cfg.seed * 1_000_003 + self.steps_done) * 1_000_003 + index) % 2 ** 63

    @torch.no_grad()
    def rollout(self, prompts: list[str], prompt_ids: list[list[int]]) -> Rollout:
        """Sample a response per prompt (each alone, seeded by ``sample_seed`` of its global index), score it, and
        record log-probs, reference log-probs and values."""
        c = self.cfg
        params = SamplingParams(temperature=c.temperature, top_k=c.top_k, top_p=c.top_p)
        responses = []
        for b, ids in enumerate(prompt_ids):
            steps = generate_tokens(self.policy, [ids], c.max_new_tokens, params, eos_ids=self.eos_ids,
                                    pad_id=self.pad_id, seed=self.sample_seed(self.offset + b))
            responses.append([toks[0] for toks in steps if toks[0] is not None])
        device = next(self.policy.parameters()).device
        B, P, R = len(prompts), max(len(p) for p in prompt_ids), max(len(r) for r in responses)
        idx = torch.full((B, P + R), self.pad_id, dtype=torch.long, device=device)
        key_mask = torch.zeros((B, P + R), dtype=torch.bool, device=device)
        prompt_idx, prompt_mask = pad_left(prompt_ids, self.pad_id)  # (B, P): left-padded, as generation did
        idx[:, :P], key_mask[:, :P] = prompt_idx, prompt_mask.bool()
        for b, response in enumerate(responses):  # right-padded after each response's end
            idx[b, P:P + len(response)] = torch.tensor(response, dtype=torch.long, device=device)
            key_mask[b, P:P + len(response)] = True
        positions = (key_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
        mask = key_mask[:, P:].float()  # (B, R)
        eos = set(self.eos_ids)
        completions = [self.tokenizer.decode([t for t in row if t not in eos])
                       for row in (idx[b, P:][key_mask[b, P:]].tolist() for b in range(B))]
        scores = torch.as_tensor(self.reward_fn(prompts, completions), dtype=torch.float32, device=device)
        if scores.shape != (B,):
            raise LmforgeError(f"the reward function returned shape {tuple(scores.shape)} for {B} completions")
        bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
        if bad:
            raise LmforgeError(f"the reward became {float(scores[bad[0]])} at PPO step {self.steps_done + 1} (for "
                               f"{len(bad)} of {B} completions, e.g. {completions[bad[0]]!r}); stopping without "
                               "saving: the reward must be a finite number")
        seq, response = (idx, positions, key_mask, P), idx[:, P:]
        logits, values = self.forward(self.policy, *seq)
        logp = token_logprobs(logits, response) * mask
        if self.ref_model is None:
            set_lora_enabled(self.policy, False)
            try:
                ref_logits, _ = self.forward(self.policy, *seq, with_values=False)
            finally:
                set_lora_enabled(self.policy, True)
        else:
            ref_logits, _ = self.forward(self.ref_model, *seq, with_values=False)
        ref_logp = token_logprobs(ref_logits, response) * mask
        return Rollout(idx, key_mask, positions, mask, logp, ref_logp, values * mask, scores, completions,
                       float(masked_mean(entropy(logits), mask)))

    def step(self, prompts: list[str], prompt_ids: list[list[int]]) -> dict[str, float]:
        """One PPO step on a batch of prompts (this rank's share of the global batch); returns the step's
        statistics (the global batch's)."""
        c = self.cfg
        if len(prompts) != self.local_batch:
            share = "" if self.dist.world == 1 else f" (this rank's {self.local_batch} of a world of {self.dist.world})"
            raise LmforgeError(f"a PPO step takes batch_size={c.batch_size} prompts{share}, got {len(prompts)}")
        b = self.rollout(prompts, prompt_ids)
        step = self.steps_done + 1

        hint = "PPO keeps its last checkpoint; lower --lr or check the reward and --kl-coef/--gamma/--lam/--vf-coef"

        def finite(value, what: str):
            return check_finite_value(value, what, step, hint)

        finite(self.kl_coef, "KL coefficient")
        finite(b.logp.sum() + b.ref_logp.sum() + b.values.sum(), "policy/reference log-probs or values")
        rewards, kl = kl_shaped_rewards(b.logp, b.ref_logp, b.scores, b.mask, self.kl_coef)
        finite(kl, "KL")
        finite(rewards, "KL-shaped reward")
        advantages, returns = gae(rewards, b.values, b.mask, c.gamma, c.lam)
        advantages = whiten_across(advantages, b.mask, self.sums)
        finite(advantages, "advantage")
        finite(returns, "return")
        response = b.idx[:, b.P:]
        B, lo = len(prompts), self.offset
        tokens = torch.zeros(c.batch_size, dtype=torch.float64)  # response tokens of each global row
        tokens[lo:lo + B] = b.mask.sum(1).double().cpu()
        tokens = self.sums(tokens)
        gen = torch.Generator().manual_seed(c.seed * 7919 + self.steps_done)
        sums = {"policy_loss": 0.0, "value_loss": 0.0, "clipfrac": 0.0, "value_clipfrac": 0.0, "approx_kl": 0.0}
        n, norm_sum = 0, 0.0
        for _ in range(c.ppo_epochs):
            order = torch.randperm(c.batch_size, generator=gen)  # the same global minibatches on every rank
            for start in range(0, c.batch_size, c.mini_batch_size):
                batch_rows = order[start:start + c.mini_batch_size]
                held = batch_rows[(batch_rows >= lo) & (batch_rows < lo + B)]  # the rows this rank holds
                share = float(tokens[held].sum() / tokens[batch_rows].sum())  # of the minibatch's response tokens
                self.optimizer.zero_grad(set_to_none=True)
                if len(held):
                    rows = (held - lo).to(response.device)
                    m = b.mask[rows]
                    logits, values = self.forward(self.policy, b.idx[rows], b.positions[rows], b.key_mask[rows], b.P)
                    logp = token_logprobs(logits, response[rows])
                    pg, clipfrac, approx_kl = policy_loss(logp, b.logp[rows], advantages[rows], m, c.clip_range)
                    vf, vf_clipfrac = value_loss(values, b.values[rows], returns[rows], m, c.clip_range_value)
                    loss = pg + c.vf_coef * vf
                    finite(loss, "PPO loss")
                    (loss * share).backward()  # this rank's token-weighted share of the minibatch mean (1 alone)
                    for key, value in zip(sums, (pg, vf, clipfrac, vf_clipfrac, approx_kl)):
                        sums[key] += float(value.detach()) * share
                self.sums.grads(self.params)  # summed over the ranks: the gradient of the whole minibatch's loss
                norm_sum += optimizer_step(self.params, self.optimizer, c.max_grad_norm, step, hint)
                n += 1
        count = float(b.mask.sum())
        local = [float(b.scores.sum()), float(kl.sum()), b.entropy * count, count, *sums.values()]
        total = self.sums(torch.tensor(local, dtype=torch.float64)).tolist()
        kl_per_seq = total[1] / c.batch_size
        stats = {"reward": total[0] / c.batch_size, "kl": kl_per_seq, "entropy": total[2] / total[3],
                 **{k: v / n for k, v in zip(sums, total[4:])}, "grad_norm": norm_sum / n, "kl_coef": self.kl_coef,
                 "response_len": total[3] / c.batch_size}
        if c.target_kl is not None:
            self.kl_coef = adaptive_kl_coef(self.kl_coef, kl_per_seq, c.target_kl, c.horizon, c.batch_size)
        self.steps_done += 1
        self.last_rollout = b
        return stats

