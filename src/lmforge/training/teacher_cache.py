"""The teacher's side of distillation (``distill.py``): its logits at the distilled positions of a batch, and
``TeacherCache``, its top-k logits for a whole dataset on disk (safetensors shards, written atomically, index
last), so a run can reuse them without the teacher and without full-vocabulary logits in memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from bisect import bisect_right
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmforge.errors import LmforgeError

if TYPE_CHECKING:  # torch is imported inside the functions so that building the CLI parser stays fast
    from torch import Tensor, nn

    from lmforge.data.sft import SFTExample

from lmforge.training.distill_losses import TopK, teacher_topk

CACHE_FORMAT = "lmforge-teacher-topk"
SHARD_BYTES = 128 * 2**20  # a cache shard holds at most about this many bytes of top-k values and indices


def _indexed_batches_class() -> type:
    from lmforge.data.sft import SFTBatches

    class IndexedBatches(SFTBatches):
        """``SFTBatches`` whose batches also hold ``items`` (B,): the example index of each row (the cache key)."""

        def collate(self, picked: list[list[int]]) -> dict[str, Tensor]:
            import torch

            return {**super().collate(picked), "items": torch.tensor([row[0] for row in picked])}

    return IndexedBatches


def make_batches(examples: list[SFTExample], *, batch_size: int, pad_id: int, seed: int = 0,
                 shuffle: bool = True) -> Any:
    """A resumable ``BatchSource`` over ``examples`` whose batches carry their example indices (``items``)."""
    return _indexed_batches_class()(examples, batch_size=batch_size, pad_id=pad_id, seed=seed, shuffle=shuffle)


def _hidden_and_labels(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Final hidden states at the distilled positions (N, C), in row-major order, and their labels (N,)."""
    from lmforge.data.tokens import select_labelled
    from lmforge.training.sft_losses import decoder_hidden

    return select_labelled(decoder_hidden(model, batch)[:, :-1], batch["labels"][:, 1:])


def teacher_logits(teacher: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """The teacher's logits (N, V) float32 at the distilled positions of ``batch`` (no gradients)."""
    import torch

    with torch.no_grad():
        h, _ = _hidden_and_labels(teacher, batch)
        return teacher.lm_head(h).float()


def teacher_fingerprint(teacher: nn.Module) -> str:
    """A cheap digest of the teacher's weights: the checkpoints' fingerprint (names, dtypes, shapes and sampled
    elements of every tensor)."""
    from lmforge.training.checkpoint import fingerprint

    return fingerprint(list(teacher.state_dict().items()))


def items_fingerprint(examples: list[SFTExample]) -> str:
    """A digest of the examples' token ids and labels (what the cache's positions are positions of)."""
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e.input_ids, e.labels]).encode())
    return h.hexdigest()


def _distilled_positions(e: SFTExample) -> int:
    from lmforge.data.tokens import IGNORE_INDEX

    return sum(1 for t in e.labels[1:] if t != IGNORE_INDEX)


class TeacherCache:
    """The teacher's top-k logits for every distilled position of every example, on disk.

    Layout of the folder: ``index.json`` ({"format": "lmforge-teacher-topk", "version": 1, "top_k",
    "temperature", "teacher", "teacher_fingerprint", "items", "items_sha256", "shards": [{"file", "first",
    "count"}]}) and ``shard-NNNNN.safetensors``, each holding for ``count`` consecutive examples ``values``
    (P, k) float32 (raw logits), ``indices`` (P, k) int32, ``lse`` (P,) float32 (logsumexp(logits / T)) and
    ``offsets`` (count + 1,) int64 (example j's positions are rows offsets[j]:offsets[j+1], in token order).
    Shards are written one at a time (at most ~128 MiB in memory), each atomically; ``index.json`` last, so a
    folder without it is an unfinished build and is rebuilt. Reading maps one slice per example.
    """

    def __init__(self, path: Path, meta: dict[str, Any]):
        self.path, self.meta = Path(path), meta
        self.firsts = [s["first"] for s in meta["shards"]]
        self._open: dict[int, Any] = {}

    @classmethod
    def ensure(cls, path: str | os.PathLike, teacher: nn.Module, teacher_name: str, examples: list[SFTExample], *,
               top_k: int, temperature: float, pad_id: int, batch_size: int) -> TeacherCache:
        """Open the cache at ``path`` if it holds these settings, else build it (refusing another run's cache)."""
        path = Path(path)
        meta = {"format": CACHE_FORMAT, "version": 1, "top_k": top_k, "temperature": temperature,
                "teacher": teacher_name, "teacher_fingerprint": teacher_fingerprint(teacher),
                "items": len(examples), "items_sha256": items_fingerprint(examples)}
        index = path / "index.json"
        if index.is_file():
            try:
                found = json.loads(index.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as e:
                raise LmforgeError(f"{index}: not a readable teacher cache index ({e})") from None
            differs = [k for k in meta if k != "teacher" and found.get(k) != meta[k]]
            if differs:
                raise LmforgeError(f"--cache-teacher {path} holds the top-k logits of another run (its "
                                   f"{', '.join(differs)} differ{'s' if len(differs) == 1 else ''}); give another "
                                   "folder or delete this one")
            return cls(path, found)
        if path.exists() and not path.is_dir():
            raise LmforgeError(f"--cache-teacher {path}: not a folder")
        from lmforge.training.distributed import env_world

        if env_world() > 1:
            raise LmforgeError(f"--cache-teacher {path} is not built yet; build it with one process first (the same "
                               "command without --nproc, e.g. with --steps 1), then rerun under torchrun")
        return cls._build(path, meta, teacher, examples, top_k=top_k, temperature=temperature, pad_id=pad_id,
                          batch_size=batch_size)

    @classmethod
    def _build(cls, path: Path, meta: dict[str, Any], teacher: nn.Module, examples: list[SFTExample], *,
               top_k: int, temperature: float, pad_id: int, batch_size: int) -> TeacherCache:
        import torch
        from safetensors.torch import save_file

        from lmforge.io import atomic_path

        path.mkdir(parents=True, exist_ok=True)
        device = next(teacher.parameters()).device
        source = make_batches(examples, batch_size=batch_size, pad_id=pad_id, shuffle=False)
        shards: list[dict[str, Any]] = []
        parts: dict[str, list[Tensor]] = {"values": [], "indices": [], "lse": []}
        counts: list[int] = []
        size = 0

        def flush() -> None:
            nonlocal size
            if not counts:
                return
            name = f"shard-{len(shards):05d}.safetensors"
            tensors = {k: torch.cat(v).contiguous() for k, v in parts.items()}
            tensors["offsets"] = torch.tensor([0, *counts]).cumsum(0)
            with atomic_path(path / name) as tmp:
                save_file(tensors, str(tmp))
            shards.append({"file": name, "first": sum(s["count"] for s in shards), "count": len(counts)})
            for v in parts.values():
                v.clear()
            counts.clear()
            size = 0

        from tqdm.auto import tqdm

        bar = tqdm(total=len(examples), desc=f"teacher top-{top_k}", unit="ex", dynamic_ncols=True, mininterval=0.5)
        try:  # the bar is closed on an error too: the error line must not land on it
            for batch in source.iter_once():
                batch = {k: v.to(device) for k, v in batch.items()}
                top = teacher_topk(teacher_logits(teacher, batch), top_k, temperature)
                lengths = [_distilled_positions(examples[int(i)]) for i in batch["items"]]
                bar.update(len(lengths))
                for j, (vals, idx, lse) in enumerate(zip(top.values.split(lengths), top.indices.split(lengths),
                                                         top.lse.split(lengths))):
                    parts["values"].append(vals.cpu())
                    parts["indices"].append(idx.to(torch.int32).cpu())
                    parts["lse"].append(lse.cpu())
                    counts.append(lengths[j])
                    size += lengths[j] * (top_k * 8 + 4)
                    if size >= SHARD_BYTES:
                        flush()
            flush()
        finally:
            bar.close()
        meta = {**meta, "shards": shards}
        from lmforge.io import write_json_atomic

        write_json_atomic(path / "index.json", meta)
        print(f"distill: cached the teacher's top-{top_k} logits of {len(examples)} examples in {len(shards)} "
              f"shard(s) under {path}", file=sys.stderr)
        return cls(path, meta)

    def _shard(self, s: int) -> Any:
        if s not in self._open:
            from safetensors import safe_open

            self._open[s] = safe_open(str(self.path / self.meta["shards"][s]["file"]), framework="pt")
        return self._open[s]

    def lookup(self, items: list[int]) -> TopK:
        """The cached ``TopK`` of these examples' positions, concatenated in the given order."""
        import torch

        values, indices, lses = [], [], []
        for item in items:
            s = bisect_right(self.firsts, item) - 1
            f = self._shard(s)
            j = item - self.firsts[s]
            offsets = f.get_slice("offsets")[j:j + 2].tolist()
            lo, hi = int(offsets[0]), int(offsets[1])
            values.append(f.get_slice("values")[lo:hi])
            indices.append(f.get_slice("indices")[lo:hi].long())
            lses.append(f.get_slice("lse")[lo:hi])
        return TopK(torch.cat(values), torch.cat(indices), torch.cat(lses))
