"""`lmforge compare`: recipes validate against the schema; a tiny run writes a self-contained report."""

import json
import re
from pathlib import Path

import pytest
import yaml

import lmforge
from lmforge.cli import main
from lmforge.errors import LmforgeError
from lmforge.evaluation.compare import CompareConfig, report_only, run_compare
from lmforge.recipe_config import load_config

RECIPES = [Path(__file__).parent.parent / "recipes" / name for name in ("dialogsum_lab.yaml", "detox_ppo.yaml")]


def test_there_are_recipes():
    assert all(p.is_file() for p in RECIPES)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_parses_and_validates(path):
    cfg = load_config(CompareConfig, path)
    assert isinstance(cfg, CompareConfig) and cfg.settings
    assert len({s.label for s in cfg.settings}) == len(cfg.settings)


def test_dialogsum_lab_recipe_says_what_the_lab_compares():
    cfg = load_config(CompareConfig, Path(__file__).parent.parent / "recipes" / "dialogsum_lab.yaml")
    assert [s.shots for s in cfg.settings][:3] == [0, 1, 2]
    assert any(s.temperature > 0 and s.seed is not None for s in cfg.settings)
    assert str(cfg.data).endswith("dialogsum/dialogsum.dev.jsonl") and cfg.reference_field == "summary"
    assert {s.model for s in cfg.settings} == {"SmolLM2-135M-Instruct"}  # from the recipe's defaults


BASE = {"data": "d.jsonl", "input_field": "text", "settings": [{"label": "a"}]}


@pytest.mark.parametrize("change, message", [
    ({"temprature": 0.7}, r"r.yaml:5: unknown key 'temprature'.*\(allowed: data, settings"),
    ({"settings": [{"label": "a", "temprature": 1}]}, r"settings\[0\]: unknown key 'temprature'; did you mean 'te"),
    ({"settings": [{"label": "a"}, {"label": "a"}]}, r"settings\[1\]: label 'a' is used twice"),
    ({"settings": [{"shots": 1}]}, r"settings\[0\]: missing key 'label'"),
    ({"settings": []}, "settings: give at least one setting"),
    ({"settings": [{"label": "a", "top_p": 1.5}]}, r"settings\[0\]: top_p: must be > 0.0 and <= 1.0, got 1.5"),
    ({"settings": [{"label": "a", "shots": "two"}]}, r"settings\[0\]: shots: expected an integer, got 'two'"),
    ({"defaults": {"label": "x"}}, "defaults: unknown key 'label'"),
    ({"limit": 0}, r"r.yaml:5: limit: must be >= 1, got 0"),
    ({"metrics": ["rouge1", "meteor"]}, "unknown metric 'meteor'; known metrics"),
    ({"task": "qa"}, r"r.yaml:5: task: expected one of 'generation'"),
    ({"input_field": None}, r"set input_field \(--input-field\) or prompt_template"),
])
def test_bad_configs_name_the_key(tmp_path, change, message):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**BASE, **change}, sort_keys=False), encoding="utf-8")
    with pytest.raises(LmforgeError, match=message):
        load_config(CompareConfig, path)


def test_bad_yaml_names_the_line(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("data: x\nsettings:\n  - {label: a\n")
    with pytest.raises(LmforgeError, match=r"r.yaml:4: not valid YAML"):
        load_config(CompareConfig, p)


def test_compare_run_writes_a_self_contained_report(tiny_lm_dirs, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"one two {i}", "summary": f"three {i}"}) + "\n" for i in range(4)))
    cfg = CompareConfig(data=data, input_field="text", reference_field="summary", limit=2, max_new_tokens=3,
                        out=tmp_path / "rep", examples_shown=2, defaults={"model": str(tiny_lm_dirs["plain"])},
                        settings=[{"label": "zero-shot"}, {"label": "one-shot", "shots": 1},
                                  {"label": "hot", "temperature": 0.9, "top_p": 0.9, "seed": 1}])
    loads = []

    def loader(model, adapter):
        loads.append((model, adapter))
        return lmforge.load(model, adapter=adapter)

    cmd = "lmforge compare --config my.yaml"
    results = run_compare(cfg, cmd, progress=False, loader=loader)
    assert len(loads) == 1  # consecutive settings on the same model reuse it
    out = tmp_path / "rep"
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    assert md.splitlines()[:6] == ["# lmforge compare: d.jsonl", "", "Regenerate this report with:", "", "```", cmd]
    assert cmd in page[:2000]
    for label in ("zero-shot", "one-shot", "hot"):
        assert label in md and label in page and (out / "runs" / label / "summary.json").is_file()
    for metric in ("rouge1", "rougeLsum", "bleu", "chrf", "exact_match"):
        assert (out / f"chart_{metric}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"![{metric}](chart_{metric}.png)" in md
    # Self-contained: every image is inline, nothing is fetched from elsewhere.
    assert page.count('src="data:image/png;base64,') == 7
    assert not re.search(r'(src|href)="(?!data:)', page)
    # Example outputs next to the references, every setting side by side.
    assert "three 0" in md and results[2].rows[0]["prediction"][:10].strip() in page
    assert results[1].summary["counts"]["shots_requested"] == 1
    assert load_config(CompareConfig, out / "config.yaml") == cfg  # the resolved config reruns the comparison
    assert yaml.safe_load((out / "runs" / "hot" / "config.yaml").read_text())["temperature"] == 0.9  # eval config
    # The report can be rebuilt from the runs on disk without running a model.
    (out / "report.md").unlink()
    again = report_only(cfg, cmd)
    assert (out / "report.md").read_text() == md and [r.summary for r in again] == [r.summary for r in results]
    cfg.runs_out = tmp_path / "elsewhere"
    with pytest.raises(LmforgeError, match="no summary.json / predictions.jsonl; run the comparison first"):
        report_only(cfg, cmd)


def test_cli_compare_check_and_errors(tmp_path, capsys):
    recipe = Path(__file__).parent.parent / "recipes" / "dialogsum_lab.yaml"
    data = tmp_path / "d.jsonl"
    data.write_text('{"dialogue": "hi", "summary": "greeting"}\n')
    assert main(["compare", "--config", str(recipe), "--data", str(data), "--check"]) == 0
    assert "valid, 4 settings" in capsys.readouterr().out
    assert main(["compare", "--data", str(data), "--input-field", "dialogue", "--setting", "label=a,shots=x",
                 "--check"]) == 2
    assert "settings[0]: shots: expected an integer, got 'x'" in capsys.readouterr().err
    assert main(["compare", "--input-field", "x", "--setting", "label=a"]) == 2
    assert "data (--data) is required" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"data: {data}\ninput_field: dialogue\nsettings:\n  - {{label: a, shots: -1}}\n")
    assert main(["compare", "--config", str(bad), "--check"]) == 2
    assert f"{bad}: settings[0]: shots: must be >= 0, got -1" in capsys.readouterr().err
