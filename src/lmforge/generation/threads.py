"""How many threads torch computes with at inference (``--threads`` on generate, chat and serve).

The rule when no count is given: the cores this process may run on (``os.sched_getaffinity``, falling back to
``os.cpu_count``) minus the machine's one-minute load average rounded to the nearest integer (work already
running there), at least 1. On an idle machine that is every allowed core, as torch's own default; on a busy one
it leaves the busy cores alone, because intra-op threads that wait for a core stall every matmul of a decode step
(on a loaded 2-core machine two threads decode several times slower than one). Inter-op threads are set to 1:
inference runs one op at a time, and a second pool would only compete with the intra-op one.
"""

from __future__ import annotations

import os

import torch


def allowed_cores() -> int:
    """Cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on this platform (macOS, Windows)
        return os.cpu_count() or 1


def free_cores() -> int:
    """allowed_cores() minus the rounded one-minute load average, at least 1 (the default thread count)."""
    cores = allowed_cores()
    try:
        busy = int(os.getloadavg()[0] + 0.5)
    except (OSError, AttributeError):  # no load average on this platform: assume an idle machine
        busy = 0
    return max(1, cores - busy)


def set_threads(requested: int | None = None) -> int:
    """Set torch's intra-op threads to ``requested`` (or ``free_cores()`` when None) and its inter-op threads to
    1 where torch still allows it (only before its first parallel work); return the intra-op count."""
    n = free_cores() if requested is None else requested
    torch.set_num_threads(n)
    if torch.get_num_interop_threads() != 1:
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # the inter-op pool already started: it keeps its size
            pass
    return n
