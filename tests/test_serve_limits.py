"""No request takes `lmforge serve` down: poison sampling values, huge bodies, slow or vanished clients and
invalid Unicode, against a real server process on 127.0.0.1 (one slot, so a stuck request would show)."""

import json
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import psutil
import pytest

MODEL = "tiny-chat"
STEP_S = 0.05  # each forward pass of the served model sleeps this long, so a 100-token request takes 5 s
# `lmforge serve` itself, with its model slowed down (a tiny model would finish any request in a blink)
LAUNCH = f"""
import sys, time
import lmforge.cli.serve as commands
load = commands.load_for_serving
def slow_load(*a, **k):
    lm = load(*a, **k)
    lm.model.register_forward_pre_hook(lambda *_: time.sleep({STEP_S}))
    return lm
commands.load_for_serving = slow_load
from lmforge.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def server(tiny_lm_dirs):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-c", LAUNCH, "serve", str(tiny_lm_dirs["chat"]), "--served-model-name", MODEL,
           "--port", str(port), "--max-batch", "1", "--max-queue", "4", "--max-body-mb", "1", "--read-timeout", "2",
           "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 60
    try:
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "lmforge serve did not come up in 60 s"
            time.sleep(0.1)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            pytest.fail("lmforge serve ignored SIGTERM")


def _chat(text="hi", **kw):
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], **kw}


def _idle(url, within, idle=True):
    """Whether the engine becomes idle (or, with idle=False, busy) within ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        h = httpx.get(url + "/health", timeout=5).json()
        if (h["running"] == 0 and h["waiting"] == 0) == idle:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)


POISON = [({"temperature": 1e-300}, "temperature"), ({"temperature": 1.0, "top_p": 1e-300}, "top_p"),
          ({"temperature": 1.0, "repetition_penalty": 1e-300}, "repetition_penalty"),
          ({"temperature": 1.0, "seed": 2**63}, "seed"), ({"temperature": 1.0, "seed": 2**64}, "seed")]


def test_poison_sampling_values_get_400_and_the_streams_beside_them_finish(server):
    url, _ = server
    results = [None] * 3

    def victim(i):
        lines = []
        body = _chat(f"victim {i}", max_tokens=8, temperature=0.7, seed=i, stream=True)
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as r:
            lines = [line for line in r.iter_lines() if line]
        results[i] = lines

    threads = [threading.Thread(target=victim, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    assert _idle(url, 10, idle=False), "the victims should be running while the poison arrives"
    for fields, param in POISON:
        for path, body in (("/v1/chat/completions", _chat(max_tokens=4, **fields)),
                           ("/v1/completions", {"model": MODEL, "prompt": "one two", "max_tokens": 4, **fields})):
            r = httpx.post(url + path, json=body, timeout=10)
            assert r.status_code == 400, (fields, r.text)
            err = r.json()["error"]
            assert err["param"] == param and param in err["message"], err
    for t in threads:
        t.join(30)
    for lines in results:
        assert lines is not None and lines[-1] == "data: [DONE]", lines
        chunks = [json.loads(line[6:]) for line in lines[:-1]]
        assert not any("error" in c for c in chunks)
        assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_a_40_mb_body_is_refused_at_once_and_never_held_in_memory(server):
    url, proc = server
    rss = psutil.Process(proc.pid).memory_info().rss
    big = b'{"model": "tiny-chat", "prompt": "' + b"a" * (40 << 20) + b'", "max_tokens": 1}'
    headers = {"Content-Type": "application/json"}
    start = time.monotonic()
    r = httpx.post(url + "/v1/completions", content=big, headers=headers, timeout=10)
    assert r.status_code == 413 and time.monotonic() - start < 1.0, r.text
    assert "at most 1048576 bytes" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: the limit is counted while the body arrives
        for i in range(0, len(big), 1 << 16):
            yield big[i:i + (1 << 16)]

    start = time.monotonic()
    r = httpx.post(url + "/v1/completions", content=chunks(), headers=headers, timeout=10)
    assert r.status_code == 413 and time.monotonic() - start < 1.0, r.text
    assert psutil.Process(proc.pid).memory_info().rss - rss < 200 << 20
    assert httpx.get(url + "/health", timeout=5).status_code == 200


def test_a_long_prompt_is_refused_by_its_length_before_tokenising(server):
    url, _ = server
    r = httpx.post(url + "/v1/chat/completions", json=_chat("fox " * 2000), timeout=10)
    assert r.status_code == 400 and "8000 characters" in r.json()["error"]["message"], r.text
    assert r.json()["error"]["code"] == "context_length_exceeded"


def test_an_abandoned_non_streaming_request_frees_its_slot(server):
    url, _ = server
    with pytest.raises(httpx.ReadTimeout):  # 100 tokens take 5 s; the client gives up after 0.5 s
        httpx.post(url + "/v1/chat/completions", json=_chat(max_tokens=100, temperature=0), timeout=0.5)
    assert _idle(url, 2.0), "the engine kept generating for a client that left"
    start = time.monotonic()
    r = httpx.post(url + "/v1/chat/completions", json=_chat(max_tokens=3), timeout=10)
    assert r.status_code == 200 and time.monotonic() - start < 2.0


def test_slow_clients_are_cut_off_after_the_read_timeout(server):
    url, _ = server
    port = int(url.rsplit(":", 1)[1])
    head_only, slow_body = socket.create_connection(("127.0.0.1", port)), socket.create_connection(("127.0.0.1", port))
    try:
        head_only.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # the head never ends
        slow_body.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 1000\r\n\r\n{\"model\": ")  # 10 of 1000 bytes
        head_only.settimeout(6)
        slow_body.settimeout(6)
        assert slow_body.recv(4096).startswith(b"HTTP/1.1 408 ")
        assert head_only.recv(4096) == b""  # closed by the server
    finally:
        head_only.close()
        slow_body.close()


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", b'{"model": "tiny-chat", "messages": [{"role": "user", "content": "a\\ud800b"}]}',
     "messages[0].content"),
    ("/v1/completions", b'{"model": "tiny-chat", "prompt": "\\udc00", "max_tokens": 2}', "prompt"),
    ("/v1/completions", b'{"model": "tiny-chat", "prompt": "hi", "stop": ["\\ud83d"]}', "stop[0]"),
])
def test_a_lone_surrogate_is_a_400(server, path, body, param):
    url, _ = server
    r = httpx.post(url + path, content=body, headers={"Content-Type": "application/json"}, timeout=10)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and "invalid Unicode" in err["message"], err


def test_a_disconnect_is_seen_while_events_keep_arriving():
    """Tokens arriving faster than the poll interval must not hide that the client left (the old loop asked
    only when the queue was quiet, so a busy generation kept running for a client that was gone)."""
    import asyncio

    from lmforge.deploy import responses as srv

    left_at = time.monotonic() + 0.3  # the client goes away 0.3 s into the generation

    class Request:
        async def is_disconnected(self):
            return time.monotonic() >= left_at

    class Engine:
        thread = type("T", (), {"is_alive": staticmethod(lambda: True)})()

    async def scenario() -> tuple[int, float]:
        queue: asyncio.Queue = asyncio.Queue()

        async def feed():  # a token every 10 ms, far faster than POLL_S
            while True:
                queue.put_nowait((0, "text", "x"))
                await asyncio.sleep(0.01)

        feeder = asyncio.create_task(feed())
        watch, events = srv.ClientWatch(Request()), 0
        try:
            while await srv.next_event(queue, Engine(), watch) is not None and events < 500:  # 500: ~5 s
                events += 1
        finally:
            feeder.cancel()
        return events, time.monotonic() - left_at

    events, late = asyncio.run(scenario())
    assert events < 500, "the disconnect was never seen while events kept arriving"
    assert late < srv.POLL_S + 0.5, late
