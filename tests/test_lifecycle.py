"""``lmforge lifecycle`` (issue 18) on a tiny recipe: a tiny random Llama, 10 training records, 2 training steps.

The full run writes every stage and the report; a re-run skips every stage; a changed adapt section re-runs adapt
and the stages after it only; a run killed inside adapt resumes there (select skipped, the fine-tune continued
from its checkpoint to the same weights as an uninterrupted run); bad recipe files are one error line naming
file:line and key, with nothing written.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lmforge.cli import main
from lmforge.lifecycle import load_lifecycle, run_lifecycle

WORDS = "red green blue fox dog cat one two three four".split()


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("lifecycle-data")
    for split, n in (("train", 10), ("dev", 4), ("test", 4)):
        with open(d / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for i in range(n):
                w = WORDS[(i * 3 + len(split)) % len(WORDS)]
                f.write(json.dumps({"dialogue": f"A: the {w} is here. B: ok.", "summary": f"the {w}",
                                    "summary2": f"{w} here"}) + "\n")
    return d


def recipe(tmp_path: Path, data: Path, model: Path, *, out: str = "out", **sections) -> Path:
    """A tiny recipe file; ``sections`` replace or add top-level keys (None removes one)."""
    r = {
        "task": {"train": str(data / "train.jsonl"), "dev": str(data / "dev.jsonl"), "test": str(data / "test.jsonl"),
                 "prompt_template": "Summarize: {dialogue}\nSummary: ", "response_field": "summary",
                 "max_new_tokens": 4, "batch_size": 4},
        "candidates": [{"label": "zero-shot", "model": str(model)}, {"label": "one-shot", "model": str(model),
                                                                      "shots": 1}],
        "out": str(tmp_path / out),
        "stages": ["select", "adapt", "evaluate"],
        "select": {"limit": 2, "speed_tokens": 2},
        "adapt": {"method": "full", "steps": 2, "batch_size": 2, "max_len": 64, "eval_generate": 0,
                  "eval_examples": 2, "save_every": 1, "log_every": 1},
        "evaluate": {"limit": 2},
    }
    for k, v in sections.items():
        if v is None:
            r.pop(k, None)
        else:
            r[k] = v
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(r, sort_keys=False), encoding="utf-8")
    return path


def run(path: Path, **kw) -> tuple[dict, list[str]]:
    lines: list[str] = []
    records = run_lifecycle(load_lifecycle(path), progress=False, log=lines.append, **kw)
    return records, lines


def test_full_lifecycle_writes_every_stage_and_the_report_and_a_rerun_skips_all(tiny_lm_dirs, task_files, tmp_path):
    task = yaml.safe_load(recipe(tmp_path, task_files, tiny_lm_dirs["chat"]).read_text(encoding="utf-8"))["task"]
    path = recipe(tmp_path, task_files, tiny_lm_dirs["chat"], stages=None, optimise={"quantize": ["int8"]},
                  deploy={"max_tokens": 3, "serve": {"max_batch": 1, "max_context": 128}},
                  task={**task, "references": ["summary", "summary2"]})
    records, lines = run(path)
    out = tmp_path / "out"
    assert list(records) == ["select", "adapt", "evaluate", "optimise", "deploy"]
    for stage in records:
        saved = json.loads((out / stage / "stage.json").read_text(encoding="utf-8"))
        assert saved["hash"] == records[stage]["hash"] and saved["table"]["rows"]
    assert records["select"]["outputs"]["label"] in ("zero-shot", "one-shot")
    assert "within the budget" in records["select"]["decision"]
    assert (out / "select" / "compare" / "runs" / "one-shot" / "predictions.jsonl").is_file()
    assert (out / "adapt" / "run" / "final" / "model.safetensors").is_file()
    assert [row[0] for row in records["evaluate"]["table"]["rows"]] == ["base: " + records["select"]["outputs"]
                                                                        ["label"], "adapted (full)"]
    assert [row[0] for row in records["optimise"]["table"]["rows"]] == ["float32", "int8"]
    assert {"rouge1", "rouge1_best"} <= set(records["evaluate"]["table"]["header"])  # several references
    deploy = records["deploy"]["outputs"]
    assert deploy["content"].strip() and deploy["latency_s"] > 0
    served = yaml.safe_load((out / deploy["serve_config"]).read_text(encoding="utf-8"))
    assert served["model"] == str(out / "adapt" / "run" / "final") and served["host"] == "127.0.0.1"
    assert "server stopped" in json.dumps(records["deploy"]["table"])
    md, page = (out / "report.md").read_text(encoding="utf-8"), (out / "report.html").read_text(encoding="utf-8")
    for stage in records:
        assert f"## {stage}" in md and f"<h2>{stage}</h2>" in page
    assert "**select**: selected '" in md and "data:image/png;base64," in page
    assert "min in all (select " in md and ", deploy " in md  # the time of every stage, and the total
    assert (out / "chart_select_rouge1.png").is_file()

    again, lines = run(path)
    assert lines == [f"[{i}/5] skip {s}: unchanged (hash {records[s]['hash'][:12]})" for i, s in enumerate(records, 1)]
    assert {s: r["finished"] for s, r in again.items()} == {s: r["finished"] for s, r in records.items()}


def test_a_changed_adapt_section_reruns_adapt_and_the_stages_after_it_only(tiny_lm_dirs, task_files, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Summarize: the {w}\nSummary: ", "chosen": f"the {w}",
                                         "rejected": "no"}) + "\n" for w in WORDS[:4]), encoding="utf-8")
    path = recipe(tmp_path, task_files, tiny_lm_dirs["chat"], stages=["select", "adapt", "align", "evaluate"],
                  align={"data": str(pairs), "steps": 1, "batch_size": 2, "max_len": 64})
    first, _ = run(path)
    aligned = first["align"]["outputs"]
    assert aligned["model"] == str(tmp_path / "out" / "adapt" / "run" / "final")  # DPO's LoRA on the adapted model
    assert aligned["adapter"] == str(tmp_path / "out" / "align" / "run" / "final")
    assert [r[0] for r in first["evaluate"]["table"]["rows"]][1:] == ["adapted (full)", "aligned (DPO, lora)"]
    cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    cfg["adapt"]["lr"] = 1e-3
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    second, lines = run(path)
    assert lines[0].startswith("[1/4] skip select: unchanged")
    for i, stage in enumerate(("adapt", "align", "evaluate"), start=2):
        assert any(line.startswith(f"[{i}/4] {stage}: running (changed") for line in lines)
        assert second[stage]["hash"] != first[stage]["hash"]
    assert second["select"]["finished"] == first["select"]["finished"]
    _, lines = run(path, force=["evaluate"])  # --force: that stage (and later ones) again
    assert lines[2].startswith("[3/4] skip align") and lines[3].startswith("[4/4] evaluate: running (forced")


SMALL = {"steps": 2, "batch_size": 2, "max_len": 64, "log_every": 1, "save_every": 1}


def test_optimise_distils_and_prunes_the_final_model_and_scores_them_beside_it(tiny_lm_dirs, task_files, tmp_path):
    """optimise's distil section trains a 1-block student from the adapted model, its prune section drops to 1
    block by block influence and heal distils the pruned model: each is a row of optimise's table (a real model
    folder with that many blocks, scored and timed); a re-run skips the stage."""
    path = recipe(tmp_path, task_files, tiny_lm_dirs["chat"], stages=["select", "adapt", "optimise"],
                  optimise={"quantize": [], "distil": {"student_layers": 1, **SMALL},
                            "prune": {"keep_layers": 1, "samples": 2, "seq_len": 16}, "heal": SMALL})
    records, lines = run(path)
    out = tmp_path / "out" / "optimise"
    rows = records["optimise"]["table"]["rows"]
    assert [r[0] for r in rows] == ["float32", "distilled (1 blocks)", "pruned (1 blocks) + healed"]
    assert all(r[1] > 0 and r[2] > 0 and r[3] is not None for r in rows)
    assert rows[1][1] < rows[0][1] and rows[2][1] < rows[0][1]  # fewer blocks, less weight memory
    for folder in (out / "distil" / "final", out / "pruned", out / "heal" / "final"):
        assert json.loads((folder / "config.json").read_text(encoding="utf-8"))["num_hidden_layers"] == 1
    assert json.loads((out / "pruned" / "prune.json").read_text(encoding="utf-8"))["method"] == "layers"
    assert (out / "calibration.txt").read_text(encoding="utf-8").startswith("Summarize: A: the")
    assert any("optimise: distilling (heal)" in line for line in lines)
    _, again = run(path)
    assert again[-1].startswith("[3/3] skip optimise: unchanged")


def test_optimise_distil_and_prune_refuse_bad_sections_and_an_adapter(tiny_lm_dirs, task_files, tmp_path, capsys):
    model = tiny_lm_dirs["chat"]
    stages = ["select", "adapt", "optimise"]
    path = recipe(tmp_path, task_files, model, stages=stages, optimise={"heal": SMALL})
    assert "optimise.heal: heals the pruned model: add a prune section" in _fails(["lifecycle", str(path)], capsys)
    path = recipe(tmp_path, task_files, model, stages=stages, optimise={"distil": {"student_layerz": 1}})
    err = _fails(["lifecycle", str(path)], capsys)
    assert "optimise.distil.student_layerz: unknown key; did you mean 'student_layers'?" in err
    path = recipe(tmp_path, task_files, model, stages=stages, optimise={"distil": {"teacher": "x", **SMALL}})
    assert "optimise.distil.teacher: is set by the lifecycle" in _fails(["lifecycle", str(path)], capsys)
    path = recipe(tmp_path, task_files, model, stages=stages, optimise={"prune": {"samples": 2}})
    assert "optimise.prune" in _fails(["lifecycle", str(path)], capsys)
    assert not (tmp_path / "out").exists()
    path = recipe(tmp_path, task_files, model, stages=stages, optimise={"quantize": [],
                                                                          "distil": {"student_layers": 1, **SMALL}},
                  adapt={"method": "lora", "steps": 1, "batch_size": 2, "max_len": 64, "eval_generate": 0,
                         "eval_examples": 2})
    err = _fails(["lifecycle", str(path)], capsys)
    assert "optimise.distil: teaches from the final model's whole weights, but adapt.method is lora" in err
    assert not (tmp_path / "out").exists()


def test_align_with_ppo_against_a_reward_function_on_the_task_prompts(tiny_lm_dirs, task_files, tmp_path,
                                                                       monkeypatch, capsys):
    """align: algorithm ppo trains the adapted model against a reward function on the task's own training prompts
    (written to OUT/align/prompts.jsonl: one PPO step of 2 prompts, so 2), and evaluate scores it beside the
    others; an unknown algorithm is one error line naming align.algorithm."""
    (tmp_path / "lc_reward.py").write_text("def short(prompts, completions):\n"
                                           "    return [-len(c) / 10 for c in completions]\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    ppo = {"algorithm": "ppo", "reward": "lc_reward:short", "steps": 1, "batch_size": 2, "mini_batch_size": 2,
           "ppo_epochs": 1, "max_new_tokens": 4}
    path = recipe(tmp_path, task_files, tiny_lm_dirs["chat"], stages=["select", "adapt", "align", "evaluate"],
                  align=ppo)
    records, _ = run(path)
    prompts = (tmp_path / "out" / "align" / "prompts.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(p)["prompt"] for p in prompts] == ["Summarize: A: the cat is here. B: ok.\nSummary: ",
                                                          "Summarize: A: the three is here. B: ok.\nSummary: "]
    assert records["align"]["outputs"]["adapter"] == str(tmp_path / "out" / "align" / "run" / "final")
    assert "with PPO (lora)" in records["align"]["decision"] and "lc_reward:short" in records["align"]["decision"]
    assert [r[0] for r in records["evaluate"]["table"]["rows"]][1:] == ["adapted (full)", "aligned (PPO, lora)"]
    capsys.readouterr()
    path = recipe(tmp_path, task_files, tiny_lm_dirs["chat"], out="bad", align={**ppo, "algorithm": "grpo"})
    assert "align.algorithm: unknown algorithm 'grpo'; allowed: dpo, ppo" in _fails(["lifecycle", str(path)], capsys)


def test_a_lifecycle_killed_inside_adapt_resumes_there(tiny_lm_dirs, task_files, tmp_path):
    adapt = {"method": "full", "steps": 12, "batch_size": 2, "max_len": 64, "eval_generate": 0, "eval_examples": 2,
             "save_every": 1, "log_every": 1}
    small = dict(stages=["select", "adapt"], adapt=adapt, select={"limit": 1, "speed_tokens": 1},
                 candidates=[{"label": "zero-shot", "model": str(tiny_lm_dirs["chat"])}])
    killed = recipe(tmp_path, task_files, tiny_lm_dirs["chat"], out="killed", **small)
    whole = recipe(tmp_path, task_files, tiny_lm_dirs["chat"], out="whole", **small)
    ckpt = tmp_path / "killed" / "adapt" / "run" / "checkpoint" / "state.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lmforge.cli", "lifecycle", str(killed), "--no-progress"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    try:
        while not ckpt.is_file():
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "no adapt checkpoint within 240 s"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    assert not (tmp_path / "killed" / "adapt" / "stage.json").exists()
    assert not (tmp_path / "killed" / "adapt" / "run" / "final").exists(), "the run finished before it was killed"
    records, lines = run(killed)
    assert lines[0].startswith("[1/2] skip select: unchanged")
    assert "  adapt: resuming from its checkpoint" in lines and "resumed" in records["adapt"]["decision"]
    run(whole)
    a = load_file(tmp_path / "killed" / "adapt" / "run" / "final" / "model.safetensors")
    b = load_file(tmp_path / "whole" / "adapt" / "run" / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def _fails(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_bad_recipe_files_are_one_line_naming_file_line_and_key_and_write_nothing(tiny_lm_dirs, task_files, tmp_path,
                                                                                    capsys):
    model = tiny_lm_dirs["chat"]
    path = recipe(tmp_path, task_files, model, stages=["select", "adapt", "evalute"])
    err = _fails(["lifecycle", str(path)], capsys)
    assert f"{path}:" in err and "stages" in err and "evalute" in err
    path = recipe(tmp_path, task_files, model, adapt={"method": "lora", "stepz": 3})
    err = _fails(["lifecycle", str(path)], capsys)
    line = next(i for i, t in enumerate(path.read_text().splitlines(), 1) if "stepz" in t)
    assert f"{path}:{line}: adapt.stepz: unknown key; did you mean 'steps'?" in err
    path = recipe(tmp_path, task_files, model, adapt={"method": "lora", "train": "x.jsonl"})
    assert "adapt.train: is set by the lifecycle" in _fails(["lifecycle", str(path)], capsys)
    path = recipe(tmp_path, task_files, model, adapt={"method": "sgd"})
    assert "adapt.method" in _fails(["lifecycle", str(path)], capsys)
    path = recipe(tmp_path, task_files, model, surprise=1)
    assert "unknown key 'surprise'" in _fails(["lifecycle", str(path)], capsys)
    task = yaml.safe_load(path.read_text())["task"]
    path = recipe(tmp_path, task_files, model, surprise=None, task={**task, "budget": {"max_params_m": -1}})
    line = next(i for i, t in enumerate(path.read_text().splitlines(), 1) if "max_params_m" in t)
    assert f"{path}:{line}: task.budget.max_params_m: must be > 0, got -1" in _fails(["lifecycle", str(path)], capsys)
    path = recipe(tmp_path, task_files, model, task={**task, "prompt_template": None})
    assert "task.prompt_template: set prompt_template or input_field" in _fails(["lifecycle", str(path)], capsys)
    path = recipe(tmp_path, task_files, model, task={**task, "test": str(tmp_path / "nope.jsonl")})
    assert f"task.test: {tmp_path / 'nope.jsonl'}: no such file" in _fails(["lifecycle", str(path)], capsys)
    path = recipe(tmp_path, task_files, model)
    err = _fails(["lifecycle", str(path), "--stages", "evaluate"], capsys)
    assert "stage evaluate reads the output of select" in err and "run select first" in err
    assert _fails(["lifecycle", str(path), "--stages", "optimise"], capsys).endswith("needs a optimise section in "
                                                                                     "the recipe\n")
    assert "unknown stage 'deplo'" in _fails(["lifecycle", str(path), "--stages", "deplo"], capsys)
    assert not (tmp_path / "out").exists()  # nothing was written by any of them
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine", encoding="utf-8")
    assert "holds files that are not a lifecycle run's (notes.txt)" in _fails(["lifecycle", str(path)], capsys)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["notes.txt"]


def test_print_config_then_config_gives_the_same_recipe(tiny_lm_dirs, task_files, tmp_path, capsys):
    path = recipe(tmp_path, task_files, tiny_lm_dirs["chat"])
    assert main(["lifecycle", str(path), "--print-config"]) == 0
    printed = capsys.readouterr().out
    (tmp_path / "printed.yaml").write_text(printed, encoding="utf-8")
    assert main(["lifecycle", "--config", str(tmp_path / "printed.yaml"), "--print-config"]) == 0
    assert capsys.readouterr().out == printed
    cfg = load_lifecycle(tmp_path / "printed.yaml")
    assert cfg.adapt["steps"] == 2 and cfg.enabled() == ("select", "adapt", "evaluate")
    cfg = load_lifecycle(path, {"device": "cuda:1"})  # the run's device reaches every stage's config...
    assert cfg.finetune_config(model=None, adapter=None, out_dir=tmp_path).device == "cuda:1"
    assert cfg.serve_config(model="m", adapter=None, port=1).device == "cuda:1"
    cfg.adapt["device"] = "cpu"  # ...unless the section names its own
    assert cfg.finetune_config(model=None, adapter=None, out_dir=tmp_path).device == "cpu"
    assert not (tmp_path / "out").exists()


def test_split_dev_carves_disjoint_seeded_dev_and_test_sets_out_of_one_file(tmp_path):
    from lmforge.lifecycle.config import Task
    from lmforge.lifecycle.data import split_task

    rows = "".join(f"{i},the tweet number {i},{i % 3}\n" for i in range(20))
    (tmp_path / "one.csv").write_text("id,tweet,class\n" + rows, encoding="utf-8")
    task = Task(train=tmp_path / "one.csv", prompt_template="{tweet}", response_field="class", split_dev=4,
                split_test=5, split_seed=1)
    split_task(task, tmp_path / "out")
    parts = {n: [json.loads(x)["id"] for x in Path(p).read_text(encoding="utf-8").splitlines()]
             for n, p in (("train", task.train), ("dev", task.dev), ("test", task.test))}
    assert [len(parts[n]) for n in ("train", "dev", "test")] == [11, 4, 5]
    assert sorted(parts["train"] + parts["dev"] + parts["test"], key=int) == [str(i) for i in range(20)]
    again = Task(train=tmp_path / "one.csv", prompt_template="{tweet}", response_field="class", split_dev=4,
                 split_test=5, split_seed=1)
    before = Path(task.dev).stat().st_mtime_ns
    split_task(again, tmp_path / "out")  # the same split: the files are left as they are
    assert Path(again.dev).stat().st_mtime_ns == before and again.test == task.test
    with pytest.raises(Exception, match="split_dev: carves dev and test out of train"):
        Task(train=tmp_path / "one.csv", dev=tmp_path / "one.csv", prompt_template="{tweet}", split_dev=2)


def test_the_select_gate_holds_the_budget_and_breaks_ties_by_size():
    from lmforge.errors import LmforgeError
    from lmforge.lifecycle.config import Budget
    from lmforge.lifecycle.stages import gate

    def facts(params, speed):
        return {"params_m": params, "tokens_per_s": speed, "weights_mb": params * 4}

    entries = [("big", 0.40, facts(360.0, 8.0)), ("small", 0.38, facts(135.0, 20.0)), ("slow", 0.45, facts(135.0, 1.0))]
    pick, reasons, why = gate(entries, "rouge1", Budget(min_tokens_per_s=2.0))
    assert pick == 0 and reasons == ["", "", "1 tokens/s < budget 2"] and "best rouge1 (0.4)" in why
    assert "1 candidate(s) left out by the budget" in why
    pick, _, why = gate(entries, "rouge1", Budget(min_tokens_per_s=2.0, tie_margin=0.05))
    assert pick == 1 and "within tie_margin 0.05 of the best ('big', 0.4)" in why
    pick, reasons, _ = gate(entries, "rouge1", Budget(max_params_m=200.0))
    assert pick == 2 and reasons[0] == "360M params > budget 200M"
    assert gate(entries, "perplexity", Budget())[0] == 1  # lower is better
    with pytest.raises(LmforgeError, match="no candidate is within the budget.*big: 360M params > budget 1M"):
        gate(entries, "rouge1", Budget(max_params_m=1.0))
