"""Training checkpoints that survive a crash, and resuming from them exactly.

A checkpoint is a folder ``out_dir/checkpoint/``:

- ``model.safetensors``      the model's parameters and buffers (tied weights stored once)
- ``optimizer.safetensors``  AdamW's per-parameter tensors (``state.{i}.{name}``)
- ``rng.safetensors``        torch's CPU (and CUDA) generator states
- ``state.json``             step, optimiser hyper-parameters, python/numpy RNG states, the batch
                             source's state, the model config, the train config
- ``config.json``            the resolved run configuration (what produced this run)

Nothing is pickled. The folder is written as ``.checkpoint.tmp-*`` (each file fsynced), then the
previous checkpoint is renamed to ``.checkpoint.old``, the new one renamed into place and the old
one removed, so a crash at any moment leaves a complete checkpoint in ``checkpoint/`` or, in the
instant between the two renames, in ``.checkpoint.old`` (which ``find_checkpoint`` falls back to).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from lmforge.errors import LmforgeError

NAME, OLD, TMP_PREFIX = "checkpoint", ".checkpoint.old", ".checkpoint.tmp-"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


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
    """Write ``out_dir/checkpoint`` atomically (see the module docstring); returns its path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(TMP_PREFIX + "*"):  # left by an earlier crash
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=out_dir))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        _write_files(tmp, model, optimizer, step, batch_state, run_config, extra or {})
        for f in tmp.iterdir():
            _fsync_file(f)
        _fsync_dir(tmp)
        final, old = out_dir / NAME, out_dir / OLD
        if old.exists():
            shutil.rmtree(old)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _write_files(tmp: Path, model: nn.Module, optimizer: torch.optim.Optimizer, step: int, batch_state: dict,
                 run_config: dict | None, extra: dict) -> None:
    save_model(model, str(tmp / "model.safetensors"))  # handles tied (shared) tensors
    opt_json, opt_tensors = optimizer_state(optimizer)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    rng_json, rng_tensors = rng_state()
    save_file(rng_tensors, str(tmp / "rng.safetensors"))
    config = getattr(model, "config", None)
    _write_json(tmp / "state.json", {
        "step": step, "optimizer": opt_json, "rng": rng_json, "batches": batch_state,
        "model_config": config.to_dict() if config is not None else None, **extra,
    })
    _write_json(tmp / "config.json", run_config or {})


def find_checkpoint(out_dir: str | Path) -> Path | None:
    """The checkpoint folder to resume from: ``checkpoint/``, or ``.checkpoint.old`` if a crash hit
    between the two renames of a save; None if there is neither."""
    out_dir = Path(out_dir)
    for name in (NAME, OLD):
        if (out_dir / name / "state.json").is_file():
            return out_dir / name
    return None


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
    """Restore model, optimiser and RNG states in place; returns state.json (step, batch state...)."""
    state = read_state(path)
    check_compatible(path, state, model)
    try:
        missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
        opt_tensors = load_file(str(path / "optimizer.safetensors"))
        rng_tensors = load_file(str(path / "rng.safetensors"))
    except Exception as e:  # safetensors raises several types for truncated/corrupt files
        raise LmforgeError(f"{path}: the checkpoint is unreadable ({type(e).__name__}: {e})") from None
    if missing or unexpected:
        raise LmforgeError(f"{path}: checkpoint tensors do not match the model "
                           f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")
    load_optimizer_state(optimizer, state["optimizer"], opt_tensors)
    set_rng_state(state["rng"], rng_tensors)
    return state
