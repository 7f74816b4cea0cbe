"""``/metrics`` of ``lmforge serve``: the server's counters, gauges and histograms in Prometheus' text format.

This module owns ``Metrics`` (what is counted, and its rendering as text exposition format 0.0.4) and
``MetricsMiddleware`` (an ASGI middleware that counts every request by route and status and times it to the
end of its response body, streams included). Token counts and time to first token are recorded by the routes;
queue depth and running sequences are read from the engines when scraped. Written by hand: the format is a
few lines of text and ``prometheus_client`` is not a dependency.

    lmforge_requests_total{route="/v1/completions",status="200"} 3
    lmforge_request_latency_seconds_bucket{route="/v1/completions",le="0.5"} 2
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable, Iterable

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/models", "/tokenize", "/health",
          "/metrics", "/")


class Histogram:
    """Cumulative buckets, sum and count, as Prometheus reads them."""

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.buckets, self.counts, self.sum, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.buckets, value)
        if i < len(self.counts):
            self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: str) -> Iterable[str]:
        running, sep = 0, "," if labels else ""
        for bound, n in zip(self.buckets, self.counts):
            running += n
            yield f'{name}_bucket{{{labels}{sep}le="{bound:g}"}} {running}'
        yield f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}'
        yield f"{name}_sum{{{labels}}} {self.sum:.6f}" if labels else f"{name}_sum {self.sum:.6f}"
        yield f"{name}_count{{{labels}}} {self.count}" if labels else f"{name}_count {self.count}"


class Metrics:
    """Thread-safe counters of one server. ``engines()`` returns the engines whose queues are reported."""

    def __init__(self, engines: Callable[[], list] = list):
        self.engines, self.lock = engines, threading.Lock()
        self.requests: dict[tuple[str, str], int] = {}
        self.latency: dict[str, Histogram] = {}
        self.ttft = Histogram()
        self.prompt_tokens = self.completion_tokens = 0

    def request(self, route: str, status: int, seconds: float) -> None:
        route = route if route in ROUTES else "other"
        with self.lock:
            key = (route, str(status))
            self.requests[key] = self.requests.get(key, 0) + 1
            self.latency.setdefault(route, Histogram()).observe(seconds)

    def tokens(self, prompt: int, completion: int) -> None:
        with self.lock:
            self.prompt_tokens += prompt
            self.completion_tokens += completion

    def first_token(self, seconds: float) -> None:
        with self.lock:
            self.ttft.observe(seconds)

    def render(self) -> str:
        stats = [e.stats() for e in self.engines()]
        with self.lock:
            out = ["# HELP lmforge_requests_total HTTP requests answered, by route and status.",
                   "# TYPE lmforge_requests_total counter"]
            out += [f'lmforge_requests_total{{route="{r}",status="{s}"}} {n}'
                    for (r, s), n in sorted(self.requests.items())]
            out += ["# HELP lmforge_prompt_tokens_total Prompt tokens of completion requests.",
                    "# TYPE lmforge_prompt_tokens_total counter", f"lmforge_prompt_tokens_total {self.prompt_tokens}",
                    "# HELP lmforge_completion_tokens_total Tokens generated.",
                    "# TYPE lmforge_completion_tokens_total counter",
                    f"lmforge_completion_tokens_total {self.completion_tokens}",
                    "# HELP lmforge_queue_depth Sequences waiting for a batch slot.",
                    "# TYPE lmforge_queue_depth gauge",
                    f"lmforge_queue_depth {sum(s['waiting'] for s in stats)}",
                    "# HELP lmforge_running_sequences Sequences being decoded.",
                    "# TYPE lmforge_running_sequences gauge",
                    f"lmforge_running_sequences {sum(s['running'] for s in stats)}",
                    "# HELP lmforge_decode_steps_total Batched decode steps (one forward pass for every running "
                    "sequence).",
                    "# TYPE lmforge_decode_steps_total counter",
                    f"lmforge_decode_steps_total {sum(s['decode_steps'] for s in stats)}",
                    "# HELP lmforge_request_latency_seconds Time from request to the end of its response.",
                    "# TYPE lmforge_request_latency_seconds histogram"]
            for route, h in sorted(self.latency.items()):
                out += h.lines("lmforge_request_latency_seconds", f'route="{route}"')
            out += ["# HELP lmforge_time_to_first_token_seconds Time from request to its first generated token.",
                    "# TYPE lmforge_time_to_first_token_seconds histogram"]
            out += self.ttft.lines("lmforge_time_to_first_token_seconds", "")
        return "\n".join(out) + "\n"


class MetricsMiddleware:
    """ASGI middleware: count each HTTP request by route and status, timed to the end of its response body."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status, recorded = time.monotonic(), [500], [False]

        async def watch(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False) and not recorded[0]:
                recorded[0] = True
                self.metrics.request(scope["path"], status[0], time.monotonic() - start)
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            if not recorded[0]:  # the client went away mid-stream, or the app failed
                self.metrics.request(scope["path"], status[0], time.monotonic() - start)
