"""``config.json`` of Hugging Face ``transformers`` <-> ``ModelConfig``, both ways.

Families: llama, mistral, qwen2, gpt2 (decoder-only), bert (encoder-only), t5 (encoder-decoder,
v1.0 and v1.1 / FLAN). Field meanings follow each family's ``transformers`` config class.
"""

from __future__ import annotations

from typing import Any

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError

SUPPORTED = ("llama", "mistral", "qwen2", "gpt2", "bert", "t5")


def _labels(hf: dict[str, Any]) -> list[str] | None:
    id2label = hf.get("id2label")
    if not id2label or hf.get("architectures", [""])[0].endswith(("Model", "LMHeadModel", "ForCausalLM",
                                                                    "ForConditionalGeneration", "ForMaskedLM")):
        return None
    return [str(id2label[k]) for k in sorted(id2label, key=int)]


def _llama_like(hf: dict[str, Any], model_type: str, common: dict[str, Any]) -> ModelConfig:
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise LmforgeError(f"config.json: hidden_act={act!r} is not supported; lmforge supports 'silu'")
    rope_params = hf.get("rope_parameters") or {}
    rope_scaling = hf.get("rope_scaling") or None
    if rope_params and rope_params.get("rope_type", "default") != "default":
        rope_scaling = {k: v for k, v in rope_params.items() if k != "rope_theta"}
    if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) in (None, "default"):
        rope_scaling = None
    return ModelConfig(
        family=model_type,
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
        qkv_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
        out_bias=model_type != "qwen2" and bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)),
        **common,
    )


def _gpt2(hf: dict[str, Any], common: dict[str, Any]) -> ModelConfig:
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


def _bert(hf: dict[str, Any], common: dict[str, Any]) -> ModelConfig:
    act = hf.get("hidden_act", "gelu")
    if act != "gelu":
        raise LmforgeError(f"config.json: hidden_act={act!r} is not supported for bert; lmforge supports 'gelu'")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise LmforgeError("config.json: only position_embedding_type='absolute' is supported for bert")
    archs = hf.get("architectures") or ["BertModel"]
    return ModelConfig(
        family="bert", arch="encoder", vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"],
        n_embd=hf["hidden_size"], n_head=hf["num_attention_heads"], intermediate_size=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 512), norm="layernorm", norm_eps=hf.get("layer_norm_eps", 1e-12),
        mlp="gelu_exact", positions="learned", qkv_bias=True, out_bias=True, mlp_bias=True, norm_first=False,
        type_vocab_size=hf.get("type_vocab_size", 2), pooler=archs[0] != "BertForMaskedLM",
        labels=_labels(hf), **common,
    )


def _t5(hf: dict[str, Any], common: dict[str, Any]) -> ModelConfig:
    ff = hf.get("feed_forward_proj", "relu")
    mlp = {"relu": "relu", "gated-gelu": "geglu", "gated-gelu_new": "geglu"}.get(ff)
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


def config_from_hf(hf: dict[str, Any], name: str = "custom") -> ModelConfig:
    """Build from a ``transformers`` config.json dict."""
    model_type = hf.get("model_type")
    common = dict(name=name, bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"),
                  pad_token_id=hf.get("pad_token_id"))
    try:
        if model_type in ("llama", "mistral", "qwen2"):
            return _llama_like(hf, model_type, common)
        if model_type == "gpt2":
            return _gpt2(hf, common)
        if model_type == "bert":
            return _bert(hf, common)
        if model_type == "t5":
            return _t5(hf, common)
    except KeyError as e:
        raise LmforgeError(f"config.json: missing field {e.args[0]!r} for model_type {model_type!r}") from None
    raise LmforgeError(f"config.json: model_type={model_type!r} is not a family lmforge supports; "
                       f"supported: {', '.join(SUPPORTED)}")


def config_to_hf(c: ModelConfig) -> dict[str, Any]:
    """The ``transformers`` config.json dict for ``c``."""
    tokens = dict(bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id)
    if c.family == "gpt2":
        if not (c.norm == "layernorm" and c.positions == "learned" and c.mlp == "gelu"):
            raise LmforgeError("a gpt2-family config needs layernorm, learned positions and a gelu MLP")
        return dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=c.vocab_size,
                    n_layer=c.n_layer, n_embd=c.n_embd, n_head=c.n_head, n_inner=c.intermediate_size,
                    n_positions=c.max_seq_len, layer_norm_epsilon=c.norm_eps, activation_function="gelu_new",
                    tie_word_embeddings=c.tie_embeddings, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **tokens)
    if c.family == "bert":
        out = dict(model_type="bert", architectures=["BertForSequenceClassification" if c.labels else "BertModel"],
                   vocab_size=c.vocab_size, num_hidden_layers=c.n_layer, hidden_size=c.n_embd,
                   num_attention_heads=c.n_head, intermediate_size=c.intermediate_size,
                   max_position_embeddings=c.max_seq_len, layer_norm_eps=c.norm_eps, hidden_act="gelu",
                   type_vocab_size=c.type_vocab_size, position_embedding_type="absolute",
                   hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **tokens)
        if c.labels:
            out.update(id2label={str(i): n for i, n in enumerate(c.labels)},
                       label2id={n: i for i, n in enumerate(c.labels)})
        return out
    if c.family == "t5":
        return dict(model_type="t5", architectures=["T5ForConditionalGeneration"], vocab_size=c.vocab_size,
                    num_layers=c.n_layer, num_decoder_layers=c.n_decoder_layer, d_model=c.n_embd,
                    num_heads=c.n_head, d_kv=c.head_dim, d_ff=c.intermediate_size, n_positions=c.max_seq_len,
                    layer_norm_epsilon=c.norm_eps,
                    feed_forward_proj={"relu": "relu", "geglu": "gated-gelu"}[c.mlp],
                    relative_attention_num_buckets=c.rel_buckets,
                    relative_attention_max_distance=c.rel_max_distance, tie_word_embeddings=c.tie_embeddings,
                    scale_decoder_outputs=c.scale_decoder_outputs,
                    decoder_start_token_id=c.decoder_start_token_id, dropout_rate=0.0, is_encoder_decoder=True,
                    **tokens)
    if not (c.norm == "rmsnorm" and c.positions == "rope" and c.mlp == "swiglu"):
        raise LmforgeError(f"a {c.family}-family config needs rmsnorm, rope and a swiglu MLP")
    arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
    if c.family not in arch:
        raise LmforgeError(f"cannot save family {c.family!r}; known: {', '.join(SUPPORTED)}")
    out: dict[str, Any] = dict(
        model_type=c.family, architectures=[arch[c.family]], vocab_size=c.vocab_size,
        num_hidden_layers=c.n_layer, hidden_size=c.n_embd, num_attention_heads=c.n_head,
        num_key_value_heads=c.n_kv_head, head_dim=c.head_dim, intermediate_size=c.intermediate_size,
        max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps, hidden_act="silu",
        rope_theta=c.rope_theta, rope_scaling=c.rope_scaling, tie_word_embeddings=c.tie_embeddings, **tokens,
    )
    if c.family == "qwen2":
        if c.out_bias or c.mlp_bias or not c.qkv_bias:
            raise LmforgeError("a qwen2-family config has biases on q, k, v only")
    else:
        if c.qkv_bias != c.out_bias:
            raise LmforgeError(f"{c.family} has one attention_bias flag: qkv_bias and out_bias must match")
        out.update(attention_bias=c.qkv_bias, mlp_bias=c.mlp_bias)
    return out
