"""One evaluation run: dataset -> prompts -> batched model calls -> scores on disk.

Owns ``EvalSettings`` (everything a run depends on besides the model: the task kind, field
mapping, shots, sampling, batch size), building each example's prompt (zero/one/few-shot, chat
template or plain text, fitted to the context by dropping shots from the end), and the four task
kinds:

- ``generation``: generate, then score against references (``metrics.score_generations``);
- ``toxicity``: generate, then the share of toxic generations (no references needed);
- ``perplexity``: exp(mean token NLL) of a text field (``likelihood.perplexity``);
- ``multiple_choice``: the choice with the highest summed log-likelihood, and length-normalised.

``run_eval`` writes ``OUT/predictions.jsonl`` (one line per example: input, prompt, prediction,
reference, scores) and ``OUT/summary.json`` (metrics, settings, counts, timing), each atomically; the
folder is checked and locked first (``lmforge.outputs``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lmforge.data.records import load_records
from lmforge.errors import LmforgeError
from lmforge.evaluation import data as D
from lmforge.evaluation.metrics import DEFAULT_METRICS, ToxicityScorer, check_metrics, score_generations
from lmforge.io import write_json_atomic, write_text_atomic
from lmforge.outputs import claims_output
from lmforge.prompts import Example, build_messages, build_prompt

TASKS = ("generation", "toxicity", "perplexity", "multiple_choice")


@dataclass
class EvalSettings:
    """What an evaluation run does, apart from which model it runs."""

    task: str = "generation"
    fields: D.FieldMap = field(default_factory=D.FieldMap)
    metrics: list[str] | None = None      # generation: default DEFAULT_METRICS; toxicity: ["toxicity"]
    limit: int | None = None              # evaluate the first N records
    shots: int = 0
    shots_file: str | None = None         # default: shots from the dataset's other records
    instruction: str | None = None
    system: str | None = None
    chat: bool | None = None              # None: use the chat template when the model has one
    batch_size: int = 8
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    window: int | None = None             # perplexity: tokens per window (default: the model's context)
    stride: int | None = None             # perplexity: default window // 2
    toxicity_scorer: str | None = None    # a registered name or "module:function" (default: profanity-check)

    def check(self) -> None:
        if self.task not in TASKS:
            raise LmforgeError(f"unknown task {self.task!r}; choose one of: {', '.join(TASKS)}")
        for name, low in (("limit", 1), ("shots", 0), ("batch_size", 1), ("max_new_tokens", 1)):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
                raise LmforgeError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.task in ("perplexity",) and (self.shots or self.shots_file):
            raise LmforgeError("perplexity scores text as it is: shots do not apply")
        if self.metrics is not None and self.task in ("perplexity", "multiple_choice"):
            raise LmforgeError(f"--metrics applies to generation and toxicity tasks, not to {self.task}")

    def metric_names(self) -> list[str]:
        if self.metrics is not None:
            return check_metrics(self.metrics)
        return ["toxicity"] if self.task == "toxicity" else list(DEFAULT_METRICS)


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


def _assemble(lm, query: str, shots: list[Example], s: EvalSettings, chat: bool) -> Any:
    if chat:
        return build_messages(query, s.instruction, shots, system=s.system)
    if s.fields.template is None:
        return build_prompt(query, s.instruction, shots) if (shots or s.instruction) else query
    # A template already says what to answer: each shot is the filled template followed by its answer.
    blocks = [s.instruction] if s.instruction else []
    blocks += [ex.input + ("" if ex.input[-1:].isspace() else " ") + ex.output for ex in shots]
    return "\n\n".join([*blocks, query])


def fit_prompt(lm, query: str, shots: list[Example], s: EvalSettings, chat: bool, reserve: int,
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


def _shot_output(record: D.Record, s: EvalSettings) -> str:
    if s.task == "multiple_choice":
        choices = D.choices_of(record, s.fields)
        return choices[D.answer_index(record, s.fields, choices)]
    if s.fields.reference is None:
        raise LmforgeError("shots need answers: set --reference-field")
    return D.text_field(record, s.fields.reference, "--reference-field")


def build_prompts(lm, records: list[D.Record], evaluated: int, s: EvalSettings, chat: bool,
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


@claims_output("eval")
def run_eval(lm, data_path: str | os.PathLike, s: EvalSettings, out_dir: str | os.PathLike | None = None, *,
             progress: bool = True, label: str = "eval", extra: dict | None = None,
             toxicity_scorer: ToxicityScorer | None = None, force: bool = False) -> dict:
    """Evaluate ``lm`` (an ``lmforge.LM``) on the dataset at ``data_path``; returns the summary.

    Writes ``predictions.jsonl`` and ``summary.json`` into ``out_dir`` when it is given: a folder that holds
    other files needs ``force`` (``lmforge.outputs``); an earlier evaluation's two files are replaced.
    ``extra`` is merged into the summary's settings (e.g. the adapter, a compare label).
    """
    s.check()
    metrics = s.metric_names() if s.task in ("generation", "toxicity") else []
    records = load_records(data_path)
    n = min(len(records), s.limit) if s.limit else len(records)
    evaluated = records[:n]
    D.check_fields(evaluated, s.fields, need_reference=any(m != "toxicity" for m in metrics),
                   multiple_choice=s.task == "multiple_choice")
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
        "settings": {**asdict(s), "chat": chat, "metrics": metrics or None, **(extra or {})},
        "counts": {"records": len(records), "evaluated": n, "shots_requested": s.shots,
                   "shots_dropped": sum(dropped), "examples_with_dropped_shots": sum(d > 0 for d in dropped)},
        "timing": {"seconds": round(seconds, 3), "seconds_per_example": round(seconds / n, 4)},
    }
    if sum(dropped):
        print(f"warning: {sum(dropped)} shots dropped over {summary['counts']['examples_with_dropped_shots']} "
              f"examples so that prompts fit the {lm.config.max_seq_len}-token context", file=sys.stderr)
    if out_dir is not None:
        write_outputs(out_dir, rows, summary)
    return summary


def _decoded(lm, ids: list[int]) -> str:
    return lm.tokenizer.decode(ids, skip_special_tokens=False)


def _run_generation(lm, records, n, s: EvalSettings, chat, metrics, progress, label, scorer):
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
    refs = ([D.text_field(r, s.fields.reference, "--reference-field") for r in records[:n]]
            if any(m != "toxicity" for m in metrics) else None)
    corpus, per = score_generations(predictions, refs, metrics, scorer or s.toxicity_scorer)
    rows = []
    for i in range(n):
        rows.append({"index": i, "where": records[i].where, "input": D.query_text(records[i], s.fields),
                     "prompt": _decoded(lm, prompts[i].ids), "prediction": predictions[i],
                     "reference": refs[i] if refs else None, "shots": prompts[i].shots_used,
                     "shots_dropped": prompts[i].shots_dropped, "scores": per[i]})
    return rows, corpus


def _run_perplexity(lm, evaluated, s: EvalSettings, progress):
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


def _run_multiple_choice(lm, records, n, s: EvalSettings, chat, progress, label):
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
