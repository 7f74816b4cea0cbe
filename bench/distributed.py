"""Data-parallel training on one machine: ``lmforge pretrain`` on 1 process vs ``--nproc N`` (DDP under torchrun).

Both runs train the same Llama-shaped model (``tiny-llama`` with the ``--preset`` shape's ``--set`` overrides,
character vocabulary of the embedded Shakespeare corpus) with the same seed, global batch (``--batch`` rows of
``--seq`` tokens: under ``--nproc N`` each rank takes batch / N rows of the same global batch), precision and
schedule, so they make the same optimisation: their losses agree step for step up to float summation order (the
first few are printed). Every process gets ``--threads`` threads (OMP_NUM_THREADS / MKL_NUM_THREADS), so N
processes use N times the threads of the single process: the figure is how well data parallelism scales with
the cores, not a contest between the two at equal cores.

Each run is a real ``python -m lmforge.cli pretrain`` command (the N-process one with ``--nproc N``, which
relaunches it under ``torchrun --standalone``; gloo on CPU), writing ``metrics.jsonl`` every step. Its tokens/s
are the loop's own ``tokens_per_s`` rows (global tokens: the loop counts each rank's share times the world size)
after the first ``--skip`` steps, median over the steps. The 1- and N-process runs alternate for ``--rounds``
rounds (order flipped every round, so a burst of machine noise hits both); the median over the rounds is
reported, with the scaling efficiency tokens/s(N) / (N x tokens/s(1)). While each run goes, the resident memory
of every process of its tree is sampled (psutil, every 20 ms): the peak per rank (a rank is a process with
torchrun's RANK in its environment; the single-process run is rank 0) and of the launcher processes
(``lmforge --nproc`` and torchrun's agent) are printed. The peak includes the Python and torch runtime
(several hundred MB per process), which dominates for small models.

``--strategies`` measures the other question, memory per rank: full fine-tuning of the embedded default model
(SmolLM2-135M-Instruct) on ``--nproc N`` processes under ``--strategy ddp`` and ``--strategy fsdp`` (synthetic
SFT rows of ``--seq`` tokens, ``--batch`` rows per step, ``--steps`` steps), alternating for ``--rounds``
rounds; it prints each rank's peak resident memory (the same sampler), tokens/s and the first losses (equal up to
float summation order: the same optimisation). DDP keeps the whole model, its gradients (plus DDP's gradient
buckets) and both AdamW moments on every rank; FSDP2 keeps 1/N of each and gathers one block's weights at a
time. Both load the whole model once before sharding.

Not measured here: GPUs.

    HF_HUB_OFFLINE=1 python bench/distributed.py [--preset 1m|10m|tiny] [--nproc 2] [--batch 16] [--seq 128]
        [--steps 12] [--skip 2] [--rounds 2] [--threads 1] [--precision fp32|bf16] [--json out.json]
    HF_HUB_OFFLINE=1 python bench/distributed.py --strategies [--nproc 2] [--batch 4] [--seq 128] [--steps 4]
        [--rounds 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

SHAPES = {  # --set overrides of the tiny-llama preset (the vocabulary is the corpus's characters)
    "tiny": {},  # the preset itself: 2 layers, width 64
    "1m": dict(n_layer=4, n_embd=128, n_head=4, n_kv_head=4, intermediate_size=384),
    "10m": dict(n_layer=6, n_embd=256, n_head=8, n_kv_head=4, intermediate_size=768),
}


class TreeSampler:
    """Samples the resident memory of a process and all its descendants every ``interval`` seconds; keeps the
    peak per label (``rank R`` for torchrun's workers, ``rank 0`` for a root that is the training process
    itself, ``launcher`` for the other processes: their peaks are summed per sample)."""

    def __init__(self, root: psutil.Process, root_is_rank: bool, interval: float = 0.02) -> None:
        self.root, self.root_is_rank, self.interval = root, root_is_rank, interval
        self.peaks: dict[str, float] = {}
        self._labels: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _label(self, p: psutil.Process) -> str:
        """A rank's label is kept once seen; "launcher" is not: a worker read between torchrun's fork and its
        exec still shows the agent's environment (no RANK) and is counted with the launcher for that sample."""
        if p.pid in self._labels:
            return self._labels[p.pid]
        if p.pid == self.root.pid and self.root_is_rank:
            rank = "0"
        else:
            rank = p.environ().get("RANK")
            if rank is None:
                return "launcher"
        self._labels[p.pid] = f"rank {rank}"
        return self._labels[p.pid]

    def sample(self) -> None:
        now: dict[str, float] = {}
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return
        for p in procs:
            try:
                label, rss = self._label(p), p.memory_info().rss / 2**20
            except psutil.Error:  # the process ended between the listing and the read
                continue
            now[label] = now.get(label, 0.0) + rss
        for label, mb in now.items():
            self.peaks[label] = max(self.peaks.get(label, 0.0), mb)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(self.interval)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def pretrain_cmd(a: argparse.Namespace, nproc: int, out: Path, cache: Path) -> list[str]:
    cmd = [sys.executable, "-m", "lmforge.cli", "pretrain", "-m", "tiny-llama", "--corpus", "shakespeare",
           "--tokenizer", "char", "--seq-len", str(a.seq), "--batch-size", str(a.batch), "--steps", str(a.steps),
           "--warmup", "2", "--precision", a.precision, "--eval-every", "0", "--eval-batches", "1",
           "--save-every", "0", "--log-every", "1", "--seed", "0", "--cache-dir", str(cache), "-o", str(out)]
    for key, value in SHAPES[a.preset].items():
        cmd += ["--set", f"{key}={value}"]
    return cmd + (["--nproc", str(nproc)] if nproc > 1 else [])


def finetune_cmd(a: argparse.Namespace, strategy: str, out: Path, data: Path) -> list[str]:
    return [sys.executable, "-m", "lmforge.cli", "finetune", "--train", str(data), "--method", "full",
            "--prompt-template", "{prompt}", "--response-field", "response", "--max-len", str(a.seq),
            "--batch-size", str(a.batch), "--steps", str(a.steps), "--lr", "1e-5", "--precision", a.precision,
            "--log-every", "1", "--save-every", "0", "--seed", "0", "--nproc", str(a.nproc), "--strategy", strategy,
            "-o", str(out)]


def sft_rows(path: Path, n: int, seq: int) -> Path:
    """``n`` synthetic SFT rows whose prompt + response fill about ``seq`` tokens (a few words a token)."""
    words = "the quick brown fox jumps over the lazy dog while seven wizards quietly hex every jumping frog".split()
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            text = " ".join(words[(i + j) % len(words)] for j in range(seq // 3))
            f.write(json.dumps({"prompt": text[: len(text) // 2], "response": text[len(text) // 2:]}) + "\n")
    return path


def run_once(a: argparse.Namespace, nproc: int, out: Path, cache: Path, cmd: list[str] | None = None) -> dict:
    """One ``lmforge pretrain`` run (or ``cmd``): its median tokens/s after --skip steps, losses, peak RSS per
    label, wall s."""
    threads = str(a.threads)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
           "GLOO_SOCKET_IFNAME": "lo", "TQDM_DISABLE": "1"}
    log_path = out.with_suffix(".log")
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = psutil.Popen(cmd or pretrain_cmd(a, nproc, out, cache), env=env, stdout=log, stderr=subprocess.STDOUT)
        with TreeSampler(proc, root_is_rank=nproc == 1) as sampler:
            rc = proc.wait()
    wall = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"{' '.join((cmd or ['pretrain'])[2:4])} --nproc {nproc} failed (exit {rc}):\n"
                         + log_path.read_text()[-3000:])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    train = [r for r in rows if "tokens_per_s" in r]
    timed = [r["tokens_per_s"] for r in train if r["step"] > a.skip]
    if not timed:
        raise SystemExit(f"no tokens_per_s rows after step {a.skip} in {out / 'metrics.jsonl'}: raise --steps")
    return {"nproc": nproc, "tokens_per_s": statistics.median(timed), "steps_tokens_per_s": timed,
            "losses": [r["loss"] for r in train], "peak_rss_mb": dict(sorted(sampler.peaks.items())), "wall_s": wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(SHAPES), default="1m", help="the model's shape (tiny-llama + --set)")
    p.add_argument("--nproc", type=int, default=2, help="processes of the data-parallel run (against 1)")
    p.add_argument("--batch", type=int, default=16, help="global batch (rows per optimiser step)")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=12, help="optimiser steps per run")
    p.add_argument("--skip", type=int, default=2, help="first steps left out of the tokens/s median (warm-up)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="threads per process")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--strategies", action="store_true",
                   help="peak memory per rank, DDP vs FSDP2, full fine-tuning of the embedded 135M model")
    a = p.parse_args()
    if a.strategies:
        return strategies(a)
    if a.nproc < 2 or a.batch % a.nproc:
        raise SystemExit(f"--nproc must be >= 2 and divide --batch {a.batch}, got {a.nproc}")
    import torch

    cpu = platform.processor() or platform.machine()
    load0 = os.getloadavg()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs ({cpu}), {a.threads} thread(s) per process, "
          f"load average {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}")
    runs: dict[int, list[dict]] = {1: [], a.nproc: []}
    with tempfile.TemporaryDirectory() as d:
        cache = Path(d) / "cache"
        for r in range(a.rounds):
            for n in ((1, a.nproc) if r % 2 == 0 else (a.nproc, 1)):
                res = run_once(a, n, Path(d) / f"r{r}-n{n}", cache)
                runs[n].append(res)
                rss = ", ".join(f"{k} {v:,.0f}" for k, v in res["peak_rss_mb"].items())
                print(f"round {r + 1} nproc {n}: {res['tokens_per_s']:,.0f} tok/s (median of "
                      f"{len(res['steps_tokens_per_s'])} steps), wall {res['wall_s']:.1f} s, peak RSS MB: {rss}")
    tok = {n: statistics.median(x["tokens_per_s"] for x in v) for n, v in runs.items()}
    eff = tok[a.nproc] / (a.nproc * tok[1])
    print(f"\n{a.preset} shape, {a.precision}, global batch {a.batch} x seq {a.seq}, {a.steps} steps, "
          f"median of {a.rounds} rounds:")
    for n, v in runs.items():
        peaks: dict[str, float] = {}
        for x in v:
            for k, mb in x["peak_rss_mb"].items():
                peaks[k] = max(peaks.get(k, 0.0), mb)
        rss = ", ".join(f"{k} {mb:,.0f}" for k, mb in sorted(peaks.items()))
        print(f"  {n} process(es): {tok[n]:,.0f} tok/s  (rounds: "
              f"{', '.join(format(x['tokens_per_s'], ',.0f') for x in v)}); peak RSS MB: {rss}")
    print(f"  scaling efficiency tok/s({a.nproc}) / ({a.nproc} x tok/s(1)) = {eff:.2f}  "
          f"(speed-up {tok[a.nproc] / tok[1]:.2f}x)")
    first = {n: v[0]["losses"][:3] for n, v in runs.items()}
    print("  first losses: " + "; ".join(f"{n} proc " + ", ".join(f"{x:.5f}" for x in ls)
                                         for n, ls in first.items()))
    load1 = os.getloadavg()
    print(f"load average after {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "tokens_per_s": tok, "efficiency": eff, "runs": runs,
                       "load_before": load0, "load_after": load1}, f, indent=2)


def strategies(a: argparse.Namespace) -> None:
    """``--strategies``: DDP vs FSDP2 on ``--nproc`` processes, full fine-tuning of the embedded default model."""
    import torch

    load0 = os.getloadavg()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {a.threads} thread(s) per process, "
          f"load average {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}")
    runs: dict[str, list[dict]] = {"ddp": [], "fsdp": []}
    with tempfile.TemporaryDirectory() as d:
        data = sft_rows(Path(d) / "sft.jsonl", 64, a.seq)
        for r in range(a.rounds):
            for s in (("ddp", "fsdp") if r % 2 == 0 else ("fsdp", "ddp")):
                out = Path(d) / f"r{r}-{s}"
                res = run_once(a, a.nproc, out, Path(d), cmd=finetune_cmd(a, s, out, data))
                runs[s].append(res)
                rss = ", ".join(f"{k} {v:,.0f}" for k, v in res["peak_rss_mb"].items())
                print(f"round {r + 1} {s}: {res['tokens_per_s']:,.0f} tok/s, wall {res['wall_s']:.1f} s, "
                      f"peak RSS MB: {rss}")
    print(f"\nfull fine-tuning, embedded SmolLM2-135M-Instruct, {a.nproc} processes, {a.precision}, global batch "
          f"{a.batch} x up to {a.seq} tokens, {a.steps} steps, {a.rounds} round(s):")
    peak = {}
    for s, v in runs.items():
        ranks = [max(x["peak_rss_mb"].get(f"rank {r}", 0.0) for x in v) for r in range(a.nproc)]
        peak[s] = max(ranks)
        tok = statistics.median(x["tokens_per_s"] for x in v)
        print(f"  {s:4}: peak RSS per rank MB {', '.join(f'{m:,.0f}' for m in ranks)}; {tok:,.0f} tok/s; "
              f"first losses {', '.join(f'{x:.5f}' for x in v[0]['losses'][:3])}")
    print(f"  FSDP2 / DDP peak memory per rank: {peak['fsdp'] / peak['ddp']:.2f}")
    load1 = os.getloadavg()
    print(f"load average after {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "runs": runs, "load_before": load0, "load_after": load1}, f, indent=2)


if __name__ == "__main__":
    main()
