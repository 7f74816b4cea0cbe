"""Resumable batch sources for the training loop: the ``BatchSource`` protocol, ``ShuffledIndices``,
the one seeded shuffled-cycling order over a list of items (DPO pairs, PPO prompts, reward examples), and
``ShardedBatches``, each rank's rows of every global batch under data parallelism (``distributed.py``).

A source's ``state_dict()`` is plain JSON and goes into every checkpoint; ``load_state_dict`` puts the
source back exactly where the checkpoint left it, so a resumed run sees the same batches in the same order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch

from lmforge.errors import LmforgeError


class BatchSource(Protocol):
    """A resumable stream of training batches (whatever the step function takes)."""

    def next_batch(self) -> Any: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@runtime_checkable
class CountsLossTerms(Protocol):
    """A source whose step loss is a mean over something other than rows (labelled tokens): ``loss_terms(batch)``
    counts the terms that mean is taken over, so that data-parallel ranks can weight their shares."""

    def loss_terms(self, batch: Any) -> int: ...


def batch_rows(batch: Any) -> int:
    """Rows in a batch: the first dimension of its ``input_ids`` (or first tensor), or a list's length."""
    if isinstance(batch, dict):
        t = batch.get("input_ids")
        if t is None:
            t = next(v for v in batch.values() if torch.is_tensor(v))
        return int(t.shape[0])
    return len(batch)


def slice_rows(batch: Any, lo: int, hi: int, n: int) -> Any:
    """Rows ``lo:hi`` of a batch of ``n`` rows: every tensor whose first dimension is ``n`` (a dict batch), or
    the list itself."""
    if isinstance(batch, dict):
        return {k: v[lo:hi] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == n else v
                for k, v in batch.items()}
    return batch[lo:hi]


class ShardedBatches:
    """Rank ``rank``'s share of every batch of ``source`` (the global batch) among ``world`` data-parallel ranks.

    Every rank draws the same global batch (the sources are seeded alike) and keeps rows
    ``[rank * b / world, (rank + 1) * b / world)``: the order of the data depends on the seed only, never on the
    world size, so ``world`` ranks of b / world rows make the same optimisation as one process of b rows, and the
    source's state (the resume position) is global: a checkpoint resumes at any world size. The global batch
    size must divide by ``world`` (``LmforgeError`` naming both; a shorter last batch of a pass is shared as
    evenly as possible).

    ``next_shard()`` also returns the share's weight ``world * local / total`` where ``local`` and ``total`` count
    the loss's terms (``CountsLossTerms.loss_terms``: labelled tokens; else rows) in the share and in the global
    batch: a per-rank mean loss times its weight, averaged over the ranks (as DDP averages gradients), is the
    mean over the global batch."""

    def __init__(self, source: BatchSource, rank: int, world: int, terms: Callable[[Any], int] | None = None):
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"ShardedBatches needs 0 <= rank < world, got rank {rank}, world {world}")
        self.source, self.rank, self.world = source, rank, world
        self.terms = terms or (source.loss_terms if isinstance(source, CountsLossTerms) else batch_rows)
        self.checked = False

    def next_shard(self) -> tuple[Any, float]:
        batch = self.source.next_batch()
        n = batch_rows(batch)
        if (not self.checked and n % self.world) or n < self.world:
            raise LmforgeError(f"the batch size {n} does not divide among the world size {self.world} "
                               f"(torchrun --nproc-per-node): choose a batch size that is a multiple of {self.world}")
        self.checked = True
        lo, hi = self.rank * n // self.world, (self.rank + 1) * n // self.world
        mine = slice_rows(batch, lo, hi, n)
        total = self.terms(batch)
        return mine, (self.world * self.terms(mine) / total if total else 0.0)

    def next_batch(self) -> Any:
        return self.next_shard()[0]

    def state_dict(self) -> dict:
        return self.source.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.source.load_state_dict(state)


class ShuffledIndices:
    """Batches of ``batch_size`` indices into ``n`` items, in passes of a fresh seeded shuffle of all of them.

    ``whole_passes=False``: every batch has ``batch_size`` indices, the end of one pass followed by the start of
    the next (DPO, PPO). ``whole_passes=True``: a batch never spans two passes, so the last one of a pass may be
    shorter (epochs of reward training). Each pass is ``torch.randperm`` from a generator seeded with ``seed``.
    State: the rest of the current order and the generator's state."""

    def __init__(self, n: int, batch_size: int, seed: int, *, whole_passes: bool = False):
        if n < 1 or batch_size < 1:
            raise ValueError(f"ShuffledIndices needs n >= 1 and batch_size >= 1, got {n}, {batch_size}")
        self.n, self.batch_size, self.whole_passes = n, batch_size, whole_passes
        self.generator = torch.Generator().manual_seed(seed)
        self.order: list[int] = []

    def _pass(self) -> list[int]:
        return torch.randperm(self.n, generator=self.generator).tolist()

    def next_batch(self) -> list[int]:
        if self.whole_passes:
            if not self.order:
                self.order = self._pass()
        else:
            while len(self.order) < self.batch_size:
                self.order += self._pass()
        rows, self.order = self.order[:self.batch_size], self.order[self.batch_size:]
        return rows

    def state_dict(self) -> dict:
        return {"order": list(self.order), "generator": self.generator.get_state().tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
        self.order = [int(i) for i in state["order"]]
        if any(not 0 <= i < self.n for i in self.order):
            raise LmforgeError(f"the checkpoint's batch order indexes {max(self.order) + 1} items but this run has "
                               f"{self.n}: resume with the same data")
