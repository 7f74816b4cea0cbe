"""The embedded SmolLM2-135M-Instruct: our GGUF path against transformers' GGUF path, end to end."""

import pytest
import torch

from lmforge.cli import main
from lmforge.generation.generate import generate_tokens

pytestmark = pytest.mark.real

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_logits_match_transformers_gguf_loader(real_lm, hf_real_model):
    ids = torch.tensor([real_lm.encode(QUESTION)])
    with torch.no_grad():
        expected = hf_real_model(ids).logits
        got = real_lm.model(ids)
    assert got.shape == expected.shape == (1, ids.shape[1], 49152)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_greedy_32_tokens_equal_transformers_generate(real_lm, hf_real_model):
    prompt = real_lm.encode(QUESTION)
    with torch.no_grad():
        expected = hf_real_model.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32,
                                          do_sample=False, eos_token_id=None, pad_token_id=2)[0, len(prompt):]
    ours = [step[0] for step in generate_tokens(real_lm.model, [prompt], 32)]
    assert ours == expected.tolist()


def test_cached_equals_uncached_on_real_weights(real_lm):
    prompt = real_lm.encode("Name three fruits.")
    cached = [s[0] for s in generate_tokens(real_lm.model, [prompt], 24)]
    uncached = [s[0] for s in generate_tokens(real_lm.model, [prompt], 24, use_cache=False)]
    assert cached == uncached


def test_api_answers_paris(real_lm):
    answer = real_lm.generate("What is the capital of France?", max_new_tokens=32)
    assert "Paris" in answer
    streamed = "".join(real_lm.stream("What is the capital of France?", max_new_tokens=32))
    assert streamed == answer


def test_batched_generation_equals_one_by_one(real_lm):
    prompts = ["What is the capital of France?", "Say hello.", "Count from one to five in words."]
    batched = real_lm.generate(prompts, max_new_tokens=20)
    alone = [real_lm.generate(p, max_new_tokens=20) for p in prompts]
    assert batched == alone


def test_readme_example_on_the_command_line(capsys):
    assert main(["generate", "What is the capital of France?", "--max-new-tokens", "32"]) == 0
    assert "Paris" in capsys.readouterr().out
