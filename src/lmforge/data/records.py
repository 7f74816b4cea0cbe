"""Reading record files and filling ``{field}`` templates from them.

The one reader behind prompt examples (``prompts.py``), fine-tuning data (``data/sft.py``), JSONL pretraining
corpora (``data/corpus.py``), reward and preference data (``data/reward_data.py``, ``alignment/dpo.py``), PPO
prompts (``alignment/rlhf.py``) and evaluation datasets (``evaluation/data.py``): JSON lines, one JSON list or
CSV, optionally gzipped (text read by ``lmforge.io.read_text``), each record with the file and line it came from;
and the one ``{field}`` template renderer, used by fine-tuning templates and evaluation/compare prompts alike
(``{{``/``}}`` are literal braces). Errors name the file (as it was given) and the line the same way
everywhere: ``FILE, line N: ...``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError
from lmforge.io import read_text


def parse_json_records(text: str, name: str, lines_only: bool = False) -> list[tuple[int, Any]]:
    """(line, item) pairs: the items of a JSON list when the text starts with ``[`` (unless
    ``lines_only``, e.g. for a ``.jsonl`` file), else one JSON value per non-blank line."""
    if text.lstrip().startswith("[") and not lines_only:
        return parse_json_list(text, name)
    items = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append((number, json.loads(line)))
        except json.JSONDecodeError as e:
            raise LmforgeError(f"{name}, line {number}: not valid JSON ({e.msg}, column {e.colno})") from None
    return items


def parse_json_list(text: str, name: str) -> list[tuple[int, Any]]:
    """Items of a JSON array, each with the line it starts on."""
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    items: list[tuple[int, Any]] = []

    def skip_ws(i: int) -> int:
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        return i

    def line_of(i: int) -> int:
        return text.count("\n", 0, i) + 1

    pos = skip_ws(pos)
    if pos < len(text) and text[pos] == "]":
        return items
    while True:
        try:
            item, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise LmforgeError(f"{name}, line {e.lineno}: not valid JSON ({e.msg})") from e
        items.append((line_of(pos), item))
        pos = skip_ws(end)
        if pos < len(text) and text[pos] == ",":
            pos = skip_ws(pos + 1)
            continue
        if pos < len(text) and text[pos] == "]":
            break
        raise LmforgeError(f"{name}, line {line_of(pos)}: expected ',' or ']' in the JSON list")
    if skip_ws(pos + 1) != len(text):
        raise LmforgeError(f"{name}, line {line_of(skip_ws(pos + 1))}: unexpected text after the JSON list")
    return items


@dataclass
class Record:
    """One dataset row and where it came from ("data/train.jsonl, line 7": the path as given)."""

    fields: dict[str, Any]
    where: str


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
        where = f"{path}, line {number}"
        if not isinstance(item, dict):
            raise LmforgeError(f"{where}: expected a JSON object, got {type(item).__name__}")
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
    lone = re.search(r"[{}]", _PLACEHOLDER.sub("", template))
    if lone:
        raise LmforgeError(f"--prompt-template: a lone {lone.group(0)!r} (write {{{{ and }}}} for literal braces, "
                           "{field} for a field)")
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
