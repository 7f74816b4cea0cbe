"""Logits parity with transformers for every decoder family, and checkpoint round trips."""

import pytest
import torch
from tests.conftest import HF_CONFIGS

from lmforge.checkpoints.hf import read_hf_dir, save_hf_dir
from lmforge.checkpoints.hf_config import config_from_hf
from lmforge.checkpoints.resolve import build_model
from lmforge.config import ModelConfig, preset
from lmforge.errors import LmforgeError
from lmforge.models.decoder import DecoderLM

FAMILIES = list(HF_CONFIGS)


def _ours(path):
    config, state, _ = read_hf_dir(path)
    return build_model(config, state)


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_match_transformers(hf_tiny, name):
    hf, path = hf_tiny[name]
    ours = _ours(path)
    x = torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = hf(x).logits, ours(x)
    assert expected.abs().max() > 1.0  # the weights are not trivially small
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_saved_directory_loads_in_transformers(hf_tiny, name, tmp_path):
    import transformers

    _, path = hf_tiny[name]
    ours = _ours(path)
    save_hf_dir(ours, tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    x = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, ours(x), atol=1e-4, rtol=0)
    assert not list(tmp_path.glob("*.tmp"))  # nothing half-written left behind


def test_left_padding_matches_transformers(hf_tiny):
    """A padded batch (attention mask + position ids) gives the same logits on the real tokens."""
    hf, path = hf_tiny["llama"]
    ours = _ours(path)
    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[0, :5] = False
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = hf(x, attention_mask=mask.long(), position_ids=pos).logits
        got = ours(x, positions=pos, key_mask=mask)
    torch.testing.assert_close(got[mask], expected[mask], atol=1e-4, rtol=0)


def test_sharded_checkpoint(hf_tiny, tmp_path):
    hf, _ = hf_tiny["qwen2"]
    hf.save_pretrained(tmp_path, max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours = _ours(tmp_path)
    x = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name,params", [("smollm2-135m", 134_515_008), ("smollm2-360m", 361_821_120),
                                         ("gpt2", 124_439_808), ("llama-3.2-1b", 1_235_814_400)])
def test_presets_have_published_parameter_counts(name, params):
    assert preset(name).num_parameters() == params


def test_preset_parameter_count_matches_module():
    for name in ("tiny-llama", "tiny-gpt2"):
        model = DecoderLM(preset(name))
        assert sum(p.numel() for p in model.parameters()) == preset(name).num_parameters()


def test_bad_configs():
    with pytest.raises(LmforgeError, match="unknown preset"):
        preset("gpt5")
    with pytest.raises(LmforgeError, match="n_head .* multiple of n_kv_head"):
        ModelConfig(n_head=4, n_kv_head=3)
    with pytest.raises(LmforgeError, match="norm='batchnorm'"):
        ModelConfig(norm="batchnorm")
    with pytest.raises(LmforgeError, match="model_type='roberta'"):
        config_from_hf({"model_type": "roberta"})
    with pytest.raises(LmforgeError, match="missing field 'hidden_size'"):
        config_from_hf({"model_type": "llama", "vocab_size": 10, "num_hidden_layers": 1,
                                  "num_attention_heads": 1, "intermediate_size": 4})


def test_weights_that_do_not_fit_the_config():
    model = DecoderLM(preset("tiny-llama")).init_weights(seed=0)
    state = model.state_dict()
    state["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(LmforgeError, match=r"model.layers.0.mlp.up_proj.weight has shape \(3, 3\)"):
        build_model(model.config, state)
    del state["model.norm.weight"]
    with pytest.raises(LmforgeError, match="missing 1 tensor"):
        build_model(model.config, state)


def test_corrupt_and_pickled_checkpoints(hf_tiny, tmp_path):
    _, path = hf_tiny["llama"]
    bad = tmp_path / "truncated"
    bad.mkdir()
    (bad / "config.json").write_bytes((path / "config.json").read_bytes())
    data = (path / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(LmforgeError, match="model.safetensors: cannot read safetensors file"):
        read_hf_dir(bad)
    (bad / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(LmforgeError, match="truncated or corrupt"):
        read_hf_dir(bad)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_bytes((path / "config.json").read_bytes())
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(LmforgeError, match="safetensors only"):
        read_hf_dir(pickled)
    (pickled / "config.json").write_text("{not json")
    with pytest.raises(LmforgeError, match="config.json: not valid JSON"):
        read_hf_dir(pickled)


@pytest.mark.parametrize("T", [16, 128, 129])
def test_bf16_attention_paths_agree_with_float32(T):
    """Short bf16 sequences on CPU take the plain matmul path (attention.SHORT_BF16), longer ones the fused
    kernel: both give the float32 model's causal logits within bf16 rounding."""
    torch.manual_seed(0)
    model = DecoderLM(preset("tiny-llama", vocab_size=64, n_layer=2, max_seq_len=256)).init_weights(seed=0, std=0.1)
    idx = torch.randint(0, 64, (2, T))
    ref = model(idx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(idx).float()
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()
    # causality: changing the last token leaves every earlier position's logits alone
    idx2 = idx.clone()
    idx2[:, -1] = (idx[:, -1] + 1) % 64
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(model(idx2)[:, :-1], model(idx)[:, :-1], rtol=0, atol=0)


def test_bf16_inference_attends_in_float32_and_training_in_bf16(hf_tiny, monkeypatch):
    """attention_dtype: a bfloat16 model on CPU keeps its KV cache in float32 and attends in float32 at inference
    (no grad, or a cache), in bfloat16 when training; its outputs stay bfloat16 either way."""
    from lmforge.models import attention

    model = _ours(hf_tiny["llama"][1]).to(torch.bfloat16)
    assert model.make_caches(1, 8)[0].k.dtype == torch.float32
    assert _ours(hf_tiny["llama"][1]).make_caches(1, 8)[0].k.dtype == torch.float32  # a float32 model: its own
    seen = []
    real = attention.grouped_attention
    monkeypatch.setattr(attention, "grouped_attention", lambda q, k, v, *a: seen.append((q.dtype, k.dtype))
                        or real(q, k, v, *a))
    x = torch.randint(0, 256, (1, 1))  # one query: the grouped_attention path
    with torch.no_grad():
        out = model(x)
        model(x, caches=model.make_caches(1, 8))
    assert out.dtype == torch.bfloat16 and set(seen) == {(torch.float32, torch.float32)}
    seen.clear()
    model(x).float().sum().backward()
    assert set(seen) == {(torch.bfloat16, torch.bfloat16)}
    x = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # float32 attention is closer to the float32 model than bfloat16 attention was
        ref = _ours(hf_tiny["llama"][1])(x)
        with monkeypatch.context() as m:
            m.setattr(attention, "attention_dtype", lambda dtype, device: dtype)
            before = model(x)
        assert (model(x).float() - ref).abs().max() <= (before.float() - ref).abs().max()
