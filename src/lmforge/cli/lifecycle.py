"""``lmforge lifecycle RECIPE.yaml``: the whole project lifecycle (select, adapt, align, evaluate, optimise, deploy)
from one recipe, each stage skipped on a re-run when its inputs are unchanged. The work is in ``lmforge.lifecycle``;
this module is its command line (flags from ``LifecycleConfig``'s top-level fields, ``--stages``, ``--force``)."""

from __future__ import annotations

import argparse
import shlex

import lmforge.cli.options as options
from lmforge.errors import LmforgeError


def cmd_lifecycle(a: argparse.Namespace) -> int:
    from lmforge.lifecycle.config import LifecycleConfig, SectionError, line_of
    from lmforge.lifecycle.run import run_lifecycle

    if a.recipe and a.config_file and a.recipe != a.config_file:
        raise LmforgeError(f"give the recipe once: {a.recipe} or --config {a.config_file}, not both")
    a.config_file = a.recipe or a.config_file
    if a.config_file is None:
        raise LmforgeError("give a recipe: lmforge lifecycle RECIPE.yaml (see recipes/lifecycle_dialogsum.yaml)")
    try:
        cfg = options.recipe_from_args(LifecycleConfig, a)
    except SectionError as e:  # a key inside a section: add the file and line
        line = line_of(a.config_file, e.keys)
        raise LmforgeError(f"{a.config_file}{f':{line}' if line else ''}: {e}") from None
    if a.print_config:
        return 0
    stages = [s.strip() for s in a.only.split(",") if s.strip()] if a.only else None
    command = shlex.join(["lmforge", "lifecycle", a.config_file, "--out", str(cfg.out)])
    records = run_lifecycle(cfg, stages=stages, force=a.force_stage or (), progress=not a.no_progress,
                            command=command)
    for stage, r in records.items():
        if r.get("decision"):
            print(f"{stage}: {r['decision']}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``lifecycle`` to the ``lmforge`` parser."""
    from lmforge.lifecycle.config import STAGES, LifecycleConfig

    p = sub.add_parser(
        "lifecycle", help="the whole lifecycle from one recipe: select, adapt, align, evaluate, optimise, deploy",
        description="Run the stages of RECIPE.yaml in order: select (zero/few-shot of each candidate with size "
                    "and speed; the gate picks one and says why), adapt (lmforge finetune), align (lmforge rlhf "
                    "dpo, optional), evaluate (base vs adapted on held-out data), optimise (int8/int4, optional) "
                    "and deploy (lmforge serve started, smoke-tested with the openai client, stopped). Each stage "
                    "writes OUT/<stage>/ and OUT/<stage>/stage.json last; a re-run skips every stage whose inputs "
                    "are unchanged and resumes a killed fine-tune from its checkpoint. OUT/report.md and "
                    "OUT/report.html show every stage and decision. See recipes/lifecycle_dialogsum.yaml.")
    p.add_argument("recipe", nargs="?", default=None, metavar="RECIPE.yaml", help="the lifecycle recipe")
    options.add_recipe_args(p, LifecycleConfig, skip=("stages",))
    p.add_argument("--stages", dest="only", default=None, metavar="STAGE,...",
                   help=f"run only these stages ({', '.join(STAGES)}); the stages they read must have run before "
                        "(default: the recipe's stages)")
    p.add_argument("--force", dest="force_stage", action="append", default=[], metavar="STAGE",
                   help="re-run STAGE and every later stage even if unchanged (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    options.add_config_args(p)
    p.set_defaults(func=cmd_lifecycle)
