"""`lmforge eval`: reading data, few-shot prompts, end-to-end runs on tiny models, and bad input."""

import csv
import dataclasses
import gzip
import json

import pytest
from rouge_score import rouge_scorer

import lmforge
from lmforge.cli import main
from lmforge.data.records import Record, load_records, render
from lmforge.errors import LmforgeError
from lmforge.evaluation import data as D
from lmforge.evaluation.harness import EvalConfig, build_prompts, run_eval
from lmforge.recipe_config import load_config

ROWS = [{"id": i, "text": f"the quick brown fox number {i}", "summary": f"fox {i}"} for i in range(6)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny(tiny_lm_dirs):
    return {k: lmforge.load(d) for k, d in tiny_lm_dirs.items()}


# ----------------------------------------------------------------------------- data
def test_formats_read_the_same_records(tmp_path):
    jl = write_jsonl(tmp_path / "d.jsonl", ROWS)
    js = tmp_path / "d.json"
    js.write_text(json.dumps(ROWS, indent=1))
    gz = tmp_path / "d.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write(jl.read_text())
    cs = tmp_path / "d.csv"
    with open(cs, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["id", "text", "summary"])
        w.writeheader()
        w.writerows(ROWS)
    expected = [r["text"] for r in ROWS]
    for p in (jl, js, gz, cs):
        recs = load_records(p)
        assert [r.fields["text"] for r in recs] == expected, p
    assert load_records(jl)[2].where == f"{jl}, line 3"  # the path as given, as in the reader's own errors


@pytest.mark.parametrize("content, name, message", [
    ('{"a": 1}\n{"a": 2,\n', "bad.jsonl", r"bad.jsonl, line 2: not valid JSON"),
    ("", "empty.jsonl", "is empty"),
    ("\n\n", "blank.jsonl", "is empty"),
    ("[]", "none.json", "holds no records"),
    ('[{"a": 1},\n {"a": }]', "bad.json", "bad.json, line 2: not valid JSON"),
    ('[1, 2]\n', "list.jsonl", "line 1: expected a JSON object, got list"),
    ("a,b\n1,2,3\n", "wide.csv", "line 2: more values than the 2 header columns"),
    ("x", "data.xml", "unknown format '.xml'"),
])
def test_bad_files_name_the_file_and_line(tmp_path, content, name, message):
    p = tmp_path / name
    p.write_text(content)
    with pytest.raises(LmforgeError, match=message):
        load_records(p)


def test_missing_field_names_it_and_lists_the_available_ones(tmp_path):
    recs = load_records(write_jsonl(tmp_path / "d.jsonl", ROWS))
    with pytest.raises(LmforgeError) as e:
        D.check_fields(recs, D.FieldMap(input="dialogue", reference="summary"), True, False)
    assert "d.jsonl, line 1: no field 'dialogue' (--input-field); the record has: id, text, summary" in str(e.value)
    with pytest.raises(LmforgeError, match=r"no field 'dialog' \(--prompt-template\)"):
        D.check_fields(recs, D.FieldMap(template="Summarize {dialog}", reference="summary"), True, False)
    with pytest.raises(LmforgeError, match=r"no field 'gold' \(--reference-field\)"):
        D.check_fields(recs, D.FieldMap(input="text", reference="gold"), True, False)


def test_template_fills_fields_without_reparsing_values():
    r = Record({"dialogue": "A: {not a field}", "n": 3}, "x")
    assert render("Summarize:\n{dialogue}\n{{n}} = {n}", r) == "Summarize:\nA: {not a field}\n{n} = 3"


# ----------------------------------------------------------------------------- few-shot prompts
def _settings(**kw):
    return EvalConfig(**{"data": "d.jsonl", "input_field": "text", "reference_field": "summary", "max_new_tokens": 4,
                         **kw})


def test_shots_in_fixed_order_and_never_the_query(tiny, tmp_path):
    recs = load_records(write_jsonl(tmp_path / "d.jsonl", ROWS))
    lm = tiny["plain"]
    # Evaluate the first 2: shots come from the records after them, in file order.
    built = build_prompts(lm, recs, 2, _settings(shots=2), chat=False, reserve=4)
    for b in built:
        assert b.prompt.index("number 2") < b.prompt.index("number 3") < b.prompt.rindex("Input:")
        assert b.shots_used == 2 and b.shots_dropped == 0
    # Evaluate all: a query is never among its own shots; the rest keep their order.
    built = build_prompts(lm, recs, 6, _settings(shots=3), chat=False, reserve=4)
    for i, b in enumerate(built):
        shots_part = b.prompt[: b.prompt.rindex("Input:")]
        assert f"number {i}\n" not in shots_part
        shown = [j for j in range(6) if f"number {j}\n" in shots_part]
        assert shown == [j for j in range(6) if j != i][:3]
        assert b.prompt.endswith(f"Input: the quick brown fox number {i}\nOutput:")


def test_a_duplicate_of_the_query_is_not_a_shot(tiny, tmp_path):
    rows = [ROWS[0], ROWS[1], dict(ROWS[0], id=99)]
    recs = load_records(write_jsonl(tmp_path / "d.jsonl", rows))
    (b,) = build_prompts(tiny["plain"], recs, 1, _settings(shots=1), chat=False, reserve=4)
    assert "number 1\nOutput: fox 1" in b.prompt and b.prompt.count("number 0") == 1


def test_shots_file_and_chat_template(tiny, tmp_path):
    recs = load_records(write_jsonl(tmp_path / "d.jsonl", ROWS[:2]))
    shots = write_jsonl(tmp_path / "shots.jsonl", [{"text": "sea otter", "summary": "loutre de mer"}])
    (b,) = build_prompts(tiny["chat"], recs, 1, _settings(shots=1, shots_file=str(shots)), chat=True, reserve=4)
    assert [m["role"] for m in b.prompt] == ["user", "assistant", "user"]
    assert b.prompt[1]["content"] == "loutre de mer" and b.prompt[2]["content"] == ROWS[0]["text"]


def test_prompt_fits_the_context_by_dropping_shots_from_the_end(tiny, tmp_path):
    rows = [{"text": f"short {i}", "summary": "s"} for i in range(2)]
    rows += [{"text": "one two three four five six seven " * 4, "summary": "long " * 10} for _ in range(4)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    lm = tiny["plain"]  # a 128-token context
    s = _settings(shots=4, limit=1, max_new_tokens=8)
    (b,) = build_prompts(lm, load_records(data), 1, s, chat=False, reserve=8)
    assert len(b.ids) + 8 <= lm.config.max_seq_len
    assert 0 < b.shots_dropped < 4 and b.shots_used + b.shots_dropped == 4
    summary = run_eval(lm, dataclasses.replace(s, data=data, out=tmp_path / "out"), progress=False)
    assert summary["counts"]["shots_dropped"] == b.shots_dropped
    assert summary["counts"]["examples_with_dropped_shots"] == 1
    row = json.loads((tmp_path / "out" / "predictions.jsonl").read_text())
    assert row["shots"] == b.shots_used and row["shots_dropped"] == b.shots_dropped


def test_too_few_records_for_the_shots(tiny, tmp_path):
    recs = load_records(write_jsonl(tmp_path / "d.jsonl", ROWS[:2]))
    with pytest.raises(LmforgeError, match="2 shots requested but the dataset has only 1"):
        build_prompts(tiny["plain"], recs, 2, _settings(shots=2), chat=False, reserve=4)


# ----------------------------------------------------------------------------- end to end
def test_generation_run_writes_predictions_and_summary(tiny, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    s = EvalConfig(data=data, out=tmp_path / "out", reference_field="summary", prompt_template="Summarize: {text}",
                   limit=3, shots=1, batch_size=2, max_new_tokens=5)
    summary = run_eval(tiny["chat"], s, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and json.loads((tmp_path / "out" / "summary.json").read_text()) == summary
    assert {"input", "prompt", "prediction", "reference", "scores"} <= rows[0].keys()
    assert rows[0]["input"] == "Summarize: the quick brown fox number 0" and "<|im_start|>user" in rows[0]["prompt"]
    scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)
    direct = [scorer.score(r["reference"], r["prediction"])["rouge1"].fmeasure for r in rows]
    assert summary["metrics"]["rouge1"] == pytest.approx(sum(direct) / 3)
    assert summary["counts"] == {"records": 6, "evaluated": 3, "shots_requested": 1, "shots_dropped": 0,
                                 "examples_with_dropped_shots": 0}
    assert summary["settings"]["chat"] is True and summary["timing"]["seconds"] > 0
    assert load_config(EvalConfig, tmp_path / "out" / "config.yaml") == s  # the resolved config reruns it


def test_toxicity_perplexity_and_multiple_choice_runs(tiny, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t, "choices": ["Paris", "the lazy dog"], "answer": a}
                                              for t, a in (("The capital of France is", 0), ("The quick", 1))])
    fields = dict(data=data, input_field="text", choices_field="choices", answer_field="answer")
    tox = run_eval(tiny["plain"], EvalConfig(task="toxicity", **fields, max_new_tokens=3),
                   progress=False, toxicity_scorer=lambda ts: [0.75] * len(ts))
    assert tox["metrics"] == {"toxicity_rate": 1.0, "toxicity_mean": 0.75}
    ppl = run_eval(tiny["plain"], EvalConfig(task="perplexity", **fields), progress=False)
    assert ppl["metrics"]["perplexity"] > 1 and ppl["metrics"]["tokens_scored"] > 0
    mc = run_eval(tiny["plain"], EvalConfig(task="multiple_choice", out=tmp_path / "mc", **fields), progress=False)
    rows = [json.loads(x) for x in (tmp_path / "mc" / "predictions.jsonl").read_text().splitlines()]
    for r in rows:
        assert r["prediction"] == max(range(2), key=r["logprobs"].__getitem__)
    assert mc["metrics"]["accuracy"] == sum(r["prediction"] == r["answer"] for r in rows) / 2


# ----------------------------------------------------------------------------- the command line
def test_cli_eval_and_its_errors(tiny_lm_dirs, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS[:2])
    out = tmp_path / "out"
    rc = main(["eval", str(data), "-o", str(out), "-m", str(tiny_lm_dirs["plain"]), "--input-field", "text",
               "--reference-field", "summary", "--metrics", "rouge1,chrf", "-n", "3", "--no-progress"])
    assert rc == 0 and set(json.loads((out / "summary.json").read_text())["metrics"]) == {"rouge1", "chrf"}
    capsys.readouterr()
    base = ["eval", str(data), "-o", str(out), "-m", str(tiny_lm_dirs["plain"]), "--no-progress"]
    cases = [
        (["--input-field", "dialogue", "--reference-field", "summary"], "no field 'dialogue'"),
        (["--input-field", "text", "--reference-field", "summary", "--metrics", "bleurt"],
         "unknown metric 'bleurt'; known metrics: rouge1"),
        (["--input-field", "text"], "need references: set --reference-field"),
    ]
    for extra, message in cases:
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["eval", str(empty), "-o", str(out), "--input-field", "text"]) == 2
    assert "is empty" in capsys.readouterr().err


def test_cli_template_escapes():
    from lmforge.cli.evaluation import unescape

    assert unescape("Summarize:\\n\\n{dialogue}\\tSummary:") == "Summarize:\n\n{dialogue}\tSummary:"
    assert unescape(None) is None
