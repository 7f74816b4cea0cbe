"""Resume after a real SIGKILL for `lmforge rlhf dpo` and `lmforge reward train` (classifier and pairwise).

Each run is the CLI in a subprocess. The killed run is held inside one optimiser step (after its gradients, before
the update) so that it cannot finish first; the test SIGKILLs it as soon as a checkpoint beyond step 1 is on disk,
which lands anywhere from just after that checkpoint (mid-step, or while a later checkpoint is being written) to
the held step. ``--resume`` must then log the same metrics.jsonl, step for step and bit for bit (timing fields
aside), and save the same final weights as a run that never stopped. The pretraining equivalent is
tests/test_training.py::test_resume_after_sigkill_matches_uninterrupted_run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from test_dpo import pairs_file
from test_reward import _toy_csv, _toy_pairs, tiny_decoder, tiny_encoder  # noqa: F401 (fixtures)

HOLD_AT = 4  # the killed run's 4th optimiser step never completes: steps 1-3 and their checkpoints come first
TIMING = ("tokens_per_s", "seconds", "elapsed", "time", "step_s")  # differ between two identical runs

DRIVER = textwrap.dedent("""
    import os, sys, time
    import torch
    torch.set_num_threads(1)
    hold = int(os.environ.get("HOLD_AT_OPTIMIZER_STEP", "0"))
    if hold:
        from lmforge.training import loop
        real, calls = loop.optimizer_step, [0]
        def held(*args, **kwargs):
            calls[0] += 1
            if calls[0] == hold:
                time.sleep(600)  # SIGKILLed here at the latest
            return real(*args, **kwargs)
        loop.optimizer_step = held
    from lmforge.cli.main import main
    sys.exit(main(sys.argv[1:]))
""")


def _start(argv: list[str], tmp: Path, hold: int = 0) -> subprocess.Popen:
    driver = tmp / "driver.py"
    driver.write_text(DRIVER, encoding="utf-8")
    env = {**os.environ, "HOLD_AT_OPTIMIZER_STEP": str(hold), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, str(driver), *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    _, err = proc.communicate(timeout=180)
    return proc.returncode, err


def _checkpoint_step(out: Path) -> int:
    try:
        return int(json.loads((out / "checkpoint" / "state.json").read_text(encoding="utf-8"))["step"])
    except (OSError, ValueError, KeyError):  # not there yet (state.json is replaced atomically, never half-written)
        return 0


def _kill_after_a_checkpoint_beyond_step_1(proc: subprocess.Popen, out: Path) -> None:
    deadline = time.monotonic() + 150
    while _checkpoint_step(out) < 2:
        if proc.poll() is not None:
            pytest.fail(f"the run ended (status {proc.returncode}) before its step-2 checkpoint: "
                        f"{proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("no checkpoint beyond step 1 within 150 s")
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)


def _rows(out: Path) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [{k: v for k, v in json.loads(line).items() if not any(t in k for t in TIMING)} for line in lines]


def _weights(folder: Path) -> dict:
    files = sorted(folder.glob("*.safetensors"))
    assert files, f"no weights in {folder}"
    return {(f.name, name): t for f in files for name, t in load_file(str(f)).items()}


def _held_out(out: Path) -> dict:
    """A reward model's held-out figures from reward_config.json, without the timing."""
    metrics = json.loads((out / "reward_config.json").read_text(encoding="utf-8"))["metrics"]
    return {k: v for k, v in metrics.items() if not any(t in k for t in TIMING)}


def assert_sigkill_then_resume_matches(argv: list[str], tmp: Path, min_steps: int, final: str) -> list[dict]:
    """Run ``argv`` straight and, in parallel, killed after a checkpoint beyond step 1; resume the killed one;
    both logs and the weights saved in OUT/``final`` must be the same. Returns the uninterrupted run's rows."""
    straight, broken = tmp / "straight", tmp / "broken"
    first = _start([*argv, "-o", str(straight)], tmp)
    killed = _start([*argv, "-o", str(broken)], tmp, hold=HOLD_AT)
    _kill_after_a_checkpoint_beyond_step_1(killed, broken)
    code, err = _finish(killed)
    assert code == -signal.SIGKILL, err[-2000:]
    assert 2 <= _checkpoint_step(broken) < HOLD_AT and not list((broken / final).glob("*.safetensors"))
    code, err = _finish(first)
    assert code == 0, err[-2000:]

    code, err = _finish(_start([*argv, "-o", str(broken), "--resume"], tmp))
    assert code == 0, err[-2000:]
    expected, got = _rows(straight), _rows(broken)
    steps = sorted({r["step"] for r in expected if "loss" in r})
    assert len(steps) >= min_steps and steps[-1] > HOLD_AT, steps
    assert got == expected
    a, b = _weights(straight / final), _weights(broken / final)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].equal(b[key]), key
    return expected


def test_dpo_resumes_after_sigkill_like_an_uninterrupted_run(tiny_lm_dirs, tmp_path):
    argv = ["rlhf", "dpo", "-m", str(tiny_lm_dirs["plain"]), "--data", str(pairs_file(tmp_path)), "--batch-size", "2",
            "--steps", "6", "--lr", "1e-3", "--warmup", "1", "--lora-r", "4", "--eval-fraction", "0.25",
            "--eval-every", "3", "--template", "plain", "--save-every", "1", "--threads", "1"]
    rows = assert_sigkill_then_resume_matches(argv, tmp_path, min_steps=6, final="final")
    assert any("eval_loss" in r for r in rows) and any("reward_accuracy" in r for r in rows)


def test_reward_classifier_resumes_after_sigkill_like_an_uninterrupted_run(tiny_encoder, tmp_path):  # noqa: F811
    argv = ["reward", "train", str(_toy_csv(tmp_path / "toy.csv", n=48)), "--model", str(tiny_encoder),
            "--text-field", "text", "--label-field", "label", "--label-map", "0=toxic,1=fine", "--good-labels", "fine",
            "--max-len", "16", "--batch-size", "6", "--epochs", "2", "--lr", "3e-3", "--precision", "fp32",
            "--eval-fraction", "0.25", "--save-every", "1", "--threads", "1"]
    assert_sigkill_then_resume_matches(argv, tmp_path, min_steps=6, final=".")  # the reward model is OUT itself
    assert _held_out(tmp_path / "broken") == _held_out(tmp_path / "straight")


def test_pairwise_reward_resumes_after_sigkill_like_an_uninterrupted_run(tiny_decoder, tmp_path):  # noqa: F811
    argv = ["reward", "train", str(_toy_pairs(tmp_path / "pairs.jsonl", n=30)), "--kind", "pairwise", "-m",
            str(tiny_decoder), "--train-layers", "1", "--max-len", "12", "--batch-size", "6", "--epochs", "2",
            "--precision", "fp32", "--eval-fraction", "0.2", "--save-every", "1", "--threads", "1"]
    assert_sigkill_then_resume_matches(argv, tmp_path, min_steps=6, final=".")  # the reward model is OUT itself
    assert _held_out(tmp_path / "broken") == _held_out(tmp_path / "straight")
