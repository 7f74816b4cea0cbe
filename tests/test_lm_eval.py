"""lmforge as an lm-evaluation-harness model (``evaluation/lm_eval_model.py``): a YAML task over a local JSONL (no hub)
run through lm-eval's registry (``model="lmforge"``) gives the accuracy of ``lmforge eval --task multiple_choice`` on
the same file, choice by choice; a perplexity task's word and byte perplexities come from the NLL of ``lmforge eval
--task perplexity``; the rolling log-likelihood and greedy generation agree with lmforge's own; the
``lmforge lm-eval`` command line runs the task, and without lm_eval installed says so in one line. The others are
skipped where lm_eval is not installed (``pip install lm_eval``; requirements-dev.txt installs it)."""

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from lmforge.cli import main

HAVE_LM_EVAL = importlib.util.find_spec("lm_eval") is not None
needs_lm_eval = pytest.mark.skipif(not HAVE_LM_EVAL, reason="lm-evaluation-harness is not installed (pip install lm_eval)")

QUESTIONS = [
    ("What is the capital of France?", ["Paris", "London", "Rome"], 0),
    ("The quick brown fox jumps over the lazy", ["dog", "cat", "fox jumps"], 0),
    ("Input: sea otter\nOutput:", ["loutre de mer", "sea otter", "otter"], 0),
    ("one two three four five", ["six", "seven", "two"], 0),
    ("What is the capital of", ["France? Paris.", "the dog", "one"], 1),
    ("The lazy dog", ["jumps over the fox.", "Paris.", "sea"], 2),
    ("five six", ["seven", "one two", "three four five six seven"], 1),
    ("loutre de", ["mer", "otter", "fox"], 0),
    ("Output: loutre", ["de mer", "brown", "capital"], 2),
    ("four five six", ["seven", "eight", "quick brown"], 1),
]

TASK_YAML = """task: lmforge_mc_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: input
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture
def mc_task(tmp_path):
    """(the JSONL file, the folder holding the task's YAML) for QUESTIONS."""
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps({"input": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "lmforge_mc_local.yaml").write_text(TASK_YAML.format(data=data, cache=tmp_path / "hf-datasets"))
    return data, tasks


@needs_lm_eval
def test_lm_eval_multiple_choice_equals_lmforge_eval(tiny_lm_dirs, tmp_path, mc_task):
    import lm_eval.evaluator
    from lm_eval.tasks import TaskManager

    import lmforge.evaluation.lm_eval_model  # noqa: F401  (registers "lmforge")
    from lmforge.evaluation.harness import EvalConfig, evaluate

    data, tasks = mc_task
    model = str(tiny_lm_dirs["plain"])
    ours = evaluate(EvalConfig(data=data, out=tmp_path / "eval", task="multiple_choice", model=model,
                               input_field="input", choices_field="choices", answer_field="answer", batch_size=4),
                    progress=False)
    rows = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    theirs = lm_eval.evaluator.simple_evaluate(model="lmforge", model_args=f"pretrained={model}",
                                               tasks=["lmforge_mc_local"], batch_size=4, log_samples=True,
                                               task_manager=TaskManager(include_path=str(tasks)))
    accuracy = theirs["results"]["lmforge_mc_local"]["acc,none"]
    assert 0 < ours["metrics"]["accuracy"] < 1  # the random tiny model gets some right and some wrong
    assert accuracy == ours["metrics"]["accuracy"]
    samples = sorted(theirs["samples"]["lmforge_mc_local"], key=lambda s: s["doc_id"])
    assert len(samples) == len(rows) == len(QUESTIONS)
    for sample, row in zip(samples, rows):  # every choice's log-likelihood, question by question
        logliks = [float(resp[0]) for resp in sample["filtered_resps"]]
        assert logliks == pytest.approx(row["logprobs"], abs=1e-4)
        assert sample["acc"] == row["scores"]["correct"]


PPL_YAML = """task: lmforge_ppl_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: text
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
"""


@needs_lm_eval
def test_lm_eval_perplexity_equals_lmforge_eval(tiny_lm_dirs, tmp_path):
    """A perplexity task (loglikelihood_rolling) over a local JSONL, one text longer than the 128-token context:
    lm-eval's word and byte perplexities are exp(NLL / words or bytes) with the NLL lmforge eval --task perplexity
    measures, for a tokenizer that adds a BOS token (the rolling log-likelihood is conditioned on it)."""
    import lm_eval.evaluator
    import tokenizers
    from lm_eval.tasks import TaskManager

    from lmforge.evaluation.harness import EvalConfig, run_eval
    from lmforge.evaluation.lm_eval_model import LmforgeLM
    from lmforge.lm import LM, load
    from lmforge.tokenizer import Tokenizer

    plain = load(tiny_lm_dirs["plain"])
    tok = Tokenizer(tokenizers.Tokenizer.from_str(plain.tokenizer.backend.to_str()), bos_token="<|endoftext|>",
                    eos_token="<|endoftext|>", add_bos_token=True)
    lm = LM(plain.model, tok, "tiny-with-bos")
    texts = ["The quick brown fox jumps over the lazy dog.", "What is the capital of France? Paris.",
             " ".join(["one two three four five six seven"] * 12)]
    assert len(tok.encode(texts[-1])) > lm.config.max_seq_len  # scored in sliding windows
    data = tmp_path / "texts.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    ours = run_eval(lm, EvalConfig(data=data, task="perplexity", input_field="text", batch_size=2), progress=False)
    nll = ours["metrics"]["nll_per_token"] * ours["metrics"]["tokens_scored"]
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "lmforge_ppl_local.yaml").write_text(PPL_YAML.format(data=data, cache=tmp_path / "hf-datasets"))
    theirs = lm_eval.evaluator.simple_evaluate(model=LmforgeLM(lm=lm), tasks=["lmforge_ppl_local"],
                                               task_manager=TaskManager(include_path=str(tasks)))
    result = theirs["results"]["lmforge_ppl_local"]
    words = sum(len(re.split(r"\s+", t)) for t in texts)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    assert result["word_perplexity,none"] == pytest.approx(math.exp(nll / words), rel=1e-5)
    assert result["byte_perplexity,none"] == pytest.approx(math.exp(nll / n_bytes), rel=1e-5)


def _requests(*args):
    return [SimpleNamespace(args=a) for a in args]


@needs_lm_eval
def test_loglikelihood_rolling_and_greedy_match_a_direct_forward_pass(tiny_lm_dirs):
    from lmforge.evaluation.lm_eval_model import LmforgeLM
    from lmforge.lm import load

    lm = load(tiny_lm_dirs["plain"])
    model = LmforgeLM(lm=lm, batch_size=2)
    tok = lm.tokenizer
    text = "The quick brown fox jumps over the lazy dog."
    ids = [model.prefix_id, *tok.encode(text, add_special_tokens=False)]
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(torch.tensor([ids])).float()[0], -1)  # (T, V)
    by_hand = sum(float(logp[t - 1, ids[t]]) for t in range(1, len(ids)))
    (rolling,) = model.loglikelihood_rolling(_requests((text,)))
    assert rolling == pytest.approx(by_hand, rel=1e-5)
    # a text longer than the 128-token context: every token is still predicted once
    long_text = " ".join([text] * 20)
    (long_total,) = model.loglikelihood_rolling(_requests((long_text,)))
    assert math.isfinite(long_total) and long_total < rolling * 10
    # the most likely next token is greedy, the least likely is not
    context = "one two three"
    with torch.no_grad():
        next_logp = torch.log_softmax(lm.model(torch.tensor([lm.encode(context, chat=False)])).float()[0, -1], -1)
    best, worst = tok.decode([int(next_logp.argmax())]), tok.decode([int(next_logp.argmin())])
    assert tok.encode(best, add_special_tokens=False) == [int(next_logp.argmax())]  # one token each way
    (ll_best, best_greedy), (ll_worst, worst_greedy) = model.loglikelihood(_requests((context, best),
                                                                                     (context, worst)))
    assert best_greedy and not worst_greedy
    assert (ll_best, ll_worst) == pytest.approx((float(next_logp.max()), float(next_logp.min())), abs=1e-5)
    greedy = lm.generate(context, chat=False, max_new_tokens=3)
    (generated,) = model.generate_until(_requests((context, {"until": ["\n\n"], "max_gen_toks": 3})))
    assert generated == greedy


@needs_lm_eval
def test_lmforge_lm_eval_runs_a_local_task(tiny_lm_dirs, tmp_path, mc_task):
    """`lmforge lm-eval ARGS` is lm-eval's command line with the lmforge model registered."""
    _, tasks = mc_task
    out = tmp_path / "results"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "lmforge.cli", "lm-eval", "run", "--model", "lmforge",
                           "--model_args", f"pretrained={tiny_lm_dirs['plain']}", "--tasks", "lmforge_mc_local",
                           "--include_path", str(tasks), "--batch_size", "4", "--output_path", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result_file,) = out.rglob("results_*.json")
    acc = json.loads(result_file.read_text())["results"]["lmforge_mc_local"]["acc,none"]
    assert 0 < acc < 1


def test_lmforge_lm_eval_without_the_package_is_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if it were not installed
    assert main(["lm-eval", "run", "--model", "lmforge", "--tasks", "x"]) == 2
    assert capsys.readouterr().err == "error: lmforge lm-eval needs lm-evaluation-harness: pip install lm_eval\n"
