"""The ``lmforge distill`` subcommand: knowledge distillation from a teacher into a smaller student.

Its flags come from ``training/distill.py`` ``DistillConfig`` (``options.add_recipe_args``), as ``finetune``'s
come from ``FinetuneConfig``; the handler builds the config (defaults < ``--config`` file < flags), returns after
``--print-config`` and else calls ``distill``. Bad input raises ``LmforgeError`` (one ``error:`` line).
"""

from __future__ import annotations

import argparse
import json
import sys

import lmforge.cli.options as options
from lmforge.cli.args import add_nproc_arg, add_output_args


def cmd_distill(a: argparse.Namespace) -> int:
    from lmforge.training.distill import DistillConfig, distill

    if getattr(a, "prompt_template", None) is not None:
        a.prompt_template = a.prompt_template.replace("\\n", "\n").replace("\\t", "\t")
    cfg = options.recipe_from_args(DistillConfig, a)
    if a.print_config:
        return 0
    result = distill(cfg, resume=a.resume, overwrite=a.overwrite, force=a.force)
    print(json.dumps(result, indent=2))
    print(f"student saved to {result['out_dir']}", file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``lmforge distill`` to the subcommands."""
    from lmforge.training.distill import DistillConfig  # torch-free at import

    p = sub.add_parser(
        "distill", help="knowledge distillation: train a smaller student on a teacher's next-token distributions",
        description="Distil --teacher into a student (--student PRESET|MODEL, or --student-layers K: the teacher "
                    "with K evenly spaced blocks) on SFT records (response tokens) or a text corpus (every token): "
                    "forward KL (Hinton et al. 2015), reverse KL or generalised JSD (Agarwal et al. 2024) between "
                    "temperature-softened distributions, optionally mixed with the label loss (--alpha). Teacher "
                    "logits on the fly, or its top-k cached on disk (--cache-teacher DIR --top-k K). Writes "
                    "OUT_DIR/final (a Hugging Face directory), OUT_DIR/checkpoint (for --resume), metrics.jsonl "
                    "(val_kl: the KL to the teacher on held-out text) and config.yaml.")
    options.add_recipe_args(p, DistillConfig)
    run = p.add_argument_group("run")
    run.add_argument("--resume", action="store_true", help="continue from OUT_DIR/checkpoint")
    add_output_args(run, "distill")
    add_nproc_arg(run)
    options.add_config_args(run)
    p.set_defaults(func=cmd_distill)
