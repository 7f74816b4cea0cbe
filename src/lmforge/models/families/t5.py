"""The T5 family (``model_type: t5``): encoder-decoder, v1.0 (relu, tied, scaled outputs) and
v1.1 / FLAN-T5 (gated gelu, untied).

RMS-style norms without bias, a bucketed relative position bias held by the first block of each
stack, unscaled attention. ``encoder.embed_tokens`` / ``decoder.embed_tokens`` are aliases of
``shared.weight``.
"""

from __future__ import annotations

from typing import Any

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.models.families.spec import Family, NameTemplates

FEED_FORWARD = {"relu": "relu", "gated-gelu": "geglu", "gated-gelu_new": "geglu"}  # feed_forward_proj -> mlp


def weight_names(config: ModelConfig) -> NameTemplates:
    out = [("shared.weight", "shared.weight"), ("lm_head.weight", "lm_head.weight")]
    ff = [("wi_0", "gate_proj"), ("wi_1", "up_proj")] if config.mlp == "geglu" else [("wi", "up_proj")]
    ff.append(("wo", "down_proj"))
    for stack in ("encoder", "decoder"):
        b = f"{stack}.block.{{i}}.layer"
        out += [(f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight", f"{stack}.rel_bias.weight"),
                (f"{b}.0.layer_norm.weight", f"{stack}.layers.{{i}}.input_layernorm.weight"),
                (f"{stack}.final_layer_norm.weight", f"{stack}.norm.weight")]
        out += [(f"{b}.0.SelfAttention.{x}.weight", f"{stack}.layers.{{i}}.self_attn.{x}_proj.weight") for x in "qkvo"]
        ff_layer = 2 if stack == "decoder" else 1
        out += [(f"{b}.{ff_layer}.DenseReluDense.{hf}.weight", f"{stack}.layers.{{i}}.mlp.{ours}.weight")
                for hf, ours in ff]
        out.append((f"{b}.{ff_layer}.layer_norm.weight", f"{stack}.layers.{{i}}.post_attention_layernorm.weight"))
    out += [(f"decoder.block.{{i}}.layer.1.EncDecAttention.{x}.weight",
             f"decoder.layers.{{i}}.cross_attn.{x}_proj.weight") for x in "qkvo"]
    out.append(("decoder.block.{i}.layer.1.layer_norm.weight", "decoder.layers.{i}.cross_attn_layernorm.weight"))
    return out


def from_hf(hf: dict[str, Any], common: dict[str, Any]) -> ModelConfig:
    ff = hf.get("feed_forward_proj", "relu")
    mlp = FEED_FORWARD.get(ff)
    if mlp is None:
        raise LmforgeError(f"config.json: feed_forward_proj={ff!r} is not supported for t5; "
                           "supported: relu (T5 v1.0), gated-gelu (T5 v1.1 / FLAN-T5)")
    tied = hf.get("tie_word_embeddings", True) is not False
    # T5 v1.0 scales the decoder output before its tied head; v1.1 does not. transformers 5 writes
    # the flag out; older configs signal v1.1 with tie_word_embeddings=false.
    scale = bool(hf.get("scale_decoder_outputs", tied))
    return ModelConfig(
        family="t5", arch="encoder-decoder", vocab_size=hf["vocab_size"], n_layer=hf["num_layers"],
        n_decoder_layer=hf.get("num_decoder_layers") or hf["num_layers"], n_embd=hf["d_model"],
        n_head=hf["num_heads"], head_dim=hf["d_kv"], intermediate_size=hf["d_ff"],
        max_seq_len=hf.get("n_positions", 512), norm="rmsnorm", norm_eps=hf.get("layer_norm_epsilon", 1e-6),
        mlp=mlp, positions="relative", rel_buckets=hf.get("relative_attention_num_buckets", 32),
        rel_max_distance=hf.get("relative_attention_max_distance", 128), attention_scale=1.0,
        tie_embeddings=tied, scale_decoder_outputs=scale,
        decoder_start_token_id=hf.get("decoder_start_token_id", hf.get("pad_token_id", 0)), **common,
    )


def to_hf(c: ModelConfig) -> dict[str, Any]:
    if c.mlp not in ("relu", "geglu"):
        raise LmforgeError(f"a t5-family config needs a relu or geglu MLP, not {c.mlp!r}")
    return dict(architectures=["T5ForConditionalGeneration"], vocab_size=c.vocab_size,
                num_layers=c.n_layer, num_decoder_layers=c.n_decoder_layer, d_model=c.n_embd,
                num_heads=c.n_head, d_kv=c.head_dim, d_ff=c.intermediate_size, n_positions=c.max_seq_len,
                layer_norm_epsilon=c.norm_eps,
                feed_forward_proj={"relu": "relu", "geglu": "gated-gelu"}[c.mlp],
                relative_attention_num_buckets=c.rel_buckets,
                relative_attention_max_distance=c.rel_max_distance, tie_word_embeddings=c.tie_embeddings,
                scale_decoder_outputs=c.scale_decoder_outputs,
                decoder_start_token_id=c.decoder_start_token_id, dropout_rate=0.0, is_encoder_decoder=True)


FAMILY = Family(
    name="t5",
    arch="encoder-decoder",
    from_hf=from_hf,
    to_hf=to_hf,
    weight_names=weight_names,
    ignored=r"(encoder|decoder)\.embed_tokens\.weight",  # aliases of shared.weight
)
