"""The data users bring: .parquet and .txt/.md record files, dotted field paths into nested records, and DPO's
counted warning when pairs are dropped (data/records.py, data/corpus.py, alignment/dpo.py)."""

from __future__ import annotations

import gzip
import json
import sys
import warnings

import pytest

from lmforge.alignment.dpo import Pair, load_preference_pairs, tokenize_pairs
from lmforge.data.corpus import corpus_files, read_documents
from lmforge.data.records import Record, field, load_records, render, text_field
from lmforge.data.sft import load_sft_data
from lmforge.errors import LmforgeError
from lmforge.evaluation.data import FieldMap, query_text
from lmforge.tokenizer import Tokenizer

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

NESTED = [
    {"id": 1, "dialogue": {"turns": ["#Person1#: Hi.", "#Person2#: Hello!"], "topic": "greeting"},
     "summary": "They greet."},
    {"id": 2, "dialogue": {"turns": ["#Person1#: Tea?", "#Person2#: Yes, please."], "topic": "tea"},
     "summary": "One offers tea."},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture(scope="module")
def toks(tiny_lm_dirs):
    return {kind: Tokenizer.from_dir(path) for kind, path in tiny_lm_dirs.items()}


# ----------------------------------------------------------------------------- parquet
def test_parquet_reads_the_same_records_as_jsonl_nested_structs_included(tmp_path):
    from_jsonl = load_records(write_jsonl(tmp_path / "d.jsonl", NESTED))
    from_parquet = load_records(write_parquet(tmp_path / "d.parquet", NESTED))
    assert [r.fields for r in from_parquet] == [r.fields for r in from_jsonl]
    assert [r.where for r in from_parquet] == [f"{tmp_path / 'd.parquet'}, row 1", f"{tmp_path / 'd.parquet'}, row 2"]


def test_parquet_sft_examples_equal_the_jsonl_ones(toks, tmp_path):
    rows = [{"prompt": "Say hi", "completion": "hi"}, {"prompt": "Count: one two", "completion": "three"}]
    want = load_sft_data(write_jsonl(tmp_path / "a.jsonl", rows), toks["chat"], max_len=64).examples
    got = load_sft_data(write_parquet(tmp_path / "a.parquet", rows), toks["chat"], max_len=64).examples
    assert [(e.input_ids, e.labels) for e in got] == [(e.input_ids, e.labels) for e in want]


def test_parquet_preference_pairs(tmp_path):
    rows = [{"prompt": "Q?", "chosen": " yes", "rejected": " no"}]
    pairs = load_preference_pairs(write_parquet(tmp_path / "p.parquet", rows))
    assert (pairs[0].prompt, pairs[0].chosen, pairs[0].rejected) == ("Q?", " yes", " no")
    assert pairs[0].where.endswith("p.parquet, row 1")
    csv_pairs = tmp_path / "p.csv"
    csv_pairs.write_text("prompt,chosen,rejected\nQ?, yes, no\n", encoding="utf-8")
    assert [(p.prompt, p.chosen, p.rejected) for p in load_preference_pairs(csv_pairs)] == [("Q?", " yes", " no")]


def test_a_broken_parquet_file_and_a_gzipped_one_are_one_clear_error(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 this is not a parquet file")
    with pytest.raises(LmforgeError, match=r"bad.parquet: not a readable parquet file"):
        load_records(bad)
    gz = tmp_path / "d.parquet.gz"
    gz.write_bytes(gzip.compress(b"x"))
    with pytest.raises(LmforgeError, match=r"d.parquet.gz: unknown format '.parquet.gz'"):
        load_records(gz)


def test_parquet_without_pyarrow_says_how_to_install_it(tmp_path, monkeypatch):
    path = write_parquet(tmp_path / "d.parquet", NESTED)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import pyarrow.parquet -> ImportError
    with pytest.raises(LmforgeError, match=r"d.parquet: reading .parquet needs pyarrow; install it with "
                                           r"`pip install pyarrow`"):
        load_records(path)


# ----------------------------------------------------------------------------- text files
def test_txt_and_md_give_one_text_record_per_paragraph_with_its_line(tmp_path):
    text = "First paragraph,\nstill the first.\n\n\n  \nSecond.\n\n# A heading\nand its text\n"
    for name in ("notes.txt", "notes.md"):
        (tmp_path / name).write_text(text, encoding="utf-8")
        records = load_records(tmp_path / name)
        assert [r.fields for r in records] == [{"text": "First paragraph,\nstill the first."}, {"text": "Second."},
                                               {"text": "# A heading\nand its text"}]
        assert [r.where.rsplit(", ", 1)[1] for r in records] == ["line 1", "line 6", "line 8"]
    with gzip.open(tmp_path / "notes.txt.gz", "wt", encoding="utf-8") as f:
        f.write(text)
    assert len(load_records(tmp_path / "notes.txt.gz")) == 3
    (tmp_path / "blank.txt").write_text("\n  \n", encoding="utf-8")
    with pytest.raises(LmforgeError, match="blank.txt is empty"):
        load_records(tmp_path / "blank.txt")


def test_eval_reads_a_text_file_through_its_text_field(tmp_path):
    (tmp_path / "essays.txt").write_text("One essay.\n\nAnother essay.\n", encoding="utf-8")
    records = load_records(tmp_path / "essays.txt")
    assert [query_text(r, FieldMap(input="text")) for r in records] == ["One essay.", "Another essay."]


# ----------------------------------------------------------------------------- field paths
def test_dotted_paths_reach_into_nested_objects_and_lists(tmp_path):
    for name, writer in (("n.jsonl", write_jsonl), ("n.parquet", write_parquet)):
        r = load_records(writer(tmp_path / name, NESTED))[0]
        assert field(r, "dialogue.topic", "--input-field") == "greeting"
        assert field(r, "dialogue.turns.1", "--input-field") == "#Person2#: Hello!"
        assert text_field(r, "dialogue.turns", "--input-field") == "#Person1#: Hi.\n#Person2#: Hello!"  # joined
        assert text_field(r, "id", "--input-field") == "1"
        assert query_text(r, FieldMap(input="dialogue.turns")) == "#Person1#: Hi.\n#Person2#: Hello!"
        assert render("Topic {dialogue.topic}: {dialogue.turns.0}", r) == "Topic greeting: #Person1#: Hi."


def test_a_key_holding_a_dot_wins_over_the_path():
    r = Record({"a.b": "whole key", "a": {"b": "path"}}, "x.jsonl, line 1")
    assert field(r, "a.b", "--input-field") == "whole key"


@pytest.mark.parametrize("path, message", [
    ("dialog.turns", r"x.jsonl, line 3: no field 'dialog.turns' \(--input-field\); the record has: id, dialogue"),
    ("dialogue.speakers", r"x.jsonl, line 3: no field 'dialogue.speakers' \(--input-field\): 'dialogue' has no "
                          r"'speakers'; it has: turns, topic"),
    ("dialogue.turns.2", r"'dialogue.turns' has 2 items, no index 2"),
    ("dialogue.turns.first", r"'dialogue.turns' is a list of 2 items, so 'first' must be an index \(0 to 1\)"),
    ("dialogue.topic.name", r"'dialogue.topic' is a str, not an object or a list, so it has no 'name'"),
])
def test_a_bad_path_names_the_file_line_and_missing_component(path, message):
    r = Record({"id": 1, "dialogue": NESTED[0]["dialogue"]}, "x.jsonl, line 3")
    with pytest.raises(LmforgeError, match=message):
        field(r, path, "--input-field")


def test_a_list_that_is_not_all_strings_is_not_text():
    r = Record({"turns": [{"speaker": "A"}]}, "x.jsonl, line 1")
    with pytest.raises(LmforgeError, match=r"field 'turns' \(--input-field\) must be text \(or a list of strings\), "
                                           r"got list"):
        text_field(r, "turns", "--input-field")


def test_sft_prompt_and_response_fields_take_paths(toks, tmp_path):
    path = write_jsonl(tmp_path / "n.jsonl", NESTED)
    data = load_sft_data(path, toks["plain"], max_len=64, prompt_field="dialogue.turns",
                         response_field="summary")
    flat = write_jsonl(tmp_path / "f.jsonl", [{"p": "\n".join(r["dialogue"]["turns"]), "s": r["summary"]}
                                              for r in NESTED])
    want = load_sft_data(flat, toks["plain"], max_len=64, prompt_field="p", response_field="s")
    assert [e.input_ids for e in data.examples] == [e.input_ids for e in want.examples]
    with pytest.raises(LmforgeError, match=r"n.jsonl, line 1: no field 'dialogue.summary' \(field path\): "
                                           r"'dialogue' has no 'summary'"):
        load_sft_data(path, toks["plain"], max_len=64, prompt_field="dialogue.turns", response_field="dialogue.summary")


# ----------------------------------------------------------------------------- pretraining corpora
def test_corpus_reads_parquet_and_gzipped_jsonl_records_by_a_path(tmp_path):
    rows = [{"meta": {"body": "alpha beta"}}, {"meta": {"body": "gamma"}}]
    write_parquet(tmp_path / "c.parquet", rows)
    with gzip.open(tmp_path / "c.jsonl.gz", "wt", encoding="utf-8") as f:  # read as raw text before
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    for name in ("c.parquet", "c.jsonl.gz"):
        assert list(read_documents([tmp_path / name], "meta.body")) == ["alpha beta", "gamma"]
    (tmp_path / "whole.md").write_text("para one\n\npara two\n", encoding="utf-8")
    assert list(read_documents([tmp_path / "whole.md"])) == ["para one\n\npara two\n"]  # one document per text file


def test_a_corpus_folder_of_parquet_shards(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(2):
        write_parquet(shards / f"train-{i:05d}.parquet", [{"text": f"shard {i}"}])
    assert [p.name for p in corpus_files(shards)] == ["train-00000.parquet", "train-00001.parquet"]
    assert list(read_documents(corpus_files(shards))) == ["shard 0", "shard 1"]
    (shards / "README.md").write_text("about the shards", encoding="utf-8")  # text files win, as before
    assert [p.name for p in corpus_files(shards)] == ["README.md"]


# ----------------------------------------------------------------------------- DPO's dropped pairs
def test_dpo_warns_once_with_the_count_of_dropped_pairs(toks):
    tok = toks["plain"]
    pairs = [Pair("short", " a", " b", "p.jsonl, line 1"),
             Pair("one two three four five six seven " * 4, " a", " b", "p.jsonl, line 2"),
             Pair("one two three four five six seven " * 4, " a", " b", "p.jsonl, line 3")]
    encode = lambda text: tok.encode(text, add_special_tokens=False)  # noqa: E731
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items, dropped = tokenize_pairs(pairs, encode, tok, max_len=8)
    assert (len(items), dropped) == (1, 2)
    assert [str(w.message) for w in caught] == [
        "dropped 2 of 3 preference pairs whose prompt leaves no room for a response within max_len=8 tokens"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tokenize_pairs(pairs[:1], encode, tok, max_len=8)
    assert caught == []


# ----------------------------------------------------------------------------- finetune --show-example
def test_show_example_prints_the_first_example_with_its_loss_mask_and_trains_nothing(tiny_lm_dirs, toks, tmp_path,
                                                                                      capsys):
    from lmforge.cli.main import main
    from lmforge.data.tokens import IGNORE_INDEX

    rows = [{"messages": [{"role": "user", "content": "What is the capital of France?"},
                          {"role": "assistant", "content": "Paris."}]},
            {"messages": [{"role": "user", "content": "one two"}, {"role": "assistant", "content": "three"}]}]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    out = tmp_path / "run"
    assert main(["finetune", "--train", str(data), "-m", str(tiny_lm_dirs["chat"]), "--show-example",
                 "-o", str(out)]) == 0
    shown = capsys.readouterr().out
    ex = load_sft_data(data, toks["chat"], max_len=128).examples[0]
    trained = [t for i, (t, y) in enumerate(zip(ex.input_ids, ex.labels)) if i and y != IGNORE_INDEX]
    assert shown == (
        f"example 1 of 2 ({data}, line 1; max_len=128):\n"
        f"input ({len(ex.input_ids)} tokens; {len(trained)} trained, {len(ex.input_ids) - len(trained)} with no "
        "loss, shown in [[ ]]):\n"
        "[[<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n]]Paris.<|im_end|>[[\n]]\n"
        f"trained tokens (the loss covers these {len(trained)}):\nParis.<|im_end|>\n")
    assert toks["chat"].decode(trained, skip_special_tokens=False) == "Paris.<|im_end|>"
    assert not out.exists()  # nothing trained, nothing written

    plain = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "one two", "completion": " three"}])
    assert main(["finetune", "--train", str(plain), "-m", str(tiny_lm_dirs["plain"]), "--show-example",
                 "--max-len", "64", "-o", str(out)]) == 0
    assert "\n[[one two]] three<|endoftext|>\n" in capsys.readouterr().out
    assert not out.exists()


def test_dpo_show_example_marks_the_prompt_counts_the_dropped_and_trains_nothing(tiny_lm_dirs, tmp_path, capsys):
    from lmforge.cli.main import main

    data = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "one two three four five six seven " * 8, "chosen": " a", "rejected": " b"},  # too long: dropped
        {"prompt": "What is the capital of France?", "chosen": " Paris.", "rejected": " Rome."}])
    out = tmp_path / "run"
    assert main(["rlhf", "dpo", "--data", str(data), "-m", str(tiny_lm_dirs["plain"]), "--max-len", "24",
                 "--show-example", "-o", str(out)]) == 0
    shown = capsys.readouterr().out.splitlines()
    assert shown[0].startswith(f"pair 1 of 1 ({data}, line 2; max_len=24, 1 dropped as too long); the prompt's ")
    assert shown[1:] == ["chosen (4 response tokens scored):", "[[What is the capital of France?]] Paris.<|endoftext|>",
                         "rejected (7 response tokens scored):", "[[What is the capital of France?]] Rome.<|endoftext|>"]
    assert not out.exists()


# ----------------------------------------------------------------------------- examples/
ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_every_examples_file_the_readmes_name_exists():
    import re

    def named(doc):
        return set(re.findall(r"examples/[\w.-]+\.\w+", doc.read_text(encoding="utf-8")))

    readme, ours = named(ROOT / "README.md"), named(ROOT / "examples" / "README.md")
    assert {"examples/shots_en_fr.jsonl", "examples/sentences.txt", "examples/tweets.csv",
            "examples/prompts.jsonl", "examples/instructions.jsonl"} <= readme
    assert sorted(n for n in readme | ours if not (ROOT / n).is_file()) == []


def test_the_examples_files_read_through_the_readers_their_commands_use(toks):
    from lmforge.alignment.reward_recipe import HATE_SPEECH_LABELS
    from lmforge.alignment.rl_inputs import load_prompts
    from lmforge.data.reward_data import load_labelled, parse_label_map, to_binary
    from lmforge.prompts import load_examples

    ex = ROOT / "examples"
    assert [e.output for e in load_examples(ex / "shots_en_fr.jsonl")][:2] == ["pomme", "bonjour"]
    tweets = load_labelled(ex / "tweets.csv", "tweet", "class", parse_label_map(HATE_SPEECH_LABELS))
    assert len(to_binary(tweets, ["neither"]).texts) == 10
    assert len(load_prompts(ex / "prompts.jsonl")) == 8
    assert len(load_sft_data(ex / "instructions.jsonl", toks["chat"], max_len=128).examples) == 10
    assert len(load_preference_pairs(ex / "pairs.jsonl")) == 4
    sentences = (ex / "sentences.txt").read_text(encoding="utf-8").splitlines()
    assert len(sentences) == 8 and all(s.strip() for s in sentences)


def test_no_recipe_writes_into_a_committed_folder():
    """Running a recipe as the README says must not overwrite what the repository commits (such as the DialogSum lab
    report in docs/dialogsum_lab)."""
    import subprocess

    import yaml

    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    folders = {str(__import__("pathlib").PurePosixPath(t).parent) for t in tracked}
    for recipe in sorted((ROOT / "recipes").glob("*.yaml")):
        values = yaml.safe_load(recipe.read_text(encoding="utf-8"))
        for key in ("out", "out_dir", "runs_out", "output"):
            target = values.get(key)
            if target is None:
                continue
            target = str(target).rstrip("/")
            assert target not in folders and not any(t.startswith(target + "/") for t in tracked), (recipe.name, key)


def test_a_truncated_or_corrupted_parquet_file_is_a_clean_error(tmp_path):
    import random

    path = write_parquet(tmp_path / "ok.parquet", [{"a": i, "b": {"c": [str(i)]}} for i in range(50)])
    data = path.read_bytes()
    rng = random.Random(0)
    for k in range(60):
        damaged = bytearray(data[: rng.randrange(len(data))] if k % 2 else data)
        for _ in range(0 if k % 2 else rng.randrange(1, 20)):
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        (tmp_path / "d.parquet").write_bytes(bytes(damaged))
        try:
            load_records(tmp_path / "d.parquet")
        except LmforgeError as e:
            assert "d.parquet" in str(e)


def test_ppo_prompts_by_a_dotted_path_and_from_parquet(tmp_path):
    from lmforge.alignment.rl_inputs import load_prompts

    rows = [{"meta": {"opening": "Stuck in traffic and"}}, {"meta": {"opening": "The bus was late so"}}]
    for path in (write_jsonl(tmp_path / "p.jsonl", rows), write_parquet(tmp_path / "p.parquet", rows)):
        assert load_prompts(path, "meta.opening") == ["Stuck in traffic and", "The bus was late so"]
    with pytest.raises(LmforgeError, match=r"p.jsonl, line 1: no field 'meta.first' \(--prompt-field\): 'meta' has "
                                           r"no 'first'; it has: opening"):
        load_prompts(tmp_path / "p.jsonl", "meta.first")


def test_eval_on_a_nested_parquet_file_by_input_field_path(tiny_lm_dirs, tmp_path, capsys):
    import json as _json

    from lmforge.cli.main import main

    data = write_parquet(tmp_path / "d.parquet", NESTED)
    flat = write_jsonl(tmp_path / "d.jsonl", [{"text": "\n".join(r["dialogue"]["turns"])} for r in NESTED])
    common = ["--task", "perplexity", "-m", str(tiny_lm_dirs["plain"]), "--no-progress"]
    assert main(["eval", str(data), "--input-field", "dialogue.turns", *common, "-o", str(tmp_path / "a")]) == 0
    assert main(["eval", str(flat), "--input-field", "text", *common, "-o", str(tmp_path / "b")]) == 0
    a, b = (_json.loads((tmp_path / x / "summary.json").read_text()) for x in "ab")
    assert a["metrics"] == b["metrics"] and a["counts"]["evaluated"] == 2
    assert main(["eval", str(data), "--input-field", "dialogue.speakers", *common, "-o", str(tmp_path / "c")]) == 2
    assert "d.parquet, row 1: no field 'dialogue.speakers' (--input-field): 'dialogue' has no 'speakers'" in \
        capsys.readouterr().err
