"""Training checkpoints that survive a crash, and resuming from them exactly.

A checkpoint is a folder ``out_dir/checkpoint/``:

- ``model.safetensors``      the model's parameters and buffers (tied weights stored once); for a model
                             with a frozen part (LoRA, QLoRA, prompt tuning) only the trainable
                             parameters: the frozen base is rebuilt from the model source on resume
- ``optimizer.safetensors``  AdamW's per-parameter tensors (``state.{i}.{name}``)
- ``rng.safetensors``        torch's CPU (and CUDA) generator states
- ``state.json``             step, optimiser hyper-parameters, python/numpy RNG states, the batch
                             source's state, the model config, the train config and, for a
                             trainable-only checkpoint, the frozen base's name and fingerprint
- ``config.json``            the resolved run configuration (what produced this run)
- ``COMPLETE``               written last, after every other file is fsynced: ``{"step": N}``

Nothing is pickled. The folder is written as ``.checkpoint.tmp-*``, completed by ``COMPLETE``; then
``.checkpoint.old`` is removed, the previous checkpoint renamed to ``.checkpoint.old``, the new one
renamed into place, and the old one and any other leftovers removed. Nothing complete is removed
before the new checkpoint is complete, so a crash at any moment leaves the newest complete checkpoint
somewhere among ``checkpoint/``, ``.checkpoint.old`` and ``.checkpoint.tmp-*``: ``find_checkpoint``
looks at all three and takes the highest step.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.io import fsync_dir, fsync_file, write_json_atomic

NAME, OLD, TMP_PREFIX = "checkpoint", ".checkpoint.old", ".checkpoint.tmp-"
MARKER = "COMPLETE"  # written last: a folder without it was cut short


def rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    """(JSON part, tensor part) of every global RNG the loop may draw from."""
    np_state = np.random.get_state()
    json_part = {"python": _to_json(random.getstate()),
                 "numpy": [np_state[0], np_state[1].tolist(), *(x for x in np_state[2:])]}
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    return json_part, tensors


def set_rng_state(json_part: dict, tensors: dict[str, torch.Tensor]) -> None:
    random.setstate(_from_json(json_part["python"]))
    kind, keys, *rest = json_part["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def _to_json(x: Any) -> Any:
    return [_to_json(v) for v in x] if isinstance(x, (tuple, list)) else x


def _from_json(x: Any) -> Any:
    return tuple(_from_json(v) for v in x) if isinstance(x, list) else x


def optimizer_state(opt: torch.optim.Optimizer) -> tuple[dict, dict[str, torch.Tensor]]:
    """AdamW's state dict split into JSON (hyper-parameters) and tensors (moments, step counts)."""
    sd = opt.state_dict()
    tensors = {}
    for idx, per_param in sd["state"].items():
        for name, value in per_param.items():
            tensors[f"state.{idx}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return {"param_groups": groups}, tensors


def load_optimizer_state(opt: torch.optim.Optimizer, json_part: dict, tensors: dict[str, torch.Tensor]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in json_part["param_groups"]]
    opt.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(out_dir: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, step: int,
                    batch_state: dict, run_config: dict | None, extra: dict | None = None) -> Path:
    """Write ``out_dir/checkpoint`` (see the module docstring); returns its path.

    Refuses (``LmforgeError``) to write parameters that are NaN or infinite. Until the new folder is
    complete nothing else is touched; after that, whatever a crash interrupts, the newest complete
    checkpoint survives for ``find_checkpoint``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors, frozen = model_tensors(model)
    check_finite(model.named_parameters() if tensors is None else tensors.items(), f"the checkpoint at step {step}")
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=out_dir))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        _write_files(tmp, model, tensors, frozen, optimizer, step, batch_state, run_config, extra or {})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return commit(tmp, out_dir, step)


def commit(tmp: Path, out_dir: Path, step: int) -> Path:
    """Make the written folder ``tmp`` the checkpoint: fsync its files, write ``COMPLETE``, then swap it in for
    ``checkpoint/`` (the old one kept as ``.checkpoint.old`` until the new one is in place)."""
    complete = False
    try:
        for f in tmp.rglob("*"):
            if f.is_file():
                fsync_file(f)
        write_json_atomic(tmp / MARKER, {"step": step})
        fsync_dir(tmp)
        fsync_dir(out_dir)
        complete = True  # from here on the new folder is the newest complete checkpoint: never remove it
        final, old = out_dir / NAME, out_dir / OLD
        if old.exists():
            shutil.rmtree(old)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(out_dir)
        shutil.rmtree(old, ignore_errors=True)
        for stale in out_dir.glob(TMP_PREFIX + "*"):  # older leftovers of earlier crashes
            shutil.rmtree(stale, ignore_errors=True)
    except BaseException:
        if not complete:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def model_tensors(model: nn.Module, gather: Callable[[torch.Tensor], torch.Tensor] | None = None
                   ) -> tuple[dict[str, torch.Tensor] | None, dict | None]:
    """(what model.safetensors holds, the frozen part's record). Every parameter trainable: (None, None),
    the whole model is saved (``save_model``). Otherwise the trainable parameters by name and
    ``{"name", "fingerprint", "tensors"}`` of the rest, which a resume rebuilds from the model source.
    ``gather`` makes a whole tensor of a shard for the fingerprint (FSDP: a collective on every rank)."""
    params = dict(model.named_parameters())
    trainable = {k: p for k, p in params.items() if p.requires_grad}
    if len(trainable) == len(params):
        return None, None
    config = getattr(model, "config", None)
    ids = {id(p) for p in trainable.values()}  # a tied trainable tensor is not part of the frozen rest
    rest = [(k, t.detach()) for k, t in model.state_dict(keep_vars=True).items() if id(t) not in ids]
    return ({k: p.detach() for k, p in trainable.items()},
            {"name": getattr(config, "name", None), "fingerprint": fingerprint(rest, gather=gather),
             "tensors": len(rest)})


def fingerprint(named: list[tuple[str, torch.Tensor]], samples: int = 256,
                gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> str:
    """A cheap fingerprint of named tensors: names, dtypes, shapes and ``samples`` evenly spaced elements
    of each (their bytes), hashed. Tells one base model from another without reading all of it."""
    h = hashlib.sha256()
    for name, t in sorted(named, key=lambda kv: kv[0]):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        flat = (gather(t) if gather else t).detach().reshape(-1)
        if flat.numel():
            idx = torch.linspace(0, flat.numel() - 1, min(samples, flat.numel()), device=flat.device).long()
            idx.clamp_(max=flat.numel() - 1)  # float32 spacing rounds past the end beyond 2**24 elements
            h.update(flat[idx].cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def check_finite(named, what: str) -> None:
    """Raise ``LmforgeError`` naming the first tensor of ``named`` ((name, tensor) pairs; None = nothing
    to check) that holds a NaN or an infinity: ``what`` is what would have been written."""
    for name, t in named or ():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise LmforgeError(f"refusing to write {what}: parameter {name} holds {bad} non-finite value(s) "
                               "(NaN or inf); the training diverged")


def _write_files(tmp: Path, model: nn.Module, tensors: dict[str, torch.Tensor] | None, frozen: dict | None,
                 optimizer: torch.optim.Optimizer, step: int, batch_state: dict, run_config: dict | None,
                 extra: dict) -> None:
    if tensors is None:
        save_model(model, str(tmp / "model.safetensors"))  # handles tied (shared) tensors
    else:
        save_file({k: t.contiguous() for k, t in tensors.items()}, str(tmp / "model.safetensors"))
    opt_json, opt_tensors = optimizer_state(optimizer)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    rng_json, rng_tensors = rng_state()
    save_file(rng_tensors, str(tmp / "rng.safetensors"))
    config = getattr(model, "config", None)
    write_json_atomic(tmp / "config.json", run_config or {})
    write_json_atomic(tmp / "state.json", {
        "step": step, "optimizer": opt_json, "rng": rng_json, "batches": batch_state,
        "model_config": config.to_dict() if config is not None else None,
        "weights": "all" if frozen is None else "trainable", "frozen": frozen, **extra,
    })


def find_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder to resume from, None if there is none.

    Candidates: ``checkpoint/`` and ``.checkpoint.old`` (complete when they hold ``state.json``: they are
    only ever renamed into place complete), and ``.checkpoint.tmp-*`` folders holding ``COMPLETE`` (a
    crash hit the swap after the new folder was written). The highest step wins; on a tie ``checkpoint/``,
    then ``.checkpoint.old``."""
    out_dir = Path(out_dir)
    found: list[tuple[int, int, Path]] = []
    rank = {NAME: 2, OLD: 1}
    for path in [out_dir / NAME, out_dir / OLD, *sorted(out_dir.glob(TMP_PREFIX + "*"))]:
        step = _complete_step(path, path.name in rank)
        if step is not None:
            found.append((step, rank.get(path.name, 0), path))
    return max(found, key=lambda f: (f[0], f[1]))[2] if found else None


def recover_checkpoint(out_dir: str | Path) -> Path | None:
    """``find_checkpoint``, then finish the swap a crash interrupted: the newest complete checkpoint is renamed
    to ``checkpoint/`` and the leftovers removed (each step crash-safe in turn: the newest is never removed).
    Returns ``out_dir/checkpoint``, or None when there is no complete checkpoint."""
    out_dir = Path(out_dir)
    path = find_checkpoint(out_dir)
    if path is None:
        return None
    final, old = out_dir / NAME, out_dir / OLD
    if path == old:
        if final.exists():  # older than .checkpoint.old, or unreadable: else it would have been found
            shutil.rmtree(final)
        os.replace(old, final)
    elif path != final:  # a complete .checkpoint.tmp-*
        if old.exists():
            shutil.rmtree(old)
        if final.exists():
            os.replace(final, old)
        os.replace(path, final)
    fsync_dir(out_dir)
    shutil.rmtree(old, ignore_errors=True)
    for stale in out_dir.glob(TMP_PREFIX + "*"):
        shutil.rmtree(stale, ignore_errors=True)
    return final


def _complete_step(path: Path, swapped_in: bool) -> int | None:
    """The step of a complete checkpoint folder, None when ``path`` is not one. A ``checkpoint/`` whose
    state cannot be read still counts (step -1: the last resort), so that resuming names the problem."""
    marker = path / MARKER
    if marker.is_file():
        try:
            return int(json.loads(marker.read_text(encoding="utf-8"))["step"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
    if not swapped_in or not (path / "state.json").is_file():
        return None
    try:
        return int(json.loads((path / "state.json").read_text(encoding="utf-8"))["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return -1


def read_state(path: Path) -> dict:
    try:
        return json.loads((path / "state.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise LmforgeError(f"{path / 'state.json'}: cannot read the checkpoint state ({e})") from None


def check_compatible(path: Path, state: dict, model: nn.Module) -> None:
    """Refuse to resume a checkpoint written for another architecture or shape."""
    saved = state.get("model_config")
    config = getattr(model, "config", None)
    if saved is None or config is None:
        return
    current = config.to_dict()
    diff = [k for k in sorted(set(saved) | set(current)) if k != "name" and saved.get(k) != current.get(k)]
    if diff:
        shown = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}" for k in diff[:8])
        raise LmforgeError(
            f"cannot resume {path}: it was written for model {saved.get('name')!r} "
            f"({saved.get('family')}, {saved.get('arch')}) but this run builds {current.get('name')!r} "
            f"({current.get('family')}, {current.get('arch')}); differing fields: {shown}")


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore model, optimiser and RNG states in place; returns state.json (step, batch state...).

    A trainable-only checkpoint (LoRA, prompt tuning) loads into the trainable parameters; the frozen
    rest must be the base it was written for (same fingerprint), else the resume is refused."""
    state = read_state(path)
    check_compatible(path, state, model)
    if state.get("layout") == "sharded":
        raise LmforgeError(f"{path} was written by an FSDP run (sharded): load it with sharded.load_sharded")
    try:
        if state.get("weights") == "trainable":
            _load_trainable(path, state, model)
        else:
            missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
            if missing or unexpected:
                raise LmforgeError(f"{path}: checkpoint tensors do not match the model "
                                   f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")
        opt_tensors = load_file(str(path / "optimizer.safetensors"))
        rng_tensors = load_file(str(path / "rng.safetensors"))
    except LmforgeError:
        raise
    except Exception as e:  # safetensors raises several types for truncated/corrupt files
        raise LmforgeError(f"{path}: the checkpoint is unreadable ({type(e).__name__}: {e})") from None
    load_optimizer_state(optimizer, state["optimizer"], opt_tensors)
    set_rng_state(state["rng"], rng_tensors)
    return state


def check_frozen_base(path: Path, state: dict, model: nn.Module,
                      gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Refuse to resume a trainable-only checkpoint onto another frozen base (another fingerprint) or onto a
    model with nothing frozen; returns the model's trainable tensors by name."""
    tensors, frozen = model_tensors(model, gather)
    saved = state.get("frozen") or {}
    if frozen is None:
        raise LmforgeError(f"{path} holds only the trainable parameters of a model with a frozen base "
                           f"({saved.get('name')!r}), but every parameter of this run is trainable "
                           "(another --method?)")
    if saved.get("fingerprint") != frozen["fingerprint"] or saved.get("tensors") != frozen["tensors"]:
        raise LmforgeError(f"cannot resume {path}: its frozen base ({saved.get('name')!r}, fingerprint "
                           f"{saved.get('fingerprint')}) is not this run's ({frozen['name']!r}, fingerprint "
                           f"{frozen['fingerprint']}): resume with the same --model (and --adapter, --quant)")
    return tensors


def _load_trainable(path: Path, state: dict, model: nn.Module) -> None:
    tensors = check_frozen_base(path, state, model)
    weights = load_file(str(path / "model.safetensors"))
    missing, unexpected = sorted(set(tensors) - set(weights)), sorted(set(weights) - set(tensors))
    if missing or unexpected:
        raise LmforgeError(f"{path}: checkpoint tensors do not match the model's trainable parameters "
                           f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    with torch.no_grad():
        for name, t in tensors.items():
            if weights[name].shape != t.shape:
                raise LmforgeError(f"{path}: {name} has shape {tuple(weights[name].shape)} in the checkpoint, "
                                   f"{tuple(t.shape)} in this run")
            t.copy_(weights[name])
