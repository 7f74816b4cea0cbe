"""Tensor names: transformers' checkpoint names <-> lmforge's parameter names, per family.

Llama, Mistral and Qwen2 share lmforge's names already. GPT-2, BERT and T5 are mapped with
templates: ``{i}`` is a layer index, ``{p}`` is ``weight`` or ``bias``. GPT-2's Conv1D weights
are stored transposed (in x out). Names that are aliases of a tied tensor, or buffers old
checkpoints carry (``position_ids``, ``attn.bias``), are skipped.
"""

from __future__ import annotations

import re

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError

GPT2 = [
    ("wte.weight", "model.embed_tokens.weight"),
    ("wpe.weight", "model.embed_positions.weight"),
    ("h.{i}.ln_1.{p}", "model.layers.{i}.input_layernorm.{p}"),
    ("h.{i}.attn.c_attn.{p}", "model.layers.{i}.self_attn.qkv_proj.{p}"),
    ("h.{i}.attn.c_proj.{p}", "model.layers.{i}.self_attn.o_proj.{p}"),
    ("h.{i}.ln_2.{p}", "model.layers.{i}.post_attention_layernorm.{p}"),
    ("h.{i}.mlp.c_fc.{p}", "model.layers.{i}.mlp.up_proj.{p}"),
    ("h.{i}.mlp.c_proj.{p}", "model.layers.{i}.mlp.down_proj.{p}"),
    ("ln_f.{p}", "model.norm.{p}"),
]
GPT2_CONV1D = re.compile(r".*\.(c_attn|c_proj|c_fc)\.weight$")

BERT = [
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
BERT_MLM_HEAD = [
    ("cls.predictions.transform.dense.{p}", "predictions.transform.dense.{p}"),
    ("cls.predictions.transform.LayerNorm.{p}", "predictions.transform.LayerNorm.{p}"),
    ("cls.predictions.bias", "predictions.bias"),
]


def _t5(gated: bool) -> list[tuple[str, str]]:
    out = [("shared.weight", "shared.weight"), ("lm_head.weight", "lm_head.weight")]
    ff = [("wi_0", "gate_proj"), ("wi_1", "up_proj")] if gated else [("wi", "up_proj")]
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


_SKIPPED = re.compile(r".*(rotary_emb\.inv_freq|\.attn\.bias|\.attn\.masked_bias|position_ids)$|^cls\.predictions\.")


def templates(config: ModelConfig) -> list[tuple[str, str]] | None:
    """(transformers name, lmforge name) templates, or None when the names are identical."""
    if config.family == "gpt2":
        return [("transformer." + hf, ours) for hf, ours in GPT2]
    if config.family == "bert":
        if config.labels:  # BertForSequenceClassification
            return [("bert." + hf, "encoder." + ours) for hf, ours in BERT] + [("classifier.{p}", "classifier.{p}")]
        return BERT
    if config.family == "t5":
        return _t5(gated=config.mlp == "geglu")
    return None


def _compile(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)"))


def rename(name: str, pairs: list[tuple[str, str]], to_lmforge: bool) -> str | None:
    """Map one name across the two namings; None if it matches no template."""
    for hf, ours in pairs:
        src, dst = (hf, ours) if to_lmforge else (ours, hf)
        m = _compile(src).fullmatch(name)
        if m:
            return dst.format(**m.groupdict())
    return None


def to_lmforge(config: ModelConfig, tensors: dict) -> dict:
    """A transformers state dict under lmforge's names (GPT-2's Conv1D weights transposed)."""
    pairs = templates(config)
    out = {}
    for name, t in tensors.items():
        if _SKIPPED.match(name):
            continue
        if pairs is None:
            out[name] = t
            continue
        key = name
        if config.family == "gpt2" and not name.startswith(("transformer.", "lm_head.")):
            key = "transformer." + name  # original GPT-2 checkpoints have no prefix
        if config.family == "bert" and config.labels is None and name.startswith("bert."):
            key = name.removeprefix("bert.")
        ours = "lm_head.weight" if key == "lm_head.weight" else rename(key, pairs, to_lmforge=True)
        if ours is None:
            if config.family == "t5" and key.endswith(".embed_tokens.weight"):
                continue  # an alias of shared.weight
            raise LmforgeError(f"unexpected tensor {name!r} in a {config.family} checkpoint")
        out[ours] = t.t().contiguous() if config.family == "gpt2" and GPT2_CONV1D.match(key) else t
    return out


def mlm_head(tensors: dict) -> dict:
    """The masked-LM head of a ``BertForMaskedLM`` state dict under ``MaskedLM``'s names
    (``predictions.*``); empty when the checkpoint has none (a ``BertModel``). ``to_lmforge`` skips
    these tensors, so the same checkpoint also loads as a plain encoder."""
    out = {}
    for name, t in tensors.items():
        ours = rename(name, BERT_MLM_HEAD, to_lmforge=True) if name.startswith("cls.predictions.") else None
        if ours is not None:
            out[ours] = t
    if "predictions.bias" not in out and "cls.predictions.decoder.bias" in tensors:
        out["predictions.bias"] = tensors["cls.predictions.decoder.bias"]
    return out


def to_hf(config: ModelConfig, state: dict) -> dict:
    """The inverse of ``to_lmforge``: tensors named as transformers saves them."""
    pairs = templates(config)
    if pairs is None:
        return dict(state)
    out = {}
    for name, t in state.items():
        hf = "lm_head.weight" if name == "lm_head.weight" else rename(name, pairs, to_lmforge=False)
        assert hf is not None, f"no {config.family} name for {name}"
        out[hf] = t.t().contiguous() if config.family == "gpt2" and GPT2_CONV1D.match(hf) else t
    return out
