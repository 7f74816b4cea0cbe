"""The model families lmforge reads and writes, registered in one place.

Each family is one module here (``llama.py``, ``mistral.py``, ``qwen2.py``, ``gpt2.py``, ``bert.py``,
``t5.py``) defining a ``FAMILY`` record (``spec.Family``): its transformers model_type(s), its
config.json mapping both ways, its tensor-name templates and, where llama.cpp converts it, its
GGUF names. The generic readers and writers in ``lmforge.checkpoints`` look families up here by
``ModelConfig.family`` (``get``), by config.json ``model_type`` (``family_for_hf``) or by GGUF
``general.architecture`` (``family_for_gguf``); none of them branches on a family's name.
Adding a family is one new module plus a line in ``BUILTIN`` (or ``register(FAMILY)`` from outside).
"""

from __future__ import annotations

from lmforge.errors import LmforgeError
from lmforge.models.families import bert, gpt2, llama, mistral, qwen2, t5
from lmforge.models.families.spec import Family, GGUFSpec, NameTemplates

__all__ = ["Family", "GGUFSpec", "NameTemplates", "register", "unregister", "get", "family_for_hf",
           "family_for_gguf", "names", "gguf_architectures"]

BUILTIN = (llama.FAMILY, mistral.FAMILY, qwen2.FAMILY, gpt2.FAMILY, bert.FAMILY, t5.FAMILY)

_BY_NAME: dict[str, Family] = {}
_BY_HF_TYPE: dict[str, Family] = {}
_BY_GGUF: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Make ``family`` known to every reader and writer. Its name, model_types and GGUF architecture
    must not already belong to another family."""
    clashes = [f"name {family.name!r}"] if family.name in _BY_NAME else []
    clashes += [f"model_type {t!r}" for t in family.hf_model_types if t in _BY_HF_TYPE]
    if family.gguf is not None and family.gguf.architecture in _BY_GGUF:
        clashes.append(f"GGUF architecture {family.gguf.architecture!r}")
    if clashes:
        raise LmforgeError(f"cannot register model family {family.name!r}: {', '.join(clashes)} already registered")
    _BY_NAME[family.name] = family
    _BY_HF_TYPE.update(dict.fromkeys(family.hf_model_types, family))
    if family.gguf is not None:
        _BY_GGUF[family.gguf.architecture] = family
    return family


def unregister(name: str) -> None:
    """Forget the family ``name`` (tests register toy families and remove them again)."""
    family = _BY_NAME.pop(name, None)
    if family is None:
        return
    for t in family.hf_model_types:
        _BY_HF_TYPE.pop(t, None)
    if family.gguf is not None:
        _BY_GGUF.pop(family.gguf.architecture, None)


def names() -> list[str]:
    """The registered families' names, in registration order."""
    return list(_BY_NAME)


def gguf_architectures() -> list[str]:
    """The GGUF ``general.architecture`` values some family reads."""
    return list(_BY_GGUF)


def get(name: str) -> Family:
    """The family a ``ModelConfig.family`` names."""
    family = _BY_NAME.get(name)
    if family is None:
        raise LmforgeError(f"unknown model family {name!r}; known: {', '.join(_BY_NAME)}")
    return family


def family_for_hf(model_type: object) -> Family:
    """The family that reads a config.json with this ``model_type``."""
    family = _BY_HF_TYPE.get(model_type) if isinstance(model_type, str) else None
    if family is None:
        raise LmforgeError(f"config.json: model_type={model_type!r} is not a family lmforge supports; "
                           f"supported: {', '.join(_BY_HF_TYPE)}")
    return family


def family_for_gguf(architecture: object) -> Family | None:
    """The family that reads GGUF files of this ``general.architecture``; None if none does."""
    return _BY_GGUF.get(architecture) if isinstance(architecture, str) else None


for _family in BUILTIN:
    register(_family)
