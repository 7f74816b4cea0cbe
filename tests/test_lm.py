"""The Python API: lmforge.load(...) and LM.generate / stream / chat on tiny saved models."""

import pytest
import torch

import lmforge
from lmforge.errors import LmforgeError


@pytest.fixture(scope="module")
def chat_lm(tiny_lm_dirs):
    return lmforge.load(tiny_lm_dirs["chat"])


@pytest.fixture(scope="module")
def plain_lm(tiny_lm_dirs):
    return lmforge.load(tiny_lm_dirs["plain"])


def test_chat_template_applied_by_default(chat_lm):
    ids = chat_lm.encode("hello")
    text = chat_lm.tokenizer.decode(ids, skip_special_tokens=False)
    assert text == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    raw = chat_lm.tokenizer.decode(chat_lm.encode("hello", chat=False), skip_special_tokens=False)
    assert raw == "hello"


def test_single_and_batch_return_types(chat_lm):
    one = chat_lm.generate("hello", max_new_tokens=5)
    many = chat_lm.generate(["hello", "the quick brown fox"], max_new_tokens=5)
    assert isinstance(one, str) and isinstance(many, list) and len(many) == 2
    assert many[0] == one  # a row in a padded batch decodes as it would alone
    msgs = chat_lm.generate([{"role": "user", "content": "hello"}], max_new_tokens=5)
    assert msgs == one


def test_stream_concatenates_to_generate(plain_lm):
    kwargs = dict(max_new_tokens=20, temperature=0.9, top_k=30, seed=11)
    assert "".join(plain_lm.stream("one two", **kwargs)) == plain_lm.generate("one two", **kwargs)


def test_stop_string_in_api(plain_lm):
    full = plain_lm.generate("one two", max_new_tokens=20)
    stop = full[5:7]
    assert plain_lm.generate("one two", max_new_tokens=20, stop=stop) == full[: full.index(stop)]


def test_eos_ends_generation(tiny_lm_dirs):
    """Declare the first greedy token an end-of-sequence token: generation must then end at once."""
    from lmforge.generation.generate import generate_tokens

    lm = lmforge.load(tiny_lm_dirs["plain"])
    first = next(generate_tokens(lm.model, [lm.encode("one two")], 1))[0]
    assert lm.generate("one two", max_new_tokens=10) != ""
    lm.generation_config["eos_token_id"] = [first]
    assert lm.generate("one two", max_new_tokens=10) == ""
    assert list(lm.stream("one two", max_new_tokens=10)) == []


def test_bad_inputs(plain_lm, tiny_lm_dirs):
    with pytest.raises(LmforgeError, match="has no chat template"):
        plain_lm.chat([{"role": "user", "content": "hi"}])
    with pytest.raises(LmforgeError, match="prompt must be a string or a list of chat messages"):
        plain_lm.generate(42)
    with pytest.raises(LmforgeError, match="no prompts"):
        plain_lm.generate([])
    with pytest.raises(LmforgeError, match="top_p must be in"):
        plain_lm.generate("x", top_p=2.0)
    with pytest.raises(LmforgeError, match="unknown dtype 'int3'"):
        lmforge.load(tiny_lm_dirs["plain"], dtype="int3")
    if not torch.cuda.is_available():
        with pytest.raises(LmforgeError, match="CUDA is not available"):
            lmforge.load(tiny_lm_dirs["plain"], device="cuda")


def test_messages_are_validated(chat_lm):
    with pytest.raises(LmforgeError, match="content"):
        chat_lm.chat([{"role": "user"}])


def test_bfloat16_load_generates(tiny_lm_dirs):
    lm = lmforge.load(tiny_lm_dirs["chat"], dtype="bf16")
    assert next(lm.model.parameters()).dtype == torch.bfloat16
    assert lm.model.model.rotary.inv_freq.dtype == torch.float32  # RoPE angles stay exact
    assert isinstance(lm.generate("hello", max_new_tokens=4), str)
