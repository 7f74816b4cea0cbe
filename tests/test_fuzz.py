"""Fuzzing the readers of untrusted input (issue 15): dataset records (``data/records.py``), the GGUF and
safetensors readers (``checkpoints/``), config.json (``checkpoints/hf_config.py``) and the server's request
models (``deploy/protocol.py``). Whatever the input, the answer is a valid result or a clean error: an
``LmforgeError`` from the readers; pydantic's ``ValidationError`` (the server's 400) or ``APIError`` from the
request models. Any other exception fails the test with the input hypothesis found.
"""

from __future__ import annotations

import gzip
import json
import math
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lmforge.errors import LmforgeError

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=12)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


@pytest.fixture(scope="module")
def scratch():
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


# ----------------------------------------------------------------------------- dataset records
SUFFIXES = [".jsonl", ".json", ".csv", ".txt", ".md", ".jsonl.gz", ".csv.gz", ".parquet", ".bin", ""]


def _records(path: Path) -> list | None:
    """The records read from ``path``, or None for a clean ``LmforgeError``; any other exception propagates."""
    from lmforge.data.records import load_records

    try:
        return load_records(path)
    except LmforgeError:
        return None


def valid_records(records: list | None) -> bool:
    from lmforge.data.records import Record

    return records is None or bool(records) and all(isinstance(r, Record) and isinstance(r.fields, dict)
                                                      for r in records)


@FUZZ
@given(data=st.binary(max_size=400), suffix=st.sampled_from(SUFFIXES), zipped=st.booleans())
def test_record_reader_on_random_bytes(scratch, data, suffix, zipped):
    path = scratch / f"data{suffix}"
    path.write_bytes(gzip.compress(data) if zipped and suffix.endswith(".gz") else data)
    assert valid_records(_records(path))


@FUZZ
@given(rows=st.lists(json_values, max_size=5), kind=st.sampled_from(["jsonl", "json", "csv"]))
def test_record_reader_on_random_json(scratch, rows, kind):
    path = scratch / f"rows.{kind}"
    if kind == "jsonl":
        text = "".join(json.dumps(r) + "\n" for r in rows)
    elif kind == "json":
        text = json.dumps(rows)
    else:  # a header from the first row's keys, then the values as they print
        keys = list(rows[0]) if rows and isinstance(rows[0], dict) else ["a"]
        text = ",".join(map(str, keys)) + "\n" + "".join(
            ",".join(str(v) for v in (r.values() if isinstance(r, dict) else [r])) + "\n" for r in rows)
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    assert valid_records(_records(path))


@FUZZ
@given(fields=st.dictionaries(st.text(max_size=6), json_values, max_size=4),
       path=st.text(alphabet="ab.01_ ", max_size=10), template=st.text(alphabet="{}ab._ x", max_size=16))
def test_field_lookup_and_templates(fields, path, template):
    from lmforge.data.records import Record, lookup, render

    try:
        lookup(fields, path, "f.jsonl, line 1", "--input-field")
    except LmforgeError:
        pass
    try:
        assert isinstance(render(template, Record(fields, "f.jsonl, line 1")), str)
    except LmforgeError:
        pass


# ----------------------------------------------------------------------------- safetensors
def _safetensors(path: Path) -> dict | None:
    """The tensors read from ``path``, or None for a clean ``LmforgeError``; any other exception propagates."""
    from lmforge.checkpoints.hf import read_safetensors

    try:
        return read_safetensors([path])
    except LmforgeError:
        return None


@FUZZ
@given(data=st.binary(max_size=200))
def test_safetensors_reader_on_random_bytes(scratch, data):
    path = scratch / "random.safetensors"
    path.write_bytes(data)
    tensors = _safetensors(path)
    assert tensors is None or isinstance(tensors, dict)


dtypes = st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F64", "XX", ""])
tensor_entries = st.fixed_dictionaries({}, optional={
    "dtype": dtypes | json_values, "shape": st.lists(st.integers(-2, 5), max_size=3) | json_values,
    "data_offsets": st.lists(st.integers(-4, 64), max_size=3) | json_values})


@FUZZ
@given(header=st.dictionaries(st.text(max_size=6), tensor_entries | json_values, max_size=3),
       body=st.binary(max_size=64), length_delta=st.integers(-3, 3))
def test_safetensors_reader_on_random_headers(scratch, header, body, length_delta):
    """A length prefix, a JSON header of tensor entries with random dtypes, shapes and offsets, and a body."""
    raw = json.dumps(header).encode()
    path = scratch / "header.safetensors"
    path.write_bytes(struct.pack("<Q", max(0, len(raw) + length_delta)) + raw + body)
    tensors = _safetensors(path)
    assert tensors is None or isinstance(tensors, dict)


# ----------------------------------------------------------------------------- GGUF
@pytest.fixture(scope="module")
def tiny_gguf(scratch) -> bytes:
    import gguf_fixtures as GF

    path = scratch / "tiny.gguf"
    GF.write_tiny_gguf(path, GF.tiny_weights(0))
    return path.read_bytes()


def _gguf(path: Path):
    """The checkpoint read from ``path``, or None for a clean ``LmforgeError``; any other exception propagates."""
    from lmforge.checkpoints.gguf import read_gguf, read_gguf_info

    try:
        read_gguf_info(path)
        return read_gguf(path)
    except LmforgeError:
        return None


def valid_gguf(ckpt) -> bool:
    from lmforge.config import ModelConfig

    return ckpt is None or isinstance(ckpt.config, ModelConfig) and isinstance(ckpt.state_dict, dict)


@FUZZ
@given(data=st.binary(max_size=300))
def test_gguf_reader_on_random_bytes(scratch, data):
    path = scratch / "random.gguf"
    path.write_bytes(b"GGUF" + data)
    assert valid_gguf(_gguf(path))


@FUZZ
@given(cut=st.integers(0, 10**9), flips=st.lists(st.tuples(st.integers(0, 10**9), st.integers(0, 255)), max_size=6))
def test_gguf_reader_on_damaged_files(scratch, tiny_gguf, cut, flips):
    """A real (tiny) GGUF file, truncated somewhere and with a few bytes changed (mostly in the header, where
    the counts, lengths, types and shapes are)."""
    data = bytearray(tiny_gguf[:max(4, cut % (len(tiny_gguf) + 1))])
    for where, value in flips:
        spot = where % 2048 if where % 3 else where  # two in three changes fall in the header
        if spot < len(data):
            data[spot] = value
    path = scratch / "damaged.gguf"
    path.write_bytes(bytes(data))
    assert valid_gguf(_gguf(path))


# ----------------------------------------------------------------------------- config.json
HF_KEYS = ["model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
           "num_key_value_heads", "head_dim", "intermediate_size", "max_position_embeddings", "rms_norm_eps",
           "rope_theta", "rope_scaling", "tie_word_embeddings", "hidden_act", "eos_token_id", "bos_token_id",
           "n_embd", "n_layer", "n_head", "n_positions", "d_model", "num_layers", "num_heads", "d_kv", "d_ff"]
small_values = st.integers(-3, 300) | st.sampled_from([0, 1, 64, 4, "64", 2.5, None, True, float("nan")]) \
    | json_values


@FUZZ
@example(cfg={"model_type": "llama", "vocab_size": 256, "hidden_size": "64", "num_hidden_layers": 2,
              "num_attention_heads": 4, "intermediate_size": 128, "max_position_embeddings": 64})
@example(cfg={"model_type": "llama", "rope_scaling": 1})  # found by this test: AttributeError in the mapping
@given(cfg=st.fixed_dictionaries(
    {"model_type": st.sampled_from(["llama", "qwen2", "mistral", "gpt2", "bert", "t5", "nope"]) | json_values},
    optional={k: small_values for k in HF_KEYS[1:]}))
def test_config_json_gives_a_config_or_one_error(cfg):
    from lmforge.checkpoints.hf_config import config_from_hf
    from lmforge.config import ModelConfig

    try:
        config = config_from_hf(cfg)
    except LmforgeError:
        return
    assert isinstance(config, ModelConfig)
    assert all(isinstance(v, int) and v >= 1 for v in (config.vocab_size, config.n_embd, config.n_head))


# ----------------------------------------------------------------------------- the server's requests
COMMON = ["model", "max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "n", "stop", "seed", "stream",
          "stream_options", "user", "frequency_penalty", "presence_penalty", "logit_bias"]
request_values = json_values | st.integers(-2, 20) | st.floats(-1, 3) | st.sampled_from(["m", "", "\ud800", 2**63])
messages = st.lists(st.fixed_dictionaries({}, optional={"role": st.sampled_from(["user", "system", "x"]) | json_values,
                                                         "content": json_values}), max_size=3)


def _body(extra: dict) -> st.SearchStrategy:
    return st.fixed_dictionaries({}, optional={**{k: request_values for k in COMMON}, **extra})


def _validated(model, body):
    """The request, or None for pydantic's ValidationError (what the server answers with a 400)."""
    from pydantic import ValidationError

    try:
        return model.model_validate(body)
    except ValidationError:
        return None


def _use(call) -> None:
    from lmforge.deploy.protocol import APIError

    try:
        call()
    except APIError as e:
        assert 400 <= e.status < 500


@FUZZ
@given(body=_body({"prompt": json_values, "echo": request_values, "logprobs": request_values,
                   "best_of": request_values, "suffix": request_values}))
def test_completion_requests(body):
    from lmforge.deploy.protocol import CompletionRequest

    req = _validated(CompletionRequest, body)
    if req is not None:
        _use(req.stop_list)
        assert isinstance(req.unsupported(), list)
        seed = req.seed_for(3)
        assert seed is None or 0 <= seed < 2**63
        assert req.temperature is None or math.isfinite(req.temperature)


@FUZZ
@given(body=_body({"messages": messages | json_values, "logprobs": request_values, "top_logprobs": request_values,
                   "max_completion_tokens": request_values, "tools": request_values,
                   "tool_choice": request_values, "response_format": request_values}))
def test_chat_requests(body):
    from lmforge.deploy.protocol import ChatRequest, chat_messages

    req = _validated(ChatRequest, body)
    if req is not None:
        _use(req.stop_list)
        _use(lambda: chat_messages(req.messages))
        assert isinstance(req.unsupported(), list)
        k = req.logprob_k()
        assert k is None or k >= 0


@FUZZ
@given(body=st.fixed_dictionaries({}, optional={"model": request_values, "input": json_values | request_values,
                                                 "encoding_format": request_values, "dimensions": request_values,
                                                 "messages": messages | json_values, "prompt": request_values}))
def test_embedding_and_tokenize_requests(body):
    from lmforge.deploy.protocol import EmbeddingRequest, TokenizeRequest

    req = _validated(EmbeddingRequest, body)
    if req is not None:
        _use(lambda: all(isinstance(t, str) for t in req.texts()))
    tok = _validated(TokenizeRequest, body)
    if tok is not None:
        assert (tok.messages is None) != (tok.prompt is None)
