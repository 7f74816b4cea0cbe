"""Data parallelism on torchrun (issue 14, first slice), on CPU with gloo: two processes started by
``python -m torch.distributed.run`` running the real CLI (``-m lmforge.cli``) train with the same losses,
step for step, and end with the same weights as one process on the whole batch; only rank 0 writes; a
world size that does not divide the batch is one clear error. Plus the single-process pieces
(``ShardedBatches``, ``Dist``) in this process."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmforge.cli.main import main
from lmforge.data.sft import SFTBatches, SFTExample
from lmforge.errors import LmforgeError
from lmforge.training.distributed import Dist, backend_for, setup
from lmforge.training.sources import ShardedBatches, ShuffledIndices
from test_reward import tiny_encoder  # noqa: F401 (a fixture)

TIMING = ("tokens_per_s",)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(argv: list[str], nproc: int = 2, timeout: float = 240) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node nproc -m lmforge.cli ARGV`` on 127.0.0.1 (gloo, one thread a process)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
           "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
           "127.0.0.1", "--master-port", str(free_port()), "-m", "lmforge.cli", *argv]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _process(pid: int):
    import psutil

    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


def losses(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def assert_same_rows(ddp: list[dict], one: list[dict], tol: float = 1e-5) -> None:
    assert [sorted(r) for r in ddp] == [sorted(r) for r in one]
    for a, b in zip(ddp, one):
        for key, value in b.items():
            assert a[key] == pytest.approx(value, abs=tol, rel=tol), (key, a, b)


def assert_same_weights(a: Path, b: Path, tol: float = 5e-5, name: str = "model.safetensors") -> None:
    """Equal weights up to float32 summation order: Adam divides each gradient by its own running size, so on
    an element whose gradient is nearly zero a rounding difference in the all-reduced sum moves the weight by
    up to ~1e-5 after a few steps (the losses agree within 1e-5)."""
    wa, wb = load_file(str(a / name)), load_file(str(b / name))
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=tol, rtol=tol, msg=name)


STRATEGIES = pytest.mark.parametrize("strategy", ["ddp", "fsdp"])


@STRATEGIES
def test_pretrain_two_ranks_equal_one_process(tmp_path, capsys, strategy):
    """Pretraining with accumulation and evaluation; under FSDP also: the sharded checkpoint of a 2-rank run
    stopped at step 2 resumes on 4 ranks and on one process, and both end where the uninterrupted run does."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("To be, or not to be, that is the question. Whether 'tis nobler in the mind.\n" * 40,
                      encoding="utf-8")
    args = ["pretrain", "--corpus", str(corpus), "--steps", "4", "--seq-len", "16", "--batch-size", "8",
            "--grad-accum", "2", "--eval-every", "2", "--eval-batches", "1", "--log-every", "1", "--save-every", "2",
            "--cache-dir", str(tmp_path / "cache"), "--set", "n_layer=2", "--set", "n_embd=32", "--lr", "1e-2"]
    assert main([*args, "-o", str(tmp_path / "one")]) == 0
    capsys.readouterr()
    done = torchrun([*args, "--strategy", strategy, "-o", str(tmp_path / "two")])
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len([r for r in one if "loss" in r]) == 4 and any("val_loss" in r for r in one)
    assert_same_rows(two, one)
    assert_same_weights(tmp_path / "two" / "final", tmp_path / "one" / "final")
    assert (tmp_path / "two" / "config.yaml").read_text(encoding="utf-8") == (
        tmp_path / "one" / "config.yaml").read_text(encoding="utf-8").replace(str(tmp_path / "one"), str(
            tmp_path / "two")).replace("strategy: auto", f"strategy: {strategy}")
    if strategy == "fsdp":
        shards = sorted(p.name for p in (tmp_path / "two" / "checkpoint" / "shards").iterdir())
        assert {p.split("-")[1] for p in shards} == {"00001", "00002"}  # each rank's own files
        assert all(p.endswith(".safetensors") for p in shards) and len(shards) == 2 * 3  # per block + the rest
        # 2 steps on 2 ranks (still in the warmup: the same learning rates as the 4-step run), then 2 more
        done = torchrun([*args, "--strategy", "fsdp", "--steps", "2", "-o", str(tmp_path / "half")])
        assert done.returncode == 0, done.stderr[-3000:]
        for name in ("four", "single"):
            shutil.copytree(tmp_path / "half", tmp_path / name)
        done = torchrun([*args, "--strategy", "fsdp", "--resume", "-o", str(tmp_path / "four")], nproc=4)
        assert done.returncode == 0, done.stderr[-3000:]
        assert main([*args, "--resume", "-o", str(tmp_path / "single")]) == 0
        for name in ("four", "single"):
            assert_same_rows(losses(tmp_path / name), one)
            assert_same_weights(tmp_path / name / "final", tmp_path / "one" / "final")
        shutil.copytree(tmp_path / "half", tmp_path / "other")  # a checkpoint of another model: one clear line
        capsys.readouterr()
        assert main([*args, "--set", "n_embd=48", "--resume", "-o", str(tmp_path / "other")]) == 2
        assert "differing fields: " in capsys.readouterr().err


@pytest.fixture
def sft_file(tmp_path) -> Path:
    words = ["one", "two", "three", "four", "fox", "dog", "lazy", "quick"]
    path = tmp_path / "train.jsonl"  # responses of different lengths: the ranks' label counts differ
    path.write_text("".join(json.dumps({"text": f"{a} {b}", "answer": " ".join([b, a] * (1 + len(a) % 3))}) + "\n"
                            for a in words for b in words), encoding="utf-8")
    return path


@STRATEGIES
def test_full_sft_two_ranks_equal_one_process_then_resume_on_one(tiny_lm_dirs, sft_file, tmp_path, capsys,
                                                                  strategy):
    """Full fine-tuning: the SFT loss is the mean over the global batch's labelled tokens, whose count differs
    between the ranks' halves. A 2-rank run's checkpoint (global position) resumes on one process (a constant
    rate, so that a run of 2 steps continued to 4 follows the 4-step run)."""
    args = ["finetune", "-m", str(tiny_lm_dirs["plain"]), "--train", str(sft_file), "--method", "full",
            "--steps", "4", "--batch-size", "8", "--max-len", "32", "--lr", "3e-3", "--min-lr-ratio", "1",
            "--log-every", "1", "--seed", "3", "--prompt-template", "Swap: {text}\nAnswer: ",
            "--response-field", "answer"]
    assert main([*args, "-o", str(tmp_path / "one")]) == 0
    capsys.readouterr()
    done = torchrun([*args, "--strategy", strategy, "--save-every", "2", "-o", str(tmp_path / "two")])
    assert done.returncode == 0, done.stderr[-3000:]
    one = losses(tmp_path / "one")
    assert len(one) == 4
    assert_same_rows(losses(tmp_path / "two"), one)
    assert_same_weights(tmp_path / "two" / "final", tmp_path / "one" / "final")

    done = torchrun([*args, "--strategy", strategy, "--steps", "2", "-o", str(tmp_path / "half")])  # then 1 rank
    assert done.returncode == 0, done.stderr[-3000:]
    if strategy == "ddp":  # whole tensors resume into FSDP shards too
        shutil.copytree(tmp_path / "half", tmp_path / "to_fsdp")
        done = torchrun([*args, "--strategy", "fsdp", "--resume", "-o", str(tmp_path / "to_fsdp")])
        assert done.returncode == 0, done.stderr[-3000:]
        assert_same_rows(losses(tmp_path / "to_fsdp"), one)
        assert_same_weights(tmp_path / "to_fsdp" / "final", tmp_path / "one" / "final")
    assert main([*args, "--resume", "-o", str(tmp_path / "half")]) == 0
    assert_same_rows(losses(tmp_path / "half"), one)
    assert_same_weights(tmp_path / "half" / "final", tmp_path / "one" / "final")


@STRATEGIES
def test_lora_sft_two_ranks_equal_one_process(tiny_lm_dirs, sft_file, tmp_path, capsys, strategy):
    """LoRA with accumulation (no_sync on the first micro-batch); without dropout, whose masks are per rank."""
    args = ["finetune", "-m", str(tiny_lm_dirs["plain"]), "--train", str(sft_file), "--method", "lora",
            "--lora-r", "4", "--lora-targets", "q_proj,v_proj", "--lora-dropout", "0", "--steps", "3",
            "--batch-size", "4", "--grad-accum", "2", "--max-len", "32", "--lr", "3e-3", "--log-every", "1",
            "--seed", "5", "--prompt-template", "{text} ->", "--response-field", "answer"]
    assert main([*args, "-o", str(tmp_path / "one")]) == 0
    capsys.readouterr()
    done = torchrun([*args, "--strategy", strategy, "-o", str(tmp_path / "two")])
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_rows(losses(tmp_path / "two"), losses(tmp_path / "one"))
    assert_same_weights(tmp_path / "two" / "final", tmp_path / "one" / "final", name="adapter_model.safetensors")


@STRATEGIES
def test_dpo_two_ranks_equal_one_process(tiny_lm_dirs, tmp_path, capsys, strategy):
    """LoRA DPO with held-out pairs (evaluated by rank 0 before and after): the preference loss is a mean over
    pairs, each rank holding half of every batch's pairs."""
    from test_dpo import pairs_file

    args = ["rlhf", "dpo", "-m", str(tiny_lm_dirs["plain"]), "--data", str(pairs_file(tmp_path)), "--steps", "3",
            "--batch-size", "4", "--lr", "1e-3", "--eval-fraction", "0.34", "--seed", "2"]
    assert main([*args, "-o", str(tmp_path / "one")]) == 0
    capsys.readouterr()
    done = torchrun([*args, "--strategy", strategy, "-o", str(tmp_path / "two")])
    assert done.returncode == 0, done.stderr[-3000:]
    one = losses(tmp_path / "one")
    assert [r["step"] for r in one] == [0, 1, 2, 3, 3] and "eval_reward_margin" in one[0]
    assert_same_rows(losses(tmp_path / "two"), one)
    assert_same_weights(tmp_path / "two" / "final", tmp_path / "one" / "final", name="adapter_model.safetensors")


def test_batch_not_divisible_by_world_is_one_clear_error(tiny_lm_dirs, sft_file, tmp_path):
    done = torchrun(["finetune", "-m", str(tiny_lm_dirs["plain"]), "--train", str(sft_file), "--method", "full",
                     "--steps", "1", "--batch-size", "3", "--max-len", "32", "--response-field", "answer",
                     "--prompt-template", "{text}", "-o", str(tmp_path / "bad")])
    assert done.returncode != 0
    for rank in (0, 1):  # each rank's error as one line naming it; the recipe's report comes from rank 0 only
        assert f"error (rank {rank}/2): the batch size 3 does not divide among the world size 2" in done.stderr
    assert done.stderr.count("parameters trainable") == 1


# ----------------------------------------------------------------------------- in this process
def test_dist_is_a_no_op_without_torchrun(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    d = setup()
    assert (d.rank, d.world, d.is_main, d.enabled) == (0, 1, True, False)
    d.barrier()
    assert d.all_reduce_mean(2.5) == 2.5 and d.all_reduce_mean([1.0, 2.0]) == [1.0, 2.0]
    assert backend_for(cuda=False) == "gloo" and backend_for(cuda=True) == "nccl"


def test_world_size_without_torchrun_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(LmforgeError, match="MASTER_ADDR is not set"):
        setup()


def test_shards_are_the_global_batch_split_in_rank_order():
    """Each rank's rows are its slice of the one global batch; the weights average to 1 and weight each
    share by its loss terms; the state is the source's (global)."""
    examples = [SFTExample(list(range(1, 3 + i)), [-100] + list(range(2, 3 + i)), [1], "") for i in range(6)]

    def source() -> SFTBatches:
        return SFTBatches(examples, batch_size=4, pad_id=0, seed=1)

    whole = source().next_batch()
    shards = [ShardedBatches(source(), r, 2) for r in range(2)]
    got = [s.next_shard() for s in shards]
    for r, (batch, _) in enumerate(got):
        for key in whole:
            assert torch.equal(batch[key], whole[key][2 * r: 2 * r + 2])
    terms = [source().loss_terms(b) for b, _ in got]
    total = source().loss_terms(whole)
    assert sum(terms) == total and terms[0] != terms[1]
    assert [w for _, w in got] == pytest.approx([2 * t / total for t in terms])
    assert shards[0].state_dict() == {"epoch": 0, "cursor": 4, "seed": 1}

    indices = ShardedBatches(ShuffledIndices(10, 4, seed=0), 1, 2)
    rows, weight = indices.next_shard()
    assert rows == ShuffledIndices(10, 4, seed=0).next_batch()[2:] and weight == 1.0
    with pytest.raises(LmforgeError, match="batch size 3 does not divide among the world size 2"):
        ShardedBatches(ShuffledIndices(10, 3, seed=0), 0, 2).next_shard()
    assert Dist(rank=1, world=2).is_main is False


def test_reward_classifier_two_ranks_equal_one_process(tiny_encoder, tmp_path, capsys):  # noqa: F811
    """Reward-classifier training (epochs of whole passes: 30 rows in batches of 8, 8, 8, 6) with held-out
    figures evaluated by rank 0."""
    from test_reward import _toy_csv

    args = ["reward", "train", str(_toy_csv(tmp_path / "toy.csv", n=40)), "--model", str(tiny_encoder),
            "--text-field", "text", "--label-field", "label", "--label-map", "0=toxic,1=fine", "--good-labels", "fine",
            "--max-len", "16", "--batch-size", "8", "--lr", "3e-3", "--precision", "fp32", "--eval-fraction", "0.25",
            "--epochs", "2"]
    assert main([*args, "-o", str(tmp_path / "one")]) == 0
    capsys.readouterr()
    done = torchrun([*args, "-o", str(tmp_path / "two")])
    assert done.returncode == 0, done.stderr[-3000:]
    one = losses(tmp_path / "one")
    assert len([r for r in one if "loss" in r]) == 8
    assert_same_rows(losses(tmp_path / "two"), one)
    assert_same_weights(tmp_path / "two", tmp_path / "one")


def test_two_ranks_killed_mid_run_resume_on_two_and_on_one(tmp_path, capsys):
    """A 2-rank pretraining run SIGKILLed (the whole process group) after its checkpoint reached step 2 resumes
    in copies of its folder with 2 ranks and with 1 process; both log the same steps as an uninterrupted run."""
    import shutil
    import signal
    import time

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("To be, or not to be, that is the question. Whether 'tis nobler in the mind.\n" * 40,
                      encoding="utf-8")
    args = ["pretrain", "--corpus", str(corpus), "--steps", "40", "--seq-len", "16", "--batch-size", "8",
            "--eval-every", "10", "--eval-batches", "1", "--log-every", "1", "--save-every", "1",
            "--cache-dir", str(tmp_path / "cache"), "--set", "n_layer=2", "--set", "n_embd=32", "--lr", "1e-2",
            "--min-lr-ratio", "1"]
    assert main([*args, "-o", str(tmp_path / "one")]) == 0
    capsys.readouterr()

    killed = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
           "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "lmforge.cli", *args, "-o", str(killed)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    state, deadline = killed / "checkpoint" / "state.json", time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if json.loads(state.read_text(encoding="utf-8"))["step"] >= 2:
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.02)
        assert proc.poll() is None, f"the run ended before it was killed: {proc.stderr.read()[-3000:]}"
    finally:  # the whole tree: torchrun's workers need not share its process group
        import psutil

        tree = [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True))]
        os.killpg(proc.pid, signal.SIGKILL)
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
        psutil.wait_procs([p for p in map(_process, tree) if p is not None], timeout=30)
    assert not (killed / "final").exists()

    for name in ("two", "single"):
        shutil.copytree(killed, tmp_path / name)
    done = torchrun([*args, "--resume", "-o", str(tmp_path / "two")])
    assert done.returncode == 0, done.stderr[-3000:]
    assert main([*args, "--resume", "-o", str(tmp_path / "single")]) == 0
    one = losses(tmp_path / "one")
    assert len([r for r in one if "loss" in r]) == 40
    for name in ("two", "single"):
        assert_same_rows(losses(tmp_path / name), one)


def test_nproc_flag_relaunches_under_torchrun(tiny_lm_dirs, sft_file, tmp_path, capsys, monkeypatch):
    """``lmforge finetune --nproc 2 ...`` runs the same command (less --nproc) under ``torchrun --standalone``:
    the 2-process run logs the 1-process run's steps; a job whose ranks stopped on bad input exits with 2
    (``distributed.launch_main``); --nproc 0 and --nproc inside a torchrun job are refused."""
    for key, value in {"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "TQDM_DISABLE": "1"}.items():
        monkeypatch.setenv(key, value)
    args = ["finetune", "-m", str(tiny_lm_dirs["plain"]), "--train", str(sft_file), "--method", "full",
            "--steps", "2", "--batch-size", "8", "--max-len", "32", "--lr", "3e-3", "--log-every", "1", "--seed", "3",
            "--prompt-template", "Swap: {text}\nAnswer: ", "--response-field", "answer"]
    assert main([*args, "-o", str(tmp_path / "one")]) == 0
    assert main([*args, "--nproc", "2", "-o", str(tmp_path / "two")]) == 0
    assert_same_rows(losses(tmp_path / "two"), losses(tmp_path / "one"))
    assert "\nnproc:" not in (tmp_path / "two" / "config.yaml").read_text(encoding="utf-8")
    assert main([*args, "--nproc=2", "--batch-size", "3", "-o", str(tmp_path / "bad")]) == 2  # bad input on the ranks
    capsys.readouterr()

    assert main([*args, "--nproc", "0", "-o", str(tmp_path / "zero")]) == 2
    assert "--nproc must be >= 1, got 0" in capsys.readouterr().err
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    assert main([*args, "--nproc", "2", "-o", str(tmp_path / "inside")]) == 2
    assert "--nproc inside a torchrun job" in capsys.readouterr().err
    for verb in (["pretrain"], ["rlhf", "dpo"], ["reward", "train"]):
        assert main([*verb, "--help"]) == 0
        assert "--nproc N" in capsys.readouterr().out
