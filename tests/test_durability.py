"""Losing nothing: a crash at any point of a checkpoint swap resumes from the newest complete checkpoint,
metrics.jsonl survives a crash while it is rewritten, LoRA / prompt-tuning runs are reproducible from their
seed, their checkpoints hold the adapter (not the frozen base) and resume exactly, and nothing non-finite
is ever written as a checkpoint or a final model."""

import io
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lmforge
from lmforge.errors import LmforgeError
from lmforge.training import checkpoint as ckpt_mod
from lmforge.training.loop import MetricsLog, RunDir, TrainConfig, train

VOCAB = 32


def tiny_setup():
    """A 1-layer Llama, its loss and a resumable batch source of random tokens."""
    from lmforge.config import preset
    from lmforge.models.decoder import DecoderLM
    from lmforge.training.objectives import causal_lm_loss

    model = DecoderLM(preset("tiny-llama", vocab_size=VOCAB, n_layer=1)).init_weights(seed=0)

    class Batches:
        def __init__(self):
            self.gen = torch.Generator().manual_seed(0)

        def next_batch(self):
            x = torch.randint(0, VOCAB, (2, 9), generator=self.gen)
            return {"input_ids": x[:, :-1], "labels": x[:, 1:]}

        def state_dict(self):
            return {"gen": self.gen.get_state().tolist()}

        def load_state_dict(self, state):
            self.gen.set_state(torch.tensor(state["gen"], dtype=torch.uint8))

    return model, (lambda m, b: causal_lm_loss(m(b["input_ids"]), b["labels"])), Batches()


def rows_of(out: Path) -> list[dict]:
    """metrics.jsonl without the timing fields."""
    return [{k: v for k, v in json.loads(line).items() if k not in ("tokens_per_s", "step_s")}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


class Crash(Exception):
    pass


class FailingAt:
    """Stands in for ``os`` / ``shutil`` inside checkpoint.py: every call of ``names`` is counted (one counter
    shared by all stand-ins) and the ``fail_at``-th one raises ``Crash`` instead of running."""

    def __init__(self, real, names, counter):
        self._real, self._names, self._counter = real, names, counter

    def __getattr__(self, name):
        attr = getattr(self._real, name)
        if name not in self._names:
            return attr

        def counted(*args, **kwargs):
            self._counter["calls"] += 1
            if self._counter["calls"] == self._counter["fail_at"]:
                raise Crash(f"{name} call {self._counter['calls']}")
            return attr(*args, **kwargs)

        return counted


def inject(monkeypatch, fail_at: int) -> dict:
    counter = {"calls": 0, "fail_at": fail_at, "saving": None}
    monkeypatch.setattr(ckpt_mod, "os", FailingAt(os, {"replace"}, counter))
    monkeypatch.setattr(ckpt_mod, "shutil", FailingAt(shutil, {"rmtree"}, counter))
    real_write_json = ckpt_mod.write_json_atomic

    def write_json(path, data):  # note the step of the checkpoint being written
        if path.name == "state.json":
            counter["saving"] = data["step"]
        real_write_json(path, data)

    monkeypatch.setattr(ckpt_mod, "write_json_atomic", write_json)
    return counter


def test_a_crash_at_every_step_of_the_checkpoint_swap_resumes_exactly_from_the_newest(tmp_path, monkeypatch):
    """Checkpoints at steps 2, 4 and 6: each os.replace / shutil.rmtree of each save is made to fail in turn.
    Wherever it fails, the newest complete checkpoint is the one being saved (it is complete before anything
    is renamed or removed), --resume starts from it, and the resumed run logs the uninterrupted run's losses
    step for step and ends with the same weights."""
    cfg = TrainConfig(steps=6, save_every=2, log_every=1, lr=3e-3)
    model, loss_fn, batches = tiny_setup()
    counter = inject(monkeypatch, fail_at=0)
    train(model, loss_fn, batches, cfg, RunDir(tmp_path / "straight"))
    monkeypatch.undo()
    total = counter["calls"]
    assert total >= 8  # 2 calls for the first save, 3 for each later one (the old folder moved aside, removed)
    straight = rows_of(tmp_path / "straight")
    assert [r["step"] for r in straight] == [1, 2, 3, 4, 5, 6]
    want = load_file(str(tmp_path / "straight" / "final" / "model.safetensors"))
    for k in range(1, total + 1):
        out = tmp_path / f"crash-{k}"
        model, loss_fn, batches = tiny_setup()
        counter = inject(monkeypatch, fail_at=k)
        with pytest.raises(Crash):
            train(model, loss_fn, batches, cfg, RunDir(out))
        monkeypatch.undo()
        found = ckpt_mod.find_checkpoint(out)
        assert found is not None, (k, sorted(p.name for p in out.iterdir()))
        assert ckpt_mod.read_state(found)["step"] == counter["saving"], (k, found)
        model, loss_fn, batches = tiny_setup()
        train(model, loss_fn, batches, cfg, RunDir(out, resume=True))
        assert rows_of(out) == straight, k
        got = load_file(str(out / "final" / "model.safetensors"))
        assert all(torch.equal(got[name], want[name]) for name in want), k
        leftovers = sorted(p.name for p in out.iterdir() if p.name.startswith(".checkpoint"))
        assert ckpt_mod.read_state(out / "checkpoint")["step"] == 6 and not leftovers, (k, leftovers)


def test_find_checkpoint_ignores_an_incomplete_folder_and_prefers_the_newest_complete_one(tmp_path):
    model, loss_fn, batches = tiny_setup()
    out = tmp_path / "run"
    train(model, loss_fn, batches, TrainConfig(steps=2), RunDir(out))
    shutil.copytree(out / "checkpoint", out / ".checkpoint.tmp-cut")  # cut short: no COMPLETE marker
    (out / ".checkpoint.tmp-cut" / "COMPLETE").unlink(missing_ok=True)
    state = json.loads((out / ".checkpoint.tmp-cut" / "state.json").read_text())
    (out / ".checkpoint.tmp-cut" / "state.json").write_text(json.dumps({**state, "step": 9}))
    assert ckpt_mod.find_checkpoint(out) == out / "checkpoint"
    shutil.copytree(out / "checkpoint", out / ".checkpoint.tmp-done")
    (out / ".checkpoint.tmp-done" / "COMPLETE").write_text(json.dumps({"step": 3}))
    assert ckpt_mod.find_checkpoint(out) == out / ".checkpoint.tmp-done"


def test_metrics_rewrite_on_resume_survives_a_crash(tmp_path, monkeypatch):
    """Resuming rewrites metrics.jsonl without the rows after the checkpoint; a crash half-way through that
    rewrite (here: the disk fills up) leaves the previous file as it was."""
    path = tmp_path / "metrics.jsonl"
    before = "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 7))
    path.write_text(before)
    real_open = io.open

    class HalfWritten:
        def __init__(self, f):
            self.f = f

        def write(self, text):
            self.f.write(text[: len(text) // 2])
            self.f.flush()
            raise OSError("No space left on device (simulated)")

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def opener(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        return HalfWritten(f) if "w" in mode and "metrics.jsonl" in Path(file).name else f

    monkeypatch.setattr(io, "open", opener)
    monkeypatch.setattr("builtins.open", opener)
    with pytest.raises(OSError, match="simulated"):
        MetricsLog(tmp_path, resume_step=3)
    monkeypatch.undo()
    assert path.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no temporary file left behind
    log = MetricsLog(tmp_path, resume_step=3)
    log.write({"step": 4, "loss": 0.5})
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]


# ----------------------------------------------------------------------------- non-finite values
def test_nothing_non_finite_is_written(tmp_path):
    model, loss_fn, batches = tiny_setup()
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(LmforgeError, match="refusing to write the checkpoint at step 3: parameter "):
        ckpt_mod.save_checkpoint(tmp_path, model, opt, 3, {}, None)
    assert list(tmp_path.iterdir()) == []
    from lmforge.training.run import save_final

    with pytest.raises(LmforgeError, match="refusing to write the final model"):
        save_final(model, tmp_path / "final", None)
    assert not (tmp_path / "final").exists()


@pytest.mark.parametrize("field", ["lr", "weight_decay", "clip", "min_lr_ratio"])
def test_train_config_refuses_non_finite_hyper_parameters(field):
    with pytest.raises(LmforgeError, match=f"{field} must be a finite number, got (nan|inf)"):
        TrainConfig(steps=1, **{field: float("nan") if field != "lr" else float("inf")})


def test_a_nan_gradient_stops_the_loop_and_keeps_the_last_checkpoint(tmp_path):
    """The loss is finite but its gradient is not (sqrt at 0): the loop stops before the update, with the
    step named, and keeps the step-2 checkpoint; no final model."""
    model, loss_fn, batches = tiny_setup()
    calls = []

    def nan_gradient_at_step_3(m, b):
        calls.append(1)
        loss = loss_fn(m, b)
        if len(calls) == 3:
            loss = loss + torch.sqrt(m.lm_head.weight[0, 0] * 0.0)  # value 0, gradient inf * 0 = nan
        return loss

    out = tmp_path / "run"
    with pytest.raises(LmforgeError, match="gradient norm became nan at step 3"):
        train(model, nan_gradient_at_step_3, batches, TrainConfig(steps=4, save_every=2), RunDir(out))
    assert ckpt_mod.read_state(out / "checkpoint")["step"] == 2 and not (out / "final").exists()


# ----------------------------------------------------------------------------- LoRA / prompt tuning
WORDS = ["one", "two", "three", "four", "five", "six", "seven", "fox", "dog"]


def sft_file(tmp_path: Path) -> Path:
    path = tmp_path / "train.jsonl"
    rows = [{"prompt": f"Repeat: {a} {b}", "completion": f"{a} {b}"} for a in WORDS for b in WORDS[:3]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def lora_run(model_dir, tmp_path, out, **kwargs):
    from lmforge.training.sft import FinetuneConfig, finetune

    args = dict(method="lora", steps=4, batch_size=4, max_len=32, lr=3e-3, log_every=1, lora_r=4,
                lora_dropout=0.1, seed=3)
    kw = {**args, **kwargs}
    run = {k: kw.pop(k) for k in ("resume", "overwrite", "force") if k in kw}
    return finetune(FinetuneConfig(model=str(model_dir), train=sft_file(tmp_path), out_dir=out, **kw), **run)


def test_two_identical_lora_runs_give_identical_metrics(tiny_lm_dirs, tmp_path):
    """The LoRA matrices are drawn from the run's seed, not from whatever torch's global generator holds:
    two runs in one process log the same losses; another seed starts from another adapter."""
    lora_run(tiny_lm_dirs["plain"], tmp_path, tmp_path / "a")
    lora_run(tiny_lm_dirs["plain"], tmp_path, tmp_path / "b")
    assert rows_of(tmp_path / "a") == rows_of(tmp_path / "b")
    a, b = (load_file(str(tmp_path / d / "final" / "adapter_model.safetensors")) for d in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    lora_run(tiny_lm_dirs["plain"], tmp_path, tmp_path / "c", seed=4)
    assert rows_of(tmp_path / "c") != rows_of(tmp_path / "a")


def test_prompt_tuning_init_follows_the_seed(tiny_lm_dirs):
    from lmforge.training.sft import apply_method

    def prompt(seed):
        torch.manual_seed(seed + 100)  # the global generator must not matter
        net = apply_method(lmforge.load(tiny_lm_dirs["plain"]).model, "prompt-tuning", lora_r=1, lora_alpha=1.0,
                           lora_dropout=0.0, lora_targets=[], rslora=False, quant="nf4", num_virtual_tokens=3,
                           seed=seed)
        return net.prompt_embeddings.detach().clone()

    assert torch.equal(prompt(1), prompt(1)) and not torch.equal(prompt(1), prompt(2))


def test_lora_checkpoints_hold_the_adapter_and_resume_exactly(tiny_lm_dirs, tmp_path, monkeypatch):
    """A LoRA checkpoint's model file holds the adapter tensors only (the frozen base is rebuilt from the
    model on resume); a run that dies at step 3 and is resumed logs the uninterrupted run's steps and ends
    with the same adapter; resuming onto another base of the same shape is refused."""
    from lmforge.data.sft import SFTBatches

    plain = tiny_lm_dirs["plain"]
    lora_run(plain, tmp_path, tmp_path / "straight", steps=5, save_every=2)
    real, calls = SFTBatches.next_batch, []

    def dies_at_step_3(self):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed")
        return real(self)

    monkeypatch.setattr(SFTBatches, "next_batch", dies_at_step_3)
    with pytest.raises(RuntimeError, match="killed"):
        lora_run(plain, tmp_path, tmp_path / "stopped", steps=5, save_every=2)
    monkeypatch.undo()
    names = list(load_file(str(tmp_path / "stopped" / "checkpoint" / "model.safetensors")))
    assert names and all(n.endswith((".lora_A.weight", ".lora_B.weight")) for n in names), names
    assert len(names) == 2 * 4 * 2  # q, k, v, o projections of 2 layers, A and B
    state = ckpt_mod.read_state(tmp_path / "stopped" / "checkpoint")
    assert state["weights"] == "trainable" and state["frozen"]["fingerprint"]
    lora_run(plain, tmp_path, tmp_path / "stopped", steps=5, save_every=2, resume=True)
    assert rows_of(tmp_path / "stopped") == rows_of(tmp_path / "straight")
    a, b = (load_file(str(tmp_path / d / "final" / "adapter_model.safetensors")) for d in ("straight", "stopped"))
    assert all(torch.equal(a[k], b[k]) for k in a)

    from lmforge.checkpoints.hf import save_hf_dir
    from lmforge.models.decoder import DecoderLM

    base = lmforge.load(plain)
    other = save_hf_dir(DecoderLM(base.config).init_weights(seed=1, std=0.2), tmp_path / "other",
                        tokenizer=base.tokenizer)
    with pytest.raises(LmforgeError, match="cannot resume .*frozen base"):
        lora_run(other, tmp_path, tmp_path / "stopped", steps=6, save_every=2, resume=True)


def test_prompt_tuning_checkpoint_holds_the_soft_prompt_only(tiny_lm_dirs, tmp_path):
    lora_run(tiny_lm_dirs["plain"], tmp_path, tmp_path / "pt", method="prompt-tuning", virtual_tokens=3,
             steps=1, lr=3e-2)
    assert list(load_file(str(tmp_path / "pt" / "checkpoint" / "model.safetensors"))) == ["prompt_embeddings"]


def test_qlora_checkpoint_holds_the_adapter_and_resumes_over_the_requantised_base(tiny_lm_dirs, tmp_path):
    """QLoRA's frozen base is quantised again from the model on resume: its fingerprint must match."""
    out = tmp_path / "q"
    lora_run(tiny_lm_dirs["plain"], tmp_path, out, method="qlora", steps=2, save_every=1)
    names = list(load_file(str(out / "checkpoint" / "model.safetensors")))
    assert names and all(n.endswith((".lora_A.weight", ".lora_B.weight")) for n in names), names
    assert lora_run(tiny_lm_dirs["plain"], tmp_path, out, method="qlora", steps=3, save_every=1, resume=True)[
        "step"] == 3
