"""``LifecycleConfig``: the typed recipe of ``lmforge lifecycle`` (one YAML file for the whole project lifecycle).

Declared like every recipe config (``lmforge.recipe_config``: a docstring per field, file:line errors, flags
and ``--print-config`` derived from it). Its sections:

- ``task``: the data (train/dev/test files), how a record becomes a prompt, the target field, the gate's
  metric, generation limits (``Task``), and the ``budget`` the gate holds candidates to (``Budget``);
- ``candidates``: the models to choose from, each a ``lmforge compare`` setting (label, model, adapter, shots...);
- one section per stage. ``select`` and ``evaluate`` and ``optimise`` are small typed sections here that become
  ``CompareConfig`` runs; ``adapt`` IS a ``FinetuneConfig`` mapping and ``align`` a ``DPOConfig`` or ``PPOConfig``
  mapping (by its ``algorithm`` key; checked by those classes, the keys the lifecycle fills itself refused);
  ``deploy`` holds a ``ServeConfig`` mapping plus the smoke test's prompt.

A nested key that is wrong raises ``SectionError`` with its key path (``adapt.lr_rate``); ``load_lifecycle``
adds the file and line. Nothing here imports torch.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from lmforge.errors import LmforgeError
from lmforge.evaluation.compare import Setting
from lmforge.evaluation.metrics import check_metrics
from lmforge.recipe_config import from_yaml, option, recipe_fields, validate

STAGES = ("select", "adapt", "align", "evaluate", "optimise", "deploy")
Stage = Literal["select", "adapt", "align", "evaluate", "optimise", "deploy"]
OPTIONAL_STAGES = ("align", "optimise")  # run only when the recipe has their section
# Keys of the reused configs that the lifecycle fills itself (from the task and the earlier stages).
ADAPT_FILLED = ("train", "dev", "prompt_template", "prompt_field", "response_field", "model", "adapter", "out_dir")
ALIGN_FILLED = ("model", "adapter", "out_dir")
ALIGNERS = ("dpo", "ppo")  # the align section's algorithm
SERVE_FILLED = ("model", "adapter", "host", "port")
DISTIL_FILLED = ("teacher", "train", "dev", "prompt_template", "prompt_field", "response_field", "out_dir")


class SectionError(LmforgeError):
    """A bad value inside a section; ``keys`` is its path (``("adapt", "lr_rate")``) so the loader can add file:line."""

    def __init__(self, keys: tuple[Any, ...], message: str):
        super().__init__(f"{'.'.join(map(str, keys))}: {message}")
        self.keys = keys


def build_section(cls: type, mapping: Any, keys: tuple[Any, ...], *, filled: tuple[str, ...] = (),
                  **given: Any) -> Any:
    """``cls(**mapping, **given)`` with every problem a ``SectionError`` at ``keys`` (+ the bad key): an unknown
    key (with a close match), a key in ``filled`` (set by the lifecycle), or a bad value."""
    if mapping is None:
        mapping = {}
    if not isinstance(mapping, dict):
        raise SectionError(keys, f"expected a mapping of {cls.__name__} keys, got {mapping!r:.60}")
    names = [f.name for f in recipe_fields(cls)]
    for key in mapping:
        if key in filled:
            raise SectionError((*keys, key), "is set by the lifecycle (from the task and the earlier stages); "
                                             "remove it from the recipe")
        if key not in names:
            allowed = [n for n in names if n not in filled]
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise SectionError((*keys, key), f"unknown key{hint} (allowed: {', '.join(allowed)})")
    try:
        return cls(**{**mapping, **given})
    except SectionError as e:  # from a section inside this one: the path from here
        raise SectionError((*keys, *e.keys), str(e).split(": ", 1)[1]) from None
    except LmforgeError as e:
        text = str(e)
        bad = next((k for k in mapping if text.startswith(f"{k} ") or text.startswith(f"{k}:")), None)
        raise SectionError((*keys, bad) if bad else keys, text.split(": ", 1)[1] if bad else text) from None
    except TypeError as e:  # a required field missing
        raise SectionError(keys, str(e)) from None


@dataclass
class Budget:
    """What the select gate holds candidates to, and how it breaks ties."""

    max_params_m: float | None = option(None, positive=True)
    """Largest model allowed, in millions of parameters (none: no limit)."""
    min_tokens_per_s: float | None = option(None, positive=True)
    """Slowest greedy decode speed allowed, tokens/s at batch 1 on this machine (none: no limit)."""
    tie_margin: float = option(0.0, min=0.0)
    """Candidates whose metric is within this of the best count as tied; the smallest of them wins."""

    def __post_init__(self) -> None:
        validate(self)


@dataclass
class Task:
    """The use case: data, prompt, target and metric."""

    train: Path
    """Training data of adapt (SFT records)."""
    dev: Path | None = None
    """Dev data: select's zero/few-shot scoring and adapt's validation (none: split_dev records of train)."""
    test: Path | None = None
    """Held-out data of evaluate and optimise (none: split_test records of train, else the dev file)."""
    split_dev: int | None = option(None, min=1)
    """Carve dev (and test) out of the train file: this many records, after a seeded shuffle, go to
    OUT/data/dev.jsonl, split_test more to OUT/data/test.jsonl, the rest to OUT/data/train.jsonl (for a task that
    ships one file; dev and test must then be none)."""
    split_test: int = option(0, min=0)
    """With split_dev: records held out for test."""
    split_seed: int = option(0, min=0)
    """With split_dev: the shuffle's seed."""
    prompt_template: str | None = None
    """How a record becomes a prompt, with {field} placeholders."""
    input_field: str | None = None
    """The field holding the whole prompt (instead of prompt_template)."""
    response_field: str = "response"
    """The target: the response adapt learns and the reference evaluate scores against."""
    references: tuple[str, ...] | None = None
    """The reference fields evaluate and optimise score against (none: response_field). Several fields, or one
    field holding a list of texts, give several references per example: rouge1 against the first, rouge1_best
    the best of them (lmforge compare's reference_field)."""
    metric: str = "rouge1"
    """The metric the gates compare (higher is better)."""
    metrics: tuple[str, ...] | None = None
    """Every metric reported (none: eval's default set)."""
    max_new_tokens: int = option(64, min=1)
    """Most tokens generated per example."""
    batch_size: int = option(8, min=1)
    """Examples per model call in select/evaluate/optimise."""
    chat: bool | None = None
    """Use the model's chat template when scoring (none: when it has one)."""
    stop: tuple[str, ...] = ()
    """Stop generating when one of these texts appears."""
    budget: Budget | dict[str, Any] = option(default_factory=dict)
    """The select gate's limits (max_params_m, min_tokens_per_s, tie_margin)."""

    def __post_init__(self) -> None:
        validate(self)
        if self.input_field is None and self.prompt_template is None:
            raise SectionError(("prompt_template",), "set prompt_template or input_field: how a record becomes "
                                                     "a prompt")
        try:
            check_metrics([self.metric, *(self.metrics or ())])
        except LmforgeError as e:
            raise SectionError(("metric",), str(e)) from None
        if self.metrics is not None and self.metric not in self.metrics:
            self.metrics = (*self.metrics, self.metric)
        if self.split_dev is not None and (self.dev is not None or self.test is not None):
            raise SectionError(("split_dev",), "carves dev and test out of train: remove dev and test, or split_dev")
        if self.split_dev is None and self.dev is None:
            raise SectionError(("dev",), "give the dev file (or split_dev: carve it out of train)")
        if not isinstance(self.budget, Budget):
            self.budget = build_section(Budget, self.budget, ("budget",))

    def files(self) -> dict[str, Path]:
        return {k: Path(v) for k, v in (("train", self.train), ("dev", self.dev), ("test", self.test)) if v}


@dataclass
class Select:
    """Zero/few-shot scoring of every candidate on the dev set."""

    limit: int = option(20, min=1)
    """Dev examples scored per candidate."""
    speed_tokens: int = option(32, min=1)
    """Tokens generated (greedy, batch 1) to measure each candidate's decode speed."""

    def __post_init__(self) -> None:
        validate(self)


@dataclass
class Evaluate:
    """Held-out scoring of the base model against the adapted (and aligned) one."""

    split: Literal["test", "dev"] = "test"
    """The data scored (test: the task's test file, or dev when it has none)."""
    limit: int | None = option(None, min=1)
    """Examples scored (none: all)."""

    def __post_init__(self) -> None:
        validate(self)


@dataclass
class Prune:
    """Drop whole blocks of the final model (lmforge prune --method layers: the blocks of lowest block influence,
    scored on the task's training text)."""

    keep_layers: int = option(min=1)
    """Blocks kept (required)."""
    samples: int = option(16, min=1)
    """Calibration windows scored."""
    seq_len: int = option(256, min=8)
    """Tokens per calibration window."""

    def __post_init__(self) -> None:
        validate(self)


@dataclass
class Optimise:
    """Smaller and faster versions of the final model, scored like evaluate beside it: weight-only quantisation,
    a distilled student with fewer blocks, and the model pruned by blocks (then healed by distillation)."""

    quantize: tuple[Literal["int8", "int4"], ...] = ("int8",)
    """The schemes tried (lmforge.load's quantize: int8 per-row, int4 group-wise)."""
    limit: int | None = option(None, min=1)
    """Examples scored (none: evaluate's limit)."""
    distil: dict[str, Any] | None = None
    """A student taught by the final model: lmforge distill settings (student_layers or student, steps, lr,
    batch_size, limit, top_k, alpha, ...; the teacher, data, prompt and out_dir are filled in). None: none."""
    prune: Prune | dict[str, Any] | None = None
    """Prune the final model by blocks: keep_layers, samples, seq_len. None: no pruning."""
    heal: dict[str, Any] | None = None
    """With prune: lmforge distill settings that heal the pruned model, taught by the final model (steps, lr,
    ...; the student is the pruned model). None: the pruned model is scored as it is."""

    def __post_init__(self) -> None:
        validate(self)
        if not self.quantize and self.distil is None and self.prune is None:
            raise LmforgeError("quantize: give at least one of int8, int4 (or a distil or prune section)")
        if self.prune is not None and not isinstance(self.prune, Prune):
            self.prune = build_section(Prune, self.prune, ("prune",))
        if self.heal is not None and self.prune is None:
            raise SectionError(("heal",), "heals the pruned model: add a prune section (keep_layers), or remove heal")


@dataclass
class Deploy:
    """The serve config and the smoke test."""

    serve: dict[str, Any] = option(default_factory=dict)
    """ServeConfig keys (max_batch, max_context, quantize, ...); model, adapter, host and port are filled in."""
    prompt: str = "Hello! Who are you?"
    """The smoke test's chat message."""
    max_tokens: int = option(16, min=1)
    """The smoke test's completion length."""
    startup_timeout: float = option(120.0, positive=True)
    """Seconds the server gets to come up."""

    def __post_init__(self) -> None:
        validate(self)


@dataclass
class LifecycleConfig:
    """The whole lifecycle: the task, the candidates, the stages and their settings, and where to write."""

    recipe: ClassVar[str] = "lifecycle"

    task: Task | dict[str, Any] = option(cli=False)
    """The data, prompt, target field, metric and budget (train, dev, test, prompt_template, input_field,
    response_field, references, metric, metrics, max_new_tokens, batch_size, chat, stop, budget)."""
    candidates: tuple[dict[str, Any] | Setting, ...] = option((), cli=False)
    """The models select chooses from: lmforge compare settings (label, model, adapter, shots, ...)."""
    out: Path = option(Path("lifecycle_out"), flags=("-o", "--out"))
    """The run folder: one subfolder per stage, report.md and report.html."""
    stages: tuple[Stage, ...] | None = option(None, sep=",")
    """The stages to run, in lifecycle order (none: select, adapt, evaluate, deploy, and align / optimise when
    the recipe has their section)."""
    title: str = "lmforge lifecycle"
    """The report's title."""
    device: str = "cpu"
    """cpu, cuda, ... (every stage; a device key in adapt, align or deploy.serve wins there)."""
    select: Select | dict[str, Any] = option(default_factory=dict, cli=False)
    """select: limit (dev examples per candidate), speed_tokens."""
    adapt: dict[str, Any] = option(default_factory=dict, cli=False)
    """adapt: lmforge finetune settings (method, steps, lr, batch_size, ...; the data, prompt, model and out_dir
    come from the task and select)."""
    align: dict[str, Any] | None = option(None, cli=False)
    """align (optional): algorithm (dpo or ppo) and its lmforge rlhf settings: dpo's data (the preference pairs),
    steps, beta, ...; ppo's reward (a reward-model folder or module:function), prompts (none: the task's training
    prompts), steps, kl_coef, ..."""
    evaluate: Evaluate | dict[str, Any] = option(default_factory=dict, cli=False)
    """evaluate: split (test | dev), limit."""
    optimise: Optimise | dict[str, Any] | None = option(None, cli=False)
    """optimise (optional): quantize (int8, int4), limit, distil (a student), prune + heal."""
    deploy: Deploy | dict[str, Any] = option(default_factory=dict, cli=False)
    """deploy: serve (ServeConfig keys), prompt, max_tokens, startup_timeout."""

    def __post_init__(self) -> None:
        validate(self)
        if not isinstance(self.task, Task):
            self.task = build_section(Task, self.task, ("task",))
        if not self.candidates:
            raise SectionError(("candidates",), "give at least one candidate model (each with a label)")
        built = []
        for i, c in enumerate(self.candidates):
            if isinstance(c, Setting):
                built.append(c)
                continue
            if not isinstance(c, dict) or "label" not in c:
                raise SectionError(("candidates", i), "expected a mapping with a label")
            built.append(build_section(Setting, c, ("candidates", i)))
        labels = [c.label for c in built]
        for i, label in enumerate(labels):
            if label in labels[:i]:
                raise SectionError(("candidates", i, "label"), f"{label!r} is used twice; labels must be unique")
        self.candidates = tuple(built)
        for name, cls in (("select", Select), ("evaluate", Evaluate), ("deploy", Deploy)):
            if not isinstance(getattr(self, name), cls):
                setattr(self, name, build_section(cls, getattr(self, name), (name,)))
        if self.optimise is not None and not isinstance(self.optimise, Optimise):
            self.optimise = build_section(Optimise, self.optimise, ("optimise",))
        if self.stages is not None:
            if not self.stages:
                raise SectionError(("stages",), "name at least one stage")
            for s in self.stages:
                if s in OPTIONAL_STAGES and getattr(self, s) is None:
                    raise SectionError(("stages",), f"{s!r} is listed but the recipe has no {s} section")
            self.stages = tuple(s for s in STAGES if s in self.stages)  # lifecycle order
        self.check_sections()

    def check_sections(self) -> None:
        """Build the reused configs once with placeholder values, so a bad key fails before anything runs."""
        final = self.finetune_config(model=None, adapter=None, out_dir=Path("."))
        if self.align is not None:
            aligned = self.align_config(model=None, adapter=None, out_dir=Path("."))
            final = aligned if "align" in self.enabled() else final
        self.serve_config(model="placeholder", adapter=None, port=0)
        if self.optimise is not None:
            taught = [k for k in ("distil", "prune") if getattr(self.optimise, k) is not None]
            if taught and final.method != "full":
                stage = "adapt" if final.recipe == "finetune" else "align"
                raise SectionError(("optimise", taught[0]), f"teaches from the final model's whole weights, but "
                                   f"{stage}.method is {final.method} (an adapter): use method: full there, or "
                                   "remove optimise's distil and prune")
            if self.optimise.distil is not None:
                self.distill_config("distil", teacher="placeholder", out_dir=Path("."))
            if self.optimise.heal is not None:
                self.distill_config("heal", teacher="placeholder", out_dir=Path("."), student="placeholder")

    def enabled(self) -> tuple[str, ...]:
        """The stages this recipe runs by default, in order."""
        if self.stages is not None:
            return self.stages
        return tuple(s for s in STAGES if s not in OPTIONAL_STAGES or getattr(self, s) is not None)

    def finetune_config(self, *, model: str | None, adapter: str | Path | None, out_dir: Path):
        from lmforge.training.sft import FinetuneConfig

        t = self.task
        return build_section(FinetuneConfig, {"device": self.device, **self.adapt}, ("adapt",), filled=ADAPT_FILLED,
                             train=(t.train,), dev=(t.dev,) if t.dev else (), prompt_template=t.prompt_template,
                             prompt_field=t.input_field, response_field=t.response_field, model=model,
                             adapter=adapter, out_dir=out_dir)

    def align_algorithm(self) -> str:
        """The align section's ``algorithm``: dpo (the default) or ppo."""
        algorithm = (self.align or {}).get("algorithm", "dpo")
        if algorithm not in ALIGNERS:
            raise SectionError(("align", "algorithm"), f"unknown algorithm {algorithm!r}; allowed: "
                                                       f"{', '.join(ALIGNERS)}")
        return algorithm

    def align_config(self, *, model: str | None, adapter: str | Path | None, out_dir: Path,
                     prompts: Path | None = None):
        """The align section as a ``DPOConfig`` (``algorithm: dpo``: ``data`` holds the preference pairs) or a
        ``PPOConfig`` (``algorithm: ppo``: a ``reward`` model or function; ``prompts`` when the section gives
        none: the task's training prompts, written by the stage)."""
        from lmforge.alignment.rlhf import DPOConfig, PPOConfig

        algorithm = self.align_algorithm()
        mapping = {k: v for k, v in self.align.items() if k != "algorithm"}
        given: dict[str, Any] = {}
        if algorithm == "ppo" and "prompts" not in mapping:
            given = {"prompts": prompts or Path("prompts.jsonl"), "prompt_field": "prompt"}
        cls = DPOConfig if algorithm == "dpo" else PPOConfig
        cfg = build_section(cls, {"device": self.device, **mapping}, ("align",), filled=ALIGN_FILLED,
                            model=model, adapter=adapter, out_dir=out_dir, **given)
        if algorithm == "dpo" and cfg.data is None:
            raise SectionError(("align", "data"), "the preference pairs file is required")
        return cfg

    def distill_config(self, section: Literal["distil", "heal"], *, teacher: str, out_dir: Path,
                       student: str | None = None):
        """The ``DistillConfig`` of ``optimise.distil`` or ``optimise.heal`` (whose student is the pruned model):
        the task's data and prompt, taught by ``teacher``."""
        from lmforge.training.distill import DistillConfig

        t, keys = self.task, ("optimise", section)
        mapping = {"device": self.device, **getattr(self.optimise, section)}
        filled = DISTIL_FILLED + (("student", "student_layers") if student is not None else ())
        given = {"student": student} if student is not None else {}
        return build_section(DistillConfig, mapping, keys, filled=filled, teacher=teacher, train=(t.train,),
                             dev=(t.dev,) if t.dev else (), prompt_template=t.prompt_template,
                             prompt_field=t.input_field, response_field=t.response_field, out_dir=out_dir, **given)

    def serve_config(self, *, model: str, adapter: str | Path | None, port: int):
        from lmforge.deploy.serve_config import ServeConfig

        d = self.deploy
        return build_section(ServeConfig, {"device": self.device, **d.serve}, ("deploy", "serve"), filled=SERVE_FILLED,
                             model=model, adapter=adapter, host="127.0.0.1", port=port)

    def data_files(self) -> dict[str, Path]:
        """Every data file the recipe reads, by the key naming it."""
        files = {f"task.{k}": v for k, v in self.task.files().items()}
        for key in ("data", "prompts"):
            if self.align is not None and self.align.get(key):
                files[f"align.{key}"] = Path(self.align[key])
        return files


def line_of(path: str | Path, keys: tuple[Any, ...]) -> int | None:
    """The 1-based line of the deepest of ``keys`` found in the YAML file (None when unreadable)."""
    try:
        node = yaml.compose(Path(path).read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    except (OSError, yaml.YAMLError):
        return None
    line = None
    for key in keys:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == str(key)), None)
            if match is None:
                break
            line, node = match[0].start_mark.line + 1, match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            break
    return line


def load_lifecycle(path: str | Path, overrides: dict[str, Any] | None = None) -> LifecycleConfig:
    """The checked ``LifecycleConfig`` of a recipe file (plus ``overrides``); every error names file:line and key."""
    path = Path(path)
    values = from_yaml(LifecycleConfig, path)
    values.update(overrides or {})
    if "task" not in values:
        raise LmforgeError(f"{path}: task is required (the data, prompt, target field and metric)")
    try:
        return LifecycleConfig(**values)
    except SectionError as e:
        line = line_of(path, e.keys)
        raise LmforgeError(f"{path}{f':{line}' if line else ''}: {e}") from None
    except LmforgeError as e:
        raise LmforgeError(f"{path}: {e}") from None

