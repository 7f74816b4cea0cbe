"""Reward-model data: labelled texts (a classifier's) and chosen/rejected pairs (a pairwise model's),
and the seeded held-out splits of both.

Files are ``.csv``, ``.jsonl`` or ``.json``, optionally gzipped, read by ``data/records.py``'s
``load_records``; every error names the file, the line and the field.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

from lmforge.data.records import field, load_records, text_field
from lmforge.errors import LmforgeError

BINARY_NAMES = ("toxic", "non_toxic")  # --binary: class 0 = every label not in good_labels, class 1 = the good ones


@dataclass
class LabelledTexts:
    """Texts with integer labels indexing ``names`` (the class names, in head order)."""

    texts: list[str]
    labels: list[int]
    names: list[str]


def parse_label_map(spec: str | None) -> dict[str, str] | None:
    """``"0=hate,1=offensive,2=neither"`` -> {"0": "hate", ...}; None stays None."""
    if spec is None:
        return None
    out = {}
    for item in spec.split(","):
        raw, sep, name = item.partition("=")
        if not sep or not raw.strip() or not name.strip():
            raise LmforgeError(f"label map {spec!r}: expected VALUE=NAME pairs separated by commas, "
                               "e.g. 0=hate,1=offensive,2=neither")
        out[raw.strip()] = name.strip()
    return out


def _natural(values: set[str]) -> list[str]:
    """Sorted, numbers by value: ["2", "10"], not ["10", "2"]."""
    return sorted(values, key=lambda v: (0, float(v), v) if v.replace(".", "", 1).lstrip("-").isdigit() else (1, 0, v))


def load_labelled(path: str | os.PathLike, text_field_name: str = "text", label_field: str = "label",
                  label_map: dict[str, str] | None = None, names: list[str] | None = None) -> LabelledTexts:
    """Read labelled texts. A label value is mapped through ``label_map`` (raw value -> class name)
    when given; a value outside the map, or a name outside ``names`` (e.g. a trained model's
    classes), is an error naming the file and line. Without ``names`` the classes are the map's
    names in order, or the distinct values found, sorted."""
    records = load_records(path)
    allowed = names or (list(dict.fromkeys(label_map.values())) if label_map else None)
    texts, raw_names = [], []
    for r in records:
        texts.append(text_field(r, text_field_name, "--text-field"))
        raw = field(r, label_field, "--label-field")
        raw = str(int(raw)) if isinstance(raw, float) and raw.is_integer() else str(raw).strip()
        if label_map is not None and raw not in label_map:
            raise LmforgeError(f"{r.where}: label {raw!r} in field {label_field!r} is not in the allowed set "
                               f"{', '.join(label_map)} (--label-map)")
        name = label_map[raw] if label_map is not None else raw
        if allowed is not None and name not in allowed:
            raise LmforgeError(f"{r.where}: label {name!r} in field {label_field!r} is not in the allowed set "
                               f"{', '.join(allowed)}")
        raw_names.append(name)
    classes = allowed or _natural(set(raw_names))
    index = {n: i for i, n in enumerate(classes)}
    return LabelledTexts(texts, [index[n] for n in raw_names], list(classes))


def to_binary(data: LabelledTexts, good_labels: list[str]) -> LabelledTexts:
    """Two classes, ``BINARY_NAMES``: 1 for the labels in ``good_labels``, 0 for all the others."""
    unknown = [g for g in good_labels if g not in data.names]
    if unknown:
        raise LmforgeError(f"good label(s) {', '.join(map(repr, unknown))} are not among the classes "
                           f"{', '.join(data.names)} (--good-labels)")
    good = {data.names.index(g) for g in good_labels}
    return LabelledTexts(data.texts, [int(y in good) for y in data.labels], list(BINARY_NAMES))


def load_pairs(path: str | os.PathLike, chosen_field: str = "chosen",
               rejected_field: str = "rejected") -> list[tuple[str, str]]:
    """(chosen, rejected) text pairs, e.g. HH-RLHF's full dialogues."""
    return [(text_field(r, chosen_field, "--chosen-field"), text_field(r, rejected_field, "--rejected-field"))
             for r in load_records(path)]


def stratified_split(labels: list[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, held-out indices): ``fraction`` of each class held out, chosen by ``seed``.
    The same labels, fraction and seed always give the same split."""
    if not 0 < fraction < 1:
        raise LmforgeError(f"the held-out fraction must be in (0, 1), got {fraction}")
    rng = random.Random(seed)
    train, held = [], []
    for c in sorted(set(labels)):
        members = [i for i, y in enumerate(labels) if y == c]
        rng.shuffle(members)
        k = round(len(members) * fraction)
        held += members[:k]
        train += members[k:]
    if not train or not held:
        raise LmforgeError(f"{len(labels)} examples are too few to hold out a fraction of {fraction}")
    return sorted(train), sorted(held)


def random_split(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, held-out indices) of ``n`` items, ``fraction`` held out, chosen by ``seed``."""
    return stratified_split([0] * n, fraction, seed)
