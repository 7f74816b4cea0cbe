"""The training loop: exact resume after SIGKILL, crash-safe checkpoints, schedule, refusing a foreign checkpoint."""

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmforge.errors import LmforgeError
from lmforge.training import checkpoint as ckpt_mod
from lmforge.training.optim import lr_at, param_groups

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"  # ../shared/data

DRIVER = textwrap.dedent("""
    import os, signal, sys
    import torch
    torch.set_num_threads(1)
    kill_after = int(os.environ.get("KILL_AFTER_BATCHES", "0"))
    if kill_after:
        from lmforge.data import corpus
        original = corpus.RandomWindows.next_batch
        calls = [0]
        def next_batch(self):
            calls[0] += 1
            if calls[0] > kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(self)
        corpus.RandomWindows.next_batch = next_batch
    from lmforge.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "shakespeare.txt"
    path.write_text(CORPUS.read_text(encoding="utf-8")[:60_000], encoding="utf-8")
    return path


def _run(args: list[str], tmp: Path, kill_after: int = 0) -> subprocess.CompletedProcess:
    driver = tmp / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "KILL_AFTER_BATCHES": str(kill_after), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(driver), *args], capture_output=True, text=True, env=env, timeout=120)


def _losses(out: Path) -> list[tuple[int, str, float]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], k, r[k]) for r in rows for k in ("loss", "val_loss") if k in r]


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path, small_corpus):
    common = ["pretrain", "--model", "tiny-llama", "--set", "n_layer=1", "--corpus", str(small_corpus),
              "--tokenizer", "char", "--seq-len", "32", "--batch-size", "4", "--grad-accum", "2", "--steps", "24",
              "--warmup", "4", "--lr", "3e-3", "--eval-every", "8", "--eval-batches", "2", "--save-every", "8",
              "--log-every", "1", "--cache-dir", str(tmp_path / "cache")]
    full, broken = tmp_path / "full", tmp_path / "broken"
    r = _run([*common, "--out-dir", str(full)], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    # 2 batches per step: killed during step 14, after the step-8 checkpoint and before the step-16 one
    r = _run([*common, "--out-dir", str(broken)], tmp_path, kill_after=27)
    assert r.returncode == -9, r.stderr[-2000:]
    assert json.loads((broken / "checkpoint" / "state.json").read_text())["step"] == 8
    assert not (broken / "final").exists()
    r = _run([*common, "--out-dir", str(broken), "--resume"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    expected, got = _losses(full), _losses(broken)
    assert [(s, k) for s, k, _ in got] == [(s, k) for s, k, _ in expected]
    assert len([1 for _, k, _ in expected if k == "loss"]) == 24
    for (step, key, a), (_, _, b) in zip(expected, got):
        assert abs(a - b) <= 1e-6, (step, key, a, b)
    wa, wb = load_file(str(full / "final" / "model.safetensors")), load_file(str(broken / "final" / "model.safetensors"))
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=1e-6)
    run_config = json.loads((broken / "checkpoint" / "config.json").read_text())
    assert run_config["seq_len"] == 32 and run_config["train"]["grad_accum"] == 2


def _tiny_setup(tmp_path, vocab=32, **overrides):
    from lmforge.config import preset
    from lmforge.models.decoder import DecoderLM

    model = DecoderLM(preset("tiny-llama", vocab_size=vocab, n_layer=1, **overrides)).init_weights(seed=0)

    class Batches:
        def __init__(self):
            self.gen = torch.Generator().manual_seed(0)
            self.i = 0

        def next_batch(self):
            self.i += 1
            x = torch.randint(0, vocab, (2, 9), generator=self.gen)
            return {"input_ids": x[:, :-1], "labels": x[:, 1:]}

        def state_dict(self):
            return {"i": self.i, "gen": self.gen.get_state().tolist()}

        def load_state_dict(self, state):
            self.i = state["i"]
            self.gen.set_state(torch.tensor(state["gen"], dtype=torch.uint8))

    def loss_fn(m, b):
        from lmforge.training.objectives import causal_lm_loss

        return causal_lm_loss(m(b["input_ids"]), b["labels"])

    return model, loss_fn, Batches()


def test_crash_while_saving_keeps_previous_checkpoint(tmp_path, monkeypatch):
    from lmforge.training.loop import RunDir, TrainConfig, train

    model, loss_fn, batches = _tiny_setup(tmp_path)
    out = tmp_path / "run"
    train(model, loss_fn, batches, TrainConfig(steps=3, log_every=1), RunDir(out))
    before = {f.name: f.read_bytes() for f in (out / "checkpoint").iterdir()}

    def broken_save(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ckpt_mod, "save_file", broken_save)  # the optimizer file: after model.safetensors
    model, loss_fn, batches = _tiny_setup(tmp_path)
    with pytest.raises(OSError, match="simulated"):
        train(model, loss_fn, batches, TrainConfig(steps=6, log_every=1), RunDir(out, resume=True))
    after = {f.name: f.read_bytes() for f in (out / "checkpoint").iterdir()}
    assert after == before
    assert not list(out.glob(".checkpoint*")), list(out.iterdir())
    monkeypatch.undo()
    model, loss_fn, batches = _tiny_setup(tmp_path)
    metrics = train(model, loss_fn, batches, TrainConfig(steps=6, log_every=1), RunDir(out, resume=True))
    assert metrics["step"] == 6
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 6


def test_crash_between_renames_resumes_from_old(tmp_path):
    from lmforge.training.loop import RunDir, TrainConfig, train

    model, loss_fn, batches = _tiny_setup(tmp_path)
    out = tmp_path / "run"
    train(model, loss_fn, batches, TrainConfig(steps=2), RunDir(out))
    os.replace(out / "checkpoint", out / ".checkpoint.old")  # the instant between the two renames
    assert ckpt_mod.find_checkpoint(out) == out / ".checkpoint.old"
    model, loss_fn, batches = _tiny_setup(tmp_path)
    assert train(model, loss_fn, batches, TrainConfig(steps=4), RunDir(out, resume=True))["step"] == 4
    assert (out / "checkpoint").is_dir() and not (out / ".checkpoint.old").exists()


def test_resume_refuses_another_architecture(tmp_path):
    from lmforge.training.loop import RunDir, TrainConfig, train

    model, loss_fn, batches = _tiny_setup(tmp_path)
    out = tmp_path / "run"
    train(model, loss_fn, batches, TrainConfig(steps=1), RunDir(out))
    other, loss_fn, batches = _tiny_setup(tmp_path, n_embd=32, n_head=2, n_kv_head=1)
    other.config.name = "other-model"
    with pytest.raises(LmforgeError, match=r"'tiny-llama'.*'other-model'.*n_embd: checkpoint 64 vs now 32"):
        train(other, loss_fn, batches, TrainConfig(steps=2), RunDir(out, resume=True))


def test_resume_without_checkpoint_is_an_error(tmp_path):
    from lmforge.training.loop import RunDir, TrainConfig, train

    model, loss_fn, batches = _tiny_setup(tmp_path)
    with pytest.raises(LmforgeError, match="no checkpoint"):
        train(model, loss_fn, batches, TrainConfig(steps=1), RunDir(tmp_path / "empty", resume=True))


def test_loop_outputs_bf16_and_grad_accum(tmp_path):
    from lmforge.training.loop import RunDir, TrainConfig, train

    model, loss_fn, batches = _tiny_setup(tmp_path)
    out = tmp_path / "run"
    metrics = train(model, loss_fn, batches, TrainConfig(steps=4, grad_accum=2, precision="bf16", log_every=2,
                                                         eval_every=2), RunDir(out),
                    eval_fn=lambda m: {"val_loss": 1.5}, tokens_per_batch=lambda b: 100)
    assert batches.i == 8
    assert metrics["val_loss"] == 1.5 and math.isfinite(metrics["loss"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 2, 4, 4]
    assert {"loss", "lr", "tokens_per_s", "grad_norm"} <= set(rows[0]) and rows[1] == {"step": 2, "val_loss": 1.5}
    assert (out / "final" / "model.safetensors").is_file() and (out / "final" / "config.json").is_file()
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_train_config_rejects_bad_values():
    from lmforge.training.loop import TrainConfig

    with pytest.raises(LmforgeError, match="precision='fp16'"):
        TrainConfig(steps=1, precision="fp16")
    with pytest.raises(LmforgeError, match="steps must be"):
        TrainConfig(steps=0)


def test_schedule_and_param_groups():
    assert lr_at(0, 1.0, 100, warmup_steps=10) == pytest.approx(0.1)
    assert lr_at(9, 1.0, 100, warmup_steps=10) == pytest.approx(1.0)
    assert lr_at(10, 1.0, 100, warmup_steps=10) == pytest.approx(1.0)
    assert lr_at(99, 1.0, 100, warmup_steps=10, min_lr_ratio=0.1) == pytest.approx(0.1)
    assert lr_at(10 + 89 // 2, 1.0, 100, warmup_steps=10, min_lr_ratio=0.0) == pytest.approx(0.5, abs=0.02)
    from lmforge.config import preset
    from lmforge.models.decoder import DecoderLM

    model = DecoderLM(preset("tiny-gpt2"))
    decay, no_decay = param_groups(model, 0.1)
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    n = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert n == sum(p.numel() for p in model.parameters())  # tied lm_head counted once
