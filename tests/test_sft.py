"""SFT data: formats, prompt masking (plain and chat), seq2seq batches, truncation, packing, resumable batches,
and bad input. The fine-tuning run itself is tested in test_sft_train.py."""

import gzip
import json

import pytest
import torch

from lmforge.data.records import load_records
from lmforge.data.sft import IGNORE_INDEX, SFTBatches, load_sft_data, to_record, tokenize_record, truncate
from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer

RECORDS = {
    "alpaca": {"instruction": "Translate to French.", "input": "sea otter", "output": "loutre de mer"},
    "alpaca-no-input": {"instruction": "What is the capital of France?", "output": "Paris."},
    "prompt-completion": {"prompt": "one two three", "completion": " four five six"},
    "fields": {"dialogue": "#A#: hi\n#B#: the quick brown fox", "summary": "A fox says hi.", "topic": "fox"},
}
TEMPLATE = "Summarize the following conversation.\n\n{dialogue}\n\nSummary: "
MESSAGES = {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": "What is the capital of France?"},
                         {"role": "assistant", "content": "Paris."},
                         {"role": "user", "content": "And one two three?"},
                         {"role": "assistant", "content": "four five six"}]}


@pytest.fixture(scope="module")
def toks(tiny_lm_dirs):
    return {kind: Tokenizer.from_dir(path) for kind, path in tiny_lm_dirs.items()}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def record_for(name):
    raw = RECORDS[name]
    kwargs = dict(prompt_template=TEMPLATE, response_field="summary") if name == "fields" else {}
    return to_record(raw, "test", **kwargs)


def labelled(ids, labels):
    return [t for t, y in zip(ids, labels) if y != IGNORE_INDEX]


@pytest.mark.parametrize("name", list(RECORDS))
def test_plain_prompt_is_masked_exactly(toks, name):
    tok = toks["plain"]
    r = record_for(name)
    ex = tokenize_record(r, tok, chat=False)
    prompt = tok.encode(r.plain_prompt, add_special_tokens=True)
    response = tok.encode(r.response, add_special_tokens=False) + [tok.eos_id]
    assert ex.input_ids == prompt + response
    assert ex.prompt_ids == prompt
    batch = SFTBatches([ex], batch_size=1, pad_id=tok.pad_id).next_batch()
    labels = batch["labels"][0].tolist()
    assert labels[:len(prompt)] == [IGNORE_INDEX] * len(prompt)  # the whole prompt carries no loss
    assert labels[len(prompt):] == response  # response ids intact, EOS labelled
    assert batch["input_ids"][0].tolist() == prompt + response


@pytest.mark.parametrize("name", list(RECORDS))
def test_chat_labels_only_assistant_content_and_end_of_turn(toks, name):
    tok = toks["chat"]
    r = record_for(name)
    ex = tokenize_record(r, tok, chat=True)
    end = tok.token_to_id("<|im_end|>")
    content = tok.encode(r.response, add_special_tokens=False)
    assert labelled(ex.input_ids, ex.labels) == content + [end]
    # The masked prompt is exactly what generation is given at inference.
    gen_prompt = tok.encode(tok.apply_chat_template(r.messages[:1], add_generation_prompt=True), add_special_tokens=False)
    assert ex.prompt_ids == gen_prompt == ex.input_ids[:len(gen_prompt)]
    assert all(y == IGNORE_INDEX for y in ex.labels[:len(gen_prompt)])
    assert tok.decode(ex.input_ids, skip_special_tokens=False) == tok.apply_chat_template(r.messages, False)


def test_chat_messages_train_every_assistant_turn(toks):
    tok = toks["chat"]
    r = to_record(MESSAGES, "test")
    ex = tokenize_record(r, tok, chat=True)
    end = tok.token_to_id("<|im_end|>")
    expected = [*tok.encode("Paris.", add_special_tokens=False), end,
                *tok.encode("four five six", add_special_tokens=False), end]
    assert labelled(ex.input_ids, ex.labels) == expected
    text_masked = tok.decode([t for t, y in zip(ex.input_ids, ex.labels) if y == IGNORE_INDEX], False)
    for m in MESSAGES["messages"]:
        assert (m["content"] in text_masked) == (m["role"] != "assistant")
    batch = SFTBatches([ex], batch_size=1, pad_id=tok.pad_id).next_batch()
    assert batch["labels"][0].tolist() == ex.labels


def test_messages_need_a_chat_template(toks):
    with pytest.raises(LmforgeError, match="chat template"):
        tokenize_record(to_record(MESSAGES, "f, line 1"), toks["plain"], chat=False)


def test_formats_are_detected_per_record_in_one_file(toks, tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [RECORDS["alpaca"], RECORDS["prompt-completion"], MESSAGES])
    data = load_sft_data(path, toks["chat"], max_len=128)
    assert len(data.examples) == 3
    assert [len(r.messages) for r in data.records] == [2, 2, 5]


def test_alpaca_json_array_and_gzip_jsonl(toks, tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([RECORDS["alpaca"], RECORDS["alpaca-no-input"]], indent=2))
    with gzip.open(tmp_path / "d.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps(RECORDS["fields"]) + "\n\n")
    assert len(load_sft_data(tmp_path / "a.json", toks["plain"], max_len=1024, format="alpaca").examples) == 2
    data = load_sft_data(tmp_path / "d.jsonl.gz", toks["plain"], max_len=128, prompt_template=TEMPLATE,
                         response_field="summary")
    assert data.records[0].plain_prompt == TEMPLATE.replace("{dialogue}", RECORDS["fields"]["dialogue"])


def test_seq2seq_batches(toks):
    tok = toks["plain"]
    exs = [tokenize_record(record_for(n), tok, chat=False, seq2seq=True) for n in ("alpaca", "prompt-completion")]
    batch = SFTBatches(exs, batch_size=2, pad_id=tok.pad_id, seq2seq=True, decoder_start_id=tok.pad_id,
                       shuffle=False).next_batch()
    for b, ex in enumerate(exs):
        n, S = len(ex.labels), len(ex.input_ids)
        assert ex.labels == tok.encode(ex.reference, add_special_tokens=False) + [tok.eos_id]
        assert batch["input_ids"][b, :S].tolist() == ex.input_ids and batch["attention_mask"][b].sum() == S
        assert batch["labels"][b, :n].tolist() == ex.labels
        assert (batch["labels"][b, n:] == IGNORE_INDEX).all()
        assert batch["decoder_input_ids"][b, :n].tolist() == [tok.pad_id, *ex.labels[:-1]]


def test_truncation_drops_long_prompts_and_cuts_responses(toks, tmp_path):
    tok = toks["plain"]
    long_prompt = {"prompt": "one two three " * 30, "completion": " four"}
    path = write_jsonl(tmp_path / "t.jsonl", [long_prompt, RECORDS["prompt-completion"]])
    with pytest.warns(UserWarning, match="dropped 1 of 2"):
        data = load_sft_data(path, tok, max_len=12)
    assert data.dropped == 1 and len(data.examples) == 1
    ex = data.examples[0]
    assert len(ex.input_ids) <= 12 and ex.labels[-1] != IGNORE_INDEX
    with pytest.raises(LmforgeError, match="all 1 examples have prompts longer than max_len=12"):
        load_sft_data(write_jsonl(tmp_path / "l.jsonl", [long_prompt]), tok, max_len=12)
    assert truncate(tokenize_record(to_record(long_prompt, "x"), tok, chat=False), 12) is None


def test_packing_keeps_masks_positions_and_segments(toks):
    tok = toks["chat"]
    exs = [tokenize_record(record_for(n), tok, chat=True) for n in RECORDS]
    lengths = [len(e.input_ids) for e in exs]
    src = SFTBatches(exs, batch_size=1, pad_id=tok.pad_id, pack=True, max_len=sum(lengths), shuffle=False)
    batch = src.next_batch()
    assert batch["input_ids"].shape == (1, sum(lengths))  # all four in one row
    labels, seg, pos = batch["labels"][0].tolist(), batch["segment_ids"][0].tolist(), batch["positions"][0].tolist()
    start = 0
    for k, ex in enumerate(exs, 1):
        end = start + len(ex.input_ids)
        assert labels[start:end] == [IGNORE_INDEX, *ex.labels[1:]]
        assert seg[start:end] == [k] * len(ex.input_ids) and pos[start:end] == list(range(len(ex.input_ids)))
        start = end


def test_batches_resume_and_reshuffle_per_epoch(toks):
    tok = toks["plain"]
    exs = [tokenize_record(to_record({"prompt": f"one {i}", "completion": " two"}, "x"), tok, chat=False)
           for i in range(7)]
    make = lambda: SFTBatches(exs, batch_size=3, pad_id=tok.pad_id, seed=5, padding_side="left")  # noqa: E731
    a = make()
    first = [a.next_batch() for _ in range(2)]
    state = a.state_dict()
    rest = [a.next_batch()["input_ids"] for _ in range(4)]
    b = make()
    b.load_state_dict(state)
    assert all(torch.equal(x, b.next_batch()["input_ids"]) for x in rest)
    assert a.rows(0) != a.rows(1) and sorted(a.rows(0)) == sorted(a.rows(1))
    left = first[0]
    assert left["attention_mask"][:, -1].all() and (left["input_ids"][~left["attention_mask"]] == tok.pad_id).all()


# ----------------------------------------------------------------------------- bad input
def test_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(RECORDS["alpaca"]) + "\n{not json\n")
    with pytest.raises(LmforgeError, match=r"bad.jsonl, line 2: not valid JSON"):
        load_records(path)


@pytest.mark.parametrize("name, content, message", [
    ("bad.jsonl", '{"text": "a b"}\n{"text": \n', "line 2: not valid JSON (Expecting value, column 10)"),
    ("list.jsonl", '{"text": "a b"}\n["a b"]\n', "line 2: expected a JSON object, got list"),
    ("list.jsonl", '[{"text": "a b"}]\n', "line 1: expected a JSON object, got list"),  # .jsonl: lines, not a list
])
def test_every_record_reader_names_the_file_and_line_alike(toks, tmp_path, name, content, message):
    """Fine-tuning data, pretraining JSONL corpora, eval/reward datasets and PPO prompts are read by one reader
    (data/records.py): the same bad file gives the same "FILE, line N: ..." error from each."""
    from lmforge.alignment.rl_inputs import load_prompts
    from lmforge.data.corpus import tokenize_corpus
    from lmforge.training.tokenizer_train import char_tokenizer

    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    readers = {"records": lambda: load_records(path),
               "finetune": lambda: load_sft_data(path, toks["plain"], max_len=64, prompt_field="text",
                                                 response_field="text"),
               "corpus": lambda: tokenize_corpus(path, char_tokenizer("ab "), tmp_path / "cache"),
               "prompts": lambda: load_prompts(path, "text")}
    errors = {}
    for what, read in readers.items():
        with pytest.raises(LmforgeError) as e:
            read()
        errors[what] = str(e.value)
    assert set(errors.values()) == {f"{path}, {message}"}, errors


def test_finetune_reads_every_dataset_kind_and_refuses_others(toks, tmp_path):
    """The file kinds of eval and reward data (.jsonl, .json, .csv, each optionally gzipped) for fine-tuning too;
    another extension is refused naming the kinds, as for eval."""
    record = RECORDS["prompt-completion"]
    files = {"d.jsonl": json.dumps(record) + "\n", "d.json": json.dumps([record]),
             "d.csv": "prompt,completion\n" + ",".join(record.values()) + "\n"}
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
        with gzip.open(tmp_path / f"{name}.gz", "wt", encoding="utf-8") as f:
            f.write(text)
    want = load_sft_data(tmp_path / "d.jsonl", toks["plain"], max_len=64).examples
    for name in [*files, *(f"{n}.gz" for n in files)]:
        got = load_sft_data(tmp_path / name, toks["plain"], max_len=64).examples
        assert [e.input_ids for e in got] == [e.input_ids for e in want], name
    (tmp_path / "d.tsv").write_text(json.dumps(record) + "\n", encoding="utf-8")
    for read in (load_records, lambda p: load_sft_data(p, toks["plain"], max_len=64)):
        with pytest.raises(LmforgeError, match=r"d\.tsv: unknown format '\.tsv'; use \.jsonl, \.json \(a list of "
                                               r"objects\), \.csv or \.txt/\.md"):
            read(tmp_path / "d.tsv")


def test_missing_field_lists_available_fields(toks, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [RECORDS["fields"]])
    with pytest.raises(LmforgeError, match=r"line 1: missing field 'answer' \(available fields: dialogue, summary, topic\)"):
        load_sft_data(path, toks["plain"], max_len=64, prompt_template=TEMPLATE, response_field="answer")
    with pytest.raises(LmforgeError, match=r"line 1: no field 'text' \(--prompt-template\); the record has: dialogue, "
                                           r"summary, topic"):  # the renderer eval uses (data/records.py)
        load_sft_data(path, toks["plain"], max_len=64, prompt_template="{text}", response_field="summary")
    with pytest.raises(LmforgeError, match=r"line 1: missing field 'output'.*instruction"):
        load_sft_data(write_jsonl(tmp_path / "a.jsonl", [{"instruction": "x"}]), toks["plain"], max_len=64,
                      format="alpaca")
    with pytest.raises(LmforgeError, match="cannot tell the format from the fields dialogue, summary, topic"):
        load_sft_data(path, toks["plain"], max_len=64)


def test_empty_dataset_and_unknown_format(toks, tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(LmforgeError, match="dataset .*empty.jsonl is empty"):
        load_sft_data(tmp_path / "empty.jsonl", toks["plain"], max_len=64)
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(LmforgeError, match="empty.json holds no records"):
        load_sft_data(tmp_path / "empty.json", toks["plain"], max_len=64)
    with pytest.raises(LmforgeError, match="unknown SFT format 'sharegpt'; choose one of: alpaca, messages"):
        load_sft_data(write_jsonl(tmp_path / "x.jsonl", [RECORDS["alpaca"]]), toks["plain"], max_len=64,
                      format="sharegpt")
    with pytest.raises(LmforgeError, match="does not exist"):
        load_sft_data(tmp_path / "missing.jsonl", toks["plain"], max_len=64)


def test_bad_messages_and_values(toks, tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "text": "hi"}]}])
    with pytest.raises(LmforgeError, match=r"m.jsonl, line 1: messages\[0\] has no 'content' \(it has: role, text\)"):
        load_sft_data(path, toks["chat"], max_len=64)
    path = write_jsonl(tmp_path / "n.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(LmforgeError, match="no 'assistant' message"):
        load_sft_data(path, toks["chat"], max_len=64)
    path = write_jsonl(tmp_path / "o.jsonl", [{"prompt": "a", "completion": 3}])
    with pytest.raises(LmforgeError, match="field 'completion' must be a string, got int"):
        load_sft_data(path, toks["chat"], max_len=64)
