"""Side-by-side comparison of settings: one dataset, several (model, adapter, shots, sampling) settings.

Owns the compare schema (what a recipe YAML may say, checked key by key with errors naming the
file and the key), loading recipes, and running every setting through ``harness.run_eval`` into
``OUT/runs/<label>/`` before ``report`` writes the side-by-side report. A recipe looks like::

    data: ../shared/data/dialogsum/dialogsum.dev.jsonl   # relative paths: from the working directory
    reference_field: summary
    prompt_template: "Summarize the conversation.\\n\\n{dialogue}\\n\\nSummary:"
    limit: 20
    max_new_tokens: 60
    out: docs/dialogsum_lab
    defaults: {model: SmolLM2-135M-Instruct}        # fields every setting starts from
    settings:
      - {label: zero-shot, shots: 0}
      - {label: sampled, temperature: 0.7, top_p: 0.9, seed: 42}
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError
from lmforge.evaluation.data import FieldMap
from lmforge.evaluation.harness import TASKS, EvalSettings, run_eval
from lmforge.evaluation.metrics import check_metrics
from lmforge.outputs import claim_output


@dataclass
class Setting:
    """One column of the comparison."""

    label: str
    model: str | None = None        # None: the embedded default model
    adapter: str | None = None
    shots: int = 0
    shots_file: str | None = None
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_new_tokens: int | None = None   # None: the recipe's value


@dataclass
class CompareConfig:
    """A whole comparison: the data and task, shared generation limits, the settings and where to write."""

    data: str
    settings: list[Setting]
    out: str = "compare_out"
    task: str = "generation"
    input_field: str | None = None
    reference_field: str | None = None
    prompt_template: str | None = None
    choices_field: str | None = None
    answer_field: str | None = None
    metrics: list[str] | None = None
    limit: int | None = None
    batch_size: int = 8
    max_new_tokens: int = 128
    instruction: str | None = None
    system: str | None = None
    chat: bool | None = None
    stop: list[str] = field(default_factory=list)
    examples_shown: int = 3
    title: str | None = None
    notes: str | None = None            # free text shown under the report's title
    runs_out: str | None = None         # per-setting predictions and summaries (default: OUT/runs)
    device: str = "cpu"
    dtype: str = "auto"
    toxicity_scorer: str | None = None  # a registered name, reward:PATH or module:function (default: profanity-check)

    def runs_dir(self) -> Path:
        return Path(self.runs_out) if self.runs_out else Path(self.out) / "runs"

    def fields_map(self) -> FieldMap:
        return FieldMap(input=self.input_field, reference=self.reference_field, template=self.prompt_template,
                        choices=self.choices_field, answer=self.answer_field)

    def eval_settings(self, s: Setting) -> EvalSettings:
        return EvalSettings(task=self.task, fields=self.fields_map(), metrics=self.metrics, limit=self.limit,
                            shots=s.shots, shots_file=s.shots_file, instruction=self.instruction,
                            system=self.system, chat=self.chat, batch_size=self.batch_size,
                            max_new_tokens=s.max_new_tokens or self.max_new_tokens, temperature=s.temperature,
                            top_k=s.top_k, top_p=s.top_p, repetition_penalty=s.repetition_penalty, seed=s.seed,
                            stop=list(self.stop), toxicity_scorer=self.toxicity_scorer)


# What each key may hold: (type test, description for the error message).
_INT = (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer")
_NUM = (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number")
_STR = (lambda v: isinstance(v, str) and v != "", "a non-empty string")
_BOOL = (lambda v: isinstance(v, bool), "true or false")
_STRS = (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of strings")
_OPTIONAL_KEYS = {"model", "adapter", "shots_file", "top_k", "top_p", "seed", "max_new_tokens", "input_field",
                  "reference_field", "prompt_template", "choices_field", "answer_field", "metrics", "limit",
                  "instruction", "system", "chat", "title", "notes", "runs_out", "toxicity_scorer"}
_TYPES: dict[str, tuple] = {
    "label": _STR, "model": _STR, "adapter": _STR, "shots": _INT, "shots_file": _STR, "temperature": _NUM,
    "top_k": _INT, "top_p": _NUM, "repetition_penalty": _NUM, "seed": _INT, "max_new_tokens": _INT,
    "data": _STR, "out": _STR, "task": _STR, "input_field": _STR, "reference_field": _STR, "prompt_template": _STR,
    "choices_field": _STR, "answer_field": _STR, "metrics": _STRS, "limit": _INT, "batch_size": _INT,
    "instruction": _STR, "system": _STR, "chat": _BOOL, "stop": _STRS, "examples_shown": _INT, "title": _STR,
    "notes": _STR, "runs_out": _STR,
    "device": _STR, "dtype": _STR, "toxicity_scorer": _STR,
}
# Lowest allowed values (and the highest for top_p).
_LOW = {"shots": 0, "top_k": 1, "max_new_tokens": 1, "limit": 1, "batch_size": 1, "examples_shown": 0,
        "temperature": 0.0}


def _check_value(key: str, value: Any, where: str) -> Any:
    if value is None and key in _OPTIONAL_KEYS:
        return None
    test, what = _TYPES[key]
    if not test(value):
        raise LmforgeError(f"{where}: '{key}' must be {what}, got {value!r}")
    if key in _LOW and value < _LOW[key]:
        raise LmforgeError(f"{where}: '{key}' must be >= {_LOW[key]}, got {value}")
    if key == "top_p" and not 0 < value <= 1:
        raise LmforgeError(f"{where}: 'top_p' must be in (0, 1], got {value}")
    if key in ("repetition_penalty",) and value <= 0:
        raise LmforgeError(f"{where}: '{key}' must be > 0, got {value}")
    if key == "task" and value not in TASKS:
        raise LmforgeError(f"{where}: unknown task {value!r}; choose one of: {', '.join(TASKS)}")
    if key == "metrics":
        try:
            check_metrics(value)
        except LmforgeError as e:
            raise LmforgeError(f"{where}: {e}") from None
    return value


def _checked(d: Any, allowed: list[str], where: str) -> dict:
    if not isinstance(d, dict):
        raise LmforgeError(f"{where}: expected a mapping of keys to values, got {type(d).__name__}")
    unknown = [k for k in d if k not in allowed]
    if unknown:
        raise LmforgeError(f"{where}: unknown key {unknown[0]!r}; known keys: {', '.join(allowed)}")
    return {k: _check_value(k, v, where) for k, v in d.items()}


SETTING_KEYS = [f.name for f in fields(Setting)]
TOP_KEYS = [f.name for f in fields(CompareConfig)] + ["defaults"]


def parse_config(raw: Any, source: str = "the compare config") -> CompareConfig:
    """Validate a parsed recipe (a dict) against the compare schema and build the ``CompareConfig``."""
    top = _checked({k: v for k, v in (raw or {}).items() if k not in ("settings", "defaults")}
                   if isinstance(raw, dict) else raw, TOP_KEYS, source)
    if "data" not in top:
        raise LmforgeError(f"{source}: missing key 'data' (the dataset file)")
    defaults = _checked(raw.get("defaults") or {}, [k for k in SETTING_KEYS if k != "label"], f"{source}: defaults")
    items = raw.get("settings")
    if not isinstance(items, list) or not items:
        raise LmforgeError(f"{source}: 'settings' must be a non-empty list of settings (each with a label)")
    settings, labels = [], set()
    for i, item in enumerate(items):
        where = f"{source}: settings[{i}]"
        s = {**defaults, **_checked(item, SETTING_KEYS, where)}
        if "label" not in s:
            raise LmforgeError(f"{where}: missing key 'label'")
        if s["label"] in labels:
            raise LmforgeError(f"{where}: label {s['label']!r} is used twice; labels must be unique")
        labels.add(s["label"])
        settings.append(Setting(**s))
    cfg = CompareConfig(settings=settings, **top)
    if cfg.input_field is None and cfg.prompt_template is None:
        raise LmforgeError(f"{source}: set 'input_field' or 'prompt_template' (how a record becomes a prompt)")
    return cfg


def load_recipe(path: str | os.PathLike) -> dict:
    """Read a recipe YAML file into a dict (validated later by ``parse_config``)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"recipe {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f", line {mark.line + 1}" if mark is not None else ""
        raise LmforgeError(f"{path}{line}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    except UnicodeDecodeError as e:
        raise LmforgeError(f"{path} is not UTF-8 text (byte {e.start})") from None
    if not isinstance(raw, dict):
        raise LmforgeError(f"{path}: a recipe must be a YAML mapping, got {type(raw).__name__}")
    return raw


def slug(label: str) -> str:
    """A folder name for a label: "few-shot (2)" -> "few-shot-2"."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip("-") or "setting"


def run_folders(settings: list[Setting]) -> dict[str, str]:
    """Each setting's run folder name, by label: its ``slug``, with "-2", "-3"... added in settings order
    when two labels would share a folder ("A b" and "a-b": names are compared ignoring case, as on macOS
    and Windows), so that distinct labels always get distinct folders."""
    names: dict[str, str] = {}
    taken: set[str] = set()
    for s in settings:
        name, n = slug(s.label), 1
        while name.casefold() in taken:
            n += 1
            name = f"{slug(s.label)}-{n}"
        taken.add(name.casefold())
        names[s.label] = name
    return names


@dataclass
class Result:
    """One setting's outcome: its summary and per-example rows (as written to its run folder)."""

    setting: Setting
    summary: dict
    rows: list[dict]


def _read_run(run_dir: Path) -> tuple[dict, list[dict]]:
    import json

    if not (run_dir / "summary.json").is_file() or not (run_dir / "predictions.jsonl").is_file():
        raise LmforgeError(f"{run_dir}: no summary.json / predictions.jsonl; run the comparison first")
    rows = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    return json.loads((run_dir / "summary.json").read_text(encoding="utf-8")), rows


def report_only(cfg: CompareConfig, command: str, *, force: bool = False) -> list[Result]:
    """Rebuild the report from the runs already on disk (no model runs)."""
    from lmforge.evaluation.report import write_report

    folders = run_folders(cfg.settings)
    results = [Result(s, *_read_run(cfg.runs_dir() / folders[s.label])) for s in cfg.settings]
    with claim_output(cfg.out, "compare", force=force):
        write_report(cfg, results, command)
    return results


def run_compare(cfg: CompareConfig, command: str, *, progress: bool = True, loader=None,
                force: bool = False) -> list[Result]:
    """Run every setting, write ``runs_out/<label>/`` (default OUT/runs; see ``run_folders``) and the report;
    returns the results. OUT is checked and locked first (``lmforge.outputs``: a folder holding other files
    needs ``force``).

    ``loader(model, adapter)`` builds an ``LM`` (default ``lmforge.load``); one model is held at a time,
    and consecutive settings on the same (model, adapter) reuse it.
    """
    from lmforge.evaluation.report import write_report
    from lmforge.lm import LM, load

    if loader is None:
        def loader(model, adapter):
            return load(model, adapter=adapter, device=cfg.device, dtype=cfg.dtype)
    results: list[Result] = []
    held_key, lm = None, None
    folders = run_folders(cfg.settings)
    with claim_output(cfg.out, "compare", force=force):
        for n, s in enumerate(cfg.settings, start=1):
            key = (s.model, s.adapter)
            if key != held_key:
                lm, held_key = None, None  # free the previous model before loading the next
                lm = loader(s.model, s.adapter)
                if not isinstance(lm, LM):
                    raise LmforgeError(f"setting {s.label!r}: {s.model} is not a text-generating model")
                held_key = key
            print(f"[{n}/{len(cfg.settings)}] {s.label}", file=sys.stderr)
            run_dir = cfg.runs_dir() / folders[s.label]
            run_eval(lm, cfg.data, cfg.eval_settings(s), run_dir, progress=progress, label=s.label,
                     extra={"label": s.label, "model": s.model or lm.name, "adapter": s.adapter}, force=force)
            results.append(Result(s, *_read_run(run_dir)))
        write_report(cfg, results, command)
    return results


