"""Zero-, one- and few-shot prompt builders and example files."""

import json

import pytest
import tokenizers
from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge.errors import LmforgeError
from lmforge.prompts import Example, build_messages, build_prompt, load_examples
from lmforge.tokenizer import Tokenizer

EXAMPLES = [Example("I loved it", "positive"), Example("Dull and slow", "negative"), Example("It was ok", "neutral")]
CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


# ------------------------------------------------------------------------------------------- plain prompts
def test_zero_shot_prompt():
    assert build_prompt("Great film") == "Input: Great film\nOutput:"
    assert build_prompt("Great film", "Classify the sentiment.") == \
        "Classify the sentiment.\n\nInput: Great film\nOutput:"


def test_one_and_few_shot_prompts_keep_order():
    assert build_prompt("Great film", "Classify.", EXAMPLES[:1]) == (
        "Classify.\n\nInput: I loved it\nOutput: positive\n\nInput: Great film\nOutput:")
    few = build_prompt("Great film", "Classify.", EXAMPLES)
    assert few == ("Classify.\n\n"
                   "Input: I loved it\nOutput: positive\n\n"
                   "Input: Dull and slow\nOutput: negative\n\n"
                   "Input: It was ok\nOutput: neutral\n\n"
                   "Input: Great film\nOutput:")
    reversed_few = build_prompt("Great film", "Classify.", EXAMPLES[::-1])
    assert reversed_few.index("It was ok") < reversed_few.index("I loved it")


def test_custom_labels_and_no_instruction():
    prompt = build_prompt("2+2", examples=[Example("1+1", "2")], input_label="Q", output_label="A")
    assert prompt == "Q: 1+1\nA: 2\n\nQ: 2+2\nA:"


@settings(max_examples=50, deadline=None)
@given(pairs=st.lists(st.tuples(st.text(max_size=10), st.text(max_size=10)), max_size=5),
       query=st.text(max_size=20), instruction=st.one_of(st.none(), st.text(min_size=1, max_size=20)))
def test_prompt_structure_property(pairs, query, instruction):
    examples = [Example(i, o) for i, o in pairs]
    prompt = build_prompt(query, instruction, examples)
    expected_blocks = [f"Input: {i}\nOutput: {o}" for i, o in pairs] + [f"Input: {query}\nOutput:"]
    head = f"{instruction}\n\n" if instruction else ""
    assert prompt == head + "\n\n".join(expected_blocks)
    assert prompt.endswith("\nOutput:")
    messages = build_messages(query, instruction, examples)
    assert [m["content"] for m in messages] == ([instruction] if instruction else []) + \
        [text for pair in pairs for text in pair] + [query]


# ------------------------------------------------------------------------------------------- chat prompts
def test_messages_zero_shot_and_instruction_as_system():
    assert build_messages("hi") == [{"role": "user", "content": "hi"}]
    assert build_messages("hi", "Be brief.") == [{"role": "system", "content": "Be brief."},
                                                 {"role": "user", "content": "hi"}]


def test_messages_few_shot_turns_in_order():
    messages = build_messages("Great film", "Classify.", EXAMPLES)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant", "user",
                                             "assistant", "user"]
    assert [m["content"] for m in messages[1:]] == ["I loved it", "positive", "Dull and slow", "negative",
                                                    "It was ok", "neutral", "Great film"]


def test_explicit_system_moves_instruction_into_first_user_turn():
    messages = build_messages("Great film", "Classify.", EXAMPLES[:1], system="You are a critic.")
    assert messages == [
        {"role": "system", "content": "You are a critic."},
        {"role": "user", "content": "Classify.\n\nI loved it"},
        {"role": "assistant", "content": "positive"},
        {"role": "user", "content": "Great film"},
    ]
    zero = build_messages("Great film", "Classify.", system="You are a critic.")
    assert zero[1] == {"role": "user", "content": "Classify.\n\nGreat film"}
    assert build_messages("q", system="S") == [{"role": "system", "content": "S"}, {"role": "user", "content": "q"}]


def test_messages_render_with_a_chat_template():
    tok = Tokenizer(tokenizers.Tokenizer(tokenizers.models.BPE()), chat_template=CHATML)
    text = tok.apply_chat_template(build_messages("Great film", "Classify.", EXAMPLES[:2]))
    assert text == ("<|im_start|>system\nClassify.<|im_end|>\n"
                    "<|im_start|>user\nI loved it<|im_end|>\n<|im_start|>assistant\npositive<|im_end|>\n"
                    "<|im_start|>user\nDull and slow<|im_end|>\n<|im_start|>assistant\nnegative<|im_end|>\n"
                    "<|im_start|>user\nGreat film<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("call, match", [
    (lambda: build_prompt(3), "query must be a str, got int"),
    (lambda: build_prompt("q", instruction=["x"]), "instruction must be a str or None, got list"),
    (lambda: build_prompt("q", examples=Example("a", "b")), "examples must be a list of Example"),
    (lambda: build_prompt("q", examples=[("a", "b")]), r"examples\[0\] must be an Example, got tuple"),
    (lambda: build_prompt("q", examples=[Example("a", 5)]), r"examples\[0\].output must be a str, got int"),
    (lambda: build_prompt("q", input_label=""), "input_label must be a non-empty string"),
    (lambda: build_messages("q", system=1), "system must be a str or None, got int"),
    (lambda: build_messages(None), "query must be a str, got NoneType"),
])
def test_bad_prompt_arguments(call, match):
    with pytest.raises(LmforgeError, match=match):
        call()


# ------------------------------------------------------------------------------------------- example files
def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_load_jsonl_with_all_field_pairs(tmp_path):
    lines = [{"input": "a", "output": "b"}, {"question": "Wie geht's? 日本", "answer": "gut"},
             {"prompt": "p", "completion": "c", "extra": 1}]
    path = _write(tmp_path, "ex.jsonl", "\n".join(json.dumps(x, ensure_ascii=False) for x in lines) + "\n\n")
    assert load_examples(path) == [Example("a", "b"), Example("Wie geht's? 日本", "gut"), Example("p", "c")]


def test_load_json_list(tmp_path):
    path = _write(tmp_path, "ex.json", json.dumps([{"input": "a", "output": "b"}, {"input": "c", "output": "d"}],
                                                  indent=2))
    assert load_examples(path) == [Example("a", "b"), Example("c", "d")]
    assert load_examples(_write(tmp_path, "one.json", ' [ {"input": "x", "output": "y"} ] \n')) == [Example("x", "y")]


def test_examples_feed_the_builders(tmp_path):
    path = _write(tmp_path, "ex.jsonl", '{"input": "1+1", "output": "2"}\n{"input": "2+3", "output": "5"}\n')
    assert build_prompt("4+4", "Add.", load_examples(path)) == \
        "Add.\n\nInput: 1+1\nOutput: 2\n\nInput: 2+3\nOutput: 5\n\nInput: 4+4\nOutput:"


@pytest.mark.parametrize("name, text, match", [
    ("bad.jsonl", '{"input": "a", "output": "b"}\n{"input": "a", "output": \n',
     r"bad.jsonl, line 2: not valid JSON"),
    ("blank.jsonl", '{"input": "a", "output": "b"}\n\n\n{oops}\n', r"blank.jsonl, line 4: not valid JSON"),
    ("missing.jsonl", '{"input": "a", "output": "b"}\n{"input": "a", "label": "b"}\n',
     r"missing.jsonl, line 2: missing field 'output' \(the line has: input, label;"),
    ("none.jsonl", '{"text": "a"}\n', r"none.jsonl, line 1: missing fields 'input' and 'output' \(the line has: text"),
    ("answer.jsonl", '{"answer": "a"}\n', r"line 1: missing field 'question' \(the line has: answer"),
    ("empty_obj.jsonl", '{}\n', r"line 1: missing fields 'input' and 'output' \(the line has: no fields"),
    ("list.jsonl", '["a", "b"]\n', r"list.jsonl, line 1: expected a JSON object"),
    ("scalar.jsonl", '"just text"\n', r"scalar.jsonl, line 1: expected a JSON object .*got str"),
    ("type.jsonl", '{"input": "a", "output": 3}\n', r"type.jsonl, line 1: field 'output' must be a string, got int"),
    ("empty.jsonl", "", r"empty.jsonl is empty"),
    ("blank_only.jsonl", "\n   \n", r"blank_only.jsonl is empty"),
    ("empty_list.json", "[ ]", r"empty_list.json holds no examples"),
    ("listbad.json", '[\n  {"input": "a", "output": "b"},\n  {"input": "c"}\n]',
     r"listbad.json, line 3: missing field 'output'"),
    ("listjson.json", '[\n  {"input": "a", "output": "b"},\n  {"input": "c", }\n]',
     r"listjson.json, line 3: not valid"),
    ("listcomma.json", '[{"input": "a", "output": "b"} {"input": "c", "output": "d"}]',
     r"listcomma.json, line 1: expected ',' or '\]'"),
    ("trailing.json", '[{"input": "a", "output": "b"}]\nmore', r"trailing.json, line 2: unexpected text"),
    ("unclosed.json", '[{"input": "a", "output": "b"},\n', r"unclosed.json, line 2: not valid JSON"),
])
def test_bad_example_files(tmp_path, name, text, match):
    path = _write(tmp_path, name, text)
    with pytest.raises(LmforgeError, match=match):
        load_examples(path)


def test_missing_and_binary_example_files(tmp_path):
    with pytest.raises(LmforgeError, match=r"nope.jsonl does not exist"):
        load_examples(tmp_path / "nope.jsonl")
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(LmforgeError, match=r"bin.jsonl is not UTF-8 text"):
        load_examples(tmp_path / "bin.jsonl")
