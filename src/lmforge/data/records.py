"""Reading record files and filling ``{field}`` templates from them.

The one reader behind fine-tuning data (``data/sft.py``), record pretraining corpora (``data/corpus.py``),
reward and preference data (``data/reward_data.py``, ``alignment/dpo.py``), PPO prompts (``alignment/rlhf.py``)
and evaluation datasets (``evaluation/data.py``), each record with the file and line it came from:

- ``.jsonl`` (one JSON object a line), ``.json`` (a list of objects, or JSON lines), ``.csv`` (a header row);
  these three optionally gzipped (``.gz``, text read by ``lmforge.io.read_text``);
- ``.parquet`` (a table; one record per row, ``FILE, row N``; needs ``pyarrow``: ``pip install pyarrow`` or the
  ``lmforge[parquet]`` extra; parquet compresses inside, so ``.parquet.gz`` is refused);
- ``.txt`` / ``.md`` (optionally gzipped): one record ``{"text": PARAGRAPH}`` per non-empty paragraph, paragraphs
  being separated by blank lines, each with the line it starts on. (A pretraining corpus reads a text file as one
  whole document instead: ``data/corpus.py``.)

Fields are named by a key or by a dotted path into nested records: ``dialogue.turns`` (a key of a nested object),
``turns.0.text`` (a list index, from 0); a key that itself holds a dot is matched whole first. Where text is
wanted (``text_field``, ``{field}`` placeholders), a number is written out and a list of strings (dialogue
turns) is joined with newlines. The JSON parsing (``parse_json_records``) also reads prompt examples
(``prompts.py``).

And the one ``{field}`` template renderer, used by fine-tuning templates and evaluation/compare prompts alike
(``{{``/``}}`` are literal braces). Errors name the file (as it was given) and the line the same way
everywhere: ``FILE, line N: ...`` (``FILE, row N: ...`` for parquet), and a bad field path names the component
that is missing.
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


RECORD_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt", ".md")
TEXT_SUFFIXES = (".txt", ".md")


def record_kind(path: str | os.PathLike) -> tuple[str, bool]:
    """``(suffix, gzipped)`` of a dataset file name: ``("jsonl", True)`` for ``x.jsonl.gz``; the suffix is
    lower-case with its dot, ``""`` when there is none."""
    name = Path(path).name
    gz = name.lower().endswith(".gz")
    return Path(name[:-3] if gz else name).suffix.lower(), gz


def load_records(path: str | os.PathLike) -> list[Record]:
    """Read a dataset (the formats of the module docstring). Errors name the file and line (or row)."""
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"dataset {path} does not exist")
    kind, gz = record_kind(path)
    if kind not in RECORD_SUFFIXES or (kind == ".parquet" and gz):
        raise LmforgeError(f"dataset {path}: unknown format {(kind + '.gz' if gz else kind) or '(no extension)'!r}; "
                           "use .jsonl, .json (a list of objects), .csv or .txt/.md (one record per paragraph, "
                           "field 'text'), optionally gzipped (.gz), or .parquet")
    if kind == ".parquet":
        rows = _parquet_rows(path)
    else:
        text = read_text(path)
        if not text.strip():
            raise LmforgeError(f"dataset {path} is empty")
        if kind == ".csv":
            rows = _csv_rows(text, path)
        elif kind in TEXT_SUFFIXES:
            rows = [(number, {"text": paragraph}) for number, paragraph in paragraphs(text)]
        else:
            rows = parse_json_records(text, str(path), lines_only=kind == ".jsonl")
    if not rows:
        raise LmforgeError(f"dataset {path} holds no records")
    unit = "row" if kind == ".parquet" else "line"
    records = []
    for number, item in rows:
        where = f"{path}, {unit} {number}"
        if not isinstance(item, dict):
            raise LmforgeError(f"{where}: expected a JSON object, got {type(item).__name__}")
        records.append(Record(item, where))
    return records


def paragraphs(text: str) -> list[tuple[int, str]]:
    """``(line, paragraph)`` for each run of non-blank lines (blank: only whitespace), joined with ``\n``."""
    out: list[tuple[int, str]] = []
    block: list[str] = []
    first = 0
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            if not block:
                first = number
            block.append(line)
        elif block:
            out.append((first, "\n".join(block)))
            block = []
    if block:
        out.append((first, "\n".join(block)))
    return out


def _csv_rows(text: str, path: Path) -> list[tuple[int, Any]]:
    rows: list[tuple[int, Any]] = []
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        for row in reader:
            if None in row:
                raise LmforgeError(f"{path}, line {reader.line_num}: more values than the "
                                   f"{len(reader.fieldnames or [])} header columns")
            rows.append((reader.line_num, dict(row)))
    except csv.Error as e:
        raise LmforgeError(f"{path}, line {reader.line_num}: not valid CSV ({e})") from None
    return rows


def _parquet_rows(path: Path) -> list[tuple[int, Any]]:
    """The rows of a parquet table as Python values (nested structs become dicts, lists lists), numbered from 1."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise LmforgeError(f"dataset {path}: reading .parquet needs pyarrow; install it with `pip install pyarrow` "
                           "(or `pip install 'lmforge[parquet]'`), or convert the file to .jsonl") from None
    try:
        rows = pq.read_table(path).to_pylist()
    except (OSError, ValueError, pa.ArrowException) as e:  # every pyarrow error derives from ArrowException
        reason = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise LmforgeError(f"dataset {path}: not a readable parquet file ({reason})") from None
    return [(i, row) for i, row in enumerate(rows, start=1)]


def lookup(fields: dict[str, Any], path: str, where: str, flag: str) -> Any:
    """The value at ``path`` in a record's ``fields``: a key, or a dotted path (``dialogue.turns``,
    ``turns.0.text``; a key holding the dot whole wins). A missing component raises naming the file and line
    (``where``), the path, the flag that chose it, the component and what is there instead."""
    if path in fields:
        return fields[path]
    value: Any = fields
    walked: list[str] = []
    for part in path.split("."):
        at = ".".join(walked)
        if isinstance(value, dict):
            if part not in value:
                have = ", ".join(map(str, value)) or "no fields"
                if not walked:
                    raise LmforgeError(f"{where}: no field {path!r} ({flag}); the record has: {have}")
                raise LmforgeError(f"{where}: no field {path!r} ({flag}): {at!r} has no {part!r}; it has: {have}")
            value = value[part]
        elif isinstance(value, list):
            if not part.isdigit():
                raise LmforgeError(f"{where}: no field {path!r} ({flag}): {at!r} is a list of {len(value)} items, "
                                   f"so {part!r} must be an index (0 to {len(value) - 1})")
            if int(part) >= len(value):
                raise LmforgeError(f"{where}: no field {path!r} ({flag}): {at!r} has {len(value)} items, "
                                   f"no index {part}")
            value = value[int(part)]
        else:
            raise LmforgeError(f"{where}: no field {path!r} ({flag}): {at!r} is a {type(value).__name__}, "
                               f"not an object or a list, so it has no {part!r}")
        walked.append(part)
    return value


def field(record: Record, name: str, flag: str) -> Any:
    """The value of ``name`` (a key or a dotted path: ``lookup``); a missing field raises naming it, the flag
    that chose it and the fields there are."""
    return lookup(record.fields, name, record.where, flag)


def as_text(value: Any, name: str, where: str, flag: str) -> str:
    """A field value as text: a string, a number written out, or a list of strings joined with newlines."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return "\n".join(value)
    if not isinstance(value, str):
        raise LmforgeError(f"{where}: field {name!r} ({flag}) must be text (or a list of strings), "
                           f"got {type(value).__name__}")
    return value


def text_field(record: Record, name: str, flag: str) -> str:
    """``field`` as text (``as_text``)."""
    return as_text(field(record, name, flag), name, record.where, flag)


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
