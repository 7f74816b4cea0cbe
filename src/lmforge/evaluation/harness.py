"""One evaluation run: dataset -> prompts -> batched model calls -> scores on disk.

Owns ``EvalConfig`` (the recipe config of ``lmforge eval``: the dataset, the model, the task kind, field
mapping, shots, sampling, batch size and output folder; one field per setting, its docstring the ``--help``
text, see ``lmforge.recipe_config``), building each example's prompt (zero/one/few-shot, chat
template or plain text, fitted to the context by dropping shots from the end), and the four task
kinds:

- ``generation``: generate, then score against references (``metrics.score_generations``; one or several per
  example: ``data.references_of``);
- ``toxicity``: generate, then the share of toxic generations (no references needed);
- ``perplexity``: exp(mean token NLL) of a text field (``likelihood.perplexity``);
- ``multiple_choice``: the choice with the highest summed log-likelihood, and length-normalised.

``run_eval(lm, cfg)`` runs a loaded model (``evaluate(cfg)`` loads ``cfg.model`` first) and writes
``OUT/predictions.jsonl`` (one line per example: input, prompt, prediction, reference, scores; with several
references ``reference`` is the first and ``references`` all of them), ``OUT/summary.json`` (metrics, settings,
counts, timing; with several references a ``references`` entry: the fields, references per example and what
each metric was scored against) and ``OUT/config.yaml`` (the resolved config:
``lmforge eval --config`` reruns it), each atomically; the folder is checked and locked first
(``lmforge.outputs``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from lmforge.checkpoints.resolve import DEFAULT_MODEL
from lmforge.data.records import load_records
from lmforge.errors import LmforgeError
from lmforge.evaluation import data as D
from lmforge.evaluation.metrics import (
    DEFAULT_METRICS,
    MULTI_REFERENCE_NOTE,
    ToxicityScorer,
    check_metrics,
    is_multi_reference,
    score_generations,
)
from lmforge.io import write_json_atomic, write_text_atomic
from lmforge.outputs import claims_output
from lmforge.prompts import Example, build_messages, build_prompt
from lmforge.recipe_config import option, validate, write_config

TASKS = ("generation", "toxicity", "perplexity", "multiple_choice")


# The sampling ranges of ``lmforge.generation.sampling`` (which imports torch; checked again there).
MIN_TEMPERATURE, MIN_TOP_P, REPETITION_PENALTY_RANGE, SEED_LIMIT = 0.01, 1e-6, (0.01, 100.0), 2**63
_DATA, _MODEL, _GEN = "data", "model", "generation"


@dataclass
class EvalConfig:
    """Everything ``lmforge eval`` needs: the dataset and how to read it, the model, shots, sampling and where
    to write. Defaults < ``--config FILE.yaml`` < flags; every run writes it to ``OUT/config.yaml``."""

    recipe: ClassVar[str] = "eval"

    data: Path
    """The dataset file (JSONL, JSON, CSV or .txt/.md paragraphs, optionally .gz; or .parquet)."""
    out: Path | None = option(None, flags=("-o", "--out"))
    """Output folder (required on the command line; none in Python: nothing is written)."""
    task: Literal["generation", "toxicity", "perplexity", "multiple_choice"] = option("generation", group=_DATA)
    """generation (scored against references), toxicity (rate of toxic generations), perplexity (of a text
    field), multiple_choice (by log-likelihood)."""
    input_field: str | None = option(None, group=_DATA)
    """The field holding the prompt text (none: 'input' unless --prompt-template is given)."""
    reference_field: str | tuple[str, ...] | None = option(None, sep=",", group=_DATA)
    """The field holding the reference output (needed by ROUGE/BLEU/...); several references: comma-separated
    fields (summary1,summary2,summary3; a list in YAML) or a field holding a list of strings. ROUGE is then
    reported against the first reference (rouge1) and the best one (rouge1_best); BLEU/chrF use them all."""
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
    instruction: str | None = option(None, group=_DATA)
    """An instruction before the examples (the system message in chat mode)."""
    system: str | None = option(None, group=_DATA)
    """A system message (chat template only)."""
    chat: bool | None = option(None, group=_DATA)
    """Use the model's chat template (none: when the model has one)."""
    shots: int = option(0, min=0, group=_DATA)
    """Worked examples before each query (0 = zero-shot); taken in a fixed order from --shots-file or from the
    dataset's other records, never the query itself."""
    shots_file: Path | None = option(None, group=_DATA)
    """A dataset file (same fields) to take shots from."""
    window: int | None = option(None, min=2, group=_DATA)
    """Perplexity: tokens per window (none: the model's context)."""
    stride: int | None = option(None, min=1, group=_DATA)
    """Perplexity: window step (none: window / 2)."""
    toxicity_scorer: str | None = option(None, group=_DATA)
    """Toxicity: a registered scorer name, 'reward:PATH' (a classifier from `lmforge reward train`) or
    'package.module:function' (none: profanity-check)."""
    model: str = option(DEFAULT_MODEL, flags=("-m", "--model"), group=_MODEL)
    """An embedded name, a local HF directory or .gguf file, or a hub id when online."""
    adapter: Path | None = option(None, group=_MODEL)
    """A PEFT adapter folder (LoRA or prompt tuning) to apply on top of the model."""
    quantize: Literal["int8", "int4"] | None = option(None, group=_MODEL)
    """Weight-only linear layers: int8 (~0.4x the weight memory) or int4 (group 64: a GGUF's Q4_1 blocks as they
    are, else round-to-nearest)."""
    quantize_head: Literal["int8", "int4", "none"] | None = option(None, group=_MODEL)
    """With quantize: the lm_head's quantisation (default int8; a tied input embedding then reads its rows)."""
    compile: bool = option(False, group=_MODEL)
    """Generate with the torch.compile'd static-shape decode step (the same tokens; compiled once per batch shape,
    the time on stderr)."""
    device: str = option("cpu", group=_MODEL)
    """cpu, cuda, cuda:1, ..."""
    dtype: str = option("auto", group=_MODEL)
    """float32 | bfloat16 | float16 | auto (bfloat16 on GPU and for int8/int4 weights, else float32 on CPU)."""
    max_new_tokens: int = option(128, min=1, flags=("-n",), group=_GEN)
    """Most tokens to generate."""
    temperature: float = option(0.0, min=0.0, flags=("-t",), group=_GEN)
    """0 = greedy, deterministic; otherwise >= 0.01, higher = more random."""
    top_k: int | None = option(None, min=1, group=_GEN)
    """Sample only from the k most likely tokens."""
    top_p: float | None = option(None, min=MIN_TOP_P, max=1.0, group=_GEN)
    """Nucleus sampling: the smallest set of tokens whose probability reaches p, in [1e-6, 1]."""
    repetition_penalty: float = option(1.0, min=REPETITION_PENALTY_RANGE[0], max=REPETITION_PENALTY_RANGE[1],
                                       group=_GEN)
    """> 1 discourages repeating tokens already seen, in [0.01, 100] (1 = off)."""
    stop: tuple[str, ...] = option((), group=_GEN)
    """Stop when this text appears (repeatable); it is not printed."""
    seed: int | None = option(None, min=0, max=SEED_LIMIT, max_exclusive=True, group=_GEN)
    """Random seed in [0, 2**63): the same seed gives the same text."""

    def __post_init__(self) -> None:
        validate(self)
        if 0 < self.temperature < MIN_TEMPERATURE:
            raise LmforgeError(f"temperature (--temperature): must be 0 (greedy) or >= {MIN_TEMPERATURE}, "
                               f"got {self.temperature}")
        if self.metrics is not None:
            self.metrics = tuple(check_metrics(list(self.metrics)))
        self.reference_field = one_or_several(self.reference_field)
        self.check()

    @property
    def fields(self) -> D.FieldMap:
        """Which record fields play which role."""
        default_input = None if self.prompt_template is not None else "input"
        return D.FieldMap(input=self.input_field or default_input, reference=self.reference_field,
                          template=self.prompt_template, choices=self.choices_field, answer=self.answer_field)

    def check(self) -> None:
        if self.task in ("perplexity",) and (self.shots or self.shots_file):
            raise LmforgeError("perplexity scores text as it is: shots do not apply")
        if self.metrics is not None and self.task in ("perplexity", "multiple_choice"):
            raise LmforgeError(f"--metrics applies to generation and toxicity tasks, not to {self.task}")

    def metric_names(self) -> list[str]:
        if self.metrics is not None:
            return check_metrics(list(self.metrics))
        return ["toxicity"] if self.task == "toxicity" else list(DEFAULT_METRICS)


def one_or_several(reference: str | tuple[str, ...] | None) -> str | tuple[str, ...] | None:
    """A ``reference_field`` value as stored: one field name as a string, several as a tuple (checked by
    ``data.reference_names``: ``"a,b"`` is two fields)."""
    names = D.reference_names(reference)
    return None if not names else names[0] if len(names) == 1 else names


def write_outputs(out_dir: str | os.PathLike, rows: list[dict], summary: dict) -> None:
    """``predictions.jsonl`` and ``summary.json`` in ``out_dir``, each written to a temp file then renamed."""
    out = Path(out_dir)
    write_text_atomic(out / "predictions.jsonl", (json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    write_json_atomic(out / "summary.json", summary)


# ----------------------------------------------------------------------------- prompts
@dataclass
class BuiltPrompt:
    """One example's prompt, ready for the model."""

    prompt: Any            # str or chat messages, as LM.generate takes it
    ids: list[int]
    shots_used: int
    shots_dropped: int


def _assemble(lm, query: str, shots: list[Example], s: EvalConfig, chat: bool) -> Any:
    if chat:
        return build_messages(query, s.instruction, shots, system=s.system)
    if s.fields.template is None:
        return build_prompt(query, s.instruction, shots) if (shots or s.instruction) else query
    # A template already says what to answer: each shot is the filled template followed by its answer.
    blocks = [s.instruction] if s.instruction else []
    blocks += [ex.input + ("" if ex.input[-1:].isspace() else " ") + ex.output for ex in shots]
    return "\n\n".join([*blocks, query])


def fit_prompt(lm, query: str, shots: list[Example], s: EvalConfig, chat: bool, reserve: int,
               where: str) -> BuiltPrompt:
    """The prompt with as many of ``shots`` as fit in the context with ``reserve`` tokens to spare;
    shots are dropped from the end. Raises if even the zero-shot prompt does not fit."""
    context = lm.config.max_seq_len
    kept = list(shots)
    while True:
        prompt = _assemble(lm, query, kept, s, chat)
        ids = lm.encode(prompt, chat=chat)
        if len(ids) + reserve <= context or not kept:
            break
        kept.pop()
    if len(ids) >= context:
        raise LmforgeError(f"{where}: the prompt is {len(ids)} tokens without shots, too long for the model's "
                           f"context of {context} tokens (with {reserve} to spare)")
    return BuiltPrompt(prompt, ids, len(kept), len(shots) - len(kept))


def _shot_output(record: D.Record, s: EvalConfig) -> str:
    if s.task == "multiple_choice":
        choices = D.choices_of(record, s.fields)
        return choices[D.answer_index(record, s.fields, choices)]
    if s.fields.reference is None:
        raise LmforgeError("shots need answers: set --reference-field")
    return D.references_of(record, s.fields)[0]


def build_prompts(lm, records: list[D.Record], evaluated: int, s: EvalConfig, chat: bool,
                  reserve: int) -> list[BuiltPrompt]:
    """Prompts for ``records[:evaluated]`` with ``s.shots`` examples each (see ``data`` for the rule)."""
    if s.shots_file:
        pool = load_records(s.shots_file)
        order, own = list(range(len(pool))), False
    else:
        pool, order, own = records, D.shot_candidates(len(records), range(evaluated)), True
    built = []
    for i in range(evaluated):
        query = D.query_text(records[i], s.fields)
        picks = D.pick_shots(i if own else None, query, pool, order, s.shots, s.fields) if s.shots else []
        if len(picks) < s.shots:
            src = s.shots_file or "the dataset"
            raise LmforgeError(f"{records[i].where}: {s.shots} shots requested but {src} has only "
                               f"{len(picks)} other usable records")
        shots = [Example(D.query_text(pool[j], s.fields), _shot_output(pool[j], s)) for j in picks]
        built.append(fit_prompt(lm, query, shots, s, chat, reserve, records[i].where))
    return built


# ----------------------------------------------------------------------------- the run
def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="ex", file=sys.stderr, disable=not enabled, leave=False)


def load_model(cfg: EvalConfig):
    """``cfg.model`` (plus adapter, quantisation, device, dtype) as a text-generating ``lmforge.LM``."""
    from lmforge.lm import LM, load

    lm = load(cfg.model, device=cfg.device, dtype=cfg.dtype, adapter=cfg.adapter, quantize=cfg.quantize,
              compile=cfg.compile, quantize_head=cfg.quantize_head)
    if not isinstance(lm, LM):
        raise LmforgeError(f"{cfg.model} is an encoder-only model ({lm.config.family}): it cannot generate text; "
                           "use `lmforge embed` for its embeddings")
    return lm


def evaluate(cfg: EvalConfig, *, progress: bool = True, force: bool = False) -> dict:
    """Load ``cfg.model`` and ``run_eval`` it; the dataset and the output folder are checked before the model
    loads."""
    from lmforge.outputs import check_output

    read_dataset(cfg)  # a missing or malformed dataset (or a record without the mapped fields) fails here
    if cfg.out is not None:
        check_output(cfg.out, "eval", force=force)  # before the model loads; run_eval claims the folder
    return run_eval(load_model(cfg), cfg, progress=progress, extra={"adapter": cfg.adapter and str(cfg.adapter)},
                    force=force)


def read_dataset(s: EvalConfig) -> tuple[list[str], list, int]:
    """(metric names, the dataset's records, how many are evaluated), the evaluated records' fields checked:
    what ``evaluate`` and ``lmforge compare`` call before any model loads."""
    metrics = s.metric_names() if s.task in ("generation", "toxicity") else []
    records = load_records(s.data)
    n = min(len(records), s.limit) if s.limit else len(records)
    D.check_fields(records[:n], s.fields, need_reference=any(m != "toxicity" for m in metrics),
                   multiple_choice=s.task == "multiple_choice")
    return metrics, records, n


@claims_output("eval", path="out", config="s")
def run_eval(lm, s: EvalConfig, *, progress: bool = True, label: str = "eval", extra: dict | None = None,
             toxicity_scorer: ToxicityScorer | None = None, force: bool = False) -> dict:
    """Evaluate ``lm`` (an ``lmforge.LM``; ``s.model`` is not loaded) on the dataset ``s.data``; returns the
    summary.

    Writes ``predictions.jsonl``, ``summary.json`` and ``config.yaml`` into ``s.out`` when it is set: a folder that
    holds other files needs ``force`` (``lmforge.outputs``); an earlier evaluation's files are replaced.
    ``extra`` is merged into the summary's settings (e.g. the adapter, a compare label).
    """
    data_path = s.data
    metrics, records, n = read_dataset(s)
    evaluated = records[:n]
    chat = lm.has_chat_template if s.chat is None else s.chat
    if chat and not lm.has_chat_template:
        raise LmforgeError(f"{lm.name} has no chat template; drop --chat (plain prompts are used by default)")
    if s.task == "perplexity":
        chat = False
    start = time.perf_counter()
    if s.task in ("generation", "toxicity"):
        rows, scores = _run_generation(lm, records, n, s, chat, metrics, progress, label, toxicity_scorer)
    elif s.task == "perplexity":
        rows, scores = _run_perplexity(lm, evaluated, s, progress)
    else:
        rows, scores = _run_multiple_choice(lm, records, n, s, chat, progress, label)
    seconds = time.perf_counter() - start
    dropped = [r.get("shots_dropped", 0) for r in rows]
    summary = {
        "task": s.task, "model": lm.name, "data": str(data_path), "metrics": scores,
        "settings": {**json.loads(json.dumps(asdict(s), default=str)), "chat": chat, "metrics": metrics or None,
                     **(extra or {})},
        "counts": {"records": len(records), "evaluated": n, "shots_requested": s.shots,
                   "shots_dropped": sum(dropped), "examples_with_dropped_shots": sum(d > 0 for d in dropped)},
        "timing": {"seconds": round(seconds, 3), "seconds_per_example": round(seconds / n, 4)},
    }
    if any("references" in r for r in rows):  # several references per example: say what each metric used
        counts = [len(r["references"]) for r in rows]
        summary["references"] = {"fields": list(D.reference_names(s.reference_field)),
                                 "min_per_example": min(counts), "max_per_example": max(counts),
                                 "scoring": MULTI_REFERENCE_NOTE}
    if sum(dropped):
        print(f"warning: {sum(dropped)} shots dropped over {summary['counts']['examples_with_dropped_shots']} "
              f"examples so that prompts fit the {lm.config.max_seq_len}-token context", file=sys.stderr)
    if s.out is not None:
        write_outputs(s.out, rows, summary)
        write_config(s, s.out)
    return summary


def _decoded(lm, ids: list[int]) -> str:
    return lm.tokenizer.decode(ids, skip_special_tokens=False)


def _run_generation(lm, records, n, s: EvalConfig, chat, metrics, progress, label, scorer):
    prompts = build_prompts(lm, records, n, s, chat, reserve=s.max_new_tokens)
    predictions: list[str] = []
    with _progress(n, label, progress) as bar:
        for b in range(0, n, s.batch_size):
            batch = [p.prompt for p in prompts[b: b + s.batch_size]]
            predictions += lm.generate(batch, chat=chat, max_new_tokens=s.max_new_tokens,
                                       temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                                       repetition_penalty=s.repetition_penalty, seed=s.seed, stop=s.stop or None)
            bar.update(len(batch))
    predictions = [p.strip() for p in predictions]
    refs = [D.references_of(r, s.fields) for r in records[:n]] if any(m != "toxicity" for m in metrics) else None
    multi = is_multi_reference(refs)
    corpus, per = score_generations(predictions, refs, metrics, scorer or s.toxicity_scorer)
    rows = []
    for i in range(n):
        # "reference" is the first one (the one rouge1... is against); "references" all, with several
        row = {"index": i, "where": records[i].where, "input": D.query_text(records[i], s.fields),
               "prompt": _decoded(lm, prompts[i].ids), "prediction": predictions[i],
               "reference": refs[i][0] if refs else None, **({"references": refs[i]} if multi else {}),
               "shots": prompts[i].shots_used, "shots_dropped": prompts[i].shots_dropped, "scores": per[i]}
        rows.append(row)
    return rows, corpus


def _run_perplexity(lm, evaluated, s: EvalConfig, progress):
    from lmforge.evaluation.likelihood import perplexity

    texts = [D.query_text(r, s.fields) for r in evaluated]
    ids = [lm.tokenizer.encode(t, add_special_tokens=True) for t in texts]
    with _progress(len(ids), "perplexity", progress) as bar:
        result = perplexity(lm.model, ids, window=s.window, stride=s.stride, batch_size=s.batch_size)
        bar.update(len(ids))
    rows = [{"index": i, "where": r.where, "input": t, "tokens": len(x), "perplexity": p}
            for i, (r, t, x, p) in enumerate(zip(evaluated, texts, ids, result.per_text))]
    return rows, {"perplexity": result.value, "nll_per_token": result.nll / result.tokens,
                  "tokens_scored": result.tokens}


def _run_multiple_choice(lm, records, n, s: EvalConfig, chat, progress, label):
    from lmforge.evaluation.likelihood import choice_logprobs

    all_choices = [D.choices_of(r, s.fields) for r in records[:n]]
    answers = [D.answer_index(r, s.fields, c) for r, c in zip(records[:n], all_choices)]
    tok = lm.tokenizer
    longest = max(len(tok.encode(" " + c, add_special_tokens=False)) for cs in all_choices for c in cs)
    prompts = build_prompts(lm, records, n, s, chat, reserve=longest)
    choice_ids = []
    for p, cs in zip(prompts, all_choices):
        text = _decoded(lm, p.ids)
        sep = "" if chat or not text or text[-1].isspace() else " "
        choice_ids.append([tok.encode(sep + c, add_special_tokens=False) for c in cs])
    scores = []
    with _progress(n, label, progress) as bar:
        for b in range(0, n, s.batch_size):
            scores += choice_logprobs(lm.model, [p.ids for p in prompts[b: b + s.batch_size]],
                                      choice_ids[b: b + s.batch_size], batch_size=s.batch_size)
            bar.update(min(s.batch_size, n - b))
    rows = []
    for i, (sc, cs, ans) in enumerate(zip(scores, all_choices, answers)):
        rows.append({"index": i, "where": records[i].where, "input": D.query_text(records[i], s.fields),
                     "prompt": _decoded(lm, prompts[i].ids), "choices": cs, "answer": ans,
                     "prediction": sc.best, "prediction_norm": sc.best_normalized, "logprobs": sc.logprob,
                     "logprobs_norm": sc.normalized, "shots": prompts[i].shots_used,
                     "shots_dropped": prompts[i].shots_dropped,
                     "scores": {"correct": float(sc.best == ans), "correct_norm": float(sc.best_normalized == ans)}})
    return rows, {"accuracy": sum(r["scores"]["correct"] for r in rows) / n,
                  "accuracy_norm": sum(r["scores"]["correct_norm"] for r in rows) / n}
