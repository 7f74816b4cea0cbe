"""The Qwen2 family (``model_type: qwen2``): Llama's layout with biases on q, k and v only.

llama.cpp stores it as GGUF architecture ``qwen2``, with q/k rows in transformers' order (not permuted).
"""

from __future__ import annotations

from lmforge.models.families.llama import (
    GGUF_BLOCK_TENSORS,
    GGUF_METADATA,
    GGUF_TENSORS,
    ROPE_BUFFERS,
    rope_decoder_from_hf,
    rope_decoder_to_hf,
)
from lmforge.models.families.spec import Family, GGUFSpec

GGUF_QKV_BIASES = {
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
}

FAMILY = Family(
    name="qwen2",
    arch="decoder",
    from_hf=lambda hf, common: rope_decoder_from_hf(hf, common, "qwen2", qkv_bias_only=True),
    to_hf=lambda c: rope_decoder_to_hf(c, "Qwen2ForCausalLM", qkv_bias_only=True),
    ignored=ROPE_BUFFERS,
    gguf=GGUFSpec(architecture="qwen2", tensors=GGUF_TENSORS, block_tensors=GGUF_BLOCK_TENSORS | GGUF_QKV_BIASES,
                  metadata=GGUF_METADATA, config={"qkv_bias": True}),
)
