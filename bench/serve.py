"""Serving throughput: the same requests sent by 1, 8 and 32 concurrent clients to ``lmforge serve``.

One server runs in this process on an ephemeral 127.0.0.1 port (the real embedded
SmolLM2-135M-Instruct unless --model says otherwise; continuous batching with --max-batch slots).
A fixed workload of --requests chat requests (distinct prompts, greedy, --max-tokens each) is
served with C client threads pulling from it, for each C in --clients. C = 1 is serving the
requests one after another; the ratio column is total tokens/s against it. Every level must give
the same greedy texts (any difference is printed). Streaming is used so time to first token
(TTFT) is measured too. A short warm-up request runs first.

    HF_HUB_OFFLINE=1 python bench/serve.py [--requests 32] [--max-tokens 32] [--clients 1 8 32]
        [--model NAME] [--device cpu] [--quantize int8] [--threads N] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import statistics
import threading
import time

import openai
import torch

from lmforge.cli.serve import load_for_serving
from lmforge.deploy.batching import Engine
from lmforge.deploy.server import BackgroundServer, create_app

TOPICS = ["the printing press", "volcanoes", "the moon landing", "honey bees", "the Roman empire", "tides",
          "black holes", "photosynthesis", "the Silk Road", "glaciers", "jazz", "the internet", "coral reefs",
          "chess", "the steam engine", "rainbows"]
ASKS = ["Explain {} to a child in a few sentences.", "Give three surprising facts about {}."]


def workload(n: int) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": ASKS[(i // len(TOPICS)) % 2].format(TOPICS[i % len(TOPICS)])}]
            for i in range(n)]


def run_level(client, model_id, requests, clients, max_tokens):
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
                                                        stream_options={"include_usage": True})
                pieces = []
                for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        if not pieces:
                            ttft[i] = time.perf_counter() - t0
                        pieces.append(chunk.choices[0].delta.content)
                    if chunk.usage:
                        tokens[i] = chunk.usage.completion_tokens
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--quantize", choices=("int8",), default=None)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-context", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    lm = load_for_serving(a.model, device=a.device, dtype=a.dtype, quantize=a.quantize)
    engine = Engine(lm.model, lm.tokenizer, lm.eos_ids, max_batch=a.max_batch, max_queue=max(64, a.requests),
                    context=a.max_context)
    requests = workload(a.requests)
    print(f"# {a.model} on {a.device} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} "
          f"torch threads), {a.requests} chat requests x max_tokens {a.max_tokens}, greedy, "
          f"{a.max_batch} batch slots{', int8 weights' if a.quantize else ''}")
    rows, reference = [], None
    with BackgroundServer(create_app(lm, engine, model_id="bench")) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=600)
        run_level(client, "bench", requests[:1], 1, 4)  # warm-up
        print(f"{'clients':>7} {'wall s':>8} {'tokens':>7} {'tok/s':>8} {'vs 1 client':>11} {'TTFT p50 s':>10} "
              f"{'latency p50 s':>13} {'same text':>9}")
        for c in a.clients:
            steps0 = engine.stats()["decode_steps"]
            wall, tokens, texts, ttft, latency = run_level(client, "bench", requests, c, a.max_tokens)
            steps = engine.stats()["decode_steps"] - steps0
            reference = reference or texts
            same = sum(x == y for x, y in zip(texts, reference))
            rate = tokens / wall
            base = rows[0]["tokens_per_s"] if rows else rate
            rows.append({"clients": c, "wall_s": wall, "tokens": tokens, "tokens_per_s": rate, "ratio": rate / base,
                         "ttft_p50_s": statistics.median(ttft), "latency_p50_s": statistics.median(latency),
                         "same_text": same, "decode_steps": steps})
            print(f"{c:>7} {wall:>8.1f} {tokens:>7} {rate:>8.1f} {rate / base:>10.2f}x "
                  f"{statistics.median(ttft):>10.2f} {statistics.median(latency):>13.2f} {same:>6}/{len(texts)}")
            for i, (x, y) in enumerate(zip(texts, reference)):
                if x != y:
                    print(f"    request {i} differs from the 1-client run: {x[:60]!r} vs {y[:60]!r}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "rows": rows, "cpu_count": os.cpu_count()}, f, indent=2)


if __name__ == "__main__":
    main()
