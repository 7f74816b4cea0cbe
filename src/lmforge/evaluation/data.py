"""Evaluation data: reading records, mapping fields, filling prompt templates, picking few-shot examples.

Owns the input formats of ``lmforge eval`` (JSONL, ``.jsonl.gz``, a JSON list, CSV; any of them
may be gzipped), the ``Record`` (one row with the file and line it came from, for errors), the
field mapping (``FieldMap``: which field is the input, the reference, the choices, the answer),
``{field}`` prompt templates, and the rule for few-shot examples:

- shots come from a shots file (read like the dataset, same field mapping) or from the dataset's
  other records: first the records outside the evaluated subset, in file order, then the
  evaluated ones;
- a query is never among its own shots (neither the same record nor a record with the same input);
- shots appear in that fixed order, so every query with the same candidates gets the same prompt.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.data.records import parse_json_records, read_text
from lmforge.errors import LmforgeError


@dataclass
class Record:
    """One dataset row and where it came from ("data.jsonl, line 7")."""

    fields: dict[str, Any]
    where: str


@dataclass
class FieldMap:
    """Which record fields play which role. ``template`` (``"...{dialogue}..."``) builds the prompt
    from any fields; without it the prompt is the ``input`` field."""

    input: str | None = "input"
    reference: str | None = None
    template: str | None = None
    choices: str | None = None
    answer: str | None = None


def load_records(path: str | os.PathLike) -> list[Record]:
    """Read a dataset: ``.jsonl``/``.json``/``.csv``, optionally ``.gz``. Errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"dataset {path} does not exist")
    suffix = path.name[:-3] if path.name.endswith(".gz") else path.name
    kind = Path(suffix).suffix.lower()
    if kind not in (".jsonl", ".json", ".csv"):
        raise LmforgeError(f"dataset {path}: unknown format {kind or '(no extension)'!r}; "
                           "use .jsonl, .json (a list of objects) or .csv, optionally gzipped (.gz)")
    text = read_text(path)
    if not text.strip():
        raise LmforgeError(f"dataset {path} is empty")
    rows: list[tuple[int, Any]] = []
    if kind == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        try:
            for row in reader:
                if None in row:
                    raise LmforgeError(f"{path}, line {reader.line_num}: more values than the "
                                       f"{len(reader.fieldnames or [])} header columns")
                rows.append((reader.line_num, dict(row)))
        except csv.Error as e:
            raise LmforgeError(f"{path}, line {reader.line_num}: not valid CSV ({e})") from None
    else:
        rows = parse_json_records(text, str(path), lines_only=kind == ".jsonl")
    if not rows:
        raise LmforgeError(f"dataset {path} holds no records")
    records = []
    for number, item in rows:
        where = f"{path.name}, line {number}"
        if not isinstance(item, dict):
            raise LmforgeError(f"{path}, line {number}: expected a JSON object, got {type(item).__name__}")
        records.append(Record(item, where))
    return records


def field(record: Record, name: str, flag: str) -> Any:
    """The value of ``name``; a missing field raises naming it, the flag that chose it and the fields there are."""
    if name not in record.fields:
        have = ", ".join(map(str, record.fields)) or "no fields"
        raise LmforgeError(f"{record.where}: no field {name!r} ({flag}); the record has: {have}")
    return record.fields[name]


def text_field(record: Record, name: str, flag: str) -> str:
    value = field(record, name, flag)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise LmforgeError(f"{record.where}: field {name!r} ({flag}) must be text, got {type(value).__name__}")
    return value


_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([^{}]*)\}")


def template_fields(template: str) -> list[str]:
    """The ``{field}`` names a template uses (``{{``/``}}`` are literal braces)."""
    names = [m.group(1) for m in _PLACEHOLDER.finditer(template) if m.group(0) not in ("{{", "}}")]
    for n in names:
        if not re.fullmatch(r"[A-Za-z_][\w.-]*", n):
            raise LmforgeError(f"--prompt-template: {{{n}}} is not a field placeholder (write {{{{ and }}}} "
                               "for literal braces)")
    return names


def render(template: str, record: Record) -> str:
    """Fill ``{field}`` placeholders with the record's values (inserted text is not parsed again)."""
    template_fields(template)

    def sub(m: re.Match) -> str:
        if m.group(0) in ("{{", "}}"):
            return m.group(0)[0]
        return text_field(record, m.group(1), "--prompt-template")

    return _PLACEHOLDER.sub(sub, template)


def query_text(record: Record, fields: FieldMap) -> str:
    """What the model is asked for this record: the filled template, or the input field."""
    if fields.template is not None:
        return render(fields.template, record)
    if fields.input is None:
        raise LmforgeError("set --input-field or --prompt-template: there is no prompt otherwise")
    return text_field(record, fields.input, "--input-field")


def choices_of(record: Record, fields: FieldMap) -> list[str]:
    """The answer options: a JSON list of strings (a CSV cell may hold one as JSON text)."""
    value = field(record, fields.choices, "--choices-field")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise LmforgeError(f"{record.where}: field {fields.choices!r} (--choices-field) must be a list of "
                               f"strings (or a JSON list in a CSV cell), got {value[:60]!r}") from None
    if not isinstance(value, list) or len(value) < 2 or not all(isinstance(c, str) for c in value):
        raise LmforgeError(f"{record.where}: field {fields.choices!r} (--choices-field) must be a list of at "
                           f"least 2 strings, got {value!r:.80}")
    return value


def answer_index(record: Record, fields: FieldMap, choices: Sequence[str]) -> int:
    """The correct choice: an index (int or digits) or the text of one of the choices."""
    value = field(record, fields.answer, "--answer-field")
    if isinstance(value, str) and value.strip().lstrip("-").isdigit() and value not in choices:
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value < len(choices):
            raise LmforgeError(f"{record.where}: answer index {value} is out of range for {len(choices)} choices")
        return value
    if isinstance(value, str) and value in choices:
        return list(choices).index(value)
    raise LmforgeError(f"{record.where}: field {fields.answer!r} (--answer-field) must be a choice index or the "
                       f"text of one of the choices, got {value!r:.80}")


def check_fields(records: Sequence[Record], fields: FieldMap, need_reference: bool, multiple_choice: bool) -> None:
    """Fail early (before any model runs) on the first record that lacks a mapped field."""
    for r in records:
        query_text(r, fields)
        if need_reference:
            if fields.reference is None:
                raise LmforgeError("the metrics need references: set --reference-field")
            text_field(r, fields.reference, "--reference-field")
        if multiple_choice:
            if fields.choices is None or fields.answer is None:
                raise LmforgeError("multiple choice needs --choices-field and --answer-field")
            answer_index(r, fields, choices_of(r, fields))


def shot_candidates(n_records: int, evaluated: Sequence[int]) -> list[int]:
    """Dataset indices in the order shots are taken from: records not evaluated first, then evaluated ones."""
    chosen = set(evaluated)
    return [i for i in range(n_records) if i not in chosen] + [i for i in evaluated]


def pick_shots(query_index: int | None, query: str, pool: Sequence[Record], order: Sequence[int], k: int,
               fields: FieldMap) -> list[int]:
    """The first ``k`` indices of ``order`` into ``pool`` that are neither the query record itself
    (``query_index``; None when the pool is a separate shots file) nor a record with the same input."""
    picked: list[int] = []
    for j in order:
        if len(picked) == k:
            break
        if j == query_index or query_text(pool[j], fields) == query:
            continue
        picked.append(j)
    return picked
