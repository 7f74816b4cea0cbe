"""The generative-AI project lifecycle in one command: ``lmforge lifecycle RECIPE.yaml``.

One recipe names the task (data, prompt, metric, budget), the candidate models and the stages: ``select`` (a
gate: zero/few-shot, size and speed of each candidate), ``adapt`` (fine-tuning), ``align`` (DPO, optional),
``evaluate`` (held-out, base vs adapted), ``optimise`` (quantisation, optional) and ``deploy`` (serve, smoke
test, stop). Each stage writes under ``OUT/<stage>/`` and is skipped on a re-run when its inputs are unchanged.

Modules: ``config`` (the typed recipe), ``stages`` (each stage, its inputs and hash), ``run`` (the runner),
``report`` (report.md / report.html). This package sits between ``lmforge.deploy`` and ``lmforge.cli``: it
composes every verb below it (compare, finetune, rlhf dpo, serve) and adds no training or scoring of its own.
Departure from the design brief: ``optimise`` quantises at load time (``lmforge.load(quantize=...)``, which
``serve`` also takes) rather than calling ``lmforge quantize``/``distill``/``prune``, whose entry points live
in the CLI layer above this one; distillation and pruning are not stages yet.
"""

from lmforge.lifecycle.config import STAGES, LifecycleConfig, load_lifecycle
from lmforge.lifecycle.run import run_lifecycle

__all__ = ["STAGES", "LifecycleConfig", "load_lifecycle", "run_lifecycle"]
