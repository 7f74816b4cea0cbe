"""How sure a difference between two settings is: the paired bootstrap over evaluation examples.

Owns ``paired_bootstrap``: two per-example scores of the same examples (e.g. exact-match correctness before and
after training, on the same held-out prompts), the mean difference and a percentile bootstrap interval of it
(Efron & Tibshirani 1993, ch. 13): resample the examples with replacement (the same draw for both settings, which
keeps the pairing), take the mean difference of each resample, and read the interval's ends from the
``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles (numpy's linear interpolation) of those means. The draws come
from ``numpy.random.default_rng(seed)``, so an interval is a function of the scores and the seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from lmforge.errors import LmforgeError


@dataclass
class PairedBootstrap:
    """The result: ``diff`` = mean(after) - mean(before), in [``low``, ``high``] at ``level``."""

    n: int
    before: float
    after: float
    diff: float
    low: float
    high: float
    level: float
    resamples: int
    seed: int

    def as_dict(self) -> dict:
        return asdict(self)


def paired_bootstrap(before: Sequence[float], after: Sequence[float], *, resamples: int = 10_000, seed: int = 0,
                     level: float = 0.95) -> PairedBootstrap:
    """The paired percentile bootstrap of mean(after) - mean(before) over the examples (see the module docstring).
    ``before[i]`` and ``after[i]`` score the same example; both need the same, non-zero length of finite numbers."""
    import numpy as np

    if len(before) != len(after):
        raise LmforgeError(f"paired bootstrap: {len(before)} scores before but {len(after)} after; each example needs "
                           "a score in both")
    if not before:
        raise LmforgeError("paired bootstrap: no examples")
    if resamples < 1:
        raise LmforgeError(f"paired bootstrap: resamples must be >= 1, got {resamples}")
    if not 0.0 < level < 1.0:
        raise LmforgeError(f"paired bootstrap: level must be in (0, 1), got {level}")
    b, a = np.asarray(before, dtype=np.float64), np.asarray(after, dtype=np.float64)
    if not (np.isfinite(b).all() and np.isfinite(a).all()):
        raise LmforgeError("paired bootstrap: the scores must be finite numbers")
    d = a - b
    rng = np.random.default_rng(seed)
    means = np.empty(resamples, dtype=np.float64)
    chunk = max(1, 2_000_000 // len(d))  # bound the index matrix's memory
    for start in range(0, resamples, chunk):
        k = min(chunk, resamples - start)
        means[start:start + k] = d[rng.integers(0, len(d), size=(k, len(d)))].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    clean = [0.0 if math.isclose(float(x), 0.0, abs_tol=1e-12) else float(x) for x in (low, high)]
    return PairedBootstrap(n=len(d), before=float(b.mean()), after=float(a.mean()), diff=float(d.mean()),
                           low=clean[0], high=clean[1], level=level, resamples=resamples, seed=seed)
