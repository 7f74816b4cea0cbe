"""The serving engine's KV cache: one slot (row) per running sequence, a shared timeline of columns.

``SlotCaches`` owns the per-layer caches of ``deploy.batching.Engine``. Each layer's keys and values live in one
flat buffer of ``slots x n_kv_head x context x head_dim`` elements, allocated once; the ``KVCache`` modules the
model writes into see it as (slots, n_kv_head, W, head_dim), W the *layout width*. Eager decoding keeps W = the
context. With compiled decode steps W follows the timeline's width bucket (``generation.fast.cache_width``):
a step of bucket (nb, W) then reads rows [0, nb) of a contiguous (slots, n_kv_head, W, head_dim) tensor, a
contiguous block, instead of a column slice of a wider buffer. That matters on CPU: attention's two matmuls
over a strided bfloat16 slice cost ~3x those over a contiguous one (one thread, 32 rows, 256 of 512 columns:
1.15 + 0.56 ms a layer against 0.28 + 0.27); in the compiled batch-32 step of SmolLM2-135M int4 the slices cost 61
copies (43 ms of ~235), and the engine's decode of 32 requests at once took 14.0-14.9 s instead of 15.3-16.3. When the
timeline crosses into another bucket the filled rows and columns move to the new layout (one copy of the
cache, once per ``WIDTH_STEP`` decode steps at most). The views of each width are built once and reused, so a
compiled step always reads the same tensor objects for its width.

``SlotRows`` is a view of some rows of the caches for an eager forward pass (an admission, an eager step);
``Prefill`` holds requests being prefilled outside the slots, in caches of their own.
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.deploy.requests import Sequence


class SlotCaches:
    """The model's KV caches for ``slots`` rows and ``context`` columns, laid out ``width`` columns wide."""

    def __init__(self, model: nn.Module, slots: int, context: int, dtype: torch.dtype):
        self.caches = model.make_caches(slots, context, dtype)
        self.slots, self.context, self.width = slots, context, context
        self._flat = [(c.k.view(-1), c.v.view(-1)) for c in self.caches]
        self._layouts: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {context: [(c.k, c.v) for c in self.caches]}

    def __iter__(self):
        return iter(self.caches)

    def __getitem__(self, i: int):
        return self.caches[i]

    def __len__(self) -> int:
        return len(self.caches)

    def relayout(self, width: int, rows: int, cols: int) -> None:
        """Lay the caches out ``width`` columns wide, keeping rows [0, rows) x columns [0, cols) (cols <= width)."""
        if width == self.width:
            return
        assert cols <= width <= self.context, (cols, width, self.context)
        if width not in self._layouts:
            shape = (self.slots, self.caches[0].k.shape[1], width, self.caches[0].k.shape[3])
            n = shape[0] * shape[1] * shape[2] * shape[3]
            self._layouts[width] = [(fk[:n].view(shape), fv[:n].view(shape)) for fk, fv in self._flat]
        for c, (k, v) in zip(self.caches, self._layouts[width]):
            if rows and cols:  # the old and the new layout share memory: copy out first
                old_k, old_v = c.k[:rows, :, :cols].clone(), c.v[:rows, :, :cols].clone()
                k[:rows, :, :cols] = old_k
                v[:rows, :, :cols] = old_v
            c.k, c.v = k, v
        self.width = width


class SlotRows:
    """Rows [lo, hi) of a KVCache, written in place by the attention layers (a view, no copy)."""

    def __init__(self, cache, lo: int, hi: int):
        self.k, self.v = cache.k[lo:hi], cache.v[lo:hi]  # (n, nkv, width, hs)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class Prefill:
    """Sequences being prefilled outside the engine's cache: left-padded in their own caches, chunk by chunk."""

    def __init__(self, model: nn.Module, seqs: list[Sequence], rows: list, device: torch.device):
        self.seqs, self.rows = seqs, rows
        lens = [len(s.prompt_ids) for s in seqs]
        self.L = L = max(lens)
        self.idx = torch.zeros((len(seqs), L), dtype=torch.long, device=device)
        self.key_mask = torch.zeros((len(seqs), L), dtype=torch.bool, device=device)
        for i, s in enumerate(seqs):
            self.idx[i, L - lens[i]:] = torch.tensor(s.prompt_ids, dtype=torch.long, device=device)
            self.key_mask[i, L - lens[i]:] = True
        self.padded = min(lens) != L
        self.positions = (self.key_mask.long().cumsum(-1) - 1).clamp(min=0)  # each row counts its own tokens
        self.caches = model.make_caches(len(seqs), L, next(model.parameters()).dtype)  # the engine's cache dtype
        self.done = 0  # prompt columns prefilled so far
        self.logits: torch.Tensor | None = None  # (k, V) once done

    def step(self, model: nn.Module, chunk: int | None) -> bool:
        """Prefill the next ``chunk`` columns (all of them for a chunk of None); True when the prompt is done."""
        a = self.done
        b = self.L if chunk is None else min(self.L, a + chunk)
        mask = self.key_mask[:, :b] if self.padded else None
        logits = model(self.idx[:, a:b], self.positions[:, a:b], mask, self.caches, a, last_only=True)[:, -1]
        self.done = b
        if b == self.L:
            self.logits = logits
        return b == self.L
