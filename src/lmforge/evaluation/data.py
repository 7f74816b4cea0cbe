"""Evaluation data: reading records, mapping fields, filling prompt templates, picking few-shot examples.

Owns the field mapping (``FieldMap``: which field is the input, the references, the choices, the answer),
``{field}`` prompt templates, each example's references, and the rule for few-shot examples.

References: ``--reference-field`` names one field or several (``summary1,summary2,summary3``, or a YAML
list); each named field gives one reference, or several when its value is a list of strings. The first
reference is the one single-reference metrics and shots use (``references_of`` keeps their order).

Few-shot examples:

- shots come from a shots file (read like the dataset, same field mapping) or from the dataset's
  other records: first the records outside the evaluated subset, in file order, then the
  evaluated ones;
- a query is never among its own shots (neither the same record nor a record with the same input);
- shots appear in that fixed order, so every query with the same candidates gets the same prompt.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from lmforge.data.records import Record, as_text, field, render, text_field
from lmforge.errors import LmforgeError


@dataclass
class FieldMap:
    """Which record fields play which role. ``template`` (``"...{dialogue}..."``) builds the prompt
    from any fields; without it the prompt is the ``input`` field."""

    input: str | None = "input"
    reference: str | tuple[str, ...] | None = None
    template: str | None = None
    choices: str | None = None
    answer: str | None = None


def query_text(record: Record, fields: FieldMap) -> str:
    """What the model is asked for this record: the filled template, or the input field."""
    if fields.template is not None:
        return render(fields.template, record)
    if fields.input is None:
        raise LmforgeError("set --input-field or --prompt-template: there is no prompt otherwise")
    return text_field(record, fields.input, "--input-field")


def reference_names(reference: str | Sequence[str] | None) -> tuple[str, ...]:
    """The reference field names: ``"summary"``, ``"summary1,summary2"`` or a list of names (none: ())."""
    if reference is None:
        return ()
    names = [n.strip() if isinstance(n, str) else "" for n in
             (reference.split(",") if isinstance(reference, str) else reference)]
    if not names or not all(names):
        raise LmforgeError(f"--reference-field: expected a field name or names separated by commas, got "
                           f"{reference!r}")
    if len(set(names)) < len(names):
        raise LmforgeError(f"--reference-field: a field is named twice in {reference!r}")
    return tuple(names)


def references_of(record: Record, fields: FieldMap) -> list[str]:
    """The record's references, in order: one per named field, or each string of a list-valued field. A
    missing field (or an empty list) raises naming the field and the record's file and line."""
    refs: list[str] = []
    for name in reference_names(fields.reference):
        value = field(record, name, "--reference-field")
        if isinstance(value, list):
            if not value or not all(isinstance(v, str) for v in value):
                raise LmforgeError(f"{record.where}: field {name!r} (--reference-field) must be text or a "
                                   f"non-empty list of strings (the references), got {value!r:.80}")
            refs += value
        else:
            refs.append(as_text(value, name, record.where, "--reference-field"))
    return refs


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
            references_of(r, fields)
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
