"""Experiment tracking (``training/tracking.py``, ``run.py`` ``MetricsLog``): ``--logger csv|tensorboard|wandb|mlflow``
on every training verb. The CSV and the TensorBoard event files, read back, hold what ``metrics.jsonl`` holds
(learning rate and gradient norm included); a resumed run's CSV and event files have each step once; PPO, DPO and
reward runs draw ``loss.png``; a missing backend package or an unknown name is one line naming it."""

import csv
import json
import math
import sys

import pytest
import torch

from lmforge.cli import main
from lmforge.errors import LmforgeError
from test_reward import tiny_decoder  # noqa: F401  (a fixture)

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 40


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def jsonl_rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def csv_rows(out):
    with open(out / "metrics.csv", newline="", encoding="utf-8") as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def numeric(rows):
    return [{k: float(v) for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            for r in rows]


def tb_scalars(log_dir):
    """{tag: [(step, value), ...]} read back from the TensorBoard event files in ``log_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def assert_tb_matches(log_dir, rows):
    """Every numeric key of every row (but ``step``) is a TensorBoard scalar at that row's step, once."""
    scalars = tb_scalars(log_dir)
    expected: dict[str, list] = {}
    for r in rows:
        for k, v in r.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                expected.setdefault(k, []).append((r["step"], v))
    assert set(scalars) == set(expected)
    for tag, points in expected.items():
        assert [s for s, _ in scalars[tag]] == [s for s, _ in points], tag
        assert [v for _, v in scalars[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag  # float32


def test_pretrain_logs_to_csv_and_tensorboard_what_metrics_jsonl_holds(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    out = tmp_path / "run"
    code, _, err = run(capsys, "pretrain", "--corpus", corpus, "-o", out, "--steps", "4", "--seq-len", "16",
                       "--batch-size", "2", "--eval-batches", "1", "--eval-every", "2", "--log-every", "1",
                       "--cache-dir", tmp_path / "c", "--set", "n_layer=1", "--logger", "csv,tensorboard")
    assert code == 0, err
    rows = jsonl_rows(out)
    assert [r["step"] for r in rows] == [1, 2, 2, 3, 4, 4]  # every step, and the evaluations at 2 and 4
    assert all({"loss", "lr", "grad_norm"} <= set(r) for r in rows if "loss" in r)
    assert csv_rows(out) == numeric(rows)  # the same figures, a column per key
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[0] == "step" and {"loss", "lr", "grad_norm", "val_loss", "val_ppl"} <= set(header)
    assert_tb_matches(out / "tb", rows)
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"


def _tiny_loop(fail_at=None):
    """A one-layer model, its loss over rows of a fixed random token table, and a resumable batch source; the
    loss raises at its ``fail_at``-th call."""
    from lmforge.config import preset
    from lmforge.models.decoder import DecoderLM
    from lmforge.training.sources import ShuffledIndices

    model = DecoderLM(preset("tiny-llama", vocab_size=32, n_layer=1)).init_weights(seed=0)
    data = torch.randint(0, 32, (16, 9), generator=torch.Generator().manual_seed(0))
    calls = {"n": 0}

    def loss_fn(m, rows):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise RuntimeError("simulated crash")
        x = data[rows]  # (B, 9)
        return torch.nn.functional.cross_entropy(m(x[:, :-1]).reshape(-1, 32), x[:, 1:].reshape(-1))

    return model, loss_fn, ShuffledIndices(16, 2, seed=0)


def test_a_resumed_run_has_each_step_once_in_the_csv_and_the_event_files(tmp_path):
    """A run that crashes after logging step 3 (its last checkpoint at step 2) and is resumed: metrics.csv is
    rebuilt from the rows metrics.jsonl keeps, and TensorBoard purges the crashed run's step-3 events."""
    pytest.importorskip("tensorboard")
    from lmforge.training.loop import RunDir, TrainConfig, train

    out = tmp_path / "run"
    cfg = TrainConfig(steps=4, log_every=1, save_every=2)
    model, loss_fn, batches = _tiny_loop(fail_at=4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(model, loss_fn, batches, cfg, RunDir(out, loggers=("csv", "tensorboard")), progress=False)
    assert [r["step"] for r in csv_rows(out)] == [1, 2, 3]
    model, loss_fn, batches = _tiny_loop()
    train(model, loss_fn, batches, cfg, RunDir(out, resume=True, loggers=("csv", "tensorboard")), progress=False)
    rows = jsonl_rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert csv_rows(out) == numeric(rows)
    assert_tb_matches(out / "tb", rows)


def test_csv_header_grows_with_new_keys(tmp_path):
    from lmforge.training.tracking import CsvTracker

    path = tmp_path / "metrics.csv"
    t = CsvTracker(path)
    t.log({"step": 1, "loss": 2.5})
    t.log({"step": 2, "loss": 2.0})
    t.log({"step": 2, "val_loss": 2.25, "sample": {"prompt": "dropped: not a scalar"}})
    t.log({"step": 3, "loss": 1.5, "note": "a, b"})
    assert path.read_text().splitlines() == ["step,loss,val_loss,note", "1,2.5,,", "2,2.0,,", "2,,2.25,",
                                             '3,1.5,,"a, b"']
    assert not list(tmp_path.glob(".*tmp"))


def test_dpo_logs_lr_and_grad_norm_and_draws_its_plot(tiny_lm_dirs, tmp_path, capsys):
    from test_dpo import pairs_file

    out = tmp_path / "dpo"
    code, _, err = run(capsys, "rlhf", "dpo", "-m", tiny_lm_dirs["plain"], "--data", pairs_file(tmp_path), "-o", out,
                       "--steps", "2", "--batch-size", "3", "--lr", "1e-3", "--threads", "1", "--logger", "csv")
    assert code == 0, err
    rows = jsonl_rows(out)
    assert all({"loss", "lr", "grad_norm", "reward_margin"} <= set(r) for r in rows)
    assert csv_rows(out) == numeric(rows)
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_ppo_logs_lr_and_grad_norm_and_draws_its_plot(tiny_lm_dirs, tmp_path, capsys, monkeypatch):
    (tmp_path / "toy_reward_g.py").write_text(
        "def share_of_vowels(prompts, completions):\n"
        "    return [sum(c.count(v) for v in 'aeiou') / max(len(c), 1) for c in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one two\nfour five\nsix seven\nfox dog\n")
    out = tmp_path / "ppo"
    code, _, err = run(capsys, "rlhf", "ppo", "-m", tiny_lm_dirs["plain"], "--prompts", prompts, "--reward",
                       "toy_reward_g:share_of_vowels", "-o", out, "--steps", "2", "--batch-size", "2",
                       "--mini-batch-size", "2", "--ppo-epochs", "1", "-n", "3", "--threads", "1", "--logger", "csv")
    assert code == 0, err
    rows = jsonl_rows(out)
    assert all({"reward", "kl", "policy_loss", "lr", "grad_norm"} <= set(r) for r in rows)
    assert rows[-1]["grad_norm"] > 0  # (step 1: every reward 0, so no gradient)
    assert csv_rows(out) == numeric(rows)  # the logged sample (a prompt and its completion) is left out
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_reward_train_logs_and_draws_its_plot(tmp_path, capsys, tiny_decoder):  # noqa: F811
    from test_reward import _toy_pairs

    out = tmp_path / "rm"
    code, _, err = run(capsys, "reward", "train", _toy_pairs(tmp_path / "pairs.jsonl"), "--kind", "pairwise", "-o",
                       out, "--model", tiny_decoder, "--max-len", "12", "--epochs", "1", "--batch-size", "16",
                       "--precision", "fp32", "--logger", "csv")
    assert code == 0, err
    rows = jsonl_rows(out)
    assert rows and all({"loss", "lr", "grad_norm"} <= set(r) for r in rows)
    assert csv_rows(out) == numeric(rows)
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_finetune_takes_the_logger_option(tiny_lm_dirs, tmp_path, capsys):
    from test_sft_train import copy_task

    train, _ = copy_task(tmp_path)
    out = tmp_path / "ft"
    code, _, err = run(capsys, "finetune", "--train", train, "-m", tiny_lm_dirs["plain"], "-o", out, "--steps", "2",
                       "--log-every", "1", "--logger", "csv")
    assert code == 0, err
    rows = jsonl_rows(out)
    assert all({"loss", "lr", "grad_norm"} <= set(r) for r in rows if "loss" in r)
    assert csv_rows(out) == numeric(rows)


@pytest.mark.parametrize("name, package", [("wandb", "wandb"), ("mlflow", "mlflow-skinny"),
                                           ("tensorboard", "tensorboard")])
def test_a_missing_backend_is_one_line_naming_the_package(tmp_path, capsys, monkeypatch, name, package):
    monkeypatch.setitem(sys.modules, name, None)  # as if it were not installed
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    out = tmp_path / "run"
    code, _, err = run(capsys, "pretrain", "--corpus", corpus, "-o", out, "--steps", "1", "--seq-len", "16",
                       "--cache-dir", tmp_path / "c", "--set", "n_layer=1", "--logger", f"csv,{name}")
    assert code == 2
    assert err == f"error: --logger {name} needs the {package} package: pip install {package}\n"
    assert not out.exists()  # refused as the flags are read: no folder claimed, no model built
    from lmforge.training.loop import RunDir

    with pytest.raises(LmforgeError, match=f"pip install {package}$"):  # the Python API: when the run is opened
        RunDir(tmp_path / "api", loggers=(name,))
    assert not (tmp_path / "api").exists()


def test_an_unknown_logger_is_refused_naming_the_choices(tmp_path, capsys):
    code, _, err = run(capsys, "pretrain", "--logger", "csv,neptune", "--print-config")
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("error: ") and "--logger" in err and "neptune" in err and "tensorboard" in err
    from lmforge.training.tracking import check_available

    with pytest.raises(LmforgeError, match="--logger neptune: unknown logger; choose from: csv, tensorboard"):
        check_available(["neptune"])


def test_every_training_verb_has_the_logger_option(capsys):
    from lmforge.alignment.reward_recipe import RewardConfig
    from lmforge.alignment.rlhf import DPOConfig, PPOConfig
    from lmforge.training.pretrain import PretrainConfig
    from lmforge.training.sft import FinetuneConfig
    from lmforge.training.tracking import Tracking

    for cls in (PretrainConfig, FinetuneConfig, DPOConfig, PPOConfig, RewardConfig):
        assert issubclass(cls, Tracking), cls
    for verb in (["pretrain"], ["finetune"], ["rlhf", "dpo"], ["rlhf", "ppo"], ["reward", "train"]):
        assert main([*verb, "--help"]) == 0
        assert "--logger {csv,tensorboard,wandb,mlflow}" in " ".join(capsys.readouterr().out.split()), verb


def test_wandb_offline_run_under_the_output_folder(tmp_path):
    pytest.importorskip("wandb")
    from lmforge.training.loop import RunDir, TrainConfig, train

    model, loss_fn, batches = _tiny_loop()
    out = tmp_path / "run"
    train(model, loss_fn, batches, TrainConfig(steps=2, log_every=1), RunDir(out, loggers=("wandb",)),
          progress=False)
    assert list((out / "wandb").glob("offline-run-*/run-*.wandb"))


def test_mlflow_file_store_holds_the_metrics(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from lmforge.training.loop import RunDir, TrainConfig, train

    model, loss_fn, batches = _tiny_loop()
    out = tmp_path / "run"
    train(model, loss_fn, batches, TrainConfig(steps=2, log_every=1), RunDir(out, {"recipe": "test"},
                                                                             loggers=("mlflow",)), progress=False)
    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("lmforge")
    (run_info,) = client.search_runs([experiment.experiment_id])
    history = client.get_metric_history(run_info.info.run_id, "loss")
    rows = jsonl_rows(out)
    assert [(m.step, m.value) for m in history] == [(r["step"], pytest.approx(r["loss"])) for r in rows]
    assert run_info.data.params["recipe"] == "test" and run_info.info.status == "FINISHED"


def test_under_torchrun_only_rank_0_tracks(tmp_path):
    """Two data-parallel ranks: one metrics.csv and one TensorBoard event file, each step once, equal to
    metrics.jsonl."""
    pytest.importorskip("tensorboard")
    from test_distributed import torchrun

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    out = tmp_path / "run"
    done = torchrun(["pretrain", "--corpus", str(corpus), "-o", str(out), "--steps", "2", "--seq-len", "16",
                     "--batch-size", "2", "--eval-batches", "1", "--log-every", "1", "--cache-dir", str(tmp_path / "c"),
                     "--set", "n_layer=1", "--logger", "csv,tensorboard"])
    assert done.returncode == 0, done.stderr[-3000:]
    rows = jsonl_rows(out)
    assert [r["step"] for r in rows] == [1, 2, 2]
    assert csv_rows(out) == numeric(rows)
    assert len(list((out / "tb").glob("events.out.tfevents.*"))) == 1
    assert_tb_matches(out / "tb", rows)
