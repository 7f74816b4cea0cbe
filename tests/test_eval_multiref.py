"""Several references per example in `lmforge eval` and `lmforge compare` (DialogSum's test split has summary1..3).

The expected numbers come from rouge-score and sacrebleu called directly here; the model's generations are fixed
(a tiny model whose ``generate`` returns known texts) so that the best reference differs from the first.
"""

import json

import pytest
import sacrebleu
import yaml
from rouge_score import rouge_scorer

import lmforge
from lmforge.cli import main
from lmforge.errors import LmforgeError
from lmforge.evaluation.compare import CompareConfig, run_compare
from lmforge.evaluation.harness import EvalConfig, run_eval
from lmforge.evaluation.metrics import score_generations
from lmforge.recipe_config import load_config

TEXTS = ["a cat on a mat", "john at the shop", "small talk about the weather"]
PREDICTIONS = ["the cat sat on the mat", "john buys milk at the store", "they talk about the weather"]
REFERENCES = [  # the first is not always the best one
    ["a dog ran in the park", "the cat sat on a mat", "cats sit"],
    ["john buys milk at the store today", "someone shops", "a purchase"],
    ["a chat", "the two talk about weather", "they talk about the weather tomorrow"],
]
ROUGE = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def expected(predictions, references):
    """rouge-score against the first and the best reference, sacrebleu multi-reference BLEU/chrF."""
    scorer = rouge_scorer.RougeScorer(list(ROUGE), use_stemmer=True)
    out = {}
    for t in ROUGE:
        first = [scorer.score(refs[0], p)[t].fmeasure for p, refs in zip(predictions, references)]
        best = [max(scorer.score(r, p)[t].fmeasure for r in refs) for p, refs in zip(predictions, references)]
        out[t], out[t + "_best"] = sum(first) / len(first), sum(best) / len(best)
    streams = [[refs[j] if j < len(refs) else None for refs in references] for j in range(max(map(len, references)))]
    out["bleu"] = sacrebleu.corpus_bleu(predictions, streams).score
    out["chrf"] = sacrebleu.corpus_chrf(predictions, streams).score
    out["exact_match"] = sum(p == refs[0] for p, refs in zip(predictions, references)) / len(predictions)
    out["exact_match_best"] = sum(p in refs for p, refs in zip(predictions, references)) / len(predictions)
    return out


@pytest.fixture(scope="module")
def fixed_lm(tiny_lm_dirs):
    """The tiny plain model, its generations replaced by PREDICTIONS (looked up by the prompt's last query; shots
    before it end with their first reference)."""
    lm = lmforge.load(tiny_lm_dirs["plain"])
    by_text = dict(zip(TEXTS, PREDICTIONS))
    lm.generate = lambda prompts, **kw: [by_text[p.rsplit("Summarize: ", 1)[1]] for p in prompts]
    return lm


def fields_file(tmp_path):
    rows = [{"text": t, **{f"summary{j + 1}": r for j, r in enumerate(refs)}} for t, refs in zip(TEXTS, REFERENCES)]
    return write_jsonl(tmp_path / "d.jsonl", rows)


def config(data, out=None, **kw):
    return EvalConfig(data=data, out=out, prompt_template="Summarize: {text}", max_new_tokens=8, **kw)


def read_rows(out):
    return [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- the metrics
def test_score_generations_first_and_best_reference():
    want = expected(PREDICTIONS, REFERENCES)
    assert want["rouge1_best"] > want["rouge1"] + 0.1  # the data makes best-of differ from the first
    corpus, per = score_generations(PREDICTIONS, REFERENCES, ["rouge1", "rouge2", "rougeL", "rougeLsum", "bleu",
                                                              "chrf", "exact_match"])
    assert corpus == pytest.approx(want)
    assert per[0]["rouge1"] < per[0]["rouge1_best"] and per[1]["rouge1"] == per[1]["rouge1_best"]
    assert per[0]["bleu"] == pytest.approx(sacrebleu.sentence_bleu(PREDICTIONS[0], REFERENCES[0]).score)
    # One reference per example (strings, or lists of one): the old keys only, the old values.
    one, _ = score_generations(PREDICTIONS, [r[0] for r in REFERENCES], ["rouge1", "bleu", "exact_match"])
    assert set(one) == {"rouge1", "bleu", "exact_match"}
    assert one["rouge1"] == pytest.approx(want["rouge1"])
    assert one["bleu"] == pytest.approx(sacrebleu.corpus_bleu(PREDICTIONS, [[r[0] for r in REFERENCES]]).score)
    assert set(score_generations(PREDICTIONS, [r[:1] for r in REFERENCES], ["rouge1"])[0]) == {"rouge1"}
    with pytest.raises(LmforgeError, match="reference 1 must be a string or a non-empty list of strings"):
        score_generations(PREDICTIONS, [["x"], [], ["y"]], ["rouge1"])


# ----------------------------------------------------------------------------- eval
def test_eval_with_several_reference_fields(fixed_lm, tmp_path):
    data, out = fields_file(tmp_path), tmp_path / "out"
    cfg = config(data, out, reference_field="summary1,summary2,summary3")
    assert cfg.reference_field == ("summary1", "summary2", "summary3")
    summary = run_eval(fixed_lm, cfg, progress=False)
    assert summary["metrics"] == pytest.approx(expected(PREDICTIONS, REFERENCES))
    assert summary["references"]["fields"] == ["summary1", "summary2", "summary3"]
    assert summary["references"]["min_per_example"] == summary["references"]["max_per_example"] == 3
    assert "first reference" in summary["references"]["scoring"]
    rows = read_rows(out)
    assert [r["references"] for r in rows] == REFERENCES and [r["reference"] for r in rows] == [r[0] for r in
                                                                                                 REFERENCES]
    assert rows[0]["scores"]["rouge1_best"] > rows[0]["scores"]["rouge1"]
    assert load_config(EvalConfig, out / "config.yaml") == cfg  # written as a YAML list, read back the same
    assert yaml.safe_load((out / "config.yaml").read_text())["reference_field"] == ["summary1", "summary2",
                                                                                     "summary3"]
    # One reference field: the output is as before (no *_best, no "references").
    single = run_eval(fixed_lm, config(data, tmp_path / "one", reference_field="summary1"), progress=False)
    assert not any(k.endswith("_best") for k in single["metrics"]) and "references" not in single
    assert "references" not in read_rows(tmp_path / "one")[0]
    assert single["metrics"]["rouge1"] == pytest.approx(summary["metrics"]["rouge1"])


def test_a_list_valued_reference_field(fixed_lm, tmp_path):
    refs = [REFERENCES[0], REFERENCES[1][:2], REFERENCES[2]]  # 3, 2 and 3 references
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t, "summaries": r} for t, r in zip(TEXTS, refs)])
    summary = run_eval(fixed_lm, config(data, tmp_path / "out", reference_field="summaries"), progress=False)
    assert summary["metrics"] == pytest.approx(expected(PREDICTIONS, refs))
    assert (summary["references"]["min_per_example"], summary["references"]["max_per_example"]) == (2, 3)
    assert [r["references"] for r in read_rows(tmp_path / "out")] == refs
    # A list of fields in YAML (the same references as summary1..3).
    yml = tmp_path / "e.yaml"
    yml.write_text(f"data: {fields_file(tmp_path)}\nreference_field: [summary1, summary2, summary3]\n")
    assert load_config(EvalConfig, yml).reference_field == ("summary1", "summary2", "summary3")


def test_a_missing_reference_names_the_field_and_the_record(fixed_lm, tmp_path, capsys):
    rows = [{"text": t, **{f"summary{j + 1}": r for j, r in enumerate(refs)}} for t, refs in zip(TEXTS, REFERENCES)]
    del rows[1]["summary3"]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(LmforgeError, match=r"d.jsonl, line 2: no field 'summary3' \(--reference-field\)"):
        run_eval(fixed_lm, config(data, reference_field=("summary1", "summary2", "summary3")), progress=False)
    rows[1]["summary3"] = []
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(LmforgeError, match=r"line 2: field 'summary3' \(--reference-field\) must be text or a non-"):
        run_eval(fixed_lm, config(data, reference_field=("summary1", "summary2", "summary3")), progress=False)
    with pytest.raises(LmforgeError, match="a field is named twice"):
        config(data, reference_field="summary1,summary1")
    # On the command line: one line, exit status 2, before any model loads.
    rc = main(["eval", str(data), "-o", str(tmp_path / "cli"), "--prompt-template", "Summarize: {text}",
               "--reference-field", "summary1,summary2,summary3", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and "summary3" in err and "line 2" in err


def test_cli_eval_with_several_reference_fields(tiny_lm_dirs, tmp_path, capsys):
    data, out = fields_file(tmp_path), tmp_path / "out"
    rc = main(["eval", str(data), "-o", str(out), "-m", str(tiny_lm_dirs["plain"]), "--prompt-template",
               "Summarize: {text}", "--reference-field", "summary1,summary2,summary3", "--metrics", "rouge1,bleu",
               "-n", "3", "--no-progress"])
    summary = json.loads((out / "summary.json").read_text())
    assert rc == 0 and set(summary["metrics"]) == {"rouge1", "rouge1_best", "bleu"}
    printed = json.loads(capsys.readouterr().out.split("\nwrote ")[0])  # what each metric was scored against
    assert printed["references"] == summary["references"] and "best of its references" in printed["references"][
        "scoring"]
    rows = read_rows(out)
    assert summary["metrics"]["rouge1_best"] == pytest.approx(
        expected([r["prediction"] for r in rows], REFERENCES)["rouge1_best"])


# ----------------------------------------------------------------------------- compare
def test_compare_with_several_references(fixed_lm, tmp_path):
    data, out = fields_file(tmp_path), tmp_path / "rep"
    cfg = CompareConfig(data=data, prompt_template="Summarize: {text}", max_new_tokens=8, out=out,
                        reference_field=["summary1", "summary2", "summary3"], metrics=("rouge1", "chrf"),
                        settings=[{"label": "a"}, {"label": "b", "shots": 1}])
    results = run_compare(cfg, "lmforge compare --config r.yaml", progress=False, loader=lambda m, a: fixed_lm)
    want = expected(PREDICTIONS, REFERENCES)
    for r in results:
        assert r.summary["metrics"] == pytest.approx({k: want[k] for k in ("rouge1", "rouge1_best", "chrf")})
        assert r.rows[0]["references"] == REFERENCES[0]
    assert "Summarize: john at the shop john buys milk at the store today" in results[1].rows[0]["prompt"]  # shots:
    # the first reference is a shot's answer
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    assert "| setting | rouge1 | rouge1_best | chrf |" in md and (out / "chart_rouge1_best.png").is_file()
    note = "Several references per example (summary1, summary2, summary3): rouge1/rouge2/rougeL/rougeLsum and"
    assert note in md and note in page
    assert "[1] a dog ran in the park<br>[2] the cat sat on a mat" in md  # the example shows every reference
    assert load_config(CompareConfig, out / "config.yaml") == cfg
