"""Data-parallel training on ``torch.distributed``, launched by ``torchrun``: the process group and ``Dist``.

``torchrun --nproc-per-node N -m lmforge.cli finetune ...`` starts N copies of the command with RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in their environment. ``setup()`` reads them and joins
the process group (``torch.distributed.init_process_group``): NCCL when CUDA is available (each rank on
``cuda:LOCAL_RANK``), gloo on CPU, chosen automatically. Without torchrun's environment (or with
WORLD_SIZE=1) ``setup()`` returns a single-process ``Dist`` whose collectives do nothing, so the one
training loop (``loop.py``) runs the same code either way. ``launch_local`` is the other end: a training
verb's ``--nproc N`` re-runs the command under ``torchrun --standalone`` on this machine, and reports a failed
job as one line (``launch_main``: each rank has printed its own ``error (rank R/N): ...`` line; torchrun's
traceback report is left out) with exit status 2 when the ranks stopped on bad input.

Faults: ``Dist.check_same`` stops a job whose ranks were started with different run configs (one line naming
the ranks and the fields). A rank that dies ends the job: torchrun's agent stops the other ranks of its node
when one exits, and a rank blocked in a collective whose peer is gone fails at once (gloo: the connection
closes) or at the latest after the process group's timeout (``setup(timeout_s=600)``: ten minutes, longer than
any single step or checkpoint save should take), so no job hangs forever; ``--resume`` continues it. Such
a rank's error is one line too (``lost_peer``, used by the CLI), not a traceback.

What data parallelism needs from the rest of the loop lives beside it: ``sources.ShardedBatches`` gives
each rank its rows of every global batch, ``loop.train`` wraps the model in ``DistributedDataParallel``
and ``run.RunDir`` writes only on rank 0.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist

from lmforge.errors import LmforgeError

__all__ = ["Dist", "backend_for", "bind_local_device", "env_rank", "env_world", "launch_local", "launch_main",
           "lost_peer", "setup", "without_nproc"]


def env_world() -> int:
    """WORLD_SIZE from torchrun's environment (1 when not launched by torchrun)."""
    return _env_int("WORLD_SIZE", 1)


def env_rank() -> int:
    """RANK from torchrun's environment (0 when not launched by torchrun)."""
    return _env_int("RANK", 0)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value in (None, ""):
        return default
    try:
        return int(value)
    except ValueError:
        raise LmforgeError(f"the environment variable {name}={value!r} is not an integer (set by torchrun)") from None


def backend_for(cuda: bool | None = None) -> str:
    """``nccl`` when CUDA is available (``cuda``: override the check), else ``gloo``."""
    return "nccl" if (torch.cuda.is_available() if cuda is None else cuda) else "gloo"


@dataclass
class Dist:
    """This process's place in the job: ``rank`` of ``world`` processes (``world == 1``: not distributed,
    every method is a no-op). ``is_main`` (rank 0) is the one that prints, logs and writes files."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self.enabled:
            tdist.barrier()

    def all_reduce_mean(self, values: float | list[float]) -> float | list[float]:
        """The mean over the ranks of a number, or of each of a list of numbers (one collective); the values
        themselves on one process."""
        if not self.enabled:
            return values
        device = torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")
        many = isinstance(values, list)
        t = torch.tensor(values if many else [values], dtype=torch.float64, device=device)
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
        out = (t / self.world).tolist()
        return out if many else out[0]

    def check_same(self, what: str, data: dict) -> None:
        """Stop (``LmforgeError`` on every rank) unless every rank holds the same ``data`` (plain JSON, such
        as the resolved run config): each rank all-gathers a hash of it, and on a mismatch the fields, so that
        the one line names the ranks and the fields that differ from rank 0. Nothing on one process."""
        if not self.enabled:
            return
        blob = json.dumps(_flatten(data), sort_keys=True, default=str).encode("utf-8")
        digests = self._all_gather_bytes(hashlib.sha256(blob).digest())
        if all(d == digests[0] for d in digests):
            return
        flats = [json.loads(b) for b in self._all_gather_bytes(blob)]
        parts = []
        for rank, flat in enumerate(flats[1:], start=1):
            first = flats[0]
            keys = sorted(k for k in flat.keys() | first.keys() if flat.get(k, _MISSING) != first.get(k, _MISSING))
            if keys:
                shown = ", ".join(f"{k}={_show(flat.get(k, _MISSING))} (rank 0: {_show(first.get(k, _MISSING))})"
                                  for k in keys[:4])
                parts.append(f"rank {rank} has {shown}{f' and {len(keys) - 4} more' if len(keys) > 4 else ''}")
        raise LmforgeError(f"the ranks were started with different {what}s: {'; '.join(parts)}; every rank must "
                           "run the same command")

    def _all_gather_bytes(self, data: bytes) -> list[bytes]:
        """Every rank's ``data`` (lengths may differ), in rank order: two all-gathers of tensors, no pickle."""
        device = torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")
        size = torch.tensor([len(data)], dtype=torch.int64, device=device)
        sizes = [torch.zeros_like(size) for _ in range(self.world)]
        tdist.all_gather(sizes, size)
        longest = max(int(s.item()) for s in sizes)
        mine = torch.zeros(longest, dtype=torch.uint8, device=device)
        mine[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
        got = [torch.zeros_like(mine) for _ in range(self.world)]
        tdist.all_gather(got, mine)
        return [bytes(g[:int(n.item())].cpu().tolist()) for g, n in zip(got, sizes)]

    def destroy(self) -> None:
        """Leave the process group (when this process joined it)."""
        if self.enabled and tdist.is_initialized():
            tdist.destroy_process_group()


_MISSING = "<missing>"


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` as ``{"a.b": 1}`` (lists stay values): the fields a mismatch is reported by."""
    if not isinstance(data, dict) or not data:
        return {prefix: data} if prefix else {}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _show(value: Any) -> str:
    text = value if value is _MISSING else json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def lost_peer(exc: BaseException) -> str | None:
    """When ``exc`` is a collective failing because another rank is gone (a ``torch.distributed`` error, or
    gloo's closed connection): the one line the CLI reports it with; else None (a genuine bug keeps its
    traceback)."""
    text = str(exc).strip()
    if not (isinstance(exc, tdist.DistError) or (isinstance(exc, RuntimeError) and any(s in text for s in _PEER_GONE))):
        return None
    detail = text.splitlines()[0] if text else type(exc).__name__
    detail = detail if len(detail) <= 160 else detail[:157] + "..."
    return f"another rank stopped or cannot be reached, so this one stops too ({detail})"


def bind_local_device() -> None:
    """Make ``cuda`` mean ``cuda:LOCAL_RANK`` in this process (torchrun with CUDA), before a recipe places its
    models: the ranks on one machine each use their own GPU. Nothing without CUDA or torchrun."""
    if env_world() > 1 and torch.cuda.is_available():
        torch.cuda.set_device(_env_int("LOCAL_RANK", 0))


def setup(timeout_s: float = 600.0) -> Dist:
    """This process's ``Dist``: joins the process group when torchrun launched more than one process (once;
    a second call returns the same group's ranks), else a single-process ``Dist``."""
    world, rank = env_world(), env_rank()
    if world <= 1:
        return Dist()
    if not 0 <= rank < world:
        raise LmforgeError(f"RANK={rank} is outside WORLD_SIZE={world} (set by torchrun)")
    local_rank = _env_int("LOCAL_RANK", 0)
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise LmforgeError(f"WORLD_SIZE={world} but {name} is not set: launch with torchrun "
                               "(torchrun --nproc-per-node N -m lmforge.cli ...)")
    backend = backend_for()
    if not tdist.is_initialized():
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        tdist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return Dist(rank=tdist.get_rank(), world=tdist.get_world_size(), local_rank=local_rank, backend=backend)


def without_nproc(argv: list[str]) -> list[str]:
    """``argv`` less its ``--nproc N`` / ``--nproc=N`` (the flag that asked for the launch)."""
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == "--nproc":
            skip = True
        elif not item.startswith("--nproc="):
            out.append(item)
    return out


def launch_local(argv: list[str], nproc: int) -> int:
    """``lmforge VERB --nproc N ...``: run ``python -m torch.distributed.run --standalone --nproc-per-node N
    -m lmforge.cli ARGV`` (ARGV less ``--nproc``) on this machine and return its exit status. Refused inside a
    job torchrun already started (which would start N jobs of N processes)."""
    if nproc < 1:
        raise LmforgeError(f"--nproc must be >= 1, got {nproc}")
    if os.environ.get("TORCHELASTIC_RUN_ID") or env_world() > 1:
        raise LmforgeError("--nproc inside a torchrun job: drop --nproc (torchrun already starts the processes)")
    launcher = "import sys; from lmforge.training.distributed import launch_main; sys.exit(launch_main(sys.argv[1:]))"
    cmd = [sys.executable, "-c", launcher, "--standalone", "--nproc-per-node", str(nproc),
           "-m", "lmforge.cli", *without_nproc(argv)]
    return subprocess.run(cmd, check=False).returncode


def launch_main(torchrun_args: list[str]) -> int:
    """torchrun (``torch.distributed.run``) with ``torchrun_args``, as ``launch_local`` runs it: the ranks'
    output streams through as usual (only rank 0 prints), but when ranks fail torchrun's own log lines and
    its ChildFailedError report are replaced by one line naming the failed ranks and how they ended. Exit
    status 2 when every rank that failed on its own (not stopped by torchrun once another had failed) exited
    with 2 (an ``LmforgeError``: bad input), else 1."""
    import logging

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # the summary below says it
    args = get_args_parser().parse_args(torchrun_args)
    try:
        run(args)
    except ChildFailedError as e:
        failures = sorted(e.failures.items())
        world = args.nproc_per_node
        stopped = -int(signal.SIGTERM)  # how torchrun ends the other ranks once one has failed
        ends = [f"rank {rank}/{world} " + ("was stopped (SIGTERM)" if f.exitcode == stopped else
                                           f"was killed by {f.signal_name()}" if f.exitcode < 0 else
                                           f"exited with status {f.exitcode}") for rank, f in failures]
        print(f"error: the job stopped: {', '.join(ends)}", file=sys.stderr, flush=True)
        own = [f.exitcode for _, f in failures if f.exitcode != stopped]
        return 2 if own and all(code == 2 for code in own) else 1
    return 0
