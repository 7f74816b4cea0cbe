"""The ``eval`` and ``compare`` subcommands.

``register(subparsers)`` adds them to the ``lmforge`` parser. Handlers import torch and the
metric libraries only when they run. Bad input raises ``LmforgeError`` (one line, exit 2).

In ``--prompt-template`` and ``--instruction`` the two-character sequences ``\\n`` and ``\\t`` stand
for a newline and a tab, so ``--prompt-template "Summarize:\\n\\n{dialogue}\\n\\nSummary:"`` works in a shell.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from lmforge.errors import LmforgeError


def unescape(text: str | None) -> str | None:
    """``\\n`` -> newline and ``\\t`` -> tab (a shell passes them as two characters)."""
    return None if text is None else text.replace("\\n", "\n").replace("\\t", "\t")


def _metrics(text: str | None) -> list[str] | None:
    from lmforge.evaluation.metrics import check_metrics

    return None if text is None else check_metrics(text)


def _add_data_args(p: argparse.ArgumentParser, in_compare: bool = False) -> None:
    from lmforge.cli.args import int_arg
    from lmforge.evaluation.harness import TASKS

    g = p.add_argument_group("data")
    g.add_argument("--task", choices=TASKS, default=None if in_compare else "generation",
                   help="generation (scored against references), toxicity (rate of toxic generations), "
                        "perplexity (of a text field), multiple_choice (by log-likelihood); default: generation")
    g.add_argument("--input-field", help="the field holding the prompt text (default: 'input' unless "
                                         "--prompt-template is given)")
    g.add_argument("--reference-field", help="the field holding the reference output (needed by ROUGE/BLEU/...)")
    g.add_argument("--prompt-template", help="build the prompt from fields: 'Summarize:\\n\\n{dialogue}\\n\\nSummary:' "
                                             "({{ and }} are literal braces)")
    g.add_argument("--choices-field", help="multiple choice: the field holding the list of choices")
    g.add_argument("--answer-field", help="multiple choice: the field holding the answer (index or choice text)")
    g.add_argument("--metrics", help="comma-separated: rouge1,rouge2,rougeL,rougeLsum,bleu,chrf,exact_match,toxicity "
                                     "(default: all but toxicity; the toxicity task: toxicity)")
    g.add_argument("--limit", type=int_arg("--limit"), help="evaluate only the first N records")
    g.add_argument("--batch-size", type=int_arg("--batch-size"), default=None,
                   help="examples per model call (default: 8)")
    g.add_argument("--instruction", help="an instruction before the examples (the system message in chat mode)")
    g.add_argument("--system", help="a system message (chat template only)")
    g.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="use the model's chat template (default: when the model has one)")


def cmd_eval(a: argparse.Namespace) -> int:
    from lmforge.cli.args import load_generator
    from lmforge.evaluation.data import FieldMap
    from lmforge.evaluation.harness import EvalSettings, run_eval
    from lmforge.outputs import check_output

    template = unescape(a.prompt_template)
    fields = FieldMap(input=a.input_field or (None if template else "input"), reference=a.reference_field,
                      template=template, choices=a.choices_field, answer=a.answer_field)
    s = EvalSettings(task=a.task, fields=fields, metrics=_metrics(a.metrics), limit=a.limit, shots=a.shots,
                     shots_file=a.shots_file, instruction=unescape(a.instruction), system=a.system, chat=a.chat,
                     batch_size=a.batch_size or 8, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                     top_k=a.top_k, top_p=a.top_p, repetition_penalty=a.repetition_penalty, seed=a.seed,
                     stop=a.stop, window=a.window, stride=a.stride, toxicity_scorer=a.toxicity_scorer)
    s.check()
    if not Path(a.data).is_file():
        raise LmforgeError(f"dataset {a.data} does not exist")
    check_output(a.out, "eval", force=a.force)  # before the model loads; run_eval claims the folder
    lm = load_generator(a)
    summary = run_eval(lm, a.data, s, a.out, progress=not a.no_progress,
                       extra={"adapter": a.adapter}, force=a.force)
    print(json.dumps({"metrics": summary["metrics"], "counts": summary["counts"]}, indent=2))
    print(f"wrote {Path(a.out) / 'predictions.jsonl'} and {Path(a.out) / 'summary.json'}", file=sys.stderr)
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


# Flags of `compare` that override a recipe's top-level keys: flag dest -> recipe key.
_OVERRIDES = {"data": "data", "out": "out", "task": "task", "input_field": "input_field",
              "reference_field": "reference_field", "prompt_template": "prompt_template",
              "choices_field": "choices_field", "answer_field": "answer_field", "limit": "limit",
              "batch_size": "batch_size", "max_new_tokens": "max_new_tokens", "instruction": "instruction",
              "system": "system", "chat": "chat", "examples_shown": "examples_shown", "title": "title",
              "device": "device", "dtype": "dtype"}


def _command_line(a: argparse.Namespace) -> str:
    """The `lmforge compare ...` command that reproduces this run (flags as given)."""
    parts = ["lmforge", "compare"]
    if a.config:
        parts += ["--config", a.config]
    for dest in _OVERRIDES:
        v = getattr(a, dest)
        if v is None:
            continue
        flag = "--" + dest.replace("_", "-")
        if isinstance(v, bool):
            parts.append(flag if v else "--no-" + flag[2:])
        else:
            parts += [flag, str(v)]
    if a.metrics:
        parts += ["--metrics", a.metrics]
    for s in a.setting:
        parts += ["--setting", s]
    return shlex.join(parts)


def cmd_compare(a: argparse.Namespace) -> int:
    from lmforge.evaluation.compare import load_recipe, parse_config, report_only, run_compare

    raw = load_recipe(a.config) if a.config else {}
    source = a.config or "the command line"
    for dest, key in _OVERRIDES.items():
        v = getattr(a, dest)
        if v is not None:
            raw[key] = unescape(v) if key in ("prompt_template", "instruction") else v
    if a.metrics:
        raw["metrics"] = _metrics(a.metrics)
    if a.setting:
        raw["settings"] = list(raw.get("settings") or []) + [_parse_setting(s) for s in a.setting]
    if "data" not in raw:
        raise LmforgeError("no dataset: give --config RECIPE.yaml or --data FILE")
    cfg = parse_config(raw, source)
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
    from lmforge.cli.args import add_model_args, add_output_args, add_sampling_args, int_arg

    e = sub.add_parser("eval", help="evaluate a model on a dataset (ROUGE, BLEU, chrF, perplexity, choices, toxicity)",
                       description="Evaluate a model on a JSONL / JSON / CSV dataset (optionally .gz). Writes "
                                   "OUT/predictions.jsonl (one line per example) and OUT/summary.json.")
    e.add_argument("data", help="the dataset file")
    e.add_argument("-o", "--out", required=True, help="output folder")
    add_output_args(e, "eval")
    _add_data_args(e)
    e.add_argument("--shots", type=int_arg("--shots", 0), default=0,
                   help="worked examples before each query (0 = zero-shot); taken in a fixed order from "
                        "--shots-file or from the dataset's other records, never the query itself")
    e.add_argument("--shots-file", help="a dataset file (same fields) to take shots from")
    e.add_argument("--window", type=int_arg("--window", 2), help="perplexity: tokens per window (default: context)")
    e.add_argument("--stride", type=int_arg("--stride"), help="perplexity: window step (default: window / 2)")
    e.add_argument("--toxicity-scorer", help="toxicity: a registered scorer name, 'reward:PATH' (a classifier from "
                                             "`lmforge reward train`) or 'package.module:function' "
                                             "(default: profanity-check)")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_args(e)
    add_sampling_args(e)
    e.set_defaults(func=cmd_eval, max_new_tokens=128)

    c = sub.add_parser("compare", help="compare settings side by side (shots, sampling, models, adapters)",
                       description="Run one dataset under several settings and write OUT/report.md, "
                                   "OUT/report.html (self-contained), chart_<metric>.png and OUT/runs/<label>/. "
                                   "Settings come from --config RECIPE.yaml and/or --setting; other flags override "
                                   "the recipe's keys.")
    c.add_argument("--config", help="a recipe YAML file (see recipes/)")
    c.add_argument("--data", help="the dataset file")
    c.add_argument("-o", "--out", help="output folder")
    add_output_args(c, "compare")
    _add_data_args(c, in_compare=True)
    c.add_argument("-n", "--max-new-tokens", type=int_arg("--max-new-tokens"), help="most tokens to generate")
    c.add_argument("--setting", action="append", default=[], metavar="KEY=VALUE,...",
                   help="add a setting, e.g. 'label=hot,temperature=0.9,top_p=0.9,seed=1' (keys: label, model, "
                        "adapter, shots, shots_file, temperature, top_k, top_p, repetition_penalty, seed, "
                        "max_new_tokens); repeatable")
    c.add_argument("--examples-shown", type=int_arg("--examples-shown", 0), help="examples in the report (3)")
    c.add_argument("--title", help="the report's title")
    c.add_argument("--device", help="cpu, cuda, ... (default: cpu)")
    c.add_argument("--dtype", help="float32 | bfloat16 | float16 | auto (default: auto)")
    c.add_argument("--check", action="store_true", help="validate the config and stop (runs no model)")
    c.add_argument("--report-only", action="store_true",
                   help="rebuild the report from the runs already written (runs no model)")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    c.set_defaults(func=cmd_compare)
