"""The BERT family (``model_type: bert``): encoder-only, post-norm, learned positions, token types.

``BertModel`` checkpoints carry the encoder's names bare, the task classes (``BertForMaskedLM``,
``BertForSequenceClassification``) under ``bert.``. A sequence classifier (config with labels)
keeps the ``bert.`` prefix plus ``classifier.*``; ``BertForMaskedLM``'s head (``cls.predictions.*``)
is skipped unless asked for (``MLM_HEAD``, read by ``read_hf_dir(..., with_mlm_head=True)``).
"""

from __future__ import annotations

from typing import Any

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.models.families.spec import Family, NameTemplates, labels_from_hf

WEIGHT_NAMES: NameTemplates = [
    ("embeddings.word_embeddings.weight", "embed_tokens.weight"),
    ("embeddings.position_embeddings.weight", "embed_positions.weight"),
    ("embeddings.token_type_embeddings.weight", "embed_types.weight"),
    ("embeddings.LayerNorm.{p}", "embed_norm.{p}"),
    ("encoder.layer.{i}.attention.self.query.{p}", "layers.{i}.self_attn.q_proj.{p}"),
    ("encoder.layer.{i}.attention.self.key.{p}", "layers.{i}.self_attn.k_proj.{p}"),
    ("encoder.layer.{i}.attention.self.value.{p}", "layers.{i}.self_attn.v_proj.{p}"),
    ("encoder.layer.{i}.attention.output.dense.{p}", "layers.{i}.self_attn.o_proj.{p}"),
    ("encoder.layer.{i}.attention.output.LayerNorm.{p}", "layers.{i}.attn_layernorm.{p}"),
    ("encoder.layer.{i}.intermediate.dense.{p}", "layers.{i}.mlp.up_proj.{p}"),
    ("encoder.layer.{i}.output.dense.{p}", "layers.{i}.mlp.down_proj.{p}"),
    ("encoder.layer.{i}.output.LayerNorm.{p}", "layers.{i}.mlp_layernorm.{p}"),
    ("pooler.dense.{p}", "pooler.{p}"),
]
# BertForMaskedLM's head under MaskedLM's names (models/mlm.py). The decoder weight is the tied word
# embedding matrix; ``cls.predictions.decoder.bias`` is an alias of ``cls.predictions.bias``.
MLM_HEAD: NameTemplates = [
    ("cls.predictions.transform.dense.{p}", "predictions.transform.dense.{p}"),
    ("cls.predictions.transform.LayerNorm.{p}", "predictions.transform.LayerNorm.{p}"),
    ("cls.predictions.bias", "predictions.bias"),
]


def weight_names(config: ModelConfig) -> NameTemplates:
    if config.labels:  # BertForSequenceClassification
        return [("bert." + hf, "encoder." + ours) for hf, ours in WEIGHT_NAMES] + [("classifier.{p}", "classifier.{p}")]
    return WEIGHT_NAMES


def from_hf(hf: dict[str, Any], common: dict[str, Any]) -> ModelConfig:
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
        labels=labels_from_hf(hf), **common,
    )


def to_hf(c: ModelConfig) -> dict[str, Any]:
    out = dict(architectures=["BertForSequenceClassification" if c.labels else "BertModel"],
               vocab_size=c.vocab_size, num_hidden_layers=c.n_layer, hidden_size=c.n_embd,
               num_attention_heads=c.n_head, intermediate_size=c.intermediate_size,
               max_position_embeddings=c.max_seq_len, layer_norm_eps=c.norm_eps, hidden_act="gelu",
               type_vocab_size=c.type_vocab_size, position_embedding_type="absolute",
               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if c.labels:
        out.update(id2label={str(i): n for i, n in enumerate(c.labels)},
                   label2id={n: i for i, n in enumerate(c.labels)})
    return out


FAMILY = Family(
    name="bert",
    arch="encoder",
    from_hf=from_hf,
    to_hf=to_hf,
    weight_names=weight_names,
    hf_prefix="bert.",
    ignored=r".*position_ids|cls\.predictions\..*",  # a buffer; the MLM head (see MLM_HEAD)
    mlm_head=MLM_HEAD,
)
