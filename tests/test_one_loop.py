"""One training loop for every gradient recipe (issue 13, item 2): reward classifier, pairwise reward and DPO runs
killed mid-run resume step for step; a NaN loss stops each before the update and keeps the last checkpoint; the
shared shuffled index source resumes exactly; no module but the loop steps an optimiser."""

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lmforge.training.loop as loop
from lmforge.cli import main
from lmforge.errors import LmforgeError
from lmforge.training.checkpoint import read_state
from lmforge.training.sources import ShuffledIndices
from test_dpo import pairs_file
from test_reward import _toy_csv, _toy_pairs, tiny_decoder, tiny_encoder, train_classifier, train_pairwise  # noqa: F401


class Killed(RuntimeError):
    pass


def kill_at_step(monkeypatch, k: int) -> None:
    """The process 'dies' in the loop's k-th optimiser step, before the update (after any checkpoint before it)."""
    real, calls = loop.optimizer_step, []

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == k:
            raise Killed(f"killed at step {k}")
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "optimizer_step", dying)


def rows_of(out: Path) -> list[dict]:
    """metrics.jsonl without the timing field."""
    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return {**load_file(str(path / "model.safetensors")),
            **(load_file(str(path / "head" / "score.safetensors")) if (path / "head").is_dir() else {})}


def assert_resumes_step_for_step(tmp_path, monkeypatch, trainer, kill: int, steps: int, **kwargs):
    straight = trainer(out_dir=tmp_path / "straight", **kwargs)
    with monkeypatch.context() as m:
        kill_at_step(m, kill)
        with pytest.raises(Killed):
            trainer(out_dir=tmp_path / "stopped", **kwargs)
    stopped = tmp_path / "stopped"
    saved = read_state(stopped / "checkpoint")["step"]
    assert 0 < saved < kill and not (stopped / "reward_config.json").exists()
    resumed = trainer(out_dir=stopped, resume=True, **kwargs)
    assert [r["step"] for r in rows_of(stopped)] == list(range(1, steps + 1))
    assert rows_of(stopped) == rows_of(tmp_path / "straight")  # the same loss, lr and grad norm at every step
    drop = ("seconds",)
    assert {k: v for k, v in resumed.items() if k not in drop} == {k: v for k, v in straight.items() if k not in drop}
    a, b = weights(tmp_path / "straight"), weights(stopped)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_reward_classifier_killed_mid_run_resumes_step_for_step(tiny_encoder, tmp_path, monkeypatch):  # noqa: F811
    data = _toy_csv(tmp_path / "toy.csv", n=48)  # 36 training examples: 5 steps an epoch (the last one short)
    kwargs = dict(data=data, model=tiny_encoder, text_field="text", label_field="label", good_labels=["fine"],
                  label_map="0=toxic,1=fine", eval_fraction=0.25, batch_size=8, lr=3e-3, max_len=16,
                  precision="fp32", epochs=2, save_every=3)
    assert_resumes_step_for_step(tmp_path, monkeypatch, train_classifier, kill=8, steps=10, **kwargs)
    assert read_state(tmp_path / "stopped" / "checkpoint")["step"] == 10  # --save-every: the last one is kept


@pytest.mark.parametrize("train_layers", [0, 1])
def test_pairwise_reward_killed_mid_run_resumes_step_for_step(tiny_decoder, tmp_path, monkeypatch,  # noqa: F811
                                                              train_layers):
    """train_layers 1: the checkpoint holds the trainable top block, norm and head only (the frozen base's
    fingerprint is checked on resume); the cached frozen states are recomputed the same."""
    data = _toy_pairs(tmp_path / "pairs.jsonl", n=30)
    kwargs = dict(data=data, model=tiny_decoder, eval_fraction=0.2, max_len=12, batch_size=8, lr=1e-2,
                  precision="fp32", epochs=3, train_layers=train_layers, save_every=4)
    assert_resumes_step_for_step(tmp_path, monkeypatch, train_pairwise, kill=6, steps=9, **kwargs)
    assert read_state(tmp_path / "stopped" / "checkpoint")["weights"] == "trainable"


def test_reward_checkpoint_is_not_kept_unless_asked_for(tiny_encoder, tmp_path):  # noqa: F811
    data = _toy_csv(tmp_path / "toy.csv", n=24)
    train_classifier(data=data, out_dir=tmp_path / "rm", model=tiny_encoder, text_field="text", label_field="label",
                     good_labels=["fine"], label_map="0=toxic,1=fine", batch_size=8, max_len=16,
                     precision="fp32")
    names = sorted(p.name for p in (tmp_path / "rm").iterdir())
    assert "checkpoint" not in names and {"metrics.jsonl", "reward_config.json", "model.safetensors"} <= set(names)


def test_cli_reward_train_resume(tiny_encoder, tmp_path, monkeypatch, capsys):  # noqa: F811
    data = _toy_csv(tmp_path / "toy.csv", n=32)
    args = ["reward", "train", str(data), "--model", str(tiny_encoder), "--text-field", "text", "--label-field",
            "label", "--label-map", "0=toxic,1=fine", "--good-labels", "fine", "--max-len", "16", "--batch-size", "8",
            "--epochs", "2", "--precision", "fp32", "--save-every", "2"]
    assert main([*args, "-o", str(tmp_path / "straight")]) == 0
    with monkeypatch.context() as m:
        kill_at_step(m, 4)
        with pytest.raises(Killed):
            main([*args, "-o", str(tmp_path / "stopped")])
    code = main([*args, "-o", str(tmp_path / "stopped")])  # a run is there: not silently restarted
    assert code == 2 and "--resume" in capsys.readouterr().err
    assert main([*args, "-o", str(tmp_path / "stopped"), "--resume"]) == 0
    assert rows_of(tmp_path / "stopped") == rows_of(tmp_path / "straight")
    capsys.readouterr()
    assert main([*args, "-o", str(tmp_path / "none"), "--resume"]) == 2
    assert "no `lmforge reward train` run to continue" in capsys.readouterr().err


def test_dpo_with_reference_table_and_held_out_pairs_resumes_step_for_step(tiny_lm_dirs, tmp_path, monkeypatch,
                                                                           capsys):
    args = ["rlhf", "dpo", "-m", str(tiny_lm_dirs["plain"]), "--data", str(pairs_file(tmp_path)), "--batch-size", "2",
            "--lr", "3e-3", "--warmup", "1", "--threads", "1", "--save-every", "2", "--steps", "6", "--precompute-ref",
            "--eval-fraction", "0.34", "--eval-every", "3"]
    assert main([*args, "-o", str(tmp_path / "straight")]) == 0
    with monkeypatch.context() as m:
        kill_at_step(m, 5)
        with pytest.raises(Killed):
            main([*args, "-o", str(tmp_path / "stopped")])
    assert read_state(tmp_path / "stopped" / "checkpoint")["step"] == 4
    assert main([*args, "-o", str(tmp_path / "stopped"), "--resume"]) == 0
    straight = rows_of(tmp_path / "straight")
    assert [r["step"] for r in straight if "eval_loss" in r] == [0, 3, 6]
    assert rows_of(tmp_path / "stopped") == straight
    a, b = (load_file(str(tmp_path / n / "final" / "adapter_model.safetensors")) for n in ("straight", "stopped"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()


# ----------------------------------------------------------------------------- a NaN loss stops every recipe
def test_reward_classifier_stops_on_a_nan_loss_and_keeps_the_last_checkpoint(tiny_encoder, tmp_path,  # noqa: F811
                                                                              monkeypatch):
    from lmforge.alignment import reward_classifier

    real, calls = reward_classifier.F.cross_entropy, []

    def nan_at_step_3(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(reward_classifier.F, "cross_entropy", nan_at_step_3)
    out = tmp_path / "rm"
    with pytest.raises(LmforgeError, match="the loss became nan at step 3"):
        train_classifier(data=_toy_csv(tmp_path / "toy.csv", n=48), out_dir=out, model=tiny_encoder,
                         text_field="text", label_field="label", good_labels=["fine"],
                         label_map="0=toxic,1=fine", batch_size=8, max_len=16, precision="fp32",
                         save_every=2)
    assert read_state(out / "checkpoint")["step"] == 2 and not (out / "reward_config.json").exists()
    assert all(torch.isfinite(t).all() for t in load_file(str(out / "checkpoint" / "model.safetensors")).values())
    assert [r["step"] for r in rows_of(out)] == [1, 2]


def test_pairwise_reward_stops_on_a_nan_loss_and_keeps_the_last_checkpoint(tiny_decoder, tmp_path,  # noqa: F811
                                                                           monkeypatch):
    from lmforge.alignment import reward_pairwise

    real, calls = reward_pairwise.bradley_terry_loss, []

    def nan_at_step_2(c, r):
        calls.append(1)
        return real(c, r) * (float("nan") if len(calls) == 2 else 1.0)

    monkeypatch.setattr(reward_pairwise, "bradley_terry_loss", nan_at_step_2)
    out = tmp_path / "rm"
    with pytest.raises(LmforgeError, match="the loss became nan at step 2"):
        train_pairwise(data=_toy_pairs(tmp_path / "pairs.jsonl", n=30), out_dir=out, model=tiny_decoder,
                       max_len=12, batch_size=8, precision="fp32", save_every=1)
    assert read_state(out / "checkpoint")["step"] == 1 and not (out / "reward_config.json").exists()


# ----------------------------------------------------------------------------- the shared pieces
@pytest.mark.parametrize("whole_passes", [False, True])
def test_shuffled_indices_resume_exactly(whole_passes):
    source = ShuffledIndices(7, 3, seed=5, whole_passes=whole_passes)
    first = [source.next_batch() for _ in range(4)]
    state = json.loads(json.dumps(source.state_dict()))  # what a checkpoint keeps
    rest = [source.next_batch() for _ in range(6)]
    again = ShuffledIndices(7, 3, seed=5, whole_passes=whole_passes)
    again.load_state_dict(state)
    assert [again.next_batch() for _ in range(6)] == rest
    if whole_passes:  # a pass is 3 + 3 + 1 indices, each index once
        assert [len(b) for b in first[:3]] == [3, 3, 1] and sorted(sum(first[:3], [])) == list(range(7))
    else:
        assert all(len(b) == 3 for b in first + rest)
    small = ShuffledIndices(4, 3, seed=5)
    with pytest.raises(LmforgeError, match="resume with the same data"):
        small.load_state_dict(state)


def test_only_the_training_loop_steps_an_optimiser():
    """Structural: ``optimizer.step()`` (any ``X.step()`` without arguments) appears in training/loop.py only."""
    src = Path(__file__).resolve().parents[1] / "src" / "lmforge"
    found = [f"{path.relative_to(src)}:{n}" for path in sorted(src.rglob("*.py"))
             for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
             if re.search(r"\.step\(\s*\)", line.split("#")[0])]
    assert len(found) == 1 and found[0].startswith("training/loop.py:"), found
