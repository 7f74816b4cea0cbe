"""The ``lmforge rlhf`` subcommands: ``rlhf ppo`` (PPO against a reward) and ``rlhf dpo`` (DPO / IPO on pairs).

``register(subparsers)`` adds them to the ``lmforge`` parser; the handlers import torch only when they run
and call the recipes of ``rlhf.py``. Bad input raises ``LmforgeError``, which ``lmforge.cli.main`` prints
as one line.
"""

from __future__ import annotations

import argparse
import json
import sys

from lmforge.errors import LmforgeError


def _common(a: argparse.Namespace) -> dict:
    from lmforge.cli.args import parse_targets

    if a.threads is not None:
        import torch

        torch.set_num_threads(a.threads)
    return dict(adapter=a.adapter, method=a.method, ref=a.ref, out_dir=a.out_dir, lr=a.lr, precision=a.precision,
                seed=a.seed, device=a.device, lora_r=a.lora_r, lora_alpha=a.lora_alpha, lora_dropout=a.lora_dropout,
                lora_targets=parse_targets(a.lora_targets), rslora=a.rslora, chat={"auto": None, "chat": True,
                                                                             "plain": False}[a.template],
                overwrite=a.overwrite, force=a.force)


def cmd_ppo(a: argparse.Namespace) -> int:
    from lmforge.alignment.rlhf import ppo

    if a.reward is None:
        raise LmforgeError("no reward given: --reward PATH (a reward-model folder) or --reward package.module:function")
    result = ppo(a.model, a.prompts, a.reward, steps=a.steps, batch_size=a.batch_size,
                 mini_batch_size=a.mini_batch_size, ppo_epochs=a.ppo_epochs, kl_coef=a.kl_coef, target_kl=a.target_kl,
                 horizon=a.horizon, gamma=a.gamma, lam=a.lam, clip_range=a.clip_range, vf_coef=a.vf_coef,
                 max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                 prompt_field=a.prompt_field, reward_input=a.reward_input, save_every=a.save_every,
                 resume=a.resume, **_common(a))
    print(json.dumps(result, indent=2))
    print(f"policy saved to {result['out_dir']}", file=sys.stderr)
    return 0


def cmd_dpo(a: argparse.Namespace) -> int:
    from lmforge.alignment.rlhf import dpo

    result = dpo(a.model, a.data, loss=a.loss, beta=a.beta, label_smoothing=a.label_smoothing,
                 precompute_ref=a.precompute_ref, steps=a.steps, epochs=a.epochs, batch_size=a.batch_size,
                 warmup_steps=a.warmup, max_len=a.max_len, limit=a.limit, eval_fraction=a.eval_fraction,
                 eval_every=a.eval_every, save_every=a.save_every, resume=a.resume,
                 **_common(a))
    print(json.dumps(result, indent=2))
    print(f"policy saved to {result['out_dir']}", file=sys.stderr)
    return 0


def _add_checkpoint_args(g, what: str, verb: str) -> None:
    from lmforge.cli.args import add_output_args, int_arg

    g.add_argument("--save-every", type=int_arg("--save-every", 0), default=0,
                   help=f"write OUT_DIR/checkpoint ({what}) atomically every N steps and at the end "
                        "(default: 0, never)")
    g.add_argument("--resume", action="store_true",
                   help="continue from OUT_DIR/checkpoint, step for step as if the run had never stopped")
    add_output_args(g, verb)


def _add_policy_args(p: argparse.ArgumentParser, default_steps: str) -> None:
    from lmforge.checkpoints.resolve import DEFAULT_MODEL
    from lmforge.cli.args import float_arg, int_arg

    m = p.add_argument_group("policy and reference")
    m.add_argument("-m", "--model", default=None,
                   help=f"the policy's base: a model name or path (default: the embedded {DEFAULT_MODEL})")
    m.add_argument("--adapter", help="continue training this PEFT LoRA adapter (with --method lora); the reference "
                                     "stays the base without it: to use an SFT adapter as the reference, "
                                     "`lmforge merge` it and pass the merged model as --model")
    m.add_argument("--method", choices=("lora", "full"), default="lora",
                   help="lora: train low-rank adapters, the reference is the base with them switched off (no "
                        "second copy); full: train every weight against a frozen copy (default: lora)")
    m.add_argument("--ref", help="a separate reference model (same architecture as the policy; default: the base "
                                 "with LoRA off, or a frozen copy for --method full)")
    m.add_argument("--template", choices=("auto", "chat", "plain"), default="auto",
                   help="render prompts with the model's chat template or as plain text (default: chat when the "
                        "tokenizer has a template)")
    pe = p.add_argument_group("LoRA (as in lmforge finetune)")
    pe.add_argument("--lora-r", type=int_arg("--lora-r"), default=16, help="LoRA rank (default: 16)")
    pe.add_argument("--lora-alpha", type=float_arg("--lora-alpha", 0.0, low_open=True), default=32.0,
                    help="LoRA alpha; the update is scaled by alpha/r (default: 32)")
    pe.add_argument("--lora-dropout", type=float_arg("--lora-dropout", 0.0, 0.99), default=0.0,
                    help="dropout on the LoRA input (default: 0)")
    pe.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj",
                    help="comma-separated layer names, 'all-linear', or a regex over full names "
                         "(default: q_proj,k_proj,v_proj,o_proj)")
    pe.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(r) (rank-stabilised LoRA)")
    t = p.add_argument_group("optimisation and output")
    t.add_argument("--steps", type=int_arg("--steps"), default=None,
                   help=f"optimiser / PPO steps (default: {default_steps})")
    t.add_argument("--lr", type=float_arg("--lr", 0.0, low_open=True), default=None,
                   help="learning rate (default: 1e-4 LoRA, 1e-6 full)")
    t.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16 = autocast (default: fp32)")
    t.add_argument("--seed", type=int_arg("--seed", 0), default=0,
                   help="seed for sampling, shuffling and init (default: 0)")
    t.add_argument("--device", default="cpu", help="cpu, cuda, ... (default: cpu)")
    t.add_argument("--threads", type=int_arg("--threads"), default=None,
                   help="torch CPU threads (default: torch's choice)")
    t.add_argument("-o", "--out-dir", required=True,
                   help="output folder: metrics.jsonl, config.json and final/ (the adapter or model)")


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``lmforge rlhf ppo`` and ``lmforge rlhf dpo`` to the ``lmforge`` parser."""
    from lmforge.cli.args import float_arg, int_arg

    r = sub.add_parser("rlhf", help="align a model: PPO against a reward model, or DPO/IPO on preference pairs",
                       description="Alignment: `rlhf ppo` optimises a policy against a reward with PPO and a KL "
                                   "penalty to a frozen reference; `rlhf dpo` trains on chosen/rejected pairs.")
    rsub = r.add_subparsers(dest="rlhf_command", metavar="METHOD", required=True)

    p = rsub.add_parser("ppo", help="PPO with a KL penalty to the reference (Ziegler et al. 2019; Ouyang et al. 2022)",
                        description="Each step samples --batch-size prompts, generates responses, scores them with "
                                    "--reward, subtracts kl_coef * KL(policy || reference) per token, estimates "
                                    "advantages with GAE and runs --ppo-epochs epochs of clipped PPO updates on "
                                    "--mini-batch-size minibatches. Writes OUT_DIR/metrics.jsonl (reward, kl, "
                                    "entropy, clipfrac, value_loss, policy_loss, kl_coef, approx_kl per step) "
                                    "and OUT_DIR/final.")
    d = p.add_argument_group("prompts and reward")
    d.add_argument("--prompts", required=True, metavar="FILE",
                   help="prompts: a .txt file (one per line) or JSONL/JSON records with a prompt field")
    d.add_argument("--prompt-field", default="prompt", help="the prompt field of JSON records (default: prompt)")
    d.add_argument("--reward", metavar="PATH",
                   help="a reward-model folder from `lmforge reward train` (higher = better; a toxicity classifier "
                        "gives P(not toxic)), or package.module:function(prompts, completions) -> scores")
    d.add_argument("--reward-input", choices=("completion", "prompt+completion"), default="completion",
                   help="what the reward model reads: the completion alone (classifiers) or prompt + completion "
                        "(pairwise models trained on whole dialogues) (default: completion)")
    g = p.add_argument_group("PPO")
    g.add_argument("--batch-size", type=int_arg("--batch-size"), default=8,
                   help="prompts (rollouts) per PPO step (default: 8)")
    g.add_argument("--mini-batch-size", type=int_arg("--mini-batch-size"), default=4,
                   help="rollouts per optimiser step; must divide --batch-size (default: 4)")
    _add_checkpoint_args(g, "policy, value head, optimiser, KL coefficient, prompt order", "rlhf ppo")
    g.add_argument("--ppo-epochs", type=int_arg("--ppo-epochs"), default=4,
                   help="passes over each rollout (default: 4)")
    g.add_argument("--kl-coef", type=float_arg("--kl-coef", 0.0), default=0.05,
                   help="beta: the per-token KL penalty (the starting value with --target-kl) (default: 0.05)")
    g.add_argument("--target-kl", type=float_arg("--target-kl", 0.0, low_open=True), default=None,
                   help="adapt beta towards this KL per sequence (Ziegler et al.'s controller; default: fixed beta)")
    g.add_argument("--horizon", type=int_arg("--horizon"), default=10000,
                   help="the adaptive controller's horizon in samples (default: 10000)")
    g.add_argument("--gamma", type=float_arg("--gamma", 0.0, 1.0), default=1.0, help="discount (default: 1)")
    g.add_argument("--lam", type=float_arg("--lam", 0.0, 1.0), default=0.95, help="GAE lambda (default: 0.95)")
    g.add_argument("--clip-range", type=float_arg("--clip-range", 0.0, low_open=True), default=0.2,
                   help="PPO ratio clip epsilon, also used for the value clip (default: 0.2)")
    g.add_argument("--vf-coef", type=float_arg("--vf-coef", 0.0), default=0.1,
                   help="weight of the value loss (default: 0.1)")
    s = p.add_argument_group("sampling the rollouts")
    s.add_argument("-n", "--max-new-tokens", type=int_arg("--max-new-tokens"), default=32,
                   help="response length limit (default: 32)")
    s.add_argument("-t", "--temperature", type=float_arg("--temperature", 0.0, low_open=True), default=1.0,
                   help="sampling temperature, > 0 (default: 1)")
    s.add_argument("--top-k", type=int_arg("--top-k"), default=None, help="sample from the k most likely tokens")
    s.add_argument("--top-p", type=float_arg("--top-p", 0.0, 1.0, low_open=True), default=None,
                   help="nucleus sampling probability mass, in (0, 1]")
    _add_policy_args(p, "20")
    p.set_defaults(func=cmd_ppo, steps=20)

    q = rsub.add_parser("dpo", help="DPO / IPO on preference pairs (Rafailov et al. 2023; Azar et al. 2023)",
                        description="Train on chosen/rejected pairs: JSONL with prompt/chosen/rejected, or HH-RLHF "
                                    "style chosen/rejected dialogues (the prompt is everything up to the last "
                                    "'\\n\\nAssistant:'). Logs loss, reward margin (chosen - rejected implicit "
                                    "reward) and reward accuracy per step to OUT_DIR/metrics.jsonl.")
    d = q.add_argument_group("data")
    d.add_argument("--data", required=True, metavar="FILE", help="preference pairs: .jsonl, .json or .jsonl.gz")
    d.add_argument("--limit", type=int_arg("--limit"), help="use only the first N pairs")
    d.add_argument("--eval-fraction", type=float_arg("--eval-fraction", 0.0, 1.0, low_open=True), default=0.0,
                   help="hold out this share of the pairs (seeded) and report their loss, implicit-reward margin "
                        "and accuracy before training, every --eval-every steps and at the end (default: 0)")
    d.add_argument("--eval-every", type=int_arg("--eval-every", 0), default=0,
                   help="steps between held-out evaluations (default: 0, only before and after)")
    d.add_argument("--max-len", type=int_arg("--max-len"), default=None,
                   help="tokens per prompt + response; longer responses are cut, pairs whose prompt fills it "
                        "dropped (default: 512 or the context window)")
    g = q.add_argument_group("preference loss")
    g.add_argument("--loss", choices=("dpo", "ipo"), default="dpo",
                   help="dpo (sigmoid) or ipo (squared) (default: dpo)")
    g.add_argument("--beta", type=float_arg("--beta", 0.0, low_open=True), default=0.1,
                   help="DPO beta (for IPO: tau) (default: 0.1)")
    g.add_argument("--label-smoothing", type=float_arg("--label-smoothing", 0.0, 0.49), default=0.0,
                   help="conservative DPO: the assumed share of flipped labels (default: 0)")
    g.add_argument("--precompute-ref", action="store_true",
                   help="compute the reference log-probs once before training (no reference forward per step)")
    g.add_argument("--batch-size", type=int_arg("--batch-size"), default=4, help="pairs per step (default: 4)")
    g.add_argument("--epochs", type=float_arg("--epochs", 0.0, low_open=True), default=None,
                   help="passes over the pairs (instead of --steps; default: one)")
    g.add_argument("--warmup", type=int_arg("--warmup", 0), default=0, help="linear warmup steps (default: 0)")
    _add_checkpoint_args(g, "policy, optimiser, pair order", "rlhf dpo")
    _add_policy_args(q, "one epoch")
    q.set_defaults(func=cmd_dpo)
