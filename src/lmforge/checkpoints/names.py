"""Tensor names: transformers' checkpoint names <-> lmforge's parameter names, for any family.

Each family (``lmforge.models.families``) gives its name templates (``{i}`` a layer index, ``{p}``
``weight`` or ``bias``), or none when the names are lmforge's already (Llama, Mistral, Qwen2); the
prefix its task classes add (read with or without it); which weights it stores transposed
(GPT-2's Conv1D, in x out); and which checkpoint entries are not weights (buffers old checkpoints
carry, aliases of a tied tensor), skipped on reading.
"""

from __future__ import annotations

import functools
import re

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.models import families
from lmforge.models.families import NameTemplates


def templates(config: ModelConfig) -> NameTemplates | None:
    """(transformers name, lmforge name) templates, or None when the names are identical."""
    family = families.get(config.family)
    return None if family.weight_names is None else family.weight_names(config)


@functools.lru_cache(maxsize=1024)
def _compile(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)"))


def rename(name: str, pairs: NameTemplates, to_lmforge: bool) -> str | None:
    """Map one name across the two namings; None if it matches no template."""
    for hf, ours in pairs:
        src, dst = (hf, ours) if to_lmforge else (ours, hf)
        m = _compile(src).fullmatch(name)
        if m:
            return dst.format(**m.groupdict())
    return None


def _transposed(family: families.Family, hf_name: str) -> bool:
    return family.transposed is not None and re.fullmatch(family.transposed, hf_name) is not None


def to_lmforge(config: ModelConfig, tensors: dict) -> dict:
    """A transformers state dict under lmforge's names (transposed weights put back in (out, in))."""
    family = families.get(config.family)
    pairs = templates(config)
    prefix = family.hf_prefix
    out = {}
    for name, t in tensors.items():
        if family.ignored is not None and re.fullmatch(family.ignored, name):
            continue
        if pairs is None:
            out[name] = t
            continue
        key, ours = name, rename(name, pairs, to_lmforge=True)
        if ours is None and prefix:  # the same weight with / without the task class's prefix
            key = name.removeprefix(prefix) if name.startswith(prefix) else prefix + name
            ours = rename(key, pairs, to_lmforge=True)
        if ours is None:
            raise LmforgeError(f"unexpected tensor {name!r} in a {config.family} checkpoint")
        out[ours] = t.t().contiguous() if _transposed(family, key) else t
    return out


def mlm_head(config: ModelConfig, tensors: dict) -> dict:
    """The masked-LM head of a state dict (``BertForMaskedLM``'s ``cls.predictions.*``) under
    ``MaskedLM``'s names (``predictions.*``); empty when the family has no such head or the checkpoint
    holds none. ``to_lmforge`` skips these tensors, so the same checkpoint also loads as a plain encoder."""
    pairs = families.get(config.family).mlm_head
    if pairs is None:
        return {}
    out = {}
    for name, t in tensors.items():
        ours = rename(name, pairs, to_lmforge=True)
        if ours is not None:
            out[ours] = t
    if "predictions.bias" not in out and "cls.predictions.decoder.bias" in tensors:
        out["predictions.bias"] = tensors["cls.predictions.decoder.bias"]  # an alias of cls.predictions.bias
    return out


def to_hf(config: ModelConfig, state: dict) -> dict:
    """The inverse of ``to_lmforge``: tensors named as transformers saves them."""
    family = families.get(config.family)
    pairs = templates(config)
    if pairs is None:
        return dict(state)
    out = {}
    for name, t in state.items():
        hf = rename(name, pairs, to_lmforge=False)
        if hf is None:
            raise LmforgeError(f"no {config.family} checkpoint name for lmforge tensor {name!r}")
        out[hf] = t.t().contiguous() if _transposed(family, hf) else t
    return out
