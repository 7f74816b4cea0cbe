"""``config.json`` of Hugging Face ``transformers`` <-> ``ModelConfig``, both ways.

The family-specific mappings live in ``lmforge.models.families`` (one module per family); this
module picks the family (by ``model_type`` when reading, by ``ModelConfig.family`` when writing)
and adds what every config.json shares: ``model_type`` and the bos/eos/pad token ids.
"""

from __future__ import annotations

from typing import Any

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.models import families


def supported() -> list[str]:
    """The model_types lmforge reads."""
    return [t for name in families.names() for t in families.get(name).hf_model_types]


_SIZES = frozenset({  # integer fields of the config.json files the families read
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "intermediate_size", "max_position_embeddings", "type_vocab_size", "n_embd", "n_layer", "n_head", "n_inner",
    "n_positions", "n_ctx", "d_model", "d_ff", "d_kv", "num_layers", "num_decoder_layers", "num_heads",
    "relative_attention_num_buckets", "relative_attention_max_distance", "sliding_window"})

_MAPPINGS = frozenset({"rope_scaling"})


def config_from_hf(hf: dict[str, Any], name: str = "custom", source: str = "config.json") -> ModelConfig:
    """Build from a ``transformers`` config.json dict; errors start with ``source`` (the file's path)."""
    model_type = hf.get("model_type")
    family = families.family_for_hf(model_type)
    for key, value in hf.items():  # a size written as text ("hidden_size": "64") is refused by its own name
        if key in _SIZES and value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise LmforgeError(f"{source}: {key} must be an integer, got {value!r} ({type(value).__name__})")
        if key in _MAPPINGS and value is not None and not isinstance(value, dict):
            raise LmforgeError(f"{source}: {key} must be an object or null, got {value!r} ({type(value).__name__})")
    common = dict(name=name, bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"),
                  pad_token_id=hf.get("pad_token_id"))
    try:
        config = family.from_hf(hf, common)
    except KeyError as e:
        raise LmforgeError(f"{source}: missing field {e.args[0]!r} for model_type {model_type!r}") from None
    except LmforgeError as e:  # ModelConfig's own checks (types, ranges, divisibility)
        raise LmforgeError(f"{source}: {e}") from None
    except (TypeError, ValueError, AttributeError, ZeroDivisionError) as e:  # a value the mapping cannot use
        raise LmforgeError(f"{source}: a field of this {model_type} config has a value of the wrong type or range "
                           f"({type(e).__name__}: {e})") from None
    if config.arch != family.arch:
        raise LmforgeError(f"{source}: the {family.name} family reads {family.arch} models, "
                           f"its mapping built an {config.arch} config")
    return config


def config_to_hf(c: ModelConfig) -> dict[str, Any]:
    """The ``transformers`` config.json dict for ``c``."""
    family = families.get(c.family)
    if c.arch != family.arch:
        raise LmforgeError(f"a {c.family}-family config must have arch={family.arch!r}, not {c.arch!r}")
    tokens = dict(bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id)
    return {"model_type": family.name, **family.to_hf(c), **tokens}
