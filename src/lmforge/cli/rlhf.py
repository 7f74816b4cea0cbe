"""The ``lmforge rlhf`` subcommands: ``rlhf ppo`` (PPO against a reward) and ``rlhf dpo`` (DPO / IPO on pairs).

``register(subparsers)`` adds them to the ``lmforge`` parser, their flags derived from the recipe configs
(``PPOConfig``, ``DPOConfig`` in ``alignment/rlhf.py``) as ``cli/training.py`` describes, plus the run flags
(``--resume``, ``--overwrite``, ``--force``, ``--threads``) and ``--config`` / ``--print-config``. The handlers
import torch only when they run. Bad input raises ``LmforgeError``, which ``lmforge.cli.main`` prints as one line.
``rlhf orpo``, ``rlhf simpo`` and ``rlhf kto`` share one handler over ``alignment/preference_recipes.py``'s
``RECIPES`` (config class and recipe per method).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import lmforge.cli.options as options
from lmforge.cli.args import add_nproc_arg, add_output_args, int_arg


def _set_threads(a: argparse.Namespace) -> None:
    if a.threads is not None:
        import torch

        torch.set_num_threads(a.threads)


def _run(a: argparse.Namespace, config_cls, recipe) -> int:
    """Build the recipe's config from the flags (and ``--config``); print it, or run the recipe."""
    cfg = options.recipe_from_args(config_cls, a)
    if a.print_config:
        return 0
    _set_threads(a)
    result = recipe(cfg, resume=a.resume, overwrite=a.overwrite, force=a.force)
    print(json.dumps(result, indent=2))
    print(f"policy saved to {result['out_dir']}", file=sys.stderr)
    return 0


def cmd_ppo(a: argparse.Namespace) -> int:
    from lmforge.alignment.rlhf import PPOConfig, ppo

    return _run(a, PPOConfig, ppo)


def cmd_dpo(a: argparse.Namespace) -> int:
    from lmforge.alignment.rlhf import DPOConfig, dpo

    if a.show_example:  # an action like --print-config, not a recipe setting
        from lmforge.alignment.dpo import show_pair

        c = options.recipe_from_args(DPOConfig, a)
        if not a.print_config:
            color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
            print(show_pair(c.data, c.model, c.chat, c.max_len, c.limit, color=color), end="")
        return 0
    return _run(a, DPOConfig, dpo)


def cmd_grpo(a: argparse.Namespace) -> int:
    from lmforge.alignment.grpo import GRPOConfig, grpo

    return _run(a, GRPOConfig, grpo)


def cmd_preference(a: argparse.Namespace) -> int:
    from lmforge.alignment.preference_recipes import RECIPES

    return _run(a, *RECIPES[a.rlhf_command])


def _add_run_args(p: argparse.ArgumentParser, verb: str) -> None:
    """How a run starts (not part of the recipe): --resume, --overwrite, --force, --threads; then --config."""
    g = p.add_argument_group("running")
    g.add_argument("--resume", action="store_true",
                   help="continue from OUT_DIR/checkpoint, step for step as if the run had never stopped")
    add_output_args(g, verb)
    g.add_argument("--threads", type=int_arg("--threads"), default=None,
                   help="torch CPU threads (default: torch's choice)")
    options.add_config_args(g)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``lmforge rlhf ppo`` and ``lmforge rlhf dpo`` to the ``lmforge`` parser."""
    from lmforge.alignment.rlhf import DPOConfig, PPOConfig

    r = sub.add_parser("rlhf", help="align a model: PPO against a reward model, or DPO/IPO on preference pairs",
                       description="Alignment: `rlhf ppo` optimises a policy against a reward with PPO and a KL "
                                   "penalty to a frozen reference; `rlhf dpo` trains on chosen/rejected pairs "
                                   "(`rlhf orpo` / `rlhf simpo` without a reference; `rlhf kto` also on unpaired "
                                   "desirable/undesirable examples).")
    rsub = r.add_subparsers(dest="rlhf_command", metavar="METHOD", required=True)

    p = rsub.add_parser("ppo", help="PPO with a KL penalty to the reference (Ziegler et al. 2019; Ouyang et al. 2022)",
                        description="Each step samples --batch-size prompts, generates responses, scores them with "
                                    "--reward, subtracts kl_coef * KL(policy || reference) per token, estimates "
                                    "advantages with GAE and runs --ppo-epochs epochs of clipped PPO updates on "
                                    "--mini-batch-size minibatches. Writes OUT_DIR/metrics.jsonl (reward, kl, "
                                    "entropy, clipfrac, value_loss, policy_loss, kl_coef, approx_kl per step), "
                                    "OUT_DIR/config.yaml and OUT_DIR/final.")
    options.add_recipe_args(p, PPOConfig)
    _add_run_args(p, "rlhf ppo")
    add_nproc_arg(p)
    p.set_defaults(func=cmd_ppo)

    q = rsub.add_parser("dpo", help="DPO / IPO on preference pairs (Rafailov et al. 2023; Azar et al. 2023)",
                        description="Train on chosen/rejected pairs: JSONL with prompt/chosen/rejected, or HH-RLHF "
                                    "style chosen/rejected dialogues (the prompt is everything up to the last "
                                    "'\\n\\nAssistant:'). Logs loss, reward margin (chosen - rejected implicit "
                                    "reward) and reward accuracy per step to OUT_DIR/metrics.jsonl; writes "
                                    "OUT_DIR/config.yaml and OUT_DIR/final.")
    options.add_recipe_args(q, DPOConfig)
    q.add_argument("--show-example", action="store_true",
                   help="print the first pair as it will be scored (prompt tokens, which count no log-prob, in "
                        "[[ ]], dim on a terminal) and exit without training; loads the tokenizer, not the model")
    _add_run_args(q, "rlhf dpo")
    add_nproc_arg(q)
    q.set_defaults(func=cmd_dpo)

    from lmforge.alignment.preference_recipes import KTOConfig, ORPOConfig, SimPOConfig

    for name, config_cls, help_text in (
            ("orpo", ORPOConfig, "ORPO: NLL plus an odds-ratio preference term, no reference (Hong et al. 2024)"),
            ("simpo", SimPOConfig, "SimPO: length-normalised margin loss, no reference (Meng et al. 2024)"),
            ("kto", KTOConfig, "KTO on desirable/undesirable examples, paired or not (Ethayarajh et al. 2024)")):
        s = rsub.add_parser(name, help=help_text,
                            description=help_text + ". Data as for rlhf dpo (kto also: records with prompt, "
                                        "completion and desirable: true/false). Logs loss and reward margin per "
                                        "step to OUT_DIR/metrics.jsonl; writes OUT_DIR/config.yaml and OUT_DIR/final.")
        options.add_recipe_args(s, config_cls)
        _add_run_args(s, f"rlhf {name}")
        add_nproc_arg(s)
        s.set_defaults(func=cmd_preference)

    from lmforge.alignment.grpo import GRPOConfig

    g = rsub.add_parser("grpo", help="GRPO: group-relative policy optimisation with verifiable rewards (Shao et al. "
                                     "2024; Dr. GRPO: Liu et al. 2025)",
                        description="Each step samples --group-size completions of --batch-size prompts, scores them "
                                    "with the --rewards (summed with --reward-weights), normalises each reward within "
                                    "its group and takes a clipped policy-gradient step, with an optional k3 KL "
                                    "penalty (--beta) to the reference. Writes OUT_DIR/metrics.jsonl (loss, reward, "
                                    "reward_<name>, kl, held-out eval_* before and after), OUT_DIR/config.yaml and "
                                    "OUT_DIR/final.")
    options.add_recipe_args(g, GRPOConfig)
    _add_run_args(g, "rlhf grpo")
    g.set_defaults(func=cmd_grpo)
