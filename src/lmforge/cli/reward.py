"""The ``lmforge reward`` subcommands: ``train`` (a classifier or a pairwise reward model) and
``eval`` (held-out metrics of a saved one).

``reward train``'s flags are derived from ``RewardConfig`` (``alignment/reward_recipe.py``) as ``cli/training.py``
describes, with ``--config`` / ``--print-config``; ``--resume``, ``--overwrite``, ``--force``, ``--threads`` and
``--metrics-out`` are run flags. Handlers import torch only when they run; bad input raises ``LmforgeError``
(one line, exit 2).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import lmforge.cli.options as options
from lmforge.cli.args import add_nproc_arg, add_output_args, int_arg


def _list(text: str | None) -> list[str] | None:
    return [x.strip() for x in text.split(",") if x.strip()] if text else None


def _print(metrics: dict, output: str | None) -> None:
    print(json.dumps({k: v for k, v in metrics.items() if k != "reliability"}))
    if output:
        from lmforge.io import write_json_atomic

        write_json_atomic(Path(output), metrics)
        print(f"metrics written to {output}", file=sys.stderr)


def cmd_train(a: argparse.Namespace) -> int:
    from lmforge.alignment.reward_recipe import RewardConfig

    cfg = options.recipe_from_args(RewardConfig, a)
    if a.print_config:
        return 0
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    if cfg.kind == "classifier":
        from lmforge.alignment.reward_classifier import train_classifier as train
    else:
        from lmforge.alignment.reward_pairwise import train_pairwise as train
    metrics = train(cfg, resume=a.resume, overwrite=a.overwrite, force=a.force)
    _print(metrics, a.metrics_out)
    print(f"reward model saved to {cfg.out_dir}", file=sys.stderr)
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    import torch

    from lmforge.alignment.reward import load_reward_model, pairwise_metrics
    from lmforge.alignment.reward_classifier import evaluate_classifier
    from lmforge.data.reward_data import load_labelled, load_pairs, parse_label_map, to_binary

    if a.threads:
        torch.set_num_threads(a.threads)
    reward = load_reward_model(a.model, device=a.device)
    if reward.kind == "pairwise":
        pairs = load_pairs(a.data, a.chosen_field, a.rejected_field)[: a.max_eval]
        scores = reward.score([c for c, _ in pairs] + [r for _, r in pairs])
        metrics = pairwise_metrics(scores[: len(pairs)], scores[len(pairs):])
    else:
        from lmforge.io import read_json_object

        trained = read_json_object(Path(a.model) / "reward_config.json").get("train") or {}
        label_map = parse_label_map(a.label_map or None) if a.label_map is not None else trained.get("label_map")
        binary = trained.get("binary", False)
        text_field, label_field = a.text_field or trained.get("text_field"), a.label_field or trained.get("label_field")
        classes = None if binary else list(reward.config.labels)  # a label outside the model's classes is an error
        data = load_labelled(a.data, text_field or "text", label_field or "label", label_map, names=classes)
        if binary:
            data = to_binary(data, _list(a.good_labels) or trained.get("good_labels") or [])
        indices = list(range(len(data.texts)))[: a.max_eval]
        metrics = evaluate_classifier(reward, data, indices)
    _print(metrics, a.metrics_out)
    return 0


def _run_flags(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """Flags of both subcommands that are not part of a recipe: CPU threads and where the metrics go."""
    p.add_argument("--threads", type=int_arg("--threads"), default=None,
                   help="torch CPU threads (default: torch's choice; use 1 on a shared machine)")
    p.add_argument("--metrics-out", default=None, metavar="FILE",
                   help="also write the metrics (with the reliability table) to this JSON file")


def _eval_fields(p: argparse.ArgumentParser) -> None:
    """``reward eval``'s data flags (``reward train`` has them from ``RewardConfig``)."""
    p.add_argument("--max-eval", type=int_arg("--max-eval"), default=None,
                   help="score at most the first N examples (default: all)")
    p.add_argument("--text-field", default=None, help="classifier: the text column/field (default: as trained)")
    p.add_argument("--label-field", default=None, help="classifier: the label column/field (default: as trained)")
    p.add_argument("--chosen-field", default="chosen", help="pairwise: the preferred text's field (default: chosen)")
    p.add_argument("--rejected-field", default="rejected",
                   help="pairwise: the dispreferred text's field (default: rejected)")
    _run_flags(p)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``lmforge reward train`` and ``lmforge reward eval``."""
    from lmforge.alignment.reward_recipe import RewardConfig  # torch-free at import

    r = sub.add_parser("reward", help="train and evaluate reward models (toxicity classifier, pairwise preferences)",
                       description="Reward models for alignment: a classifier whose reward is P(good class), e.g. "
                                   "P(not toxic), or a pairwise (Bradley-Terry) model trained on chosen/rejected "
                                   "pairs. Load one in Python with "
                                   "lmforge.alignment.reward.load_reward_model(PATH).score(texts).")
    rsub = r.add_subparsers(dest="reward_command", metavar="ACTION", required=True)

    t = rsub.add_parser("train", help="train a reward model and report held-out metrics",
                        description="Train a reward model on DATA (.csv, .jsonl or .json, optionally .gz) and save "
                                    "it to OUT_DIR (a Hugging Face directory + reward_config.json; the resolved "
                                    "settings in config.yaml, which --config reruns). Prints the "
                                    "held-out metrics as JSON: accuracy, balanced accuracy (classifier), ROC AUC, "
                                    "expected calibration error (10 bins); pairwise: accuracy and mean margin.")
    options.add_recipe_args(t, RewardConfig, positional=("data",))
    g = t.add_argument_group("running")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in OUT_DIR from its checkpoint, step for step as if uninterrupted")
    add_output_args(g, "reward train")
    add_nproc_arg(g)
    _run_flags(g)
    options.add_config_args(g)
    t.set_defaults(func=cmd_train)

    e = rsub.add_parser("eval", help="held-out metrics of a saved reward model",
                        description="Score DATA with the reward model at MODEL and print the metrics as JSON. A "
                                    "classifier reads labelled texts (fields, label map and --binary as it was "
                                    "trained unless overridden); a pairwise model reads chosen/rejected pairs.")
    e.add_argument("model", help="a reward model directory written by `lmforge reward train`")
    e.add_argument("data", help="labelled texts or chosen/rejected pairs (.csv, .jsonl, .json, optionally .gz, or "
                                  ".parquet)")
    e.add_argument("--label-map", default=None, help="classifier: VALUE=NAME pairs (default: as trained)")
    e.add_argument("--good-labels", default=None, help="classifier with --binary: the good classes (default: as "
                                                       "trained)")
    e.add_argument("--device", default="cpu", help="cpu, cuda, ... (default: %(default)s)")
    _eval_fields(e)
    e.set_defaults(func=cmd_eval)
