"""Structured output (generation/constrained.py): JSON-schema and regex constrained decoding on tiny models with
random weights, which almost never write valid JSON on their own; in the Python API, the CLI and the server."""

import json
import re
import warnings
from types import SimpleNamespace

import openai
import pytest

import lmforge
from lmforge.errors import LmforgeError

pytest.importorskip("llguidance")

# Small, bounded schemas: a 128-token tiny model must be able to finish each one.
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "role"],
          "properties": {"name": {"type": "string", "maxLength": 8},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "role": {"enum": ["admin", "user", "guest"]}}}
NESTED = {"type": "object", "additionalProperties": False, "required": ["ents", "n", "ok"],
          "properties": {"ents": {"type": "array", "maxItems": 2,
                                  "items": {"type": "object", "additionalProperties": False, "required": ["t", "l"],
                                            "properties": {"t": {"type": "string", "maxLength": 6},
                                                           "l": {"enum": ["PER", "ORG", "LOC"]}}}},
                         "n": {"type": "integer", "minimum": 0, "maximum": 9},
                         "ok": {"type": "boolean"}}}
MIXED = {"type": "object", "additionalProperties": False, "required": ["k", "x", "tags", "note"],
         "properties": {"k": {"const": "pt"}, "x": {"type": "number", "minimum": -50, "maximum": 50},
                        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "minItems": 1,
                                 "maxItems": 2},
                        "note": {"type": ["string", "null"], "maxLength": 5}}}
SCHEMAS = [PERSON, NESTED, MIXED]
TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def validate(value, schema, path="$"):
    """A small JSON-schema validator for the keywords these tests use (jsonschema is not a dependency)."""
    if "const" in schema:
        assert value == schema["const"], f"{path}: {value!r} != const {schema['const']!r}"
    if "enum" in schema:
        assert value in schema["enum"], f"{path}: {value!r} not in {schema['enum']}"
    types = schema.get("type")
    if types is not None:
        types = [types] if isinstance(types, str) else types
        ok = any((t == "integer" and isinstance(value, int) and not isinstance(value, bool))
                 or (t == "number" and isinstance(value, (int, float)) and not isinstance(value, bool))
                 or (t in TYPES and isinstance(value, TYPES[t])) for t in types)
        assert ok, f"{path}: {value!r} is not {types}"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        assert schema.get("minimum", value) <= value <= schema.get("maximum", value), f"{path}: {value} out of range"
    if isinstance(value, str):
        assert schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", len(value)), f"{path}: length"
    if isinstance(value, list):
        assert schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", len(value)), f"{path}: items"
        for i, v in enumerate(value):
            validate(v, schema.get("items", {}), f"{path}[{i}]")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        missing = set(schema.get("required", [])) - set(value)
        assert not missing, f"{path}: missing {missing}"
        if schema.get("additionalProperties") is False:
            assert set(value) <= set(props), f"{path}: extra keys {set(value) - set(props)}"
        for k, v in value.items():
            validate(v, props.get(k, {}), f"{path}.{k}")


def is_valid(text, schema):
    try:
        validate(json.loads(text), schema)
    except (ValueError, AssertionError):
        return False
    return True


@pytest.fixture(scope="module")
def plain_lm(tiny_lm_dirs):
    return lmforge.load(tiny_lm_dirs["plain"])


@pytest.fixture(scope="module")
def chat_lm(tiny_lm_dirs):
    return lmforge.load(tiny_lm_dirs["chat"])


def test_fifty_sampled_generations_all_parse_and_validate(plain_lm):
    prompts = ["one two", "The quick brown fox", "What is", "seven", "Input: sea otter"]
    free = plain_lm.generate(prompts * 2, seed=0, max_new_tokens=40, temperature=1.0)
    assert sum(is_valid(t, PERSON) for t in free) == 0, "the random model should not write valid JSON unaided"
    outs = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an incomplete output warns: none may be incomplete
        for seed in range(10):  # 10 seeds x a batch of 5 rows (each row samples its own document) = 50
            schema = SCHEMAS[seed % len(SCHEMAS)]
            for text in plain_lm.generate(prompts, seed=seed, json_schema=schema, max_new_tokens=110, temperature=1.0):
                outs.append((schema, text))
                validate(json.loads(text), schema)
    assert len(outs) == 50 and len({t for _, t in outs}) > 40, "different seeds and rows sample different documents"
    assert any(json.loads(t)["ents"] for s, t in outs if s is NESTED), "nested arrays of objects, not only []"


def test_regex_and_stopping_when_complete(plain_lm):
    pattern = r"[0-9]{3}-[A-Z]{2}(x|yz)?"
    outs = [plain_lm.generate("one two", regex=pattern, seed=s, temperature=1.0, max_new_tokens=30) for s in range(8)]
    assert all(re.fullmatch(pattern, t) for t in outs), outs
    # a finite language: generation stops when nothing else can follow, EOS or not
    assert plain_lm.generate("one two", regex="(ab|cd)e", max_new_tokens=20) in ("abe", "cde")


def test_eos_only_where_the_output_is_complete(plain_lm):
    (state,) = plain_lm.constraint_states(1, regex="[0-9]{2,}")
    eos = plain_lm.eos_ids
    digit = plain_lm.tokenizer.encode("7", add_special_tokens=False)
    assert len(digit) == 1
    mask = state.allowed_mask()
    assert mask.shape == (plain_lm.config.vocab_size,) and not mask[eos].any() and mask[digit[0]]
    state.advance(digit[0])
    assert not state.allowed_mask()[eos].any() and not state.is_accepting
    state.advance(digit[0])
    assert state.allowed_mask()[eos].all() and state.is_accepting and not state.is_done


def test_incomplete_output_says_so(plain_lm):
    with pytest.warns(UserWarning, match="incomplete.*max_new_tokens=3"):
        text = plain_lm.generate("one two", json_schema=NESTED, max_new_tokens=3)
    assert not is_valid(text, NESTED)


def test_stream_equals_generate_and_batch_rows_are_each_valid(plain_lm):
    for seed in range(3):
        kw = dict(json_schema=PERSON, seed=seed, temperature=0.8, max_new_tokens=100)
        assert "".join(plain_lm.stream("one two", **kw)) == plain_lm.generate("one two", **kw)
    prompts = ["one two", "The quick brown fox jumps", "What"]
    batch = plain_lm.generate(prompts, json_schema=MIXED, max_new_tokens=100)
    assert batch == [plain_lm.generate(p, json_schema=MIXED, max_new_tokens=100) for p in prompts]
    sampled = plain_lm.generate(prompts * 2, json_schema=NESTED, max_new_tokens=100, temperature=1.0, seed=5)
    assert all(is_valid(t, NESTED) for t in sampled) and all(is_valid(t, MIXED) for t in batch)


@pytest.mark.parametrize("kwargs, message", [
    (dict(regex="[0-9"), "the regex '\\[0-9': unclosed character class"),
    (dict(regex="a(b"), "unclosed group"),
    (dict(json_schema={"type": "integer", "minimum": 5, "maximum": 2}), "Unsatisfiable schema.*minimum"),
    (dict(json_schema={"enum": []}), "Unsatisfiable schema"),
    (dict(json_schema={"type": "wat"}), "Invalid type: wat"),
    (dict(json_schema={"type": "object"}, regex="a"), "either a JSON schema or a regex"),
])
def test_impossible_schema_or_bad_regex_is_a_clear_error(plain_lm, kwargs, message):
    with pytest.raises(LmforgeError, match=message):
        plain_lm.generate("one two", max_new_tokens=5, **kwargs)


def test_cli_json_schema_regex_and_errors(tiny_lm_dirs, capsys, tmp_path):
    from tests.test_cli import run

    d = tiny_lm_dirs["plain"]
    schema = tmp_path / "person.json"
    schema.write_text(json.dumps(PERSON))
    code, out, _ = run(capsys, "generate", "one two", "-m", d, "-n", "100", "-t", "1", "--seed", "3",
                       "--json-schema", schema)
    assert code == 0 and is_valid(out.strip("\n"), PERSON)
    code, streamed, _ = run(capsys, "generate", "one two", "-m", d, "-n", "100", "-t", "1", "--seed", "3",
                            "--json-schema", schema, "--stream")
    assert streamed == out
    code, out, _ = run(capsys, "generate", "one two", "-m", d, "-n", "20", "--regex", "[a-c]{2}[0-9]")
    assert code == 0 and re.fullmatch("[a-c]{2}[0-9]", out.strip("\n"))
    (tmp_path / "bad.json").write_text(json.dumps({"type": "integer", "minimum": 3, "maximum": 1}))
    for args, message in [(["--regex", "[0-9"], "unclosed character class"),
                          (["--json-schema", tmp_path / "bad.json"], "Unsatisfiable schema"),
                          (["--json-schema", tmp_path / "missing.json"], "missing.json: no such file")]:
        code, out, err = run(capsys, "generate", "one two", "-m", d, "-n", "5", *args)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err


@pytest.fixture(scope="module")
def served(chat_lm):
    from lmforge.deploy.batching import Engine
    from lmforge.deploy.server import BackgroundServer, create_app

    engine = Engine(chat_lm.model, chat_lm.tokenizer, chat_lm.eos_ids, max_batch=8, max_queue=8)
    with BackgroundServer(create_app(chat_lm, engine, model_id="tiny")) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=120)
        yield SimpleNamespace(client=client, lm=chat_lm)


def _fmt(schema, name="thing"):
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def test_server_response_format_json_schema_batched_and_streamed(served):
    from concurrent.futures import ThreadPoolExecutor

    def ask(i):
        schema = SCHEMAS[i % 3]
        r = served.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": f"item {i}"}],
                                           response_format=_fmt(schema), max_tokens=90, temperature=1.0, seed=i, n=2)
        return schema, r

    with ThreadPoolExecutor(6) as pool:  # different schemas decode together in the continuous batcher
        results = list(pool.map(ask, range(6)))
    for schema, r in results:
        for choice in r.choices:
            assert choice.finish_reason == "stop"
            validate(json.loads(choice.message.content), schema)
    messages = [{"role": "user", "content": "hi"}]
    whole = served.client.chat.completions.create(model="tiny", messages=messages, response_format=_fmt(NESTED),
                                           max_tokens=90, temperature=0.7, seed=9)
    chunks = served.client.chat.completions.create(model="tiny", messages=messages, response_format=_fmt(NESTED),
                                            max_tokens=90, temperature=0.7, seed=9, stream=True)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content and is_valid(text, NESTED)
    greedy = served.client.chat.completions.create(model="tiny", messages=messages, response_format=_fmt(MIXED),
                                            max_tokens=90, temperature=0)
    assert greedy.choices[0].message.content == served.lm.generate(messages, json_schema=MIXED, max_new_tokens=90)
    r = served.client.chat.completions.create(model="tiny", messages=messages, response_format={"type": "json_object"},
                                       max_tokens=90, temperature=0)
    assert r.choices[0].finish_reason == "length" or isinstance(json.loads(r.choices[0].message.content), dict)
    r = served.client.chat.completions.create(model="tiny", messages=messages, response_format=_fmt(PERSON), max_tokens=4)
    assert r.choices[0].finish_reason == "length" and not is_valid(r.choices[0].message.content, PERSON)


@pytest.mark.parametrize("response_format, message", [
    (_fmt({"type": "integer", "minimum": 5, "maximum": 2}), "Unsatisfiable schema"),
    (_fmt({"type": "object", "properties": {"a": {"type": "string", "pattern": "(("}}}), "unclosed group"),
    ({"type": "xml"}, "response_format.type must be"),
    ({"type": "json_schema", "json_schema": {"schema": {}}}, "'name' and a 'schema'"),
])
def test_server_impossible_schema_is_a_400(served, response_format, message):
    with pytest.raises(openai.BadRequestError, match=message) as e:
        served.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                       response_format=response_format, max_tokens=5)
    assert e.value.status_code == 400
