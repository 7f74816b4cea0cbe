"""Prompt engineering: zero-, one- and few-shot prompts from an instruction and worked examples.

Owns the ``Example`` pair, reading example files (JSONL or a JSON list), and the two prompt
shapes: plain text for base models (``build_prompt``) and a message list for chat models
(``build_messages``, rendered later by ``Tokenizer.apply_chat_template``). Examples always
appear in the order given; zero-shot simply means no examples.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.data.records import parse_json_records
from lmforge.errors import LmforgeError
from lmforge.io import read_text

# Field pairs an example file may use, in order of preference.
FIELD_PAIRS = (("input", "output"), ("question", "answer"), ("prompt", "completion"))


@dataclass
class Example:
    """One worked example: what the model is shown and what it should answer."""

    input: str
    output: str


def _example_from(item: Any, where: str) -> Example:
    """Turn one parsed JSON value into an ``Example``; ``where`` is "file, line N" for errors."""
    expected = ", ".join(f"{a}/{b}" for a, b in FIELD_PAIRS)
    if not isinstance(item, dict):
        raise LmforgeError(f"{where}: expected a JSON object with {expected}, got {type(item).__name__}")
    for in_key, out_key in FIELD_PAIRS:
        if in_key in item and out_key in item:
            for key in (in_key, out_key):
                if not isinstance(item[key], str):
                    raise LmforgeError(f"{where}: field '{key}' must be a string, got {type(item[key]).__name__}")
            return Example(input=item[in_key], output=item[out_key])
    # Name what is missing from the pair the line comes closest to.
    for in_key, out_key in FIELD_PAIRS:
        if in_key in item or out_key in item:
            missing = f"field '{out_key if in_key in item else in_key}'"
            break
    else:
        missing = "fields 'input' and 'output'"
    has = ", ".join(map(str, item)) or "no fields"
    raise LmforgeError(f"{where}: missing {missing} (the line has: {has}; expected one of {expected})")


def load_examples(path: str | os.PathLike) -> list[Example]:
    """Read examples from JSONL (one object per line) or a JSON list of objects.

    Each object holds ``input``/``output`` (or ``question``/``answer``, or ``prompt``/``completion``).
    Errors name the file, the line and the missing field.
    """
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"examples file {path} does not exist")
    text = read_text(path)
    if not text.strip():
        raise LmforgeError(f"examples file {path} is empty")
    items = parse_json_records(text, str(path))
    if not items:
        raise LmforgeError(f"examples file {path} holds no examples")
    return [_example_from(item, f"{path}, line {number}") for number, item in items]


def _check_inputs(query: Any, instruction: Any, examples: Any) -> list[Example]:
    if not isinstance(query, str):
        raise LmforgeError(f"query must be a str, got {type(query).__name__}")
    if instruction is not None and not isinstance(instruction, str):
        raise LmforgeError(f"instruction must be a str or None, got {type(instruction).__name__}")
    if isinstance(examples, (str, Example)) or not isinstance(examples, Sequence):
        raise LmforgeError(f"examples must be a list of Example, got {type(examples).__name__}")
    for i, example in enumerate(examples):
        if not isinstance(example, Example):
            raise LmforgeError(f"examples[{i}] must be an Example, got {type(example).__name__}")
        for field in ("input", "output"):
            if not isinstance(getattr(example, field), str):
                raise LmforgeError(f"examples[{i}].{field} must be a str, got "
                                   f"{type(getattr(example, field)).__name__}")
    return list(examples)


def build_prompt(query: str, instruction: str | None = None, examples: Sequence[Example] = (), *,
                 input_label: str = "Input", output_label: str = "Output") -> str:
    """A plain-text prompt for a base model; the model continues after the final ``Output:``.

    Layout (blocks separated by a blank line; the instruction block is left out when empty)::

        {instruction}

        Input: {example 1 input}
        Output: {example 1 output}

        Input: {query}
        Output:
    """
    examples = _check_inputs(query, instruction, examples)
    for name, label in (("input_label", input_label), ("output_label", output_label)):
        if not isinstance(label, str) or not label.strip():
            raise LmforgeError(f"{name} must be a non-empty string, got {label!r}")
    blocks = [instruction] if instruction else []
    blocks += [f"{input_label}: {ex.input}\n{output_label}: {ex.output}" for ex in examples]
    blocks.append(f"{input_label}: {query}\n{output_label}:")
    return "\n\n".join(blocks)


def build_messages(query: str, instruction: str | None = None, examples: Sequence[Example] = (),
                   system: str | None = None) -> list[dict[str, str]]:
    """A chat conversation: examples as user/assistant turns, then the query as the last user turn.

    Where the instruction goes: with no ``system`` it becomes the system message; with an explicit
    ``system`` it is put in front of the first user turn (``"{instruction}\\n\\n{first input}"``),
    so the system message stays exactly what the caller wrote. No system message is produced when
    neither is given, which suits templates that reject the system role.
    """
    examples = _check_inputs(query, instruction, examples)
    if system is not None and not isinstance(system, str):
        raise LmforgeError(f"system must be a str or None, got {type(system).__name__}")
    messages: list[dict[str, str]] = []
    prefix = ""
    if system:
        messages.append({"role": "system", "content": system})
        prefix = f"{instruction}\n\n" if instruction else ""
    elif instruction:
        messages.append({"role": "system", "content": instruction})
    for ex in examples:
        messages.append({"role": "user", "content": prefix + ex.input})
        messages.append({"role": "assistant", "content": ex.output})
        prefix = ""
    messages.append({"role": "user", "content": prefix + query})
    return messages
