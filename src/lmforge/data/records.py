"""Reading record files: JSON lines or one JSON list of records, each with the line it starts on.

The one parser behind prompt examples (``prompts.py``), fine-tuning data (``data/sft.py``) and
evaluation datasets (``evaluation/data.py``); each of those adds its own fields and messages.
Errors name the file and the line.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError


def read_text(path: Path) -> str:
    """A UTF-8 text file, gunzipped when its name ends in ``.gz``."""
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rt", encoding="utf-8") as f:
                return f.read()
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LmforgeError(f"{path} is not UTF-8 text (byte {e.start})") from None
    except (OSError, EOFError) as e:
        raise LmforgeError(f"{path} cannot be read: {e}") from None


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
