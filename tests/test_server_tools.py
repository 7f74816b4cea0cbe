"""Tool calling in /v1/chat/completions: ``tools`` / ``tool_choice`` checked (bad ones: 400 naming the field),
rendered into the prompt (the chat template's own tools support, else the generic Hermes-style block), the
model's ``<tool_call>`` blocks parsed into ``message.tool_calls`` (streamed as one delta per call), a forced call
constrained to a valid call even from a random model, and a conversation with calls and results rendered."""

import json
from types import SimpleNamespace

import httpx
import openai
import pytest

import lmforge
from lmforge.deploy.batching import Engine
from lmforge.deploy.protocol import APIError, chat_messages
from lmforge.deploy.server import BackgroundServer, create_app
from lmforge.deploy.tools import (
    FORCED_OPEN,
    ToolCallStream,
    ToolPlan,
    parse_tool_calls,
    render_prompt,
    template_takes_tools,
    tool_plan,
)
from lmforge.tokenizer import Tokenizer

MODEL = "tiny-tools"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object",
                                       "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 14}},
                                       "required": ["zone"], "additionalProperties": False}}}
NAMES = ("get_weather", "get_time")
IMPOSSIBLE = {"type": "function", "function": {"name": "never", "parameters": {
    "type": "object", "properties": {"x": {"type": "integer", "minimum": 5, "maximum": 1}}, "required": ["x"]}}}

# A template with its own tools support (Hermes/Qwen2.5 style, written for this test): tools in the system turn,
# calls written from their argument *objects*, results in a user turn.
TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTEMPLATE-TOOLS{% for t in tools %}\n{{ t | tojson }}{% endfor %}<|im_end|>\n"
    "{% endif %}"
    "{% for m in messages %}{% if m.role == 'tool' %}<|im_start|>user\n<tool_response name={{ m.name }}>\n"
    "{{ m.content }}\n</tool_response><|im_end|>\n"
    "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<tool_call>\n{{ {'name': c.function.name, 'arguments': c.function.arguments}"
    " | tojson }}\n</tool_call>{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

HISTORY = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris and the time in zone 1?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_a", "type": "function", "function": {"name": "get_weather",
                                                          "arguments": '{"city": "Paris", "unit": "celsius"}'}},
        {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": '{"zone": 1}'}}]},
    {"role": "tool", "tool_call_id": "call_a", "content": "18 C, sunny"},
    {"role": "tool", "tool_call_id": "call_b", "content": "14:05"},
]


@pytest.fixture(scope="module")
def long_lm(tiny_lm_dirs, tmp_path_factory):
    """The tiny random chat model of conftest with room for tool specs (2048 positions instead of 128: its 320-token BPE spends about a token per 1.5 characters)."""
    from lmforge.checkpoints.hf import save_hf_dir
    from lmforge.config import preset
    from lmforge.models.decoder import DecoderLM

    tok = lmforge.load(tiny_lm_dirs["chat"]).tokenizer
    config = preset("tiny-llama", vocab_size=tok.vocab_size, max_seq_len=2048, eos_token_id=tok.eos_id)
    model = DecoderLM(config).init_weights(seed=0, std=0.2)
    return lmforge.load(save_hf_dir(model, tmp_path_factory.mktemp("tiny-tools"), tokenizer=tok))


@pytest.fixture(scope="module")
def served(long_lm):
    engine = Engine(long_lm.model, long_lm.tokenizer, long_lm.eos_ids, max_batch=4, max_queue=8)
    with BackgroundServer(create_app(long_lm, engine, model_id=MODEL)) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=120)
        yield SimpleNamespace(url=srv.url, lm=long_lm, client=client)


def _with_template(tok: Tokenizer, template: str) -> Tokenizer:
    import tokenizers

    return Tokenizer(tokenizers.Tokenizer.from_str(tok.backend.to_str()), eos_token=tok.eos_token,
                     pad_token=tok.pad_token, chat_template=template)


# ------------------------------------------------------------------------------------------ checking the request
@pytest.mark.parametrize("tools, choice, param", [
    ([{"type": "function"}], None, "tools[0]"),
    ([{"type": "retrieval", "function": {"name": "x"}}], None, "tools[0]"),
    ([{"type": "function", "function": {"name": "has space"}}], None, "tools[0].function.name"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}], None,
     "tools[0].function.parameters"),
    ([WEATHER, TIME, WEATHER], None, "tools[2].function.name"),
    ({"get_weather": WEATHER}, None, "tools"),
    ([WEATHER], "sometimes", "tool_choice"),
    ([WEATHER], {"type": "function", "function": {"name": "get_time"}}, "tool_choice.function.name"),
    ([WEATHER], {"type": "function"}, "tool_choice"),
    (None, "required", "tool_choice"),
])
def test_bad_tools_and_tool_choice_name_the_field(tools, choice, param):
    with pytest.raises(APIError) as e:
        tool_plan(tools, choice)
    assert e.value.status == 400 and e.value.param == param, (e.value.param, e.value.message)


def test_tool_plans():
    assert tool_plan(None, None) == ToolPlan() and not tool_plan(None, "none").active
    auto = tool_plan([WEATHER, TIME], None)
    assert auto.choice == "auto" and auto.active and not auto.forced and auto.names == NAMES
    assert not tool_plan([WEATHER], "none").active
    named = tool_plan([WEATHER, TIME], {"type": "function", "function": {"name": "get_time"}})
    assert named.forced and [t.name for t in named.callable_tools()] == ["get_time"]
    assert tool_plan([WEATHER], "required").forced


# ------------------------------------------------------------------------------------------------------ parsing
def test_parser_takes_calls_out_and_leaves_the_rest():
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
            '\n</tool_call>\n<tool_call>{"name": "get_time", "arguments": {"zone": 1}}</tool_call>\nDone.')
    content, calls = parse_tool_calls(text, NAMES)
    assert content == "Let me check.\nDone."
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris", "unit": "celsius"}
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    assert len({c["id"] for c in calls}) == 2

    # parallel_tool_calls: false: the first call only, the next stays content
    content, calls = parse_tool_calls(text, NAMES, max_calls=1)
    assert [c["function"]["name"] for c in calls] == ["get_weather"] and content.startswith("Let me check.\n<tool_call>")
    assert tool_plan([WEATHER], None, parallel=False).max_calls == 1 and tool_plan([WEATHER], None).max_calls is None

    # malformed JSON, an unknown tool and arguments that are not an object stay content
    for bad in ('<tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>',
                '<tool_call>{"name": "launch", "arguments": {}}</tool_call>',
                '<tool_call>{"name": "get_time", "arguments": [1]}</tool_call>'):
        assert parse_tool_calls("Hi " + bad, NAMES) == ("Hi " + bad, [])
    assert parse_tool_calls("plain answer", NAMES) == ("plain answer", [])
    assert parse_tool_calls("   ", NAMES) == (None, [])

    # a block left open at the end (generation stopped after the JSON), arguments as a string, "parameters",
    # and a bare JSON call (Llama 3.1's convention) are calls too
    content, calls = parse_tool_calls('<tool_call>\n{"name": "get_time", "arguments": "{\\"zone\\": 3}"}', NAMES)
    assert content is None and json.loads(calls[0]["function"]["arguments"]) == {"zone": 3}
    content, calls = parse_tool_calls(' {"name": "get_time", "parameters": {"zone": 2}}', NAMES)
    assert content is None and calls[0]["function"]["arguments"] == '{"zone": 2}'


def test_stream_splitter_matches_the_whole_answer_in_any_pieces():
    text = ('Sure <b>.\n<tool_call>\n{"name": "get_time", "arguments": {"zone": 5}}\n</tool_call>\n'
            '<tool_call>{"bad json</tool_call> and <tool_call>{"name": "get_weather", "arguments": '
            '{"city": "Oslo", "unit": "celsius"}}')
    whole_content, whole_calls = parse_tool_calls(text, NAMES)
    assert len(whole_calls) == 2 and "<b>" in whole_content and "bad json" in whole_content
    for size in (1, 3, 7, len(text)):
        stream = ToolCallStream(NAMES)
        deltas = [d for i in range(0, len(text), size) for d in stream.feed(text[i:i + size])] + stream.finish()
        content = "".join(d.get("content", "") for d in deltas)
        calls = [c for d in deltas for c in d.get("tool_calls", [])]
        assert content == whole_content, size
        assert [(c["index"], c["function"]) for c in calls] == [(i, c["function"]) for i, c in enumerate(whole_calls)]
        assert all(len(d.get("tool_calls", [])) <= 1 for d in deltas)  # one delta per call, its arguments whole


# ---------------------------------------------------------------------------------------------------- rendering
def test_generic_rendering_shows_the_tools_and_the_history(long_lm):
    tok = long_lm.tokenizer
    assert not template_takes_tools(tok.chat_template)
    messages = chat_messages(HISTORY)
    text = render_prompt(tok, messages, tool_plan([WEATHER, TIME], "auto"))
    assert json.dumps(WEATHER) in text and json.dumps(TIME) in text and "<tools>" in text
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools")  # merged into the system message
    assert text.count("<|im_start|>system") == 1
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": '
            '"celsius"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": 1}}\n</tool_call>'
            '<|im_end|>') in text
    assert ("<|im_start|>user\n<tool_response>\n18 C, sunny\n</tool_response>\n<tool_response>\n14:05\n"
            "</tool_response><|im_end|>\n<|im_start|>assistant\n") in text  # both results in one user turn
    assert text.endswith("<|im_start|>assistant\n")

    none = render_prompt(tok, messages, tool_plan([WEATHER], "none"))
    assert "<tools>" not in none and "<tool_response>" in none  # no tools shown, the history still rendered
    forced = render_prompt(tok, chat_messages(HISTORY[:2]), tool_plan([WEATHER, TIME], "required"))
    assert forced.endswith("<|im_start|>assistant\n" + FORCED_OPEN) and "You must call" in forced
    assert forced.startswith("<|im_start|>system\nBe brief.")
    assert "call at most one function" in render_prompt(tok, messages, tool_plan([WEATHER], "auto", parallel=False))
    alone = render_prompt(tok, chat_messages(HISTORY[1:2]), tool_plan([WEATHER], "auto"))
    assert alone.startswith("<|im_start|>system\n# Tools")  # no system message: one is added


def test_template_rendering_uses_the_template_s_own_tool_format(long_lm):
    tok = _with_template(long_lm.tokenizer, TOOLS_TEMPLATE)
    assert template_takes_tools(tok.chat_template)
    text = render_prompt(tok, chat_messages(HISTORY), tool_plan([WEATHER, TIME], "auto"))
    assert text.startswith("<|im_start|>system\nTEMPLATE-TOOLS" + json.dumps(WEATHER))  # trim_blocks, as in HF
    assert "# Tools" not in text  # not the generic block
    # the template got the arguments as objects (not a JSON string inside JSON) and each result's tool name
    assert '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}' in text
    assert "<tool_response name=get_weather>\n18 C, sunny" in text and "<tool_response name=get_time>" in text
    assert "TEMPLATE-TOOLS" not in render_prompt(tok, chat_messages(HISTORY), tool_plan([WEATHER], "none"))


def test_template_rendering_equals_transformers_apply_chat_template(tiny_lm_dirs):
    """transformers' own apply_chat_template(tools=...) on the conversation in its documented shape (calls with
    argument objects, results with the tool's name) gives the same prompt."""
    transformers = pytest.importorskip("transformers")

    hf = transformers.AutoTokenizer.from_pretrained(tiny_lm_dirs["chat"])
    hf.chat_template = TOOLS_TEMPLATE
    ours = _with_template(lmforge.load(tiny_lm_dirs["chat"]).tokenizer, TOOLS_TEMPLATE)
    hf_history = [*HISTORY[:2], {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_a", "type": "function", "function": {"name": "get_weather",
                                                          "arguments": {"city": "Paris", "unit": "celsius"}}},
        {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": {"zone": 1}}}]},
        {"role": "tool", "tool_call_id": "call_a", "name": "get_weather", "content": "18 C, sunny"},
        {"role": "tool", "tool_call_id": "call_b", "name": "get_time", "content": "14:05"}]
    expected = hf.apply_chat_template(hf_history, tools=[WEATHER, TIME], add_generation_prompt=True, tokenize=False)
    assert render_prompt(ours, chat_messages(HISTORY), tool_plan([WEATHER, TIME], "auto")) == expected


def test_history_with_bad_tool_calls_is_refused():
    bad = [dict(HISTORY[2], tool_calls=[{"id": "c", "type": "function",
                                         "function": {"name": "get_time", "arguments": "{zone: 1"}}])]
    with pytest.raises(APIError) as e:
        chat_messages([HISTORY[1], *bad])
    assert e.value.param == "messages[1].tool_calls[0].function.arguments"
    with pytest.raises(APIError) as e:
        chat_messages([HISTORY[1], dict(HISTORY[2], tool_calls=[{"function": "get_time"}])])
    assert e.value.param == "messages[1].tool_calls[0]"


# ------------------------------------------------------------------------------------------------------ server
def test_server_accepts_tools_and_parses_the_answer(served):
    c = served.client
    r = c.chat.completions.create(model=MODEL, messages=HISTORY[:2], tools=[WEATHER, TIME], max_tokens=8,
                                  temperature=0)
    choice = r.choices[0]  # a random model answers text: it comes back as content, no calls
    assert choice.finish_reason in ("stop", "length") and choice.message.tool_calls is None
    assert r.usage.prompt_tokens == len(served.lm.tokenizer.encode(
        render_prompt(served.lm.tokenizer, chat_messages(HISTORY[:2]), tool_plan([WEATHER, TIME], None)),
        add_special_tokens=False))

    # /tokenize (the playground's "show prompt") renders the same prompt
    rendered = render_prompt(served.lm.tokenizer, chat_messages(HISTORY), tool_plan([WEATHER, TIME], "required"))
    r = httpx.post(served.url + "/tokenize", timeout=60,
                   json={"messages": HISTORY, "tools": [WEATHER, TIME], "tool_choice": "required"})
    assert r.status_code == 200 and r.json()["prompt"] == rendered and json.dumps(TIME) in rendered
    assert httpx.post(served.url + "/tokenize", json={"messages": HISTORY, "tools": [TIME, TIME]}).status_code == 400

    # a whole conversation with calls and results is accepted
    r = c.chat.completions.create(model=MODEL, messages=HISTORY, tools=[WEATHER, TIME], max_tokens=4, temperature=0,
                                  parallel_tool_calls=False)
    assert r.choices[0].finish_reason in ("stop", "length")


def _valid_call(call) -> None:
    args = json.loads(call.function.arguments)
    if call.function.name == "get_weather":
        assert set(args) == {"city", "unit"} and isinstance(args["city"], str) and args["unit"] in ("celsius",
                                                                                                   "fahrenheit")
    else:
        assert call.function.name == "get_time" and set(args) == {"zone"} and isinstance(args["zone"], int)


def test_required_and_named_tool_choice_force_a_valid_call_from_a_random_model(served):
    c = served.client
    for seed in range(4):
        r = c.chat.completions.create(model=MODEL, messages=HISTORY[:2], tools=[WEATHER, TIME], tool_choice="required",
                                      max_tokens=200, temperature=1.0, seed=seed)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        assert len(choice.message.tool_calls) == 1 and choice.message.content is None
        _valid_call(choice.message.tool_calls[0])
    r = c.chat.completions.create(model=MODEL, messages=HISTORY[:2], tools=[WEATHER, TIME], max_tokens=200,
                                  tool_choice={"type": "function", "function": {"name": "get_weather"}}, seed=1, n=2)
    assert [ch.finish_reason for ch in r.choices] == ["tool_calls", "tool_calls"]
    for ch in r.choices:
        assert ch.message.tool_calls[0].function.name == "get_weather"
        _valid_call(ch.message.tool_calls[0])


def test_streamed_forced_call_is_one_delta_with_the_whole_arguments(served):
    c = served.client
    kw = dict(model=MODEL, messages=HISTORY[:2], tools=[WEATHER, TIME], max_tokens=200, temperature=0,
              tool_choice={"type": "function", "function": {"name": "get_time"}})
    whole = c.chat.completions.create(**kw).choices[0]
    chunks = list(c.chat.completions.create(**kw, stream=True))
    deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
    calls = [tc for d in deltas for tc in d.tool_calls or []]
    assert len(calls) == 1 and calls[0].index == 0 and calls[0].type == "function"
    assert calls[0].function.name == "get_time" == whole.message.tool_calls[0].function.name
    assert calls[0].function.arguments == whole.message.tool_calls[0].function.arguments
    assert not "".join(d.content or "" for d in deltas)
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "tool_calls"


def test_streamed_text_answer_with_tools_equals_the_plain_answer(served):
    kw = dict(model=MODEL, messages=HISTORY[:2], tools=[WEATHER, TIME], max_tokens=24, temperature=0, logprobs=True)
    whole = served.client.chat.completions.create(**kw).choices[0]
    chunks = list(served.client.chat.completions.create(**kw, stream=True))
    deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
    assert "".join(d.content or "" for d in deltas).strip() == (whole.message.content or "").strip()
    assert not any(d.tool_calls for d in deltas)
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == whole.finish_reason
    streamed = [e.token for ch in chunks if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert streamed == [e.token for e in whole.logprobs.content]  # every token's logprob sent, none twice


def test_forcing_without_constrained_decoding_and_with_an_impossible_schema():
    from lmforge.deploy.tools import forced_call_states
    from lmforge.errors import LmforgeError
    from lmforge.generation.constrained import INSTALL_HINT

    def refuse(message):
        def constraint_states(n, schema):
            raise LmforgeError(message)
        return SimpleNamespace(constraint_states=constraint_states)

    plan = tool_plan([WEATHER], "required")
    assert forced_call_states(refuse(INSTALL_HINT), 1, plan) is None  # prompted only
    with pytest.raises(APIError) as e:
        forced_call_states(refuse("the JSON schema is unsatisfiable"), 1, plan)
    assert e.value.status == 400 and e.value.param == "tools"


def test_bad_tools_are_a_400_naming_the_field(served):
    c = served.client
    for kw, param in ((dict(tools=[WEATHER, WEATHER]), "tools[1].function.name"),
                      (dict(tools=[{"type": "function", "function": {"description": "no name"}}]),
                       "tools[0].function.name"),
                      (dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}),
                       "tool_choice.function.name"),
                      (dict(tools=[WEATHER], tool_choice="required", response_format={"type": "json_object"}),
                       "response_format"),
                      (dict(tools=[IMPOSSIBLE], tool_choice="required"), "tools")):
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model=MODEL, messages=HISTORY[:2], max_tokens=4, **kw)
        assert e.value.body["param"] == param, e.value.body
    r = httpx.post(served.url + "/v1/chat/completions", timeout=60,
                   json={"model": MODEL, "messages": HISTORY[:2], "functions": [WEATHER["function"]]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "functions"


@pytest.mark.real
def test_real_model_calls_the_weather_tool(real_lm):
    engine = Engine(real_lm.model, real_lm.tokenizer, real_lm.eos_ids, max_batch=2, context=1024)
    with BackgroundServer(create_app(real_lm, engine, model_id="smollm2")) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=300)
        r = client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "What is the weather like in Paris today?"}],
            tools=[WEATHER, TIME], tool_choice="required", max_tokens=60, temperature=0)
    call = r.choices[0].message.tool_calls[0]
    assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    assert "paris" in json.loads(call.function.arguments)["city"].lower()
