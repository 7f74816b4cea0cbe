"""The GPT-2 family (``model_type: gpt2``).

LayerNorm pre-norm blocks, learned absolute positions, a tanh-gelu MLP, one fused qkv projection
and biases everywhere. transformers stores the linear layers as ``Conv1D``, weights (in, out), so
those are transposed on the way in and out; original OpenAI checkpoints lack the ``transformer.`` prefix.
"""

from __future__ import annotations

from typing import Any

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.models.families.spec import Family, NameTemplates

WEIGHT_NAMES: NameTemplates = [
    ("transformer.wte.weight", "model.embed_tokens.weight"),
    ("transformer.wpe.weight", "model.embed_positions.weight"),
    ("transformer.h.{i}.ln_1.{p}", "model.layers.{i}.input_layernorm.{p}"),
    ("transformer.h.{i}.attn.c_attn.{p}", "model.layers.{i}.self_attn.qkv_proj.{p}"),
    ("transformer.h.{i}.attn.c_proj.{p}", "model.layers.{i}.self_attn.o_proj.{p}"),
    ("transformer.h.{i}.ln_2.{p}", "model.layers.{i}.post_attention_layernorm.{p}"),
    ("transformer.h.{i}.mlp.c_fc.{p}", "model.layers.{i}.mlp.up_proj.{p}"),
    ("transformer.h.{i}.mlp.c_proj.{p}", "model.layers.{i}.mlp.down_proj.{p}"),
    ("transformer.ln_f.{p}", "model.norm.{p}"),
    ("lm_head.weight", "lm_head.weight"),
]


def from_hf(hf: dict[str, Any], common: dict[str, Any]) -> ModelConfig:
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise LmforgeError(f"config.json: activation_function={act!r} is not supported; lmforge supports 'gelu_new'")
    n_embd = hf.get("n_embd", 768)
    return ModelConfig(
        family="gpt2", vocab_size=hf.get("vocab_size", 50257), n_layer=hf.get("n_layer", 12), n_embd=n_embd,
        n_head=hf.get("n_head", 12), intermediate_size=hf.get("n_inner") or 4 * n_embd,
        max_seq_len=hf.get("n_positions", 1024), norm="layernorm", norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        mlp="gelu", positions="learned", tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        qkv_bias=True, out_bias=True, mlp_bias=True, fused_qkv=True, **common,
    )


def to_hf(c: ModelConfig) -> dict[str, Any]:
    if not (c.norm == "layernorm" and c.positions == "learned" and c.mlp == "gelu"):
        raise LmforgeError("a gpt2-family config needs layernorm, learned positions and a gelu MLP")
    return dict(architectures=["GPT2LMHeadModel"], vocab_size=c.vocab_size,
                n_layer=c.n_layer, n_embd=c.n_embd, n_head=c.n_head, n_inner=c.intermediate_size,
                n_positions=c.max_seq_len, layer_norm_epsilon=c.norm_eps, activation_function="gelu_new",
                tie_word_embeddings=c.tie_embeddings, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


FAMILY = Family(
    name="gpt2",
    arch="decoder",
    from_hf=from_hf,
    to_hf=to_hf,
    weight_names=lambda config: WEIGHT_NAMES,
    hf_prefix="transformer.",
    transposed=r".*\.(c_attn|c_proj|c_fc)\.weight",
    ignored=r".*\.attn\.(bias|masked_bias)",  # causal-mask buffers of older checkpoints
)
