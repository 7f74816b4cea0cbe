"""Checkpoints of FSDP runs: every rank writes its own shards, and any world size reads them back.

An FSDP run (``parallel.py``) holds each parameter and optimiser state as a DTensor split over the ranks,
so no rank has the whole model to write. Its checkpoint folder is the single-process one
(``checkpoint.py``: ``state.json``, ``rng.safetensors``, ``config.json``, ``COMPLETE`` written last, the
same crash-safe swap into ``checkpoint/``) with the tensors in ``shards/`` instead of
``model.safetensors`` + ``optimizer.safetensors``:

- ``shards/shard-0000R-model-00001-of-00001.safetensors``, one file per rank, written by
  ``torch.distributed.checkpoint`` (DCP) through its Hugging Face storage writer: safetensors, no pickle,
  each file's header recording which slice of which global tensor it holds. Keys are
  ``model.<parameter name>`` (only the trainable ones when the base is frozen: LoRA, prompt tuning) and
  ``optim.<parameter name>.<exp_avg|exp_avg_sq|step>``.
- ``state.json`` has ``"layout": "sharded"``, the world size that wrote it and AdamW's parameter groups
  (keyed by parameter name).

DCP plans the load from the saved slices and the loading model's own layout, so a checkpoint written by 2
ranks resumes on 1 (plain tensors, no process group), 2 or 4 ranks, under FSDP or DDP. A checkpoint
written by one process or DDP (whole tensors) also resumes into an FSDP run (``load_sharded`` scatters it).

The folder is written as ``.checkpoint.tmp-stepN`` (a name every rank knows without talking); rank 0
finishes it (``COMPLETE``) only after every rank's shards are written, then swaps it in.
"""

from __future__ import annotations

import re
import shutil
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lmforge.errors import LmforgeError
from lmforge.io import write_json_atomic
from lmforge.training.checkpoint import (
    NAME,
    TMP_PREFIX,
    check_compatible,
    check_frozen_base,
    commit,
    model_tensors,
    read_state,
    rng_state,
    set_rng_state,
)
from lmforge.training.distributed import Dist
from lmforge.training.parallel import full_tensor

SHARDS = "shards"


def _options(trainable_only: bool, full: bool = False):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=trainable_only, full_state_dict=full, strict=not trainable_only)


def _flat_state(model: nn.Module, optimizer: torch.optim.Optimizer, trainable_only: bool
                ) -> tuple[dict[str, Tensor], list[dict]]:
    """The model's (trainable) tensors and AdamW's states by name, as one flat dict for DCP, and AdamW's
    parameter groups."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    opts = _options(trainable_only)
    ties = tied_names(model)
    flat = {f"model.{k}": v for k, v in get_model_state_dict(model, options=opts).items() if k not in ties}
    osd = get_optimizer_state_dict(model, optimizer, options=opts)
    for fqn, per_param in osd["state"].items():
        for name, value in per_param.items():
            flat[f"optim.{fqn}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return flat, osd["param_groups"]


def tied_names(model: nn.Module) -> dict[str, str]:
    """Parameter names that are another name's tensor (tied embeddings: ``lm_head.weight`` ->
    ``model.embed_tokens.weight``): stored once, under the first name."""
    first: dict[int, str] = {}
    ties = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            ties[name] = first[id(p)]
        else:
            first[id(p)] = name
    return ties


def files_by_block(flat: dict[str, Tensor]) -> dict[str, int]:
    """The file (1, 2, ...) of each key: one per transformer block (``...layers.N...``, weights and AdamW states
    together) and one for the rest. The writer builds each file in memory before writing it, so one file per
    block bounds what a save adds to a rank's memory by one block's share instead of the whole shard."""
    index: dict[str, int] = {}
    for key in flat:
        m = _BLOCK.search(key)
        index[key] = 1 if m is None else 2 + int(m.group(1)) + (1000 * (m.group(0).startswith("encoder")))
    return index


_BLOCK = re.compile(r"(?:encoder\.)?layers\.(\d+)\.")


def _local(t: Tensor) -> Tensor:
    """A DTensor's shard on this rank; a plain tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _json_groups(groups: list[dict]) -> list[dict]:
    return [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in groups]


def save_sharded(out_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, step: int, batch_state: dict,
                 run_config: dict | None, extra: dict | None, dist: Dist) -> Path:
    """Write ``out_dir/checkpoint`` from every rank (see the module docstring); every rank must call it.
    Refuses non-finite weights (on every rank, naming the tensor where a rank found one)."""
    import torch.distributed.checkpoint as dcp

    out_dir = Path(out_dir)
    tmp = out_dir / f"{TMP_PREFIX}step{step}"
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a crash at this very step
        (tmp / SHARDS).mkdir(parents=True)
    dist.barrier()
    _, frozen = model_tensors(model, gather=full_tensor)
    flat, groups = _flat_state(model, optimizer, frozen is not None)
    bad = next((k[6:] for k, t in flat.items() if k.startswith("model.") and t.is_floating_point()
                and not bool(torch.isfinite(_local(t)).all())), None)
    if dist.all_reduce_mean(0.0 if bad is None else 1.0) > 0:
        if dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise LmforgeError(f"refusing to write the checkpoint at step {step}: "
                           + (f"parameter {bad} holds non-finite value(s)" if bad else "another rank's parameters "
                              "hold non-finite values") + " (NaN or inf); the training diverged")
    try:
        dcp.save(flat, storage_writer=dcp.HuggingFaceStorageWriter(str(tmp / SHARDS), save_distributed=True,
                                                                   fqn_to_index_mapping=files_by_block(flat)))
        dist.barrier()  # every rank's shards are on disk
        if dist.is_main:
            rng_json, rng_tensors = rng_state()
            save_file(rng_tensors, str(tmp / "rng.safetensors"))
            write_json_atomic(tmp / "config.json", run_config or {})
            config = getattr(model, "config", None)
            write_json_atomic(tmp / "state.json", {
                "step": step, "layout": "sharded", "world": dist.world,
                "optimizer": {"param_groups": _json_groups(groups)}, "rng": rng_json, "batches": batch_state,
                "model_config": config.to_dict() if config is not None else None,
                "weights": "all" if frozen is None else "trainable", "frozen": frozen, **(extra or {})})
            commit(tmp, out_dir, step)
    except BaseException:
        if dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    dist.barrier()
    return out_dir / NAME


def is_sharded_checkpoint(path: Path) -> bool:
    """True when the checkpoint folder ``path`` was written by an FSDP run."""
    return read_state(path).get("layout") == "sharded"


def load_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore ``model``, ``optimizer`` and the RNGs from the checkpoint folder ``path``: a sharded one into any
    model (FSDP at any world size, or plain tensors), or a whole-tensor one into an FSDP model. Returns
    state.json (step, batch state...)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    state = read_state(path)
    check_compatible(path, state, model)
    trainable_only = state.get("weights") == "trainable"
    if trainable_only:
        check_frozen_base(path, state, model, gather=full_tensor)
    try:
        groups = state["optimizer"]["param_groups"]
        full = state.get("layout") != "sharded"
        if full:
            flat, order = _read_whole(path, model, optimizer)
            groups = [{**g, "params": [order[i] for i in g["params"]]} for g in groups]
        else:
            flat = _read_shards(path, model, optimizer, trainable_only)
        model_sd = {k[6:]: v for k, v in flat.items() if k.startswith("model.")}
        for alias, name in tied_names(model).items():  # a tied tensor is stored once: under either name
            if name in model_sd or alias in model_sd:
                model_sd[alias] = model_sd[name] = model_sd.get(name, model_sd.get(alias))
        per_param: dict[str, dict[str, Tensor]] = {}
        for key, value in flat.items():
            if key.startswith("optim."):
                fqn, name = key[6:].rsplit(".", 1)
                per_param.setdefault(fqn, {})[name] = value
        groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in groups]
        opts = _options(trainable_only, full)
        set_model_state_dict(model, model_sd, options=opts)
        set_optimizer_state_dict(model, optimizer, {"state": per_param, "param_groups": groups}, options=opts)
        rng_tensors = load_file(str(path / "rng.safetensors"))
    except LmforgeError:
        raise
    except Exception as e:  # DCP and safetensors raise many types for missing keys, shapes, truncated files
        raise LmforgeError(f"{path}: the checkpoint does not fit this run or is unreadable "
                           f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    set_rng_state(state["rng"], rng_tensors)
    return state


def _read_shards(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, trainable_only: bool
                 ) -> dict[str, Tensor]:
    import torch.distributed.checkpoint as dcp

    flat, _ = _flat_state(model, optimizer, trainable_only)  # the layout to load into: this run's
    with warnings.catch_warnings():  # one process reads a sharded checkpoint: DCP warns that it assumes so
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        dcp.load(flat, storage_reader=dcp.HuggingFaceStorageReader(str(path / SHARDS)))
    return flat


def _read_whole(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer
                ) -> tuple[dict[str, Tensor], list[str]]:
    """A single-process checkpoint's tensors, keyed as ``_flat_state`` keys them (whole tensors), and the
    parameter names in AdamW's order: its states are saved by index, the parameter's place in the groups."""
    flat = {f"model.{k}": v for k, v in load_file(str(path / "model.safetensors")).items()}
    names = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), name)
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    for key, value in load_file(str(path / "optimizer.safetensors")).items():
        _, idx, name = key.split(".", 2)
        flat[f"optim.{order[int(idx)]}.{name}"] = value
    return flat, order
