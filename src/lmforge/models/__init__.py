"""The three transformer variants, built from the blocks in layers.py / attention.py / positions.py.

- ``decoder.py``: DecoderLM, decoder-only (Llama, Qwen2, Mistral, GPT-2)
- ``encoder.py``: EncoderModel, encoder-only (BERT)
- ``seq2seq.py``: Seq2SeqLM, encoder-decoder (T5)
- ``heads.py``: pooling and the sequence-classification head
- ``families/``: the checkpoint formats (transformers model_types, GGUF architectures), one module each
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

from lmforge.config import ModelConfig
from lmforge.models.init import init_weights

__all__ = ["TiesWeights", "build_empty", "count_parameters", "init_weights", "model_class"]


@runtime_checkable
class TiesWeights(Protocol):
    """A model whose tied tensors (embeddings shared with the LM head, T5's shared embedding) are
    re-tied by ``tie_weights()`` after its storage is replaced (``to_empty``): DecoderLM, Seq2SeqLM."""

    def tie_weights(self) -> None: ...


def model_class(config: ModelConfig) -> type[nn.Module]:
    """The module class for a config: by ``arch``, and for encoders with labels the classifier."""
    if config.arch == "decoder":
        from lmforge.models.decoder import DecoderLM

        return DecoderLM
    if config.arch == "encoder":
        from lmforge.models.encoder import EncoderModel
        from lmforge.models.heads import SequenceClassifier

        return SequenceClassifier if config.labels else EncoderModel
    from lmforge.models.seq2seq import Seq2SeqLM

    return Seq2SeqLM


def build_empty(config: ModelConfig) -> nn.Module:
    """The model with shapes only (meta device): for parameter counts and as a loading target."""
    with torch.device("meta"):
        return model_class(config)(config)


def count_parameters(config: ModelConfig) -> int:
    """Parameters of the model ``config`` describes (tied weights once): the formula for decoders, a
    shape-only (meta-device) model for the other variants."""
    if config.arch == "decoder" and config.mlp in ("swiglu", "gelu"):
        return config.num_parameters()
    return sum(p.numel() for p in build_empty(config).parameters())
