"""The Mistral family (``model_type: mistral``): Llama's layout under its own model_type.

llama.cpp converts Mistral checkpoints to GGUF architecture ``llama``, which reads back as Llama.
"""

from __future__ import annotations

from lmforge.models.families.llama import ROPE_BUFFERS, rope_decoder_from_hf, rope_decoder_to_hf
from lmforge.models.families.spec import Family

FAMILY = Family(
    name="mistral",
    arch="decoder",
    from_hf=lambda hf, common: rope_decoder_from_hf(hf, common, "mistral"),
    to_hf=lambda c: rope_decoder_to_hf(c, "MistralForCausalLM"),
    ignored=ROPE_BUFFERS,
    gguf_written_as="llama",
)
