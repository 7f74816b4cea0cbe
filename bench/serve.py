"""Serving throughput: the same requests sent by 1, 8 and 32 concurrent clients to ``lmforge serve``.

``lmforge serve`` runs in a process of its own, as llama-server does, on an ephemeral 127.0.0.1 port (the real
embedded SmolLM2-135M-Instruct unless --model says otherwise; continuous batching with --max-batch slots;
``--in-process``: on a thread of this process instead, where its HTTP threads share the GIL with the clients').
A fixed workload of --requests chat requests (distinct prompts, greedy, --max-tokens each) is
served with C client threads pulling from it, for each C in --clients. C = 1 is serving the
requests one after another; the ratio column is total tokens/s against it. Every level must give
the same greedy texts (any difference is printed). Streaming is used so time to first token
(TTFT) is measured too (p50 and p95). A short warm-up request runs first.

``--compile``: the engine decodes with its compiled static-shape steps (each batch/timeline bucket compiles on
first use: run with --warm-levels to compile outside the measured levels). ``--quantize int8|int4``: weight-only
linears on PyTorch's packed CPU kernels. When llama.cpp's ``llama-server`` is on PATH or in ``$LLAMA_CPP_BIN``,
the same levels run against it too (same GGUF, same threads, as many slots as the most clients), its rows
after lmforge's, with its prompt cache off (``cache_prompt: false``: the levels repeat the same requests, which
llama-server would otherwise answer without prefilling; ``--llama-prompt-cache`` leaves it on).

    HF_HUB_OFFLINE=1 python bench/serve.py [--requests 32] [--max-tokens 32] [--clients 1 8 32]
        [--model NAME] [--device cpu] [--quantize int8|int4] [--compile] [--warm-levels] [--threads N]
        [--no-llama-server] [--in-process] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import torch

from lmforge.checkpoints.resolve import resolve
from lmforge.cli.serve import load_for_serving
from lmforge.deploy.batching import Engine
from lmforge.deploy.server import BackgroundServer, create_app
from lmforge.lifecycle.stages import free_port

TOPICS = ["the printing press", "volcanoes", "the moon landing", "honey bees", "the Roman empire", "tides",
          "black holes", "photosynthesis", "the Silk Road", "glaciers", "jazz", "the internet", "coral reefs",
          "chess", "the steam engine", "rainbows"]
ASKS = ["Explain {} to a child in a few sentences.", "Give three surprising facts about {}."]


def workload(n: int) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": ASKS[(i // len(TOPICS)) % 2].format(TOPICS[i % len(TOPICS)])}]
            for i in range(n)]


def run_level(client, model_id, requests, clients, max_tokens, extra_body=None):
    """Serve every request with `clients` threads; returns (wall s, tokens, texts, ttfts, latencies)."""
    todo = queue.Queue()
    for i in range(len(requests)):
        todo.put(i)
    texts, tokens, ttft, latency = [None] * len(requests), [0] * len(requests), [0.0] * len(requests), \
        [0.0] * len(requests)
    errors = []

    def worker():
        while True:
            try:
                i = todo.get_nowait()
            except queue.Empty:
                return
            try:
                t0 = time.perf_counter()
                stream = client.chat.completions.create(model=model_id, messages=requests[i], max_tokens=max_tokens,
                                                        temperature=0, stream=True,
                                                        stream_options={"include_usage": True},
                                                        extra_body=extra_body)
                pieces, usage = [], None
                for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        if not pieces:
                            ttft[i] = time.perf_counter() - t0
                        pieces.append(chunk.choices[0].delta.content)
                    if chunk.usage:
                        usage = chunk.usage.completion_tokens
                tokens[i] = len(pieces) if usage is None else usage  # a server without usage: one piece a token
                latency[i], texts[i] = time.perf_counter() - t0, "".join(pieces)
            except Exception as e:  # reported below; the level is then invalid
                errors.append(f"request {i}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise SystemExit("requests failed:\n" + "\n".join(errors[:5]))
    return wall, sum(tokens), texts, ttft, latency


def p95(values):
    return statistics.quantiles(values, n=20, method="inclusive")[-1] if len(values) > 1 else values[0]


def levels(label, client, model_id, requests, a, stats=None, reference=None, extra_body=None):
    """Every --clients level against one server; rows of results (and the texts of the first level)."""
    rows = []
    run_level(client, model_id, requests[:1], 1, 4, extra_body)  # warm-up
    if a.warm_levels:
        for c in a.clients:
            run_level(client, model_id, requests, c, a.max_tokens, extra_body)
    for c in a.clients:
        steps0 = stats()["decode_steps"] if stats else 0
        wall, tokens, texts, ttft, latency = run_level(client, model_id, requests, c, a.max_tokens, extra_body)
        steps = stats()["decode_steps"] - steps0 if stats else None
        reference = reference or texts
        same = sum(x == y for x, y in zip(texts, reference))
        rate = tokens / wall
        base = rows[0]["tokens_per_s"] if rows else rate
        rows.append({"server": label, "clients": c, "wall_s": wall, "tokens": tokens, "tokens_per_s": rate,
                     "ratio": rate / base, "ttft_p50_s": statistics.median(ttft), "ttft_p95_s": p95(ttft),
                     "latency_p50_s": statistics.median(latency), "same_text": same, "decode_steps": steps})
        print(f"{label:>12} {c:>7} {wall:>8.1f} {tokens:>7} {rate:>8.1f} {rate / base:>10.2f}x "
              f"{statistics.median(ttft):>10.2f} {p95(ttft):>10.2f} {statistics.median(latency):>13.2f} "
              f"{same:>6}/{len(texts)}", flush=True)
        for i, (x, y) in enumerate(zip(texts, reference)):
            if x != y and label == "lmforge":
                print(f"    request {i} differs from the first level: {x[:60]!r} vs {y[:60]!r}")
    return rows


def run_in_process(a, requests, threads):
    """lmforge's server on a thread of this process (the clients' threads share its GIL)."""
    lm = load_for_serving(a.model, device=a.device, dtype=a.dtype, quantize=a.quantize)
    engine = Engine(lm.model, lm.tokenizer, lm.eos_ids, max_batch=a.max_batch, max_queue=max(64, a.requests),
                    context=a.max_context, compile=a.compile)
    with BackgroundServer(create_app(lm, engine, model_id="bench")) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=600)
        return levels("lmforge", client, "bench", requests, a, engine.stats)


def wait_healthy(proc, port, cmd, what, timeout=600):
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode}: {' '.join(cmd)}")
        time.sleep(0.5)
    raise SystemExit(f"{what} did not answer /health within {timeout} s: {' '.join(cmd)}")


def run_lmforge_server(a, requests, threads):
    """``lmforge serve`` in a process of its own (as llama-server runs), the same settings; its decode steps are
    read from /metrics. Its stderr (compile times) goes to ours."""
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "lmforge.cli", "serve", a.model, "--port", str(port), "--device", a.device,
           "--dtype", a.dtype, "--max-batch", str(a.max_batch), "--max-queue", str(max(64, a.requests)),
           "--max-context", str(a.max_context), "--threads", str(threads), "--served-model-name", "bench",
           "--log-level", "warning"]
    cmd += (["--quantize", a.quantize] if a.quantize else []) + (["--compile"] if a.compile else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    try:
        wait_healthy(proc, port, cmd, "lmforge serve")

        def stats():
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
            line = next(x for x in text.splitlines() if x.startswith("lmforge_decode_steps_total "))
            return {"decode_steps": int(float(line.split()[1]))}

        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=600)
        return levels("lmforge", client, "bench", requests, a, stats)
    finally:
        proc.terminate()
        proc.wait(30)


def llama_server_bin():
    folder = os.environ.get("LLAMA_CPP_BIN")
    if folder and Path(folder, "llama-server").is_file():
        return str(Path(folder, "llama-server"))
    return shutil.which("llama-server")


def embedded_gguf() -> Path:
    return resolve(None).path  # the embedded default: SmolLM2-135M-Instruct's Q4_1 GGUF


def run_llama_server(a, requests, threads):
    """Start llama-server on the same GGUF (slots = the most clients), run the levels, stop it."""
    port = free_port()
    slots = max(a.clients)
    cmd = [llama_server_bin(), "-m", str(a.gguf or embedded_gguf()), "--host", "127.0.0.1", "--port", str(port),
           "-t", str(threads), "-tb", str(threads), "-np", str(slots), "-c", str(slots * a.max_context)]
    # extra flags, e.g. LLAMA_CPP_ARGS=--no-repack where llama.cpp's repacked kernels die with SIGILL (AMX VMs)
    cmd += shlex.split(os.environ.get("LLAMA_CPP_ARGS", ""))
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(proc, port, cmd, "llama-server", timeout=300)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=600)
        # llama-server keeps each slot's prompt KV and reuses the longest common prefix (cache_prompt, on by
        # default): the same requests served again (warm-up, --warm-levels, the levels before) then skip their
        # prefill (TTFT 0.03 s for a 40-token prompt it prefills at ~140 tok/s). lmforge has no prompt cache, so
        # by default each request is prefilled on both sides; --llama-prompt-cache measures llama-server's own.
        return levels("llama-server", client, "bench", requests, a,
                      extra_body=None if a.llama_prompt_cache else {"cache_prompt": False})
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--quantize", choices=("int8", "int4"), default=None)
    ap.add_argument("--compile", action="store_true", help="compiled static-shape decode steps in the engine")
    ap.add_argument("--warm-levels", action="store_true",
                    help="run every level once unmeasured first (compiles every bucket before the measurement)")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-context", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--gguf", default=None, help="the GGUF llama-server loads (default: the embedded one)")
    ap.add_argument("--no-llama-server", action="store_true", help="skip llama-server even when it is there")
    ap.add_argument("--llama-prompt-cache", action="store_true",
                    help="let llama-server reuse the KV of a prompt it has seen (its default; off here because the "
                         "levels repeat the same requests and lmforge has no prompt cache)")
    ap.add_argument("--in-process", action="store_true",
                    help="serve lmforge from this process (its HTTP threads then share the GIL with the clients' "
                         "threads) instead of an `lmforge serve` process of its own, as llama-server runs")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    requests = workload(a.requests)
    threads = torch.get_num_threads()
    print(f"# {a.model} on {a.device} ({platform.processor() or platform.machine()}, {threads} "
          f"torch threads), {a.requests} chat requests x max_tokens {a.max_tokens}, greedy, "
          f"{a.max_batch} batch slots{f', {a.quantize} weights' if a.quantize else ''}"
          f"{', compiled decode' if a.compile else ''}; load average {os.getloadavg()[0]:.1f}")
    print(f"{'server':>12} {'clients':>7} {'wall s':>8} {'tokens':>7} {'tok/s':>8} {'vs 1 client':>11} "
          f"{'TTFT p50 s':>10} {'TTFT p95 s':>10} {'latency p50 s':>13} {'same text':>9}")
    rows = (run_in_process if a.in_process else run_lmforge_server)(a, requests, threads)
    if llama_server_bin() and not a.no_llama_server:
        rows += run_llama_server(a, requests, threads)
        for c in a.clients:
            ours = next(r for r in rows if r["server"] == "lmforge" and r["clients"] == c)
            theirs = next(r for r in rows if r["server"] == "llama-server" and r["clients"] == c)
            print(f"{c} clients: lmforge / llama-server = {ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}")
    elif not a.no_llama_server:
        print("(no llama-server rows: put llama-server on PATH or set LLAMA_CPP_BIN to llama.cpp's build/bin)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "rows": rows, "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
                       "load": os.getloadavg()}, f, indent=2)


if __name__ == "__main__":
    main()
