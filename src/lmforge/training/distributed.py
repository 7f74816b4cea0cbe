"""Data-parallel training on ``torch.distributed``, launched by ``torchrun``: the process group and ``Dist``.

``torchrun --nproc-per-node N -m lmforge.cli finetune ...`` starts N copies of the command with RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in their environment. ``setup()`` reads them and joins
the process group (``torch.distributed.init_process_group``): NCCL when CUDA is available (each rank on
``cuda:LOCAL_RANK``), gloo on CPU, chosen automatically. Without torchrun's environment (or with
WORLD_SIZE=1) ``setup()`` returns a single-process ``Dist`` whose collectives do nothing, so the one
training loop (``loop.py``) runs the same code either way. ``launch_local`` is the other end: a training
verb's ``--nproc N`` re-runs the command under ``torchrun --standalone`` on this machine.

What data parallelism needs from the rest of the loop lives beside it: ``sources.ShardedBatches`` gives
each rank its rows of every global batch, ``loop.train`` wraps the model in ``DistributedDataParallel``
and ``run.RunDir`` writes only on rank 0.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from lmforge.errors import LmforgeError

__all__ = ["Dist", "backend_for", "bind_local_device", "env_rank", "env_world", "launch_local", "setup",
           "without_nproc"]


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

    def destroy(self) -> None:
        """Leave the process group (when this process joined it)."""
        if self.enabled and tdist.is_initialized():
            tdist.destroy_process_group()


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
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "lmforge.cli", *without_nproc(argv)]
    return subprocess.run(cmd, check=False).returncode
