"""`lmforge compare` deployment columns (``deployment_stats``) and a setting's load-time ``quantize``."""

import json
import os

import pytest

import lmforge
from lmforge.cli import main
from lmforge.errors import LmforgeError
from lmforge.evaluation.compare import CompareConfig, run_compare
from lmforge.evaluation.deployment import PeakMemory, count_parameters, path_bytes
from lmforge.models import count_parameters as config_parameters


def _data(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"one two {i}", "summary": f"three {i}"}) + "\n" for i in range(3)))
    return data


def test_deployment_columns_have_sane_values_and_int4_differs(tiny_lm_dirs, tmp_path):
    model = tiny_lm_dirs["plain"]
    cfg = CompareConfig(data=_data(tmp_path), input_field="text", reference_field="summary", limit=2,
                        max_new_tokens=3, out=tmp_path / "rep", deployment_stats=True, decode_tokens=8,
                        defaults={"model": str(model)}, metrics=("rougeL",),
                        settings=[{"label": "fp32"}, {"label": "int4", "quantize": "int4"},
                                  {"label": "int8", "quantize": "int8"}])
    fp32, int4, int8 = (r.deployment for r in run_compare(cfg, "lmforge compare", progress=False))
    reference = lmforge.load(model).model
    n_params = sum(p.numel() for p in reference.parameters())
    assert n_params == config_parameters(reference.config)
    assert fp32["parameters"] == int4["parameters"] == int8["parameters"] == n_params  # the weights it represents
    assert fp32["disk_mb"] == round(path_bytes(model) / 2**20, 2) > 0
    assert int4["disk_mb"] == fp32["disk_mb"]  # quantised at load time: the folder on disk is the float one
    assert fp32["weights_mb"] > int8["weights_mb"] > int4["weights_mb"] > 0
    for d in (fp32, int4, int8):
        assert d["decode_tok_s"] > 0 and d["decode_tokens"] == 8
        if os.access("/proc/self/clear_refs", os.W_OK):  # Linux: the resident-set peak is measured
            assert d["peak_mem_mb"] >= 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "## Deployment" in md and "| setting | disk MB | weights MB | parameters | peak memory MB | decode tok/s |" in md
    assert f"| int4 | {int4['disk_mb']:.4g} | {int4['weights_mb']:.4g} | {n_params} |" in md
    assert "<h2>Deployment</h2>" in (tmp_path / "rep" / "report.html").read_text()
    summary = json.loads((tmp_path / "rep" / "runs" / "int4" / "summary.json").read_text())
    assert summary["deployment"] == int4 and summary["settings"]["quantize"] == "int4"


def test_peak_memory_counts_what_is_allocated_after_the_baseline():
    import torch

    memory = PeakMemory("cpu")
    memory.baseline()
    memory.start()
    if memory.peak() is None:
        pytest.skip("no /proc/self/clear_refs here: the peak resident set cannot be reset")
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB touched
    assert memory.peak() >= 60 * 2**20
    del block


def test_quantised_layers_count_their_weights(tiny_lm_dirs):
    lm = lmforge.load(tiny_lm_dirs["plain"])
    n = count_parameters(lm.model)
    assert count_parameters(lmforge.load(tiny_lm_dirs["plain"], quantize="int4").model) == n


def test_deployment_columns_are_off_by_default(tiny_lm_dirs, tmp_path):
    cfg = CompareConfig(data=_data(tmp_path), input_field="text", reference_field="summary", limit=1,
                        max_new_tokens=2, out=tmp_path / "rep", metrics=("rougeL",),
                        settings=[{"label": "a", "model": str(tiny_lm_dirs["plain"])}])
    (result,) = run_compare(cfg, "lmforge compare", progress=False)
    assert result.deployment is None and "## Deployment" not in (tmp_path / "rep" / "report.md").read_text()


def test_bad_quantize_is_one_clear_line(tmp_path, capsys):
    with pytest.raises(LmforgeError, match=r"settings\[0\]: quantize: expected one of 'int8', 'int4'.*'int3'"):
        CompareConfig(data=tmp_path / "d.jsonl", input_field="text", settings=[{"label": "a", "quantize": "int3"}])
    data = _data(tmp_path)
    assert main(["compare", "--data", str(data), "--input-field", "text", "--setting", "label=a,quantize=int3",
                 "--check"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: settings[0]: quantize: expected one of 'int8', 'int4'")


def _optimize_bench():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent.parent / "bench" / "optimize.py"
    spec = importlib.util.spec_from_file_location("bench_optimize", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_optimize_bench_checks_issue_16s_thresholds():
    bench = _optimize_bench()
    row = {"rouge1": 0.4, "rouge2": 0.1, "rougeL": 0.30, "disk_mb": 100.0, "parameters": 10, "peak_mem_mb": 5.0,
           "decode_tok_s": 10.0}
    rows = {"teacher": row, "int4": {**row, "rougeL": 0.2905, "disk_mb": 29.0, "decode_tok_s": 9.9},
            "distilled": {**row, "rougeL": 0.27, "decode_tok_s": 16.9}}
    got = {name: (ok, detail) for name, ok, detail in bench.checks(rows)}
    assert got["int4 ROUGE-L within 1.0 point of fp32"][0] is True  # 0.95 points lower
    assert got["int4 size on disk <= 0.3x fp32"] == (True, "29.0 MB / 100.0 MB = 0.290x")
    assert got["int4 batch-1 decode faster than fp32"] == (False, "9.9 / 10.0 tok/s = 0.99x")
    assert got["student ROUGE-L >= 90% of the teacher's"] == (True, "27.00 / 30.00 = 90.0%")
    assert got["student decode >= 1.7x the teacher's"] == (False, "16.9 / 10.0 tok/s = 1.69x")
    assert got["pruned+healed ROUGE-L >= 90% of the teacher's"] == (None, "no pruned+healed row")
    rows["int4"]["rougeL"] = 0.2895  # 1.05 points lower
    assert dict((n, ok) for n, ok, _ in bench.checks(rows))["int4 ROUGE-L within 1.0 point of fp32"] is False


def test_a_compile_setting_times_the_compiled_decode_and_is_recorded(tiny_lm_dirs, tmp_path, monkeypatch):
    import lmforge.evaluation.deployment as deployment

    seen = []
    real = deployment.generate_tokens

    def spy(*args, compile=False, **kwargs):
        seen.append(compile)
        return real(*args, compile=False, **kwargs)  # the compiled step itself is tested in test_fast_decode

    monkeypatch.setattr(deployment, "generate_tokens", spy)
    cfg = CompareConfig(data=_data(tmp_path), input_field="text", reference_field="summary", limit=1,
                        max_new_tokens=2, out=tmp_path / "rep", deployment_stats=True, decode_tokens=4,
                        defaults={"model": str(tiny_lm_dirs["plain"])}, metrics=("rougeL",),
                        settings=[{"label": "eager"}, {"label": "compiled", "compile": True}])
    eager, compiled = run_compare(cfg, "lmforge compare", progress=False)
    half = len(seen) // 2  # the eager setting's timing runs, then as many for the compiled one
    assert seen and seen == [False] * half + [True] * half
    runs = tmp_path / "rep" / "runs"
    assert json.loads((runs / "compiled" / "summary.json").read_text())["settings"]["compile"] is True
    assert json.loads((runs / "eager" / "summary.json").read_text())["settings"]["compile"] is False
    assert compiled.deployment["decode_tok_s"] > 0 and eager.deployment["decode_tok_s"] > 0


def test_peak_memory_is_the_batch_1_decode_not_the_evaluation(tiny_lm_dirs, tmp_path, monkeypatch):
    """What the batched evaluation allocates (here 256 MiB, touched) is not the deployed model's peak memory."""
    import torch

    import lmforge.evaluation.compare as compare

    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("no /proc/self/clear_refs here: the peak resident set cannot be reset")
    real = compare.run_eval

    def greedy_eval(*args, **kwargs):
        block = torch.ones(256 * 2**20 // 4)
        del block
        return real(*args, **kwargs)

    monkeypatch.setattr(compare, "run_eval", greedy_eval)
    cfg = CompareConfig(data=_data(tmp_path), input_field="text", reference_field="summary", limit=1,
                        max_new_tokens=2, out=tmp_path / "rep", deployment_stats=True, decode_tokens=4,
                        defaults={"model": str(tiny_lm_dirs["plain"])}, metrics=("rougeL",),
                        settings=[{"label": "a"}])
    (result,) = run_compare(cfg, "lmforge compare", progress=False)
    assert 0 <= result.deployment["peak_mem_mb"] < 128
