"""How the one training loop spreads a model over the ranks of a torchrun job: the strategies.

``--strategy`` chooses (``resolve_strategy``):

- ``ddp``: ``DistributedDataParallel``. Every rank holds the whole model, its gradients and AdamW's two
  moments; gradients are all-reduced in buckets as backward produces them (``no_sync`` on all but the
  last micro-batch of an accumulated step). Fastest while the model fits one device.
- ``fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``) on every transformer block and on the root.
  Each rank keeps 1/N of every parameter, gradient and optimiser state (DTensors); a block's full weights
  are all-gathered just before its forward (and again for backward) and freed after, and gradients are
  reduce-scattered. Memory per rank falls roughly as 1/N for the parameter-sized parts, at the cost of
  the extra communication. With bf16 precision the all-gathers and the compute use bf16 copies of the
  weights (``MixedPrecisionPolicy``) while the sharded master weights, the gradient reduction and AdamW
  stay fp32. ``cpu_offload`` (CUDA only) keeps the shards and optimiser states in host memory.
- ``auto``: ``ddp``, unless the model's training state (weights, gradients, AdamW states: 16 bytes per
  trainable parameter, plus the frozen weights) would take more than 40% of one GPU's memory; then
  ``fsdp``. On the CPU always ``ddp``.

Both run the whole step function inside one wrapper module (``StepModule``), so that a step function that
calls submodules directly (``model.lm_head(...)``) still goes through the wrapper's hooks. Under FSDP the
evaluation runs through the same wrapper on every rank (the weights are sharded: all ranks take part in
the gathers); only rank 0 logs it.

``activation_checkpointing`` (any strategy, one process too) recomputes each block's activations during
backward instead of keeping them: memory for activations falls from one set per block to one block's,
for about a third more compute.

What FSDP cannot shard is refused before anything starts: 4-bit (QLoRA) bases, whose packed uint8
weights are not floating-point tensors FSDP can all-gather into a computation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lmforge.errors import LmforgeError
from lmforge.training.distributed import Dist

STRATEGIES = ("auto", "ddp", "fsdp")
AUTO_FSDP_FRACTION = 0.4  # auto picks FSDP when the training state would take more of one GPU than this


class StepModule(nn.Module):
    """``step_fn(model, batch)`` as a module's forward, so that a DDP/FSDP wrapper wraps the whole step (step
    functions call submodules such as ``model.lm_head`` directly, which a wrapper around the model alone
    would not see). ``forward(batch, fn)`` runs another function of the model the same way (evaluation)."""

    def __init__(self, model: nn.Module, step_fn: Callable[[nn.Module, Any], Any]):
        super().__init__()
        self.model, self.step_fn = model, step_fn

    def forward(self, batch: Any, fn: Callable[[nn.Module, Any], Any] | None = None) -> Any:
        return (fn or self.step_fn)(self.model, batch)


def blocks_of(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks of ``model``: every child of an ``nn.ModuleList`` (the decoder's and
    encoder's ``layers``; both stacks of an encoder-decoder)."""
    return [block for m in model.modules() if isinstance(m, nn.ModuleList) for block in m]


def has_quantized_base(model: nn.Module) -> bool:
    """True when some weights are stored as packed integers (a QLoRA/int8 base), which FSDP cannot shard."""
    return any(t.dtype in (torch.uint8, torch.int8) for t in model.buffers())


def resolve_strategy(strategy: str, dist: Dist, model: nn.Module) -> str | None:
    """The strategy a run uses: None for one process, else ``ddp`` or ``fsdp`` (``auto`` decided as in the
    module docstring). ``LmforgeError`` for an unknown name or a model FSDP cannot shard."""
    if strategy not in STRATEGIES:
        raise LmforgeError(f"--strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    if strategy == "fsdp" and has_quantized_base(model):
        raise LmforgeError("--strategy fsdp cannot shard a quantised (4-bit/8-bit QLoRA) base: its weights are "
                           "packed integers; use --strategy ddp, or LoRA on a bf16/fp32 base")
    if not dist.enabled:
        return None
    if strategy == "auto":
        strategy = "fsdp" if _state_bytes(model) > AUTO_FSDP_FRACTION * _device_bytes(model) else "ddp"
    return strategy


def _state_bytes(model: nn.Module) -> float:
    params = {id(p): p for p in model.parameters()}.values()  # tied weights once
    trainable = sum(p.numel() for p in params if p.requires_grad)
    frozen = sum(p.numel() * p.element_size() for p in params if not p.requires_grad)
    return 16 * trainable + frozen


def _device_bytes(model: nn.Module) -> float:
    device = next(model.parameters()).device
    if device.type != "cuda":
        return float("inf")  # on the CPU: ddp
    return float(torch.cuda.get_device_properties(device).total_memory)


def checkpoint_blocks(model: nn.Module) -> int:
    """Activation checkpointing: each block's forward runs under ``torch.utils.checkpoint`` (non-reentrant),
    so its activations are recomputed in backward instead of kept. The module tree and parameter names are
    unchanged (the block's ``forward`` is wrapped in place). Returns the number of blocks."""
    from torch.utils.checkpoint import checkpoint

    blocks = blocks_of(model)
    for block in blocks:
        inner = block.forward

        def forward(*args: Any, _inner: Callable = inner, **kwargs: Any) -> Any:
            if not torch.is_grad_enabled():  # evaluation, generation: nothing to save memory on
                return _inner(*args, **kwargs)
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward
    return len(blocks)


def wrap(model: nn.Module, step_fn: Callable, strategy: str, dist: Dist, *, precision: str = "fp32",
         cpu_offload: bool = False) -> nn.Module:
    """``StepModule(model, step_fn)`` under ``strategy`` (``ddp`` or ``fsdp``). For FSDP the model's own
    parameters become DTensor shards in place: build the optimiser after this."""
    root = StepModule(model, step_fn)
    device = next(model.parameters()).device
    if cpu_offload and (strategy != "fsdp" or device.type != "cuda"):
        raise LmforgeError("--cpu-offload moves FSDP's parameter shards and optimiser states from the GPU to host "
                           "memory: it needs --strategy fsdp on CUDA" + (" (this run is on the CPU)"
                                                                        if device.type != "cuda" else ""))
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index if device.index is not None else dist.local_rank] if device.type == "cuda" else None
        return DistributedDataParallel(root, device_ids=ids)
    if strategy != "fsdp":
        raise LmforgeError(f"unknown strategy {strategy!r}")
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    kwargs: dict[str, Any] = {"offload_policy": CPUOffloadPolicy() if cpu_offload else OffloadPolicy()}
    if precision == "bf16":
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                                   cast_forward_inputs=False)
    for block in blocks_of(model):
        fully_shard(block, **kwargs)
    fully_shard(root, **kwargs)
    if device.type == "cpu":
        return_freed_memory()
    return root


def return_freed_memory(threshold: int = 1 << 20) -> bool:
    """Have glibc serve allocations of ``threshold`` bytes or more from their own mappings, given back to the
    system when freed. FSDP on the CPU allocates and frees every block's gathered weights and gradients several
    times a step; with glibc's default (a threshold that rises after the first large free) those buffers come
    from the heap and stay resident after they are freed, so a rank's resident memory grew to above DDP's
    (bench/distributed.py --strategies: 3.7 GB against 3.4 GB for the 135M model, 2.0 GB with this). True when
    set (Linux with glibc), else False and nothing changes."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, threshold))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def no_sync(wrapped: nn.Module, strategy: str | None, last: bool) -> contextlib.AbstractContextManager:
    """The context for one micro-batch's backward: gradients are communicated only on the ``last`` micro-batch
    of an accumulated step (DDP's ``no_sync``; FSDP's ``set_requires_gradient_sync``)."""
    if strategy == "ddp" and not last:
        return wrapped.no_sync()
    if strategy == "fsdp":
        wrapped.set_requires_gradient_sync(last)
    return contextlib.nullcontext()


def is_sharded(model: nn.Module) -> bool:
    """True when the model's parameters are FSDP shards (DTensors)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_tensor(t: Tensor) -> Tensor:
    """A DTensor gathered whole (a collective: every rank must call it); a plain tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def full_state_dict(model: nn.Module, dist: Dist) -> dict[str, Tensor]:
    """The model's parameters and buffers as whole CPU tensors on rank 0 (empty elsewhere); every rank must
    call it (the shards are gathered one tensor at a time)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                broadcast_from_rank0=False)) if dist.enabled else {}


@contextlib.contextmanager
def gathered(model: nn.Module, dist: Dist):
    """Inside the block, on rank 0, ``model``'s parameters are whole plain tensors (for saving with the
    single-process writers); tied parameters stay tied. Other ranks only take part in the gathers. The
    sharded parameters are put back on leaving."""
    full = full_state_dict(model, dist)
    saved: list[tuple[nn.Module, str, nn.Parameter]] = []
    if dist.is_main:
        made: dict[int, nn.Parameter] = {}
        for prefix, module in model.named_modules():
            for name, p in list(module._parameters.items()):
                if p is None:
                    continue
                key = f"{prefix}.{name}" if prefix else name
                if id(p) not in made:
                    made[id(p)] = nn.Parameter(full[key], requires_grad=p.requires_grad)
                saved.append((module, name, p))
                module._parameters[name] = made[id(p)]
    try:
        yield model
    finally:
        for module, name, p in saved:
            module._parameters[name] = p
