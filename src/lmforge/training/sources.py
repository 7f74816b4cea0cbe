"""Resumable batch sources for the training loop: the ``BatchSource`` protocol and ``ShuffledIndices``,
the one seeded shuffled-cycling order over a list of items (DPO pairs, PPO prompts, reward examples).

A source's ``state_dict()`` is plain JSON and goes into every checkpoint; ``load_state_dict`` puts the
source back exactly where the checkpoint left it, so a resumed run sees the same batches in the same order.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from lmforge.errors import LmforgeError


class BatchSource(Protocol):
    """A resumable stream of training batches (whatever the step function takes)."""

    def next_batch(self) -> Any: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


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
