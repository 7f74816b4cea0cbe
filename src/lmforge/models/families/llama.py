"""The Llama family (``model_type: llama``), and the helpers Mistral and Qwen2 share with it.

RMSNorm pre-norm blocks, RoPE (optionally with llama3 / linear scaling), a SwiGLU MLP and
grouped-query attention. lmforge's module names are Llama's, so weights need no renaming.
llama.cpp stores it as GGUF architecture ``llama`` with q/k rows permuted.
"""

from __future__ import annotations

from typing import Any

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.models.families.spec import Family, GGUFSpec

# llama.cpp's names, shared by the architectures it converts from Llama-shaped checkpoints
GGUF_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
GGUF_BLOCK_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
GGUF_METADATA = {
    "vocab_size": "vocab_size",
    "n_layer": "block_count",
    "n_embd": "embedding_length",
    "n_head": "attention.head_count",
    "n_kv_head": "attention.head_count_kv",
    "head_dim": "attention.key_length",
    "intermediate_size": "feed_forward_length",
    "max_seq_len": "context_length",
    "norm_eps": "attention.layer_norm_rms_epsilon",
    "rope_theta": "rope.freq_base",
    "rope_dimensions": "rope.dimension_count",
    "rope_scaling_type": "rope.scaling.type",
    "rope_scaling_factor": "rope.scaling.factor",
    "rope_original_context": "rope.scaling.original_context_length",
}


def rope_decoder_from_hf(hf: dict[str, Any], common: dict[str, Any], family: str,
                         qkv_bias_only: bool = False) -> ModelConfig:
    """A Llama-shaped config.json (Llama, Mistral, Qwen2) -> ModelConfig. ``qkv_bias_only``: biases on
    q, k and v and nowhere else (Qwen2), instead of Llama's ``attention_bias`` / ``mlp_bias`` flags."""
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise LmforgeError(f"config.json: hidden_act={act!r} is not supported; lmforge supports 'silu'")
    rope_params = hf.get("rope_parameters") or {}
    rope_scaling = hf.get("rope_scaling") or None
    if rope_params and rope_params.get("rope_type", "default") != "default":
        rope_scaling = {k: v for k, v in rope_params.items() if k != "rope_theta"}
    if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) in (None, "default"):
        rope_scaling = None
    attention_bias = bool(hf.get("attention_bias", False))
    return ModelConfig(
        family=family,
        vocab_size=hf["vocab_size"],
        n_layer=hf["num_hidden_layers"],
        n_embd=hf["hidden_size"],
        n_head=hf["num_attention_heads"],
        n_kv_head=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        intermediate_size=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048),
        norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        mlp="swiglu",
        positions="rope",
        rope_theta=float(rope_params.get("rope_theta", hf.get("rope_theta", 10000.0))),
        rope_scaling=rope_scaling,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias_only or attention_bias,
        out_bias=not qkv_bias_only and attention_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        **common,
    )


def rope_decoder_to_hf(c: ModelConfig, architecture: str, qkv_bias_only: bool = False) -> dict[str, Any]:
    """The inverse of ``rope_decoder_from_hf`` (without model_type and token ids)."""
    if not (c.norm == "rmsnorm" and c.positions == "rope" and c.mlp == "swiglu"):
        raise LmforgeError(f"a {c.family}-family config needs rmsnorm, rope and a swiglu MLP")
    out: dict[str, Any] = dict(
        architectures=[architecture], vocab_size=c.vocab_size,
        num_hidden_layers=c.n_layer, hidden_size=c.n_embd, num_attention_heads=c.n_head,
        num_key_value_heads=c.n_kv_head, head_dim=c.head_dim, intermediate_size=c.intermediate_size,
        max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps, hidden_act="silu",
        rope_theta=c.rope_theta, rope_scaling=c.rope_scaling, tie_word_embeddings=c.tie_embeddings,
    )
    if qkv_bias_only:
        if c.out_bias or c.mlp_bias or not c.qkv_bias:
            raise LmforgeError(f"a {c.family}-family config has biases on q, k, v only")
    else:
        if c.qkv_bias != c.out_bias:
            raise LmforgeError(f"{c.family} has one attention_bias flag: qkv_bias and out_bias must match")
        out.update(attention_bias=c.qkv_bias, mlp_bias=c.mlp_bias)
    return out


# checkpoints of older transformers versions carry the RoPE frequencies as a buffer
ROPE_BUFFERS = r".*rotary_emb\.inv_freq"

FAMILY = Family(
    name="llama",
    arch="decoder",
    from_hf=lambda hf, common: rope_decoder_from_hf(hf, common, "llama"),
    to_hf=lambda c: rope_decoder_to_hf(c, "LlamaForCausalLM"),
    ignored=ROPE_BUFFERS,
    gguf=GGUFSpec(architecture="llama", tensors=GGUF_TENSORS, block_tensors=GGUF_BLOCK_TENSORS,
                  metadata=GGUF_METADATA, permuted_qk=True),
)
