"""Adapters on disk in Hugging Face PEFT's format, both ways.

A folder holds ``adapter_config.json`` and ``adapter_model.safetensors``. LoRA tensors are named
``base_model.model.<transformers module path>.lora_A.weight`` / ``lora_B.weight``; prompt tuning
stores ``prompt_embeddings`` (N, hidden). Module paths are translated with the same name maps as
checkpoints (``checkpoints/names.py``), so an adapter trained in lmforge loads in ``peft`` on the
``transformers`` model, and one made with ``peft`` loads here. ``adapter_config.json`` records the base model as
``base_model_name_or_path`` (``base_model_reference``: a local folder's absolute path, else the name given), so
``peft.AutoPeftModelForCausalLM.from_pretrained(adapter_dir)`` finds the base on its own.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lmforge.checkpoints.names import rename, templates
from lmforge.errors import LmforgeError
from lmforge.io import atomic_path, read_json_object, write_json_atomic
from lmforge.models import families
from lmforge.models.quantized import LINEAR_LAYERS
from lmforge.peft.lora import LoRALinear, LoraSpec, add_lora, linear_names, lora_layers
from lmforge.peft.prompt_tuning import PromptTunedLM

PREFIX = "base_model.model."
TASK_TYPES = {"decoder": "CAUSAL_LM", "encoder-decoder": "SEQ_2_SEQ_LM", "encoder": "FEATURE_EXTRACTION"}


def _hf_path(config, ours: str) -> str:
    pairs = templates(config)
    if pairs is None:
        return ours
    hf = rename(ours + ".weight", pairs, to_lmforge=False)
    assert hf is not None, f"no transformers name for {ours}"
    return hf.removesuffix(".weight")


def _our_path(config, hf: str) -> str | None:
    pairs = templates(config)
    if pairs is None:
        return hf
    ours = rename(hf + ".weight", pairs, to_lmforge=True)
    return None if ours is None else ours.removesuffix(".weight")


def _write(path: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    with atomic_path(path / "adapter_model.safetensors") as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    write_json_atomic(path / "adapter_config.json", config)
    return path


def base_model_reference(name: str | os.PathLike | None) -> str:
    """What ``adapter_config.json`` records as ``base_model_name_or_path`` for the base model ``name`` (as given to
    ``lmforge.load``): an existing local folder or file as its absolute path (so that the adapter folder can move and
    ``peft`` still finds the base), an embedded or hub name as it is; None (the embedded default) as its name."""
    from lmforge.checkpoints.resolve import DEFAULT_MODEL, EMBEDDED

    if name is None:
        return DEFAULT_MODEL
    if isinstance(name, str) and name.lower() in EMBEDDED:
        return name
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else str(name)


def save_adapter(model: nn.Module, path: str | Path, base_name: str | None = None) -> Path:
    """Write the model's LoRA adapters or soft prompt as a PEFT adapter folder (atomically per file);
    ``base_name``: ``base_model_name_or_path`` (see ``base_model_reference``; None writes null)."""
    path = Path(path)
    if isinstance(model, PromptTunedLM):
        c = model.base.config
        config = {"peft_type": "PROMPT_TUNING", "task_type": TASK_TYPES[c.arch], "num_virtual_tokens": model.n,
                  "token_dim": c.n_embd, "num_transformer_submodules": 1, "num_attention_heads": c.n_head,
                  "num_layers": c.n_layer, "prompt_tuning_init": "RANDOM", "base_model_name_or_path": base_name,
                  "inference_mode": True}
        return _write(path, config, {"prompt_embeddings": model.prompt_embeddings})
    layers = list(lora_layers(model))
    if not layers:
        raise LmforgeError("the model has no LoRA adapters or soft prompt to save")
    c = model.config
    first = layers[0][1]
    assert len({(m.r, m.alpha, m.rslora) for _, m in layers}) == 1, "one rank and one alpha per adapter"
    hf_paths = [_hf_path(c, name) for name, _ in layers]
    leaves = sorted({p.rsplit(".", 1)[-1] for p in hf_paths})
    all_hf = [_hf_path(c, n) for n in linear_names(model)] + hf_paths
    by_leaf = {p for p in all_hf if p.rsplit(".", 1)[-1] in leaves}
    # a list of leaf names when it selects exactly these layers, else a regex of their full paths
    targets: list[str] | str = leaves if by_leaf == set(hf_paths) else "|".join(re.escape(p) for p in hf_paths)
    config = {
        "peft_type": "LORA", "task_type": TASK_TYPES[c.arch], "r": first.r,
        "lora_alpha": first.alpha, "use_rslora": first.rslora,
        "lora_dropout": first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0,
        "target_modules": targets, "bias": "none",
        "fan_in_fan_out": families.get(c.family).transposed is not None,  # weights stored (in, out): GPT-2's Conv1D
        "base_model_name_or_path": base_name, "inference_mode": True,
        "modules_to_save": None, "init_lora_weights": True, "use_dora": False,
    }
    tensors = {f"{PREFIX}{hf}.{ab}.weight": getattr(m, ab).weight
               for hf, (_, m) in zip(hf_paths, layers) for ab in ("lora_A", "lora_B")}
    return _write(path, config, tensors)


def read_adapter(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(adapter_config.json as a dict, tensors by PEFT name) of an adapter folder."""
    path = Path(path)
    cfg_file, weights = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not cfg_file.exists() or not weights.exists():
        raise LmforgeError(f"{path}: not an adapter folder (needs adapter_config.json and adapter_model.safetensors)")
    config = read_json_object(cfg_file)
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise LmforgeError(f"{weights}: cannot read safetensors file, it is truncated or corrupt ({e})") from None
    return config, tensors


def load_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Apply a PEFT adapter folder to ``model``; returns the adapted model (a wrapper for prompt tuning)."""
    path = Path(path)
    config, tensors = read_adapter(path)
    kind = config.get("peft_type")
    if kind == "PROMPT_TUNING":
        emb = tensors.get("prompt_embeddings")
        if emb is None:
            raise LmforgeError(f"{path}: a prompt-tuning adapter without a 'prompt_embeddings' tensor")
        if config.get("num_transformer_submodules", 1) != 1:
            raise LmforgeError(f"{path}: prompt tuning with num_transformer_submodules != 1 is not supported")
        hidden = model.config.n_embd
        if emb.dim() != 2 or emb.shape[1] != hidden:
            raise LmforgeError(f"{path}: prompt_embeddings has shape {tuple(emb.shape)}, the model expects "
                               f"(N, {hidden})")
        wrapped = PromptTunedLM(model, emb.shape[0])
        with torch.no_grad():
            wrapped.prompt_embeddings.copy_(emb.to(wrapped.prompt_embeddings.dtype))
        return wrapped
    if kind != "LORA":
        raise LmforgeError(f"{path}: peft_type {kind!r} is not supported; supported: LORA, PROMPT_TUNING")
    for key, ok in (("use_dora", False), ("bias", "none")):
        if config.get(key, ok) != ok:
            raise LmforgeError(f"{path}: {key}={config[key]!r} is not supported (only {ok!r})")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise LmforgeError(f"{path}: per-module {key} is not supported")
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = re.fullmatch(r"base_model\.model\.(.+)\.(lora_A|lora_B)(?:\.[\w-]+)?\.weight", key)
        if m is None:
            raise LmforgeError(f"{path}: unexpected tensor {key!r} in a LoRA adapter")
        ours = _our_path(model.config, m.group(1))
        if ours is None:
            raise LmforgeError(f"{path}: tensor {key!r} names module {m.group(1)!r}, which this "
                               f"{model.config.family} model does not have")
        modules.setdefault(ours, {})[m.group(2)] = t
    available = dict(model.named_modules())
    for name, ab in modules.items():
        layer = available.get(name)
        if not isinstance(layer, (*LINEAR_LAYERS, LoRALinear)):
            raise LmforgeError(f"{path}: adapter targets {name!r}, which is not a linear layer of this model")
        want = {"lora_A": (r, layer.in_features), "lora_B": (layer.out_features, r)}
        for which, shape in want.items():
            if which not in ab:
                raise LmforgeError(f"{path}: {name}.{which}.weight is missing")
            if tuple(ab[which].shape) != shape:
                raise LmforgeError(f"{path}: tensor {PREFIX}{_hf_path(model.config, name)}.{which}.weight has shape "
                                   f"{tuple(ab[which].shape)}, but this base model needs {shape}: "
                                   "the adapter was trained for another base model")
    spec = LoraSpec(r=r, alpha=alpha, dropout=float(config.get("lora_dropout", 0.0)),
                    rslora=bool(config.get("use_rslora", False)))
    add_lora(model, spec, names=sorted(modules))
    for name, m in lora_layers(model):
        with torch.no_grad():
            m.lora_A.weight.copy_(modules[name]["lora_A"])
            m.lora_B.weight.copy_(modules[name]["lora_B"])
    return model
