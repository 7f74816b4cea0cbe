"""What a model family is: the ``Family`` record every family module fills in, and its GGUF part.

A family is a checkpoint format of one transformer design (a ``transformers`` model_type): how its
``config.json`` maps to ``ModelConfig`` both ways, how its tensor names map to lmforge's module
names, and, where llama.cpp converts it, its GGUF architecture name, tensor names and metadata
keys. The records hold data and pure functions only; the machinery that reads and writes files
with them lives in ``lmforge.checkpoints`` (``hf_config.py``, ``names.py``, ``gguf.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lmforge.config import Arch, ModelConfig

# (transformers name, lmforge name) templates: ``{i}`` is a layer index, ``{p}`` is ``weight`` or ``bias``
NameTemplates = list[tuple[str, str]]


@dataclass(frozen=True)
class GGUFSpec:
    """How llama.cpp stores a family in a GGUF file.

    ``tensors`` maps top-level GGUF tensor names to lmforge names; ``block_tensors`` maps the leaf
    after ``blk.N.`` to the leaf after ``model.layers.N.``. ``metadata`` maps ``ModelConfig`` fields
    to metadata keys, each read under ``<architecture>.``. ``config`` holds the ``ModelConfig``
    fields the architecture fixes (e.g. Qwen2's ``qkv_bias=True``).
    """

    architecture: str  # general.architecture
    tensors: dict[str, str]
    block_tensors: dict[str, str]
    metadata: dict[str, str]
    permuted_qk: bool = False  # llama.cpp's converter interleaves each head's RoPE halves in q and k rows
    config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Family:
    """One model family: everything that differs between, say, Llama and GPT-2 checkpoints.

    ``from_hf(hf, common)`` builds the ``ModelConfig`` from a config.json dict (``common`` holds
    ``name`` and the bos/eos/pad token ids, to be passed through); a missing required key may
    raise ``KeyError``, which the caller reports as a missing field. ``to_hf(config)`` returns the
    family-specific config.json entries (the caller adds ``model_type`` and the token ids) and
    raises ``LmforgeError`` for a config the format cannot express.
    """

    name: str  # ModelConfig.family; the model_type written to config.json
    arch: Arch
    from_hf: Callable[[dict[str, Any], dict[str, Any]], ModelConfig]
    to_hf: Callable[[ModelConfig], dict[str, Any]]
    hf_model_types: tuple[str, ...] = ()  # model_types read as this family (default: (name,))
    # (transformers, lmforge) name templates for a config; None: the names are identical
    weight_names: Callable[[ModelConfig], NameTemplates] | None = None
    # the prefix transformers' task classes put before the base model's names (GPT-2's
    # ``transformer.``, BERT's ``bert.``): checkpoint names are read with or without it
    hf_prefix: str = ""
    transposed: str | None = None  # regex over transformers names stored (in, out) (GPT-2's Conv1D)
    ignored: str | None = None  # regex over checkpoint names that are not weights (buffers, tied aliases)
    mlm_head: NameTemplates | None = None  # a masked-LM head's names, read only when asked for
    gguf: GGUFSpec | None = None
    # the family whose GGUF layout llama.cpp writes this one with (Mistral: ``llama``); None: its own ``gguf``
    gguf_written_as: str | None = None

    def __post_init__(self) -> None:
        if not self.hf_model_types:
            object.__setattr__(self, "hf_model_types", (self.name,))


def labels_from_hf(hf: dict[str, Any]) -> list[str] | None:
    """Class names of a sequence-classification config.json (``id2label``), None for other heads."""
    id2label = hf.get("id2label")
    if not id2label or hf.get("architectures", [""])[0].endswith(("Model", "LMHeadModel", "ForCausalLM",
                                                                    "ForConditionalGeneration", "ForMaskedLM")):
        return None
    return [str(id2label[k]) for k in sorted(id2label, key=int)]
