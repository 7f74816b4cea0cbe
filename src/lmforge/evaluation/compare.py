"""Side-by-side comparison of settings: one dataset, several (model, adapter, shots, sampling) settings.

Owns ``CompareConfig`` (the recipe config of ``lmforge compare``, declared like every recipe config with
``lmforge.recipe_config``: a docstring per field, read from YAML with file:line errors, flags derived from it)
and its ``Setting`` columns, and running every setting through ``harness.run_eval`` into
``OUT/runs/<label>/`` before ``report`` writes the side-by-side report and ``OUT/config.yaml`` (the resolved
config: ``lmforge compare --config`` reruns it). A recipe looks like::

    data: ../shared/data/dialogsum/dialogsum.dev.jsonl   # relative paths: from the working directory
    reference_field: summary
    prompt_template: "Summarize the conversation.\\n\\n{dialogue}\\n\\nSummary:"
    limit: 20
    max_new_tokens: 60
    out: out/dialogsum_lab/report
    defaults: {model: SmolLM2-135M-Instruct}        # fields every setting starts from
    settings:
      - {label: zero-shot, shots: 0}
      - {label: sampled, temperature: 0.7, top_p: 0.9, seed: 42}

``load_config(CompareConfig, path, overrides)`` (``lmforge.recipe_config``) reads one; settings given as
mappings are merged over ``defaults`` and checked when the config is built.
"""

from __future__ import annotations

import difflib
import re
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, Literal

from lmforge.checkpoints.resolve import DEFAULT_MODEL
from lmforge.errors import LmforgeError
from lmforge.evaluation.data import FieldMap
from lmforge.evaluation.harness import EvalConfig, one_or_several, read_dataset, run_eval
from lmforge.evaluation.metrics import check_metrics
from lmforge.io import write_json_atomic
from lmforge.outputs import claim_output
from lmforge.recipe_config import option, validate, write_config


@dataclass
class Setting:
    """One column of the comparison (YAML only: ``settings`` items, or ``--setting KEY=VALUE,...``)."""

    label: str = option(cli=False)
    """The column's name (unique)."""
    model: str | None = option(None, cli=False)
    """The model (none: the embedded default model)."""
    adapter: str | None = option(None, cli=False)
    """A PEFT adapter folder on top of the model."""
    quantize: Literal["int8", "int4"] | None = option(None, cli=False)
    """Quantise the model's linear layers when it loads: int8 (per-row) or int4 (group 64, round to nearest), as
    ``lmforge.load(quantize=...)``; one recipe can compare a model's float, int8 and int4 forms (a folder written
    by ``lmforge quantize`` is loaded quantised as it is: leave this unset for it)."""
    shots: int = option(0, min=0, cli=False)
    """Worked examples before each query."""
    shots_file: str | None = option(None, cli=False)
    """A dataset file to take shots from (none: the dataset's other records)."""
    temperature: float = option(0.0, min=0.0, cli=False)
    """0 = greedy."""
    top_k: int | None = option(None, min=1, cli=False)
    """Sample only from the k most likely tokens."""
    top_p: float | None = option(None, min=0.0, min_exclusive=True, max=1.0, cli=False)
    """Nucleus sampling threshold in (0, 1]."""
    repetition_penalty: float = option(1.0, positive=True, cli=False)
    """> 1 discourages repeating tokens already seen."""
    seed: int | None = option(None, min=0, cli=False)
    """Sampling seed."""
    max_new_tokens: int | None = option(None, min=1, cli=False)
    """Most tokens to generate (none: the config's max_new_tokens)."""
    compile: bool = option(False, cli=False)
    """Decode through the torch.compile'd static-shape step (the same tokens as eager; compiled once per batch
    shape, the time on stderr): one recipe can time a model's eager and compiled decode side by side."""

    def __post_init__(self) -> None:
        validate(self)


SETTING_KEYS = [f.name for f in fields(Setting)]
_DATA = "data"


def _setting(item: dict[str, Any], defaults: dict[str, Any], where: str) -> Setting:
    """A ``Setting`` from a mapping merged over ``defaults``; unknown or missing keys name ``where``."""
    for key in item:
        if key not in SETTING_KEYS:
            close = difflib.get_close_matches(str(key), SETTING_KEYS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise LmforgeError(f"{where}: unknown key {key!r}{hint} (known keys: {', '.join(SETTING_KEYS)})")
    if "label" not in item:
        raise LmforgeError(f"{where}: missing key 'label'")
    try:
        return Setting(**{**defaults, **item})
    except LmforgeError as e:
        raise LmforgeError(f"{where}: {e}") from None


@dataclass
class CompareConfig:
    """A whole comparison: the data and task, shared generation limits, the settings and where to write.
    Defaults < ``--config RECIPE.yaml`` < flags; every run writes the resolved config to ``OUT/config.yaml``."""

    recipe: ClassVar[str] = "compare"

    data: Path
    """The dataset file."""
    settings: tuple[dict[str, Any] | Setting, ...] = option((), cli=False)
    """The columns: mappings with a label and any of model, adapter, quantize, shots, shots_file, temperature, top_k,
    top_p, repetition_penalty, seed, max_new_tokens (--setting adds one)."""
    defaults: dict[str, Any] = option(default_factory=dict, cli=False)
    """Setting fields every setting starts from (a setting's own keys win)."""
    out: Path = option(Path("compare_out"), flags=("-o", "--out"))
    """Output folder: report.md, report.html, chart_<metric>.png, config.yaml and runs/."""
    task: Literal["generation", "toxicity", "perplexity", "multiple_choice"] = option("generation", group=_DATA)
    """generation (scored against references), toxicity (rate of toxic generations), perplexity (of a text
    field), multiple_choice (by log-likelihood)."""
    input_field: str | None = option(None, group=_DATA)
    """The field holding the prompt text (instead of --prompt-template)."""
    reference_field: str | tuple[str, ...] | None = option(None, sep=",", group=_DATA)
    """The field holding the reference output (needed by ROUGE/BLEU/...); several references: comma-separated
    fields (summary1,summary2,summary3; a list in YAML) or a field holding a list of strings (rouge1 is then
    against the first reference, rouge1_best the best one)."""
    prompt_template: str | None = option(None, group=_DATA)
    """Build the prompt from fields: 'Summarize:\\n\\n{dialogue}\\n\\nSummary:' ({{ and }} are literal braces; on the
    command line \\n and \\t are unescaped)."""
    choices_field: str | None = option(None, group=_DATA)
    """Multiple choice: the field holding the list of choices."""
    answer_field: str | None = option(None, group=_DATA)
    """Multiple choice: the field holding the answer (index or choice text)."""
    metrics: tuple[str, ...] | None = option(None, sep=",", group=_DATA)
    """Comma-separated: rouge1,rouge2,rougeL,rougeLsum,bleu,chrf,exact_match,answer_match (the '#### N' answer of a
    worked solution, as GSM8K's),toxicity (none: all but answer_match and toxicity; the toxicity task: toxicity)."""
    limit: int | None = option(None, min=1, group=_DATA)
    """Evaluate only the first N records."""
    batch_size: int = option(8, min=1, group=_DATA)
    """Examples per model call."""
    max_new_tokens: int = option(128, min=1, flags=("-n",))
    """Most tokens to generate (a setting's max_new_tokens wins)."""
    instruction: str | None = option(None, group=_DATA)
    """An instruction before the examples (the system message in chat mode)."""
    system: str | None = option(None, group=_DATA)
    """A system message (chat template only)."""
    chat: bool | None = option(None, group=_DATA)
    """Use the model's chat template (none: when the model has one)."""
    stop: tuple[str, ...] = option((), cli=False)
    """Stop when one of these texts appears."""
    examples_shown: int = option(3, min=0)
    """Examples in the report."""
    title: str | None = None
    """The report's title (none: 'lmforge compare: DATA')."""
    notes: str | None = option(None, cli=False)
    """Free text shown under the report's title."""
    runs_out: Path | None = option(None, cli=False)
    """Per-setting predictions and summaries (none: OUT/runs)."""
    device: str = "cpu"
    """cpu, cuda, ..."""
    dtype: str = "auto"
    """float32 | bfloat16 | float16 | auto."""
    toxicity_scorer: str | None = option(None, cli=False)
    """Toxicity: a registered name, reward:PATH or module:function (none: profanity-check)."""
    deployment_stats: bool = False
    """Also measure, per setting, what the model costs to deploy: size on disk (MB), weights in memory (MB),
    parameters, peak memory while decoding at batch 1 (MB above the memory in use before the model loaded) and
    batch-1 greedy decode tokens/s on the first prompt (timed apart from the evaluation; see
    evaluation/deployment.py)."""
    decode_tokens: int = option(64, min=2)
    """Deployment stats: new tokens timed for the decode speed (after a short warm-up)."""

    def __post_init__(self) -> None:
        validate(self)
        for key in self.defaults:
            if key not in SETTING_KEYS or key == "label":
                raise LmforgeError(f"defaults: unknown key {key!r} (known keys: {', '.join(SETTING_KEYS[1:])})")
        if not self.settings:
            raise LmforgeError("settings: give at least one setting (each with a label) in the config or with "
                               "--setting")
        self.settings = tuple(s if isinstance(s, Setting) else _setting(s, self.defaults, f"settings[{i}]")
                              for i, s in enumerate(self.settings))
        labels = [s.label for s in self.settings]
        for i, label in enumerate(labels):
            if label in labels[:i]:
                raise LmforgeError(f"settings[{i}]: label {label!r} is used twice; labels must be unique")
        if self.metrics is not None:
            self.metrics = tuple(check_metrics(list(self.metrics)))
        self.reference_field = one_or_several(self.reference_field)
        if self.input_field is None and self.prompt_template is None:
            raise LmforgeError("set input_field (--input-field) or prompt_template (--prompt-template): how a "
                               "record becomes a prompt")

    def runs_dir(self) -> Path:
        return Path(self.runs_out) if self.runs_out else Path(self.out) / "runs"

    def fields_map(self) -> FieldMap:
        return FieldMap(input=self.input_field, reference=self.reference_field, template=self.prompt_template,
                        choices=self.choices_field, answer=self.answer_field)

    def eval_config(self, s: Setting, out: Path | None = None) -> EvalConfig:
        """The ``lmforge eval`` config of one setting (written to ``out``)."""
        return EvalConfig(data=self.data, out=out, task=self.task, input_field=self.input_field,
                          reference_field=self.reference_field, prompt_template=self.prompt_template,
                          choices_field=self.choices_field, answer_field=self.answer_field, metrics=self.metrics,
                          limit=self.limit, shots=s.shots, shots_file=s.shots_file, instruction=self.instruction,
                          system=self.system, chat=self.chat, batch_size=self.batch_size,
                          max_new_tokens=s.max_new_tokens or self.max_new_tokens, temperature=s.temperature,
                          top_k=s.top_k, top_p=s.top_p, repetition_penalty=s.repetition_penalty, seed=s.seed,
                          stop=self.stop, toxicity_scorer=self.toxicity_scorer, model=s.model or DEFAULT_MODEL,
                          adapter=s.adapter, device=self.device, dtype=self.dtype, compile=s.compile)


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

    @property
    def deployment(self) -> dict | None:
        """The deployment columns (``deployment_stats``), or None when they were not measured."""
        return self.summary.get("deployment")


def _read_run(run_dir: Path) -> tuple[dict, list[dict]]:
    import json

    if not (run_dir / "summary.json").is_file() or not (run_dir / "predictions.jsonl").is_file():
        raise LmforgeError(f"{run_dir}: no summary.json / predictions.jsonl; run the comparison first")
    rows = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    return json.loads((run_dir / "summary.json").read_text(encoding="utf-8")), rows


def _first_prompt(cfg: CompareConfig, s: Setting, lm) -> list[int]:
    """The token ids of setting ``s``'s first prompt, as its evaluation builds it (the decode-speed prompt)."""
    from lmforge.evaluation.harness import build_prompts

    e = cfg.eval_config(s)
    _, records, _ = read_dataset(e)
    chat = lm.has_chat_template if e.chat is None else e.chat
    return build_prompts(lm, records, 1, e, chat, reserve=cfg.decode_tokens)[0].ids


def report_only(cfg: CompareConfig, command: str, *, force: bool = False) -> list[Result]:
    """Rebuild the report from the runs already on disk (no model runs)."""
    from lmforge.evaluation.report import write_report

    folders = run_folders(cfg.settings)
    results = [Result(s, *_read_run(cfg.runs_dir() / folders[s.label])) for s in cfg.settings]
    with claim_output(cfg.out, "compare", force=force):
        write_report(cfg, results, command)
        write_config(cfg, cfg.out)
    return results


def run_compare(cfg: CompareConfig, command: str, *, progress: bool = True, loader=None,
                force: bool = False) -> list[Result]:
    """Run every setting, write ``runs_out/<label>/`` (default OUT/runs; see ``run_folders``) and the report;
    returns the results. OUT is checked and locked first (``lmforge.outputs``: a folder holding other files
    needs ``force``).

    ``loader(model, adapter)`` builds an ``LM`` (default ``lmforge.load``; a setting with ``quantize`` calls
    ``loader(model, adapter, quantize=...)``); one model is held at a time, and consecutive settings on the same
    (model, adapter, quantize) reuse it. With ``deployment_stats`` each setting's summary.json also holds
    ``deployment`` (``evaluation.deployment.stats``): the first model is loaded once more beforehand and the
    scoring warmed up, so that the libraries they import are not counted as the model's peak memory.
    """
    from lmforge.evaluation.deployment import PeakMemory, decode_speed, stats, warm_up_scoring
    from lmforge.evaluation.report import write_report
    from lmforge.lm import LM, load

    if loader is None:
        def loader(model, adapter, quantize=None):
            return load(model, adapter=adapter, device=cfg.device, dtype=cfg.dtype, quantize=quantize)
    def load_setting(s: Setting):
        lm = loader(s.model, s.adapter) if s.quantize is None else loader(s.model, s.adapter, quantize=s.quantize)
        if not isinstance(lm, LM):
            raise LmforgeError(f"setting {s.label!r}: {s.model} is not a text-generating model")
        return lm

    results: list[Result] = []
    held_key, lm, memory, warm = None, None, None, False
    folders = run_folders(cfg.settings)
    if cfg.settings:  # a missing or malformed dataset fails before any model loads
        read_dataset(cfg.eval_config(cfg.settings[0]))
    with claim_output(cfg.out, "compare", force=force):
        for n, s in enumerate(cfg.settings, start=1):
            key = (s.model, s.adapter, s.quantize)
            if key != held_key:
                lm, held_key = None, None  # free the previous model before loading the next
                memory = PeakMemory(cfg.device) if cfg.deployment_stats else None
                if memory is not None and not warm:  # what loading and scoring import is not the model's memory
                    load_setting(s)
                    warm_up_scoring(cfg.eval_config(s).metric_names() if cfg.task == "generation" else [])
                    warm = True
                if memory is not None:
                    memory.baseline()
                lm = load_setting(s)
                held_key = key
            lm.compile = s.compile
            print(f"[{n}/{len(cfg.settings)}] {s.label}", file=sys.stderr)
            run_dir = cfg.runs_dir() / folders[s.label]
            if memory is not None:  # the decode timing first (it builds int4's packed weights), then the evaluation
                memory.start()
                speed = decode_speed(lm, _first_prompt(cfg, s, lm), cfg.decode_tokens)
                peak = memory.peak()  # batch-1 decode: what the deployed model holds, not the batched evaluation
            summary = run_eval(lm, cfg.eval_config(s, run_dir), progress=progress, label=s.label,
                               extra={"label": s.label, "model": s.model or lm.name, "adapter": s.adapter,
                                      "quantize": s.quantize}, force=force)
            if memory is not None:
                summary["deployment"] = stats(lm, model=s.model, adapter=s.adapter, decode_tok_s=speed,
                                              decode_tokens=cfg.decode_tokens, peak=peak)
                write_json_atomic(run_dir / "summary.json", summary)
            results.append(Result(s, *_read_run(run_dir)))
        write_report(cfg, results, command)
        write_config(cfg, cfg.out)
    return results


