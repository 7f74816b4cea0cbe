"""Final answers of worked solutions: finding a completion's answer and normalising it for comparison.

Owns the answer extractors (GSM8K's ``#### N``, or the last number in the text), the normaliser (numbers without
``$``, thousands commas or a trailing ``.0``) and a reference's answer. The ``answer_match`` metric of
``lmforge eval``/``lmforge compare`` (``metrics.py``) and GRPO's ``exact_match`` reward (``alignment/grpo_rewards.py``)
both compare answers through these, so a held-out accuracy means the same in both.
"""

from __future__ import annotations

import math
import re
from typing import Any

from lmforge.errors import LmforgeError

EXTRACTORS = ("hashes", "last_number")

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def normalise_answer(text: str) -> str:
    """An answer as compared: a number without $, thousands commas or a trailing .0 ("1,000.00" -> "1000"),
    anything else stripped."""
    s = text.strip().rstrip(".").replace("$", "").replace(",", "").strip()
    try:
        value = float(s)
    except ValueError:
        return s
    if math.isfinite(value) and value == int(value):
        return str(int(value))
    return repr(value)


def extract_answer(text: str, extractor: str = "hashes") -> str | None:
    """The final answer of a completion: ``hashes``: the number after the last ``#### `` (GSM8K's format);
    ``last_number``: the last number in the text. None when there is none."""
    if extractor == "hashes":
        found = re.findall(r"####\s*(" + _NUMBER.pattern + ")", text)
    elif extractor == "last_number":
        found = _NUMBER.findall(text)
    else:
        raise LmforgeError(f"unknown answer extractor {extractor!r}; choose one of: {', '.join(EXTRACTORS)}")
    return normalise_answer(found[-1]) if found else None


def reference_answer(raw: Any) -> str:
    """A record's reference answer: the number after ``####`` when the text has one (a GSM8K solution), else the
    whole text, normalised."""
    text = str(raw)
    return extract_answer(text, "hashes") if "####" in text and extract_answer(text, "hashes") else \
        normalise_answer(text)
