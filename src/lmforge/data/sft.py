"""Supervised fine-tuning data: files of examples -> token ids with the prompt masked -> batches.

Owns the four record formats of SFT files (read by ``data/records.load_records``: .jsonl, .json, .csv or
.txt/.md, optionally gzipped, or .parquet; errors name the file and line as for every dataset; ``prompt_field``
and ``response_field`` may be dotted paths into nested records such as ``dialogue.summary``), rendering
each record with the model's chat template or a plain prompt template, the loss mask, truncation,
packing, and a resumable batch source (``SFTBatches``) for the training loop.

Formats (detected per record, or forced with ``format=``):

- ``alpaca``: ``instruction``, optional ``input``, ``output``.
- ``messages``: ``messages``, a list of ``{"role", "content"}``; every assistant turn is trained.
- ``prompt-completion``: ``prompt`` and ``completion``.
- ``fields``: any record, with ``prompt_template`` (``{field}`` placeholders, ``{{``/``}}`` literal braces:
  ``data/records.render``, the renderer ``eval`` and ``compare`` use) or ``prompt_field``, and
  ``response_field`` naming the answer; giving any of these three selects this format.

Masking rule: ``labels`` is ``IGNORE_INDEX`` (-100, ``data/tokens.py``) on everything the model is not asked to
write. Plain text: the prompt (and BOS) are masked; the response and an EOS appended after it are labelled. Chat
template: only the assistant contents and the end-of-turn token that closes each of them are labelled. The prompt
and the response are tokenised *separately* and their ids concatenated, so the prompt ids are exactly what
generation sees at inference (tokenising the joined text could merge tokens across the boundary).

Truncation rule: an example whose prompt leaves no response token inside ``max_len`` is dropped and
counted (``SFTData.dropped``; an error if every example is dropped); otherwise the response is cut at
``max_len``. Encoder-decoder examples are dropped when the source exceeds ``max_len``; the target is cut.

Packing concatenates whole examples (in shuffled order) into rows of at most ``max_len`` tokens. Each
example keeps its own positions (restarting at 0) and a ``segment_ids`` row tells the loss to build a
block-diagonal causal mask, so examples never attend to each other.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field

import torch

from lmforge.data.records import Record, as_text, load_records, lookup, render
from lmforge.data.tokens import IGNORE_INDEX, pad_rows
from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer, check_messages

FORMATS = ("alpaca", "messages", "prompt-completion", "fields")
# The plain-text prompt of the Stanford Alpaca release (Taori et al., 2023), used without a chat template.
ALPACA_PROMPT = ("Below is an instruction that describes a task, paired with an input that provides further "
                 "context. Write a response that appropriately completes the request.\n\n"
                 "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                          "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


# ----------------------------------------------------------------------------- formats
@dataclass
class SFTRecord:
    """One example in a format-free shape: the conversation (chat rendering) and the plain prompt text."""

    messages: list[dict[str, str]]  # ends with the assistant turn to learn; single-turn: [user, assistant]
    plain_prompt: str | None  # text before the response without a chat template (None: needs a template)
    where: str

    @property
    def response(self) -> str:
        return self.messages[-1]["content"]


def _missing(record: dict, name: str, where: str) -> LmforgeError:
    fields = ", ".join(map(str, record)) or "none"
    return LmforgeError(f"{where}: missing field '{name}' (available fields: {fields})")


def _get(record: dict, name: str, where: str, optional: bool = False) -> str:
    """The string field ``name`` of a record ("" when optional and absent or null); ``name`` may be a dotted path
    into nested records (``data/records.lookup``)."""
    if name not in record and "." in name:
        return as_text(lookup(record, name, where, "field path"), name, where, "field path")
    if name not in record:
        if optional:
            return ""
        raise _missing(record, name, where)
    value = record[name]
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise LmforgeError(f"{where}: field '{name}' must be a string, got {type(value).__name__}")
    return value


def detect_format(record: dict, where: str) -> str:
    """The format a record is written in, from its fields."""
    if "messages" in record:
        return "messages"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "prompt" in record and "completion" in record:
        return "prompt-completion"
    raise LmforgeError(f"{where}: cannot tell the format from the fields {', '.join(map(str, record)) or '(none)'}; "
                       "expected 'messages', 'instruction'+'output' or 'prompt'+'completion', or pass a "
                       "prompt template / response field")


def to_record(record: dict, where: str, format: str | None = None, prompt_template: str | None = None,
              prompt_field: str | None = None, response_field: str | None = None) -> SFTRecord:
    """Normalise one raw record of any format into an ``SFTRecord``."""
    fmt = format or ("fields" if (prompt_template or prompt_field or response_field) else detect_format(record, where))
    if fmt not in FORMATS:
        raise LmforgeError(f"unknown SFT format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    if fmt == "messages":
        if "messages" not in record:
            raise _missing(record, "messages", where)
        messages = record["messages"]
        try:
            check_messages(messages)
        except LmforgeError as e:
            raise LmforgeError(f"{where}: {e}") from None
        if not any(m["role"] == "assistant" for m in messages):
            raise LmforgeError(f"{where}: the conversation has no 'assistant' message to learn from")
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        return SFTRecord([dict(role=m["role"], content=m["content"]) for m in messages[:last + 1]], None, where)
    if fmt == "alpaca":
        instruction, extra = _get(record, "instruction", where), _get(record, "input", where, optional=True)
        response = _get(record, "output", where)
        user = f"{instruction}\n\n{extra}" if extra else instruction
        plain = (ALPACA_PROMPT if extra else ALPACA_PROMPT_NO_INPUT).format(instruction=instruction, input=extra)
    elif fmt == "prompt-completion":
        user = plain = _get(record, "prompt", where)
        response = _get(record, "completion", where)
    else:  # fields
        if not response_field:
            raise LmforgeError("the 'fields' format needs a response field (--response-field)")
        if prompt_template is None and not prompt_field:
            raise LmforgeError("the 'fields' format needs a prompt template (--prompt-template) or a prompt field")
        user = plain = (render(prompt_template, Record(record, where)) if prompt_template is not None
                        else _get(record, prompt_field, where))
        response = _get(record, response_field, where)
    return SFTRecord([{"role": "user", "content": user}, {"role": "assistant", "content": response}], plain, where)


# ----------------------------------------------------------------------------- tokenising with the mask
@dataclass
class SFTExample:
    """A tokenised example. Decoder-only: ``input_ids`` and same-length ``labels`` (-100 = no loss).
    Encoder-decoder: ``input_ids`` is the source and ``labels`` the target ids (ending in EOS)."""

    input_ids: list[int]
    labels: list[int]
    prompt_ids: list[int]  # what generation is given to produce the last response (for eval)
    reference: str  # the last response text (for eval)


def _encode(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False) if text else []


def _eos(tok: Tokenizer) -> int:
    if tok.eos_id is None:
        raise LmforgeError(f"{tok.name} has no EOS token; fine-tuning needs one to mark the end of a response")
    return tok.eos_id


def _tokenize_chat(r: SFTRecord, tok: Tokenizer) -> SFTExample:
    """Render with the chat template; label each assistant content and the end-of-turn token closing it."""
    full = tok.apply_chat_template(r.messages, add_generation_prompt=False)
    ends = set(tok.eos_ids)
    ids: list[int] = []
    labels: list[int] = []
    done = 0  # characters of ``full`` already tokenised
    prompt_ids: list[int] = []
    for i, m in enumerate(r.messages):
        if m["role"] != "assistant":
            continue
        before = tok.apply_chat_template(r.messages[:i], add_generation_prompt=True) if i else ""
        through = tok.apply_chat_template(r.messages[:i + 1], add_generation_prompt=False)
        if not (full.startswith(before) and full.startswith(through) and through.startswith(before)):
            raise LmforgeError(f"{r.where}: the chat template of {tok.name} renders earlier turns differently once "
                               "later ones are added, so the prompt cannot be masked; use a plain prompt (chat=False)")
        turn = through[len(before):]
        at = turn.find(m["content"]) if m["content"] else len(turn)
        if at < 0:
            raise LmforgeError(f"{r.where}: the chat template of {tok.name} changes the assistant text, so it cannot "
                               "be located for the loss mask; use a plain prompt (chat=False)")
        head = _encode(tok, full[done:len(before) + at])  # earlier turns, this turn's header
        ids += head
        labels += [IGNORE_INDEX] * len(head)
        prompt_ids = list(ids)
        content = _encode(tok, m["content"])
        tail = _encode(tok, turn[at + len(m["content"]):])  # end-of-turn token and separators
        cut = next((j + 1 for j, t in enumerate(tail) if t in ends), None)
        if cut is None:  # the template closes turns with no end token: add EOS ourselves
            tail, cut = [_eos(tok), *tail], 1
        ids += content + tail
        labels += content + tail[:cut] + [IGNORE_INDEX] * (len(tail) - cut)
        done = len(through)
    rest = _encode(tok, full[done:])
    return SFTExample(ids + rest, labels + [IGNORE_INDEX] * len(rest), prompt_ids, r.response)


def tokenize_record(r: SFTRecord, tok: Tokenizer, *, chat: bool, seq2seq: bool = False) -> SFTExample:
    """Token ids and labels of one record (see the module docstring for the masking rule)."""
    if r.plain_prompt is None and (seq2seq or not chat):
        raise LmforgeError(f"{r.where}: the messages format needs a decoder-only model with a chat template"
                           f"{'' if seq2seq or tok.chat_template else f' ({tok.name} has none)'}")
    if seq2seq:
        source = tok.encode(r.plain_prompt, add_special_tokens=True)
        return SFTExample(source, _encode(tok, r.response) + [_eos(tok)], source, r.response)
    if chat:
        return _tokenize_chat(r, tok)
    prompt = ([tok.bos_id] if tok.add_bos_token and tok.bos_id is not None else []) + _encode(tok, r.plain_prompt)
    response = _encode(tok, r.response) + [_eos(tok)]
    return SFTExample(prompt + response, [IGNORE_INDEX] * len(prompt) + response, prompt, r.response)


def truncate(ex: SFTExample, max_len: int, seq2seq: bool = False) -> SFTExample | None:
    """Cut an example to ``max_len`` tokens; None when its prompt leaves no room for a response token."""
    if seq2seq:
        if len(ex.input_ids) > max_len:
            return None
        return SFTExample(ex.input_ids, ex.labels[:max_len], ex.prompt_ids, ex.reference)
    # Position 0 is never predicted, so a useful example has a labelled token at 1..max_len-1.
    if all(t == IGNORE_INDEX for t in ex.labels[1:max_len]):
        return None
    return SFTExample(ex.input_ids[:max_len], ex.labels[:max_len], ex.prompt_ids, ex.reference)


@dataclass
class SFTData:
    """Tokenised examples from one or more files, and how many were dropped as too long."""

    examples: list[SFTExample]
    dropped: int = 0
    seq2seq: bool = False
    records: list[SFTRecord] = field(default_factory=list)


def load_sft_data(paths: str | os.PathLike | list, tokenizer: Tokenizer, *, max_len: int, seq2seq: bool = False,
                  chat: bool | None = None, format: str | None = None, prompt_template: str | None = None,
                  prompt_field: str | None = None, response_field: str | None = None,
                  limit: int | None = None) -> SFTData:
    """Read, normalise, tokenise and truncate SFT files. ``chat=None`` uses the chat template when the
    tokenizer has one (never for encoder-decoder models); ``limit`` keeps the first N records."""
    if format is not None and format not in FORMATS:
        raise LmforgeError(f"unknown SFT format {format!r}; choose one of: {', '.join(FORMATS)}")
    if max_len < 2:
        raise LmforgeError(f"max_len must be at least 2, got {max_len}")
    if chat is None:
        chat = bool(tokenizer.chat_template) and not seq2seq
    if chat and not tokenizer.chat_template:
        raise LmforgeError(f"{tokenizer.name} has no chat template; fine-tune with a plain prompt (chat=False)")
    raw = [r for p in (paths if isinstance(paths, (list, tuple)) else [paths]) for r in load_records(p)]
    raw = raw[:limit] if limit is not None else raw
    records = [to_record(r.fields, r.where, format, prompt_template, prompt_field, response_field) for r in raw]
    examples = [truncate(tokenize_record(r, tokenizer, chat=chat, seq2seq=seq2seq), max_len, seq2seq)
                for r in records]
    kept = [e for e in examples if e is not None]
    dropped = len(examples) - len(kept)
    if not kept:
        raise LmforgeError(f"all {dropped} examples have prompts longer than max_len={max_len} tokens; "
                           "raise max_len or shorten the prompts")
    if dropped:
        warnings.warn(f"dropped {dropped} of {len(examples)} examples whose prompt leaves no room for the response "
                      f"within max_len={max_len} tokens", stacklevel=2)
    return SFTData(kept, dropped, seq2seq, [r for r, e in zip(records, examples) if e is not None])


def mark_untrained(ids: list[int], trained: list[bool], tokenizer: Tokenizer, color: bool = False) -> str:
    """The text of ``ids`` with the runs of tokens the loss ignores (``trained`` False) in ``[[`` ``]]``, or dim
    with ``color`` (ANSI codes for a terminal). Special tokens are shown; each run is decoded on its own."""
    runs: list[tuple[bool, list[int]]] = []
    for t, on in zip(ids, trained):
        if runs and runs[-1][0] == on:
            runs[-1][1].append(t)
        else:
            runs.append((on, [t]))
    open_, close = ("\x1b[2m", "\x1b[22m") if color else ("[[", "]]")
    return "".join(tokenizer.decode(run, skip_special_tokens=False) if on
                   else f"{open_}{tokenizer.decode(run, skip_special_tokens=False)}{close}" for on, run in runs)


def format_example(ex: SFTExample, tokenizer: Tokenizer, *, seq2seq: bool = False, color: bool = False) -> str:
    """One tokenised example as text with its loss mask, for a person to check what training sees.

    Decoder-only: the whole input with the tokens the loss ignores marked (``mark_untrained``), then the trained
    tokens alone. Position 0 counts as ignored (nothing predicts it: ``SFTBatches.collate``). Encoder-decoder:
    the source (never trained) and the target (all trained)."""
    def text(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=False)

    if seq2seq:
        return (f"encoder input ({len(ex.input_ids)} tokens, no loss):\n{text(ex.input_ids)}\n"
                f"decoder target ({len(ex.labels)} tokens, all trained):\n{text(ex.labels)}\n")
    trained = [i > 0 and y != IGNORE_INDEX for i, y in enumerate(ex.labels)]
    n = sum(trained)
    return (f"input ({len(ex.input_ids)} tokens; {n} trained, {len(ex.input_ids) - n} with no loss, shown "
            f"{'dim' if color else 'in [[ ]]'}):\n{mark_untrained(ex.input_ids, trained, tokenizer, color)}\n"
            f"trained tokens (the loss covers these {n}):\n{text([t for t, on in zip(ex.input_ids, trained) if on])}\n")


# ----------------------------------------------------------------------------- batches
def pack_rows(lengths: list[int], order: list[int], max_len: int) -> list[list[int]]:
    """Greedy packing: walk ``order`` and start a new row whenever the next example does not fit."""
    rows: list[list[int]] = []
    used = max_len + 1
    for i in order:
        if used + lengths[i] > max_len:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += lengths[i]
    return rows


class SFTBatches:
    """A resumable, seeded stream of padded batches over tokenised examples (the loop's ``BatchSource``).

    Each epoch visits every row once in an order shuffled with ``seed + epoch``; a batch that runs past
    the end continues into the next epoch. Decoder-only batches hold ``input_ids``, ``labels`` (aligned
    with the inputs: the loss shifts them), ``attention_mask`` (bool, False on padding) and ``positions``;
    packed ones add ``segment_ids`` (0 on padding). Encoder-decoder batches hold ``input_ids``,
    ``attention_mask``, ``decoder_input_ids`` (start token + target[:-1]) and ``labels``.
    """

    def __init__(self, examples: list[SFTExample], *, batch_size: int, pad_id: int, seq2seq: bool = False,
                 decoder_start_id: int | None = None, seed: int = 0, shuffle: bool = True, pack: bool = False,
                 max_len: int | None = None, padding_side: str = "right"):
        if not examples:
            raise LmforgeError("no examples to batch (empty dataset)")
        if batch_size < 1:
            raise LmforgeError(f"batch_size must be >= 1, got {batch_size}")
        if padding_side not in ("left", "right"):
            raise LmforgeError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if pack and (seq2seq or max_len is None):
            raise LmforgeError("packing needs a decoder-only model and max_len")
        if seq2seq and padding_side == "left":  # the decoder masks only causally: leading pads would be attended
            raise LmforgeError("padding_side='left' is for decoder-only models; encoder-decoder batches are "
                               "right-padded (drop --padding-side left)")
        if seq2seq and decoder_start_id is None:
            raise LmforgeError("an encoder-decoder model needs config.decoder_start_token_id to build decoder inputs")
        self.examples, self.batch_size, self.pad_id, self.seq2seq = examples, batch_size, pad_id, seq2seq
        self.decoder_start_id, self.seed, self.shuffle = decoder_start_id, seed, shuffle
        self.pack, self.max_len, self.padding_side = pack, max_len, padding_side
        self.epoch, self.cursor = 0, 0
        self._rows_epoch: int | None = None
        self._rows: list[list[int]] = []

    def rows(self, epoch: int) -> list[list[int]]:
        """The rows (lists of example indices) of one epoch, in visiting order."""
        if self._rows_epoch != epoch:
            n = len(self.examples)
            order = (torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
                     if self.shuffle else list(range(n)))
            lengths = [len(e.input_ids) for e in self.examples]
            self._rows = pack_rows(lengths, order, self.max_len) if self.pack else [[i] for i in order]
            self._rows_epoch = epoch
        return self._rows

    def next_batch(self) -> dict[str, torch.Tensor]:
        picked: list[list[int]] = []
        while len(picked) < self.batch_size:
            rows = self.rows(self.epoch)
            picked.append(rows[self.cursor])
            self.cursor += 1
            if self.cursor == len(rows):
                self.epoch, self.cursor = self.epoch + 1, 0
        return self.collate(picked)

    def loss_terms(self, batch: dict[str, torch.Tensor]) -> int:
        """The labelled tokens the SFT loss averages over: labels after the first column (a decoder's labels are
        aligned with its inputs and the loss shifts them), every column for an encoder-decoder. Data-parallel
        ranks weight their share of a batch by it (``training/sources.ShardedBatches``)."""
        labels = batch["labels"] if self.seq2seq else batch["labels"][:, 1:]
        return int((labels != IGNORE_INDEX).sum())

    def iter_once(self, batch_size: int | None = None):
        """Every example once, in file order, unpacked (for evaluation); does not touch the resume state."""
        size = batch_size or self.batch_size
        for start in range(0, len(self.examples), size):
            yield self.collate([[i] for i in range(start, min(start + size, len(self.examples)))])

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.cursor, self.seed = int(state["epoch"]), int(state["cursor"]), int(state["seed"])
        self._rows_epoch = None

    def _pad(self, rows: list[list[int]], value: int) -> torch.Tensor:
        return pad_rows(rows, value, self.padding_side)  # (B, T)

    def collate(self, picked: list[list[int]]) -> dict[str, torch.Tensor]:
        """Pad the chosen rows (each a list of example indices) into one batch of tensors."""
        exs = [[self.examples[i] for i in row] for row in picked]
        if self.seq2seq:
            src, tgt = [r[0].input_ids for r in exs], [r[0].labels for r in exs]
            return {"input_ids": self._pad(src, self.pad_id), "attention_mask": self._pad(src, -1) != -1,
                    "decoder_input_ids": self._pad([[self.decoder_start_id, *t[:-1]] for t in tgt], self.pad_id),
                    "labels": self._pad(tgt, IGNORE_INDEX)}
        ids, labels, positions, segments = [], [], [], []
        for row in exs:
            ids.append([t for e in row for t in e.input_ids])
            # The first token of an example is never predicted from inside it: no label there.
            labels.append([t for e in row for t in [IGNORE_INDEX, *e.labels[1:]]])
            positions.append([p for e in row for p in range(len(e.input_ids))])
            segments.append([s for k, e in enumerate(row, 1) for s in [k] * len(e.input_ids)])
        seg = self._pad(segments, 0)
        batch = {"input_ids": self._pad(ids, self.pad_id), "labels": self._pad(labels, IGNORE_INDEX),
                 "attention_mask": seg != 0, "positions": self._pad(positions, 0)}
        if self.pack:
            batch["segment_ids"] = seg
        return batch
