"""The model-family registry is the single source of family knowledge (lmforge.models.families).

Every registered family maps its config.json and its tensor names both ways without loss; the
generic checkpoint code branches on no family name; and registering one new module's worth of
data (a toy family: Llama under another model_type, with its own tensor names) is enough for a
checkpoint of that type to load, match transformers' Llama logits, and save back.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmforge.checkpoints.hf import read_hf_dir, save_hf_dir
from lmforge.checkpoints.hf_config import config_from_hf, config_to_hf
from lmforge.checkpoints.names import to_hf, to_lmforge
from lmforge.checkpoints.resolve import build_model
from lmforge.config import ModelConfig, preset
from lmforge.errors import LmforgeError
from lmforge.models import build_empty, families
from lmforge.models.families import Family
from lmforge.models.families.llama import rope_decoder_from_hf, rope_decoder_to_hf

SRC = Path(__file__).resolve().parents[1] / "src" / "lmforge"

_BERT = dict(arch="encoder", vocab_size=50, n_layer=2, n_embd=32, n_head=2, intermediate_size=64, max_seq_len=64,
             norm="layernorm", norm_eps=1e-12, mlp="gelu_exact", positions="learned", qkv_bias=True, out_bias=True,
             mlp_bias=True, norm_first=False, type_vocab_size=2, pooler=True)
_T5 = dict(arch="encoder-decoder", vocab_size=50, n_layer=2, n_decoder_layer=3, n_embd=32, n_head=2, head_dim=16,
           intermediate_size=64, max_seq_len=64, norm="rmsnorm", norm_eps=1e-6, positions="relative", rel_buckets=8,
           rel_max_distance=32, attention_scale=1.0, decoder_start_token_id=0, pad_token_id=0)
# one or more tiny configs per built-in family, each a shape the family's config.json can express
TINY = {
    "llama": [preset("tiny-llama", rope_scaling={"rope_type": "linear", "factor": 2.0}),
              preset("tiny-llama", tie_embeddings=True, qkv_bias=True, out_bias=True, mlp_bias=True)],
    "mistral": [preset("tiny-llama", family="mistral")],
    "qwen2": [preset("tiny-llama", family="qwen2", qkv_bias=True)],
    "gpt2": [preset("tiny-gpt2"), preset("tiny-gpt2", tie_embeddings=False)],
    "bert": [ModelConfig(name="x", family="bert", **_BERT),
             ModelConfig(name="x", family="bert", **_BERT, labels=["neg", "pos", "neutral"])],
    "t5": [ModelConfig(name="x", family="t5", **_T5, mlp="relu", tie_embeddings=True, scale_decoder_outputs=True),
           ModelConfig(name="x", family="t5", **_T5, mlp="geglu", tie_embeddings=False)],
}


def _configs():
    return [pytest.param(c, id=f"{name}-{i}") for name, cs in TINY.items() for i, c in enumerate(cs)]


def test_every_registered_family_has_tiny_configs_here():
    assert set(families.names()) == set(TINY)


@pytest.mark.parametrize("config", _configs())
def test_config_json_round_trip(config):
    hf = config_to_hf(config)
    assert hf["model_type"] == config.family
    assert families.family_for_hf(hf["model_type"]) is families.get(config.family)
    back = config_from_hf(json.loads(json.dumps(hf)), name=config.name)
    assert dataclasses.asdict(back) == dataclasses.asdict(config)


@pytest.mark.parametrize("config", _configs())
def test_weight_names_round_trip(config):
    """Every parameter of the model gets a transformers name, and reading those names back gives the same
    tensors under the same lmforge names (transposed weights included)."""
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.randn(p.shape, generator=gen) for k, p in build_empty(config).named_parameters()}
    hf = to_hf(config, state)
    assert len(hf) == len(state)
    back = to_lmforge(config, hf)
    assert set(back) == set(state)
    for k, t in state.items():
        assert torch.equal(back[k], t), k


def test_lookups_name_the_problem_and_the_known_values():
    with pytest.raises(LmforgeError, match=r"model_type='roberta'.*supported: llama, mistral, qwen2, gpt2, bert, t5"):
        families.family_for_hf("roberta")
    with pytest.raises(LmforgeError, match=r"unknown model family 'falcon'; known: llama"):
        families.get("falcon")
    with pytest.raises(LmforgeError, match="unknown model family 'falcon'"):
        config_to_hf(preset("tiny-llama", family="falcon"))
    with pytest.raises(LmforgeError, match=r"cannot register model family 'llama': name 'llama', model_type 'llama'"):
        families.register(families.get("llama"))
    assert families.gguf_architectures() == ["llama", "qwen2"]
    assert families.family_for_gguf("qwen2") is families.get("qwen2")
    assert families.family_for_gguf("falcon") is None


def test_generic_code_branches_on_no_family_name():
    """Family knowledge lives in models/families only: no ``family == ...`` chains elsewhere."""
    names = "llama|mistral|qwen2|gpt2|bert|t5"
    pattern = re.compile(rf"""\b(family|model_type)\s*(==|!=|in)\s*[(\["']"""  # family == "gpt2", model_type in (...)
                         rf"""|==\s*["']({names.replace("gpt2|", "")})["']"""  # arch == "qwen2" (gpt2 also names a tokenizer)
                         rf"""|\{{\s*["']({names})["']\s*:""")  # {"bert": "encoder", ...}
    offenders = []
    for path in SRC.rglob("*.py"):
        if "families" in path.parts:
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if pattern.search(line.split("#", 1)[0]):
                offenders.append(f"{path.relative_to(SRC)}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_capabilities_are_not_probed_with_hasattr():
    """Optional parts are attributes that are None when absent, capabilities are types or protocols; only
    duck typing on foreign objects (numpy/torch scalars, argparse namespaces) is left."""
    def foreign(p: Path) -> bool:  # the tokenizer takes numpy/torch values; cli/ reads argparse namespaces
        return p.relative_to(SRC) == Path("tokenizer.py") or p.relative_to(SRC).parts[0] == "cli"

    offenders = [f"{p.relative_to(SRC)}:{n}" for p in SRC.rglob("*.py") if not foreign(p)
                 for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if "hasattr(" in line]
    assert not offenders, offenders


# ---- a new family is one module's worth of data ------------------------------------------------------------------

_LEAVES = ["input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight",
           "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight", "mlp.gate_proj.weight",
           "mlp.up_proj.weight", "mlp.down_proj.weight"]


def _toy_names(config: ModelConfig) -> list[tuple[str, str]]:
    """The toy format calls the body ``backbone`` and the head ``head``."""
    return ([("backbone.embed_tokens.weight", "model.embed_tokens.weight"), ("backbone.norm.weight", "model.norm.weight"),
             ("head.weight", "lm_head.weight")]
            + [(f"backbone.layers.{{i}}.{leaf}", f"model.layers.{{i}}.{leaf}") for leaf in _LEAVES])


TOY = Family(
    name="toyllama",
    arch="decoder",
    from_hf=lambda hf, common: rope_decoder_from_hf(hf, common, "toyllama"),
    to_hf=lambda c: rope_decoder_to_hf(c, "ToyLlamaForCausalLM"),
    weight_names=_toy_names,
    ignored=r".*rotary_emb\.inv_freq",
)


@pytest.fixture
def toy_checkpoint(hf_tiny, tmp_path):
    """transformers' tiny Llama rewritten as a 'toyllama' checkpoint: its own model_type and tensor names."""
    hf, path = hf_tiny["llama"]
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(model_type="toyllama", architectures=["ToyLlamaForCausalLM"])
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    renamed = {("head." + k.removeprefix("lm_head.")) if k.startswith("lm_head.") else "backbone." + k.removeprefix("model."): v
               for k, v in load_file(str(path / "model.safetensors")).items()}
    save_file(renamed, str(tmp_path / "model.safetensors"))
    yield hf, tmp_path
    families.unregister("toyllama")


def test_registering_a_toy_family_makes_its_checkpoints_load_and_save(toy_checkpoint, tmp_path):
    hf, path = toy_checkpoint
    with pytest.raises(LmforgeError, match="model_type='toyllama' is not a family lmforge supports"):
        read_hf_dir(path)
    families.register(TOY)
    config, state, _ = read_hf_dir(path)
    assert config.family == "toyllama"
    ours = build_model(config, state)
    x = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = hf(x).logits
        torch.testing.assert_close(ours(x), expected, atol=1e-4, rtol=0)
    out = save_hf_dir(ours, tmp_path / "saved")
    saved = load_file(str(out / "model.safetensors"))
    assert json.loads((out / "config.json").read_text())["model_type"] == "toyllama"
    assert "head.weight" in saved and "backbone.layers.1.mlp.down_proj.weight" in saved
    config2, state2, _ = read_hf_dir(out)
    with torch.no_grad():
        torch.testing.assert_close(build_model(config2, state2)(x), expected, atol=1e-4, rtol=0)
