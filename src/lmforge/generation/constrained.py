"""Constrained decoding: structured output (a JSON schema or a regular expression) over the tokenizer's vocabulary.

This module owns compiling a JSON schema or a regex into a token-level automaton (``Constraint``), the
per-row state that generation carries (``ConstraintState``: ``allowed_mask``, ``advance(token)``, ``is_done``)
and the errors for what cannot be compiled (an impossible schema, an invalid regex: ``LmforgeError`` naming it;
the server answers them with a 400, the CLI with one ``error:`` line).

The engine is llguidance (https://github.com/guidance-ai/llguidance, MIT), chosen over writing our own
regex->DFA and schema->regex compiler and over ``outlines-core``/``xgrammar`` because it installs here as one
3 MB wheel without dependencies, reads our HF ``tokenizers`` JSON directly (``Tokenizer.backend.to_str()``),
covers JSON Schema far beyond what a small home-made compiler would (nested objects, arrays, enum, const,
anyOf, numeric and length bounds, patterns), detects unsatisfiable schemas, and computes the token mask
with an Earley parser over a lexer DFA in microseconds per step. It is an optional extra
(``pip install 'lmforge[structured]'``); without it, asking for structured output says so.

Semantics. A regex must match the whole output (it is anchored at both ends). JSON is emitted compactly
(``{"a": 1, "b": [2, 3]}``: ", " and ": " separators, no other whitespace), which keeps a model from
wandering in whitespace. The end-of-sequence token is allowed only where the automaton accepts; when it
accepts and nothing else can follow, the state ``is_done`` and generation stops there. A generation that
reaches ``max_new_tokens`` first is incomplete (finish reason "length") and never valid by promise.

    constraint = json_schema_constraint({"type": "object", ...}, tokenizer, vocab_size=V, eos_ids=[2])
    state = constraint.new_state()
    logits = logits.masked_fill(~state.allowed_mask(), float("-inf")); state.advance(token)
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer

INSTALL_HINT = "structured output needs the llguidance package: pip install 'lmforge[structured]'"
# Compact JSON: the separators a model sees in most JSON text, and no free whitespace to wander in.
JSON_OPTIONS = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}
ANY_JSON_OBJECT: dict[str, Any] = {"type": "object"}

# One llguidance tokenizer per (lmforge Tokenizer, vocabulary size, end ids): building it reads the whole vocabulary.
_LL_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise LmforgeError(INSTALL_HINT) from None
    return llguidance


def _ll_tokenizer(tokenizer: Any, vocab_size: int | None, eos_ids: Sequence[int]):
    """The llguidance view of an lmforge ``Tokenizer`` (its ``tokenizers`` backend), cached per tokenizer."""
    llg = _llguidance()
    if not isinstance(tokenizer, Tokenizer):
        raise LmforgeError(f"structured output needs lmforge's Hugging Face `tokenizers` tokenizer, got "
                           f"{type(tokenizer).__name__}")
    backend = tokenizer.backend
    eos = sorted(set(eos_ids) or set(tokenizer.eos_ids))
    if not eos:
        raise LmforgeError("structured output needs an end-of-sequence token; this tokenizer has none")
    n_vocab = max(vocab_size or 0, backend.get_vocab_size(with_added_tokens=True))
    key = (n_vocab, tuple(eos))
    cache = _LL_TOKENIZERS.setdefault(tokenizer, {})
    if key not in cache:
        try:
            cache[key] = llg.LLTokenizer(backend.to_str(), n_vocab=n_vocab, eos_token=eos)
        except Exception as e:  # an unusual tokenizer.json llguidance cannot read
            raise LmforgeError(f"structured output cannot read this tokenizer: {e}") from None
    return cache[key]


class ConstraintState:
    """One generation's position in a ``Constraint``: which tokens may come next, and whether it is complete."""

    def __init__(self, constraint: Constraint, matcher: Any):
        self.constraint, self._m = constraint, matcher

    def allowed_mask(self) -> torch.Tensor:
        """(vocab_size,) bool: True where the token may come next (end-of-sequence only where the output is
        complete)."""
        raw = self._m.compute_bitmask()
        if self._m.is_error():
            raise LmforgeError(f"structured output failed: {self._m.get_error()}")
        bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little")  # bit t: token t (LE words)
        mask = torch.from_numpy(bits.view(np.bool_))
        V = self.constraint.vocab_size
        if mask.numel() >= V:
            return mask[:V]
        return torch.cat([mask, mask.new_zeros(V - mask.numel())])

    def mask_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (..., V) with every token the constraint forbids at -inf."""
        allowed = self.allowed_mask().to(logits.device)
        return logits.masked_fill(~allowed, float("-inf"))

    def advance(self, token: int) -> None:
        """Take one generated token (an end-of-sequence token is fine where the output is complete)."""
        if not self._m.consume_token(int(token)):
            raise LmforgeError(f"structured output: token {token} does not fit the {self.constraint.what} "
                               f"({self._m.get_error() or 'not allowed here'})")

    @property
    def is_accepting(self) -> bool:
        """The output so far is complete: it matches the schema or regex."""
        return bool(self._m.is_accepting())

    @property
    def is_done(self) -> bool:
        """Complete, and nothing can follow but the end of sequence: generation should stop here."""
        return bool(self._m.is_stopped()) and self.is_accepting


class Constraint:
    """A compiled JSON schema or regex for one tokenizer and vocabulary; ``new_state()`` for each generation."""

    def __init__(self, grammar: str, tokenizer: Any, *, what: str, vocab_size: int | None = None,
                 eos_ids: Sequence[int] = ()):
        llg = _llguidance()
        self.what = what
        lltok = _ll_tokenizer(tokenizer, vocab_size, eos_ids)
        self.vocab_size = vocab_size or lltok.vocab_size
        failed, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, lltok)
        if failed:
            raise LmforgeError(f"{what}: {_first_line(messages[0])}")
        self._template = llg.LLMatcher(lltok, grammar, log_level=0)
        if self._template.is_error():
            raise LmforgeError(f"{what}: {_first_line(self._template.get_error())}")

    def new_state(self) -> ConstraintState:
        return ConstraintState(self, self._template.deep_copy())


def _first_line(message: str) -> str:
    """llguidance's error, in one line: the "error: ..." line of a regex parse error, else the first line."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    for line in lines:
        if line.startswith("error:"):
            return line[len("error:"):].strip()
    return lines[0] if lines else "invalid"


def check_schema(schema: Any, what: str = "the JSON schema") -> dict[str, Any]:
    """A JSON schema must be a JSON object (a dict); ``True`` (anything) is taken as any JSON object."""
    if schema is True:
        return dict(ANY_JSON_OBJECT)
    if not isinstance(schema, dict):
        raise LmforgeError(f"{what} must be a JSON object, got {type(schema).__name__}")
    try:
        json.dumps(schema)
    except (TypeError, ValueError) as e:
        raise LmforgeError(f"{what} is not JSON: {e}") from None
    return schema


def json_schema_constraint(schema: dict[str, Any] | None, tokenizer: Any, *, vocab_size: int | None = None,
                           eos_ids: Sequence[int] = (), what: str = "the JSON schema") -> Constraint:
    """Outputs that are JSON documents valid against ``schema`` (None: any JSON object). ``vocab_size``: the
    model's (its logits' width, may exceed the tokenizer's); ``eos_ids``: the ids that end a generation."""
    llg = _llguidance()
    schema = dict(ANY_JSON_OBJECT) if schema is None else check_schema(schema, what)
    try:
        grammar = llg.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
    except Exception as e:
        raise LmforgeError(f"{what}: {_first_line(str(e))}") from None
    return Constraint(grammar, tokenizer, what=what, vocab_size=vocab_size, eos_ids=eos_ids)


def regex_constraint(pattern: str, tokenizer: Any, *, vocab_size: int | None = None, eos_ids: Sequence[int] = (),
                     what: str | None = None) -> Constraint:
    """Outputs matching the whole of ``pattern`` (Rust ``regex`` syntax, close to Python's without lookaround
    and backreferences)."""
    if not isinstance(pattern, str) or not pattern:
        raise LmforgeError(f"the regex must be a non-empty string, got {pattern!r}")
    grammar = _llguidance().LLMatcher.grammar_from_regex(pattern)
    return Constraint(grammar, tokenizer, what=what or f"the regex {pattern!r}", vocab_size=vocab_size,
                      eos_ids=eos_ids)


def read_schema(path: str | Path) -> dict[str, Any]:
    """A JSON schema from a file (``--json-schema FILE``), with errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"--json-schema {path}: no such file")
    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LmforgeError(f"--json-schema {path}: not valid JSON ({e})") from None
    return check_schema(schema, f"--json-schema {path}")


def make_constraint(tokenizer: Any, *, json_schema: dict[str, Any] | bool | None = None, regex: str | None = None,
                    vocab_size: int | None = None, eos_ids: Sequence[int] = ()) -> Constraint | None:
    """The constraint an API call asks for (at most one of ``json_schema`` and ``regex``), or None for free
    text. ``json_schema=True`` means any JSON object."""
    if json_schema is not None and json_schema is not False and regex is not None:
        raise LmforgeError("give either a JSON schema or a regex, not both")
    if regex is not None:
        return regex_constraint(regex, tokenizer, vocab_size=vocab_size, eos_ids=eos_ids)
    if json_schema is None or json_schema is False:
        return None
    return json_schema_constraint(None if json_schema is True else json_schema, tokenizer, vocab_size=vocab_size,
                                  eos_ids=eos_ids)
