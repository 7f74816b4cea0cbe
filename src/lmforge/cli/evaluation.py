"""The ``eval`` and ``compare`` subcommands, and ``lm-eval`` (lm-evaluation-harness's command line with lmforge
as its ``lmforge`` model: every argument after ``lm-eval`` is lm-eval's, see ``evaluation/lm_eval_model.py``).

``register(subparsers)`` adds them to the ``lmforge`` parser; their flags come from ``EvalConfig``
(``evaluation/harness.py``) and ``CompareConfig`` (``evaluation/compare.py``) through
``lmforge.cli.options`` (the pattern is described in ``lmforge.cli.training``), with ``--config FILE.yaml``
and ``--print-config``. Handlers import torch and the metric libraries only when they run. Bad input
raises ``LmforgeError`` (one line, exit 2).

Parsed by hand here: ``--chat/--no-chat`` (an optional bool), ``--stop`` (repeatable), ``--setting``
(compare: one column as ``KEY=VALUE,...``), and in ``--prompt-template`` and ``--instruction`` the
two-character sequences ``\\n`` and ``\\t`` stand for a newline and a tab, so
``--prompt-template "Summarize:\\n\\n{dialogue}\\n\\nSummary:"`` works in a shell.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import lmforge.cli.options as options
from lmforge.errors import LmforgeError
from lmforge.recipe_config import from_yaml, recipe_fields

_UNESCAPED = ("prompt_template", "instruction")


def unescape(text: str | None) -> str | None:
    """``\\n`` -> newline and ``\\t`` -> tab (a shell passes them as two characters)."""
    return None if text is None else text.replace("\\n", "\n").replace("\\t", "\t")


def _by_hand(a: argparse.Namespace) -> dict:
    """The values of the flags parsed here (only those given), as recipe overrides; unescapes in place."""
    for name in _UNESCAPED:
        if isinstance(getattr(a, name, None), str):
            setattr(a, name, unescape(getattr(a, name)))
    return {name: getattr(a, name) for name in ("chat", "stop") if hasattr(a, name)}


def _add_by_hand(p: argparse.ArgumentParser, stop: bool) -> None:
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                   help="use the model's chat template (default: when the model has one)")
    if stop:
        p.add_argument("--stop", action="append", metavar="TEXT", default=argparse.SUPPRESS,
                       help="stop when this text appears (repeatable); it is not printed")


def cmd_eval(a: argparse.Namespace) -> int:
    from lmforge.evaluation.harness import EvalConfig, evaluate

    cfg = options.recipe_from_args(EvalConfig, a, **_by_hand(a))
    if a.print_config:
        return 0
    if cfg.out is None:
        raise LmforgeError("out (-o/--out): give the output folder")
    summary = evaluate(cfg, progress=not a.no_progress, force=a.force)
    shown = {k: summary[k] for k in ("metrics", "counts", "references") if k in summary}  # references: several
    print(json.dumps(shown, indent=2))
    print(f"wrote {Path(cfg.out) / 'predictions.jsonl'}, {Path(cfg.out) / 'summary.json'} and "
          f"{Path(cfg.out) / 'config.yaml'}", file=sys.stderr)
    return 0


def _parse_setting(text: str) -> dict:
    """``label=hot,temperature=0.9,top_p=0.9`` -> a setting dict (values read as YAML scalars)."""
    import yaml

    out = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise LmforgeError(f"--setting {text!r}: expected KEY=VALUE pairs separated by commas, "
                               "e.g. label=hot,temperature=0.9,seed=1")
        out[key.strip()] = yaml.safe_load(value) if value.strip() else None
    return out


def _command_line(a: argparse.Namespace) -> str:
    """The `lmforge compare ...` command that reproduces this run (the flags as given)."""
    from lmforge.evaluation.compare import CompareConfig

    parts = ["lmforge", "compare"]
    if a.config_file:
        parts += ["--config", a.config_file]
    for f in recipe_fields(CompareConfig):
        if f.name in ("chat", "stop") or not hasattr(a, f.name):
            continue
        v, flag = getattr(a, f.name), "--" + f.name.replace("_", "-")
        if isinstance(v, bool):
            parts.append(flag if v else "--no-" + flag[2:])
        else:
            parts += [flag, *(v if isinstance(v, list) else [str(v)])]
    if hasattr(a, "chat"):
        parts.append("--chat" if a.chat else "--no-chat")
    for s in a.setting:
        parts += ["--setting", s]
    return shlex.join(parts)


def cmd_compare(a: argparse.Namespace) -> int:
    from lmforge.evaluation.compare import CompareConfig, report_only, run_compare

    extra = _by_hand(a)
    if a.setting:
        in_file = from_yaml(CompareConfig, Path(a.config_file)).get("settings", ()) if a.config_file else ()
        extra["settings"] = [*in_file, *(_parse_setting(s) for s in a.setting)]
    source = a.config_file or "the command line"
    try:
        cfg = options.recipe_from_args(CompareConfig, a, **extra)
    except LmforgeError as e:
        if a.config_file and not str(e).startswith(a.config_file):
            raise LmforgeError(f"{a.config_file}: {e}") from None  # e.g. a bad key inside settings
        raise
    if a.print_config:
        return 0
    if not Path(cfg.data).is_file():
        raise LmforgeError(f"{source}: dataset {cfg.data} does not exist")
    if a.check:
        print(f"{source}: valid, {len(cfg.settings)} settings: {', '.join(s.label for s in cfg.settings)}")
        return 0
    if a.report_only:
        results = report_only(cfg, _command_line(a), force=a.force)
    else:
        results = run_compare(cfg, _command_line(a), progress=not a.no_progress, force=a.force)
    table = {r.setting.label: r.summary["metrics"] for r in results}
    print(json.dumps(table, indent=2))
    print(f"wrote {Path(cfg.out) / 'report.md'} and {Path(cfg.out) / 'report.html'}", file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``eval`` and ``compare`` to the ``lmforge`` parser."""
    from lmforge.cli.args import add_output_args
    from lmforge.evaluation.compare import CompareConfig
    from lmforge.evaluation.harness import EvalConfig

    e = sub.add_parser("eval", help="evaluate a model on a dataset (ROUGE, BLEU, chrF, perplexity, choices, toxicity)",
                       description="Evaluate a model on a JSONL / JSON / CSV / .txt dataset (optionally .gz) or "
                                   ".parquet. Writes OUT/predictions.jsonl (one line per example), OUT/summary.json "
                                   "and OUT/config.yaml (the resolved settings: rerun with --config).")
    options.add_recipe_args(e, EvalConfig, positional=("data",), skip=("chat", "stop"))
    _add_by_hand(e, stop=True)
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_output_args(e, "eval")
    options.add_config_args(e)
    e.set_defaults(func=cmd_eval)

    c = sub.add_parser("compare", help="compare settings side by side (shots, sampling, models, adapters)",
                       description="Run one dataset under several settings and write OUT/report.md, "
                                   "OUT/report.html (self-contained), chart_<metric>.png, OUT/config.yaml and "
                                   "OUT/runs/<label>/. Settings come from --config RECIPE.yaml and/or --setting; "
                                   "other flags override the recipe's keys.")
    options.add_recipe_args(c, CompareConfig, skip=("chat",))
    _add_by_hand(c, stop=False)
    c.add_argument("--setting", action="append", default=[], metavar="KEY=VALUE,...",
                   help="add a setting, e.g. 'label=hot,temperature=0.9,top_p=0.9,seed=1' (keys: label, model, "
                        "adapter, quantize (int8|int4), shots, shots_file, temperature, top_k, top_p, "
                        "repetition_penalty, seed, max_new_tokens); repeatable")
    c.add_argument("--check", action="store_true", help="validate the config and stop (runs no model)")
    c.add_argument("--report-only", action="store_true",
                   help="rebuild the report from the runs already written (runs no model)")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_output_args(c, "compare")
    options.add_config_args(c)
    c.set_defaults(func=cmd_compare)

    # prefix_chars that no argument starts with: every token after `lm-eval` (--help included) is lm-eval's
    le = sub.add_parser("lm-eval", help="lm-evaluation-harness with lmforge as its model (pip install lm_eval)",
                        description="lm-evaluation-harness's command line with the model `lmforge` registered: "
                                    "lmforge lm-eval run --model lmforge --model_args pretrained=PATH --tasks TASK "
                                    "[--include_path DIR] ... (lmforge lm-eval --help: lm-eval's own help)",
                        add_help=False, prefix_chars="\0")
    le.add_argument("lm_eval_args", nargs=argparse.REMAINDER)
    le.set_defaults(func=cmd_lm_eval)


def cmd_lm_eval(a: argparse.Namespace) -> int:
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise LmforgeError("lmforge lm-eval needs lm-evaluation-harness: pip install lm_eval")
    from lmforge.evaluation.lm_eval_model import main

    try:
        main(a.lm_eval_args)
    except SystemExit as e:  # lm-eval's own --help and usage errors
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    return 0
