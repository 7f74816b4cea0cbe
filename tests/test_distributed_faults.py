"""Distributed faults (issue 14), on CPU with gloo, 2 processes of a tiny pretraining run: ranks started with
different configs stop with one line naming the ranks and fields; each rank's error is one line naming it and
``--nproc`` ends a failed job with one summary line (status 2 on bad input) instead of torchrun's report; a
rank that dies ends the job (no hang) and ``--resume`` continues it; a kill during a checkpoint save loses at
most one interval; two "nodes" on 127.0.0.1 (c10d rendezvous) match one process.

Faults are injected by ``fault_wrapper.py`` (written into the test's folder), which torchrun runs in place of
``-m lmforge.cli``: it records its pid per rank, can add arguments on rank 1, and can stall rank 0 inside a
checkpoint save just before the checkpoint is marked complete; then it calls the real CLI (``main``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmforge.cli.main import main
from test_distributed import assert_same_rows, free_port, losses

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "TQDM_DISABLE": "1"}
STEPS = 12
LAUNCH_MAIN = "import sys; from lmforge.training.distributed import launch_main; sys.exit(launch_main(sys.argv[1:]))"

WRAPPER = '''
import json, os, sys, time
from pathlib import Path

faults = Path(os.environ["FAULT_DIR"])
rank = os.environ.get("RANK", "0")
(faults / f"pid-{rank}").write_text(str(os.getpid()))
argv = sys.argv[1:]
if rank == "1":
    argv += json.loads(os.environ.get("FAULT_RANK1_ARGS", "[]"))
stall_at = int(os.environ.get("FAULT_STALL_SAVE_AT", "0"))
if stall_at and rank == "0":
    import lmforge.training.checkpoint as ckpt

    def stall(folder):
        (faults / "stalled").write_text(str(folder))
        time.sleep(600)

    if os.environ.get("FAULT_STALL_PHASE") == "swap":  # the old checkpoint moved aside, the new one not yet in
        replace = os.replace

        def stalling_replace(src, dst, *args, **kwargs):
            src, dst = Path(src), Path(dst)
            if src.name.startswith(ckpt.TMP_PREFIX) and dst.name == ckpt.NAME and src.is_dir():
                if json.loads((src / ckpt.MARKER).read_text())["step"] == stall_at:
                    stall(src)
            return replace(src, dst, *args, **kwargs)

        os.replace = stalling_replace
    else:  # the new checkpoint's files written, not yet marked complete
        write = ckpt.write_json_atomic

        def stalling_write(path, data, *args, **kwargs):
            if Path(path).name == ckpt.MARKER and data.get("step") == stall_at:
                stall(Path(path).parent)
            return write(path, data, *args, **kwargs)

        ckpt.write_json_atomic = stalling_write
from lmforge.cli.main import main
sys.exit(main(argv))
'''


@pytest.fixture(scope="module")
def pretrain(tmp_path_factory) -> tuple[list[str], list[dict]]:
    """The tiny pretraining command (less ``-o``) and the losses of its uninterrupted single-process run."""
    root = tmp_path_factory.mktemp("faults")
    corpus = root / "corpus.txt"
    corpus.write_text("To be, or not to be, that is the question. Whether 'tis nobler in the mind.\n" * 40,
                      encoding="utf-8")
    args = ["pretrain", "--corpus", str(corpus), "--steps", str(STEPS), "--seq-len", "16", "--batch-size", "8",
            "--eval-every", "6", "--eval-batches", "1", "--log-every", "1", "--save-every", "2",
            "--cache-dir", str(root / "cache"), "--set", "n_layer=2", "--set", "n_embd=32", "--lr", "1e-2",
            "--min-lr-ratio", "1"]
    assert main([*args, "-o", str(root / "one")]) == 0
    one = losses(root / "one")
    assert len([r for r in one if "loss" in r]) == STEPS
    return args, one


def start(argv: list[str], faults: Path, as_nproc: bool = False, **env: str) -> subprocess.Popen:
    """2 ranks of ``fault_wrapper.py ARGV`` under torchrun (its output in ``faults/torchrun.log``); with
    ``as_nproc``, torchrun as ``--nproc`` runs it (``distributed.launch_main``)."""
    faults.mkdir(parents=True, exist_ok=True)
    wrapper = faults / "fault_wrapper.py"
    wrapper.write_text(WRAPPER, encoding="utf-8")
    launcher = ["-c", LAUNCH_MAIN] if as_nproc else ["-m", "torch.distributed.run"]
    cmd = [sys.executable, *launcher, "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), str(wrapper), *argv]
    log = open(faults / "torchrun.log", "w", encoding="utf-8")
    return subprocess.Popen(cmd, env={**ENV, "FAULT_DIR": str(faults), **env}, stdout=log, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def finish(proc: subprocess.Popen, faults: Path, timeout: float) -> tuple[int, str]:
    """The job's exit status and output; the whole process group is killed if it outlives ``timeout``."""
    try:
        rc = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return rc, (faults / "torchrun.log").read_text(encoding="utf-8")


def wait_for(check, proc: subprocess.Popen, faults: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if proc.poll() is not None:
            pytest.fail(f"the job ended first: {(faults / 'torchrun.log').read_text(encoding='utf-8')[-3000:]}")
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail("timed out waiting for the job")


def checkpoint_step(out: Path) -> int:
    try:
        return int(json.loads((out / "checkpoint" / "COMPLETE").read_text(encoding="utf-8"))["step"])
    except (OSError, ValueError, KeyError):
        return -1


def resume_on_two(args: list[str], out: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "lmforge.cli", *args, "--resume", "-o", str(out)]
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]


def test_mismatched_configs_between_ranks_are_one_clear_error(pretrain, tmp_path):
    """Rank 1 started with another --lr, --seed and --strategy: every rank stops at the start, before the
    model is wrapped (whose collectives would differ), with a line naming rank 1 and the fields (rank 0's
    values beside them); nothing is trained."""
    args, _ = pretrain
    proc = start([*args, "-o", str(tmp_path / "out")], tmp_path / "faults",
                 FAULT_RANK1_ARGS=json.dumps(["--lr", "2e-2", "--seed", "7", "--strategy", "fsdp"]))
    rc, out = finish(proc, tmp_path / "faults", timeout=240)
    assert rc != 0
    lines = [line for line in out.splitlines() if "different run configs" in line]
    assert lines and all(line.startswith(("error (rank 0/2): ", "error (rank 1/2): ")) for line in lines), out[-3000:]
    assert "rank 1 has lr=0.02 (rank 0: 0.01)" in lines[0] and "seed=7 (rank 0: " in lines[0], lines[0]
    assert 'strategy="fsdp" (rank 0: "auto")' in lines[0], lines[0]
    assert "every rank must run the same command" in lines[0]
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_nproc_reports_a_failed_job_in_one_line_with_status_2(pretrain, tmp_path):
    """``--nproc 2`` with a batch size 2 ranks cannot split: each rank's error is its own line naming it, the
    job ends with one summary line (no torchrun report or traceback) and exit status 2; the recipe's report
    (rank 0's output) still reaches the user."""
    args, _ = pretrain
    done = subprocess.run([sys.executable, "-m", "lmforge.cli", *args, "--batch-size", "3", "--nproc", "2",
                           "-o", str(tmp_path / "bad")], env=ENV, capture_output=True, text=True, timeout=240)
    assert done.returncode == 2, done.stderr[-3000:]
    err = done.stderr
    assert "error (rank 0/2): the batch size 3 does not divide among the world size 2" in err
    assert "error: the job stopped: rank " in err and "exited with status 2" in err
    for noise in ("Traceback", "ChildFailedError", "elastic", "Root Cause"):
        assert noise not in err, err[-3000:]
    assert all(line.startswith("error") for line in err.splitlines() if "rank" in line), err[-3000:]
    assert "step/s" not in err, "the split is checked before any progress bar is drawn: " + err[-3000:]


def test_a_dead_rank_ends_the_job_and_resume_continues(pretrain, tmp_path):
    """Rank 1 SIGKILLed once a checkpoint reached step 2: the job (rank 0 included) exits with 1 within 60 s
    instead of hanging, reported (as ``--nproc`` runs torchrun) in one line naming the rank and the signal;
    ``--resume`` with 2 ranks logs the uninterrupted run's steps."""
    args, one = pretrain
    out, faults = tmp_path / "out", tmp_path / "faults"
    proc = start([*args, "-o", str(out)], faults, as_nproc=True)
    wait_for(lambda: checkpoint_step(out) >= 2 and (faults / "pid-1").exists(), proc, faults)
    os.kill(int((faults / "pid-1").read_text()), signal.SIGKILL)
    killed_at = time.monotonic()
    rc, log = finish(proc, faults, timeout=60)
    assert rc == 1 and time.monotonic() - killed_at < 60, log[-3000:]
    assert "error: the job stopped: " in log and "rank 1/2 was killed by SIGKILL" in log, log[-3000:]
    assert "ChildFailedError" not in log and "Traceback" not in log, log[-3000:]
    assert not (out / "final").exists(), "the job finished before rank 1 was killed"
    resume_on_two(args, out)
    assert_same_rows(losses(out), one)


@pytest.mark.parametrize("phase", ["files", "swap", "files-fsdp"])
def test_kill_during_a_checkpoint_save_loses_at_most_one_interval(pretrain, tmp_path, phase):
    """Rank 0 SIGKILLed inside the save of step 4, ``files``: its files written, not yet marked complete (the
    folder still holds the complete checkpoint of step 2: one interval lost); ``swap``: the checkpoint of step
    2 moved aside, the new one complete but not yet renamed into place (nothing lost); ``files-fsdp``: as
    ``files``, every rank's shards written by an FSDP run (resumed under DDP). ``--resume`` continues from the
    newest complete one and ends with the uninterrupted run's losses."""
    from lmforge.training.checkpoint import MARKER, find_checkpoint

    args, one = pretrain
    out, faults = tmp_path / "out", tmp_path / "faults"
    fsdp = phase.endswith("-fsdp")
    proc = start([*args, *(["--strategy", "fsdp"] if fsdp else []), "-o", str(out)], faults, FAULT_STALL_SAVE_AT="4",
                 FAULT_STALL_PHASE=phase.removesuffix("-fsdp"))
    wait_for(lambda: (faults / "stalled").exists(), proc, faults)
    tmp = Path((faults / "stalled").read_text(encoding="utf-8"))
    assert tmp.name.startswith(".checkpoint.tmp-") and (tmp / ("shards" if fsdp else "model.safetensors")).exists()
    os.kill(int((faults / "pid-0").read_text()), signal.SIGKILL)
    rc, log = finish(proc, faults, timeout=60)
    assert rc != 0, log[-3000:]
    newest = find_checkpoint(out)
    assert json.loads((newest / MARKER).read_text(encoding="utf-8"))["step"] == (4 if phase == "swap" else 2)
    assert checkpoint_step(out) == (-1 if phase == "swap" else 2)  # "swap": checkpoint/ is not there
    resume_on_two(args, out)
    assert_same_rows(losses(out), one)


def test_two_nodes_on_localhost_match_one_process(pretrain, tmp_path):
    """Two torchrun launches, ``--nnodes 2 --nproc-per-node 1``, meeting at a c10d rendezvous on 127.0.0.1
    (as on two machines, the README's example): they train and log the single process's losses."""
    args, one = pretrain
    port, procs = free_port(), []
    logs = [tmp_path / f"node{i}.log" for i in range(2)]
    for node, log in enumerate(logs):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--node-rank", str(node), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
               "--rdzv-id", "lmforge-test", "-m", "lmforge.cli", *args, "-o", str(tmp_path / "out")]
        with open(log, "w", encoding="utf-8") as f:
            procs.append(subprocess.Popen(cmd, env=ENV, stdout=f, stderr=subprocess.STDOUT, start_new_session=True))
    try:
        codes = [p.wait(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    assert codes == [0, 0], "\n".join(log.read_text(encoding="utf-8")[-2000:] for log in logs)
    assert_same_rows(losses(tmp_path / "out"), one)


def test_a_rank_whose_peer_is_gone_reports_one_line(monkeypatch, capsys):
    """Under torchrun (WORLD_SIZE=2), a collective failing because another rank died (gloo's closed
    connection) is one line naming this rank and exit status 1; any other exception keeps its traceback."""
    import lmforge.cli.training as verbs

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    gone = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                        "[127.0.0.1]:29851. This is typically caused by a remote worker crashing.")

    def raises(exc):
        def cmd(a):
            raise exc
        return cmd

    monkeypatch.setattr(verbs, "cmd_pretrain", raises(gone))
    assert main(["pretrain", "--corpus", "c.txt"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("\n"), "a rank other than 0 starts a line of its own (rank 0's progress bar may hold one)"
    err = err[1:]
    assert err.startswith("error (rank 1/2): another rank stopped or cannot be reached, so this one stops too "
                          "([../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer")
    assert len(err.splitlines()) == 1
    monkeypatch.setattr(verbs, "cmd_pretrain", raises(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        main(["pretrain", "--corpus", "c.txt"])
