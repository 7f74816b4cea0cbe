"""Answering a completion or chat request: the sequences submitted to the engine, their events gathered
into one JSON body or sent as server-sent events, and the client watched so a request whose client left is
cancelled.

This module owns ``respond`` (one JSON body or a ``StreamingResponse``), ``Reply`` (what the answer needs besides
the sequences: its kind, model id, logprob settings, timings and, for a chat with tools, the ``ToolPlan`` whose
calls are parsed out of each choice's text by ``deploy.tools``), ``ClientWatch`` and ``next_event``. The routes
that build the sequences are ``server.py``'s.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from lmforge.deploy.batching import Engine, EngineBusy, Sequence
from lmforge.deploy.metrics import Metrics
from lmforge.deploy.protocol import (
    APIError,
    chat_body,
    chat_chunk,
    chat_logprobs,
    completion_body,
    completion_chunk,
    completion_logprobs,
    error_body,
    new_id,
    usage,
    usage_chunk,
)
from lmforge.deploy.tools import ToolCallStream, ToolPlan, forced_prefix, parse_tool_calls

POLL_S = 0.25  # how often a waiting non-streaming request checks that its client is still there


class Reply:
    """What a completion request's answer needs besides its sequences: its kind ("text_completion" or
    "chat.completion"), the model id it names, how a token id reads as text, the logprobs asked for (None or
    top k), each choice's echoed prompt logprobs, and where its timings and token counts go."""

    def __init__(self, kind: str, model_id: str, token_text, k: int | None, prefix: list[list], metrics: Metrics,
                 start: float, tools: ToolPlan | None = None):
        self.kind, self.model_id, self.token_text, self.k, self.prefix = kind, model_id, token_text, k, prefix
        self.metrics, self.start, self.first = metrics, start, True
        self.chat = kind == "chat.completion"
        self.offsets = [0] * len(prefix)
        self.tools = tools if tools is not None and tools.active else None

    def message(self, text: str, reason: str) -> tuple[str | dict[str, Any], str]:
        """A chat choice's message and finish reason: with tools, the calls parsed out of the text (after the
        forced prefix the prompt ended with) and finish reason "tool_calls" when there are any."""
        if self.tools is None:
            return text, reason
        content, calls = parse_tool_calls(forced_prefix(self.tools) + text, self.tools.names, self.tools.max_calls)
        if not calls:
            return text, reason
        return {"role": "assistant", "content": content, "tool_calls": calls}, "tool_calls"

    def tool_stream(self) -> ToolCallStream | None:
        """A choice's splitter of streamed text into content and tool-call deltas (None without tools)."""
        if self.tools is None:
            return None
        stream = ToolCallStream(self.tools.names, self.tools.max_calls)
        stream.feed(forced_prefix(self.tools))
        return stream

    def token_seen(self) -> None:
        if self.first:
            self.first = False
            self.metrics.first_token(time.monotonic() - self.start)

    def logprobs(self, index: int, entries: list) -> dict[str, Any] | None:
        """Entries in the response's shape (None when logprobs were not asked for); a completion choice's
        text offsets continue from its previous call's."""
        if self.k is None:
            return None
        if self.chat:
            return chat_logprobs(entries, self.token_text)
        out = completion_logprobs(entries, self.token_text, self.offsets[index])
        self.offsets[index] += sum(len(self.token_text(t)[1].decode("utf-8", errors="ignore")) for t, _, _ in entries)
        return out


async def respond(request: Request, engine: Engine, seqs: list[Sequence], reply: Reply, req, echo: list[str],
                   prompt_tokens: int, submit: bool = True):
    """Submit the sequences and answer with one JSON body, or a stream of server-sent events. ``submit=False``
    (``max_tokens: 0``): generate nothing, answer the echo (and its logprobs) alone."""
    loop, queue = asyncio.get_running_loop(), asyncio.Queue()

    def on_event(seq: Sequence, what: str, value: Any) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, (seq.index, what, value))

    for s in seqs:
        s.on_event = on_event
    if submit:
        try:
            engine.submit(seqs)
        except EngineBusy as e:
            raise APIError(503, str(e), type="server_error", code="server_overloaded") from None
    else:
        for s in seqs:
            queue.put_nowait((s.index, "done", "length"))
    rid = new_id("cmpl" if not reply.chat else "chatcmpl")
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        events = _stream(engine, seqs, queue, rid, reply, echo, include_usage, prompt_tokens)
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    texts, reasons, pending, watch = list(echo), [""] * len(seqs), len(seqs), ClientWatch(request)
    entries = [list(p) for p in reply.prefix]
    try:
        while pending:
            event = await next_event(queue, engine, watch)
            if event is None:  # the client went away: the finally below frees the slots
                return Response(status_code=499)
            index, what, value = event
            if what == "text":
                reply.token_seen()
                texts[index] += value
            elif what == "logprob":
                reply.token_seen()
                entries[index].append(value)
            elif what == "done":
                reasons[index], pending = value, pending - 1
            else:
                raise APIError(500, value, type="server_error")
    finally:
        if pending:
            engine.cancel(seqs)
    completion_tokens = sum(len(s.token_ids) for s in seqs)
    reply.metrics.tokens(prompt_tokens, completion_tokens)
    use = usage(prompt_tokens, completion_tokens)
    logprobs = [reply.logprobs(i, e) for i, e in enumerate(entries)]
    if reply.chat:
        body = chat_body(rid, reply.model_id, [reply.message(t, r) for t, r in zip(texts, reasons)], use, logprobs)
    else:
        body = completion_body(rid, reply.model_id, list(zip(texts, reasons)), use, logprobs)
    return JSONResponse(body)


class ClientWatch:
    """Whether a request's client has gone away, asked of the server at most every ``POLL_S`` seconds however
    fast the request's events arrive (a busy generation must not hide a disconnect)."""

    def __init__(self, request: Request | None):
        self.request, self.next_check = request, 0.0

    async def gone(self) -> bool:
        now = time.monotonic()
        if self.request is None or now < self.next_check:
            return False
        self.next_check = now + POLL_S
        return await self.request.is_disconnected()


async def next_event(queue: asyncio.Queue, engine: Engine, watch: ClientWatch) -> tuple[int, str, str] | None:
    """The next (index, kind, value) event of a request; None once its client has gone away (see
    ``ClientWatch``). An engine that stopped without answering is an error."""
    while True:
        if await watch.gone():
            return None
        try:
            return await asyncio.wait_for(queue.get(), POLL_S)
        except asyncio.TimeoutError:
            if not engine.thread.is_alive() and queue.empty():
                return -1, "error", "the server is shutting down"


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def _stream(engine, seqs, queue, rid, reply: Reply, echo, include_usage, prompt_tokens):
    created, pending, chat, model_id = int(time.time()), len(seqs), reply.chat, reply.model_id
    waiting = [[] for _ in seqs]  # logprob entries whose text has not been sent yet
    splitters = [reply.tool_stream() for _ in seqs]  # with tools: content / tool-call deltas per choice
    try:
        for s in seqs:
            if chat:
                yield _sse(chat_chunk(rid, model_id, created, s.index, {"role": "assistant", "content": ""}))
            elif echo[s.index] or reply.prefix[s.index]:
                yield _sse(completion_chunk(rid, model_id, created, s.index, echo[s.index],
                                            logprobs=reply.logprobs(s.index, reply.prefix[s.index])))
        while pending:  # a client that goes away cancels this generator (Starlette watches the connection)
            index, what, value = await next_event(queue, engine, ClientWatch(None))
            if what == "logprob":
                reply.token_seen()
                waiting[index].append(value)
            elif what == "text" and splitters[index] is not None:  # text held until known not to be a call
                reply.token_seen()
                for delta in splitters[index].feed(value):
                    lp, waiting[index] = (reply.logprobs(index, waiting[index]) if waiting[index] else None), []
                    yield _sse(chat_chunk(rid, model_id, created, index, delta, logprobs=lp))
            elif what == "text":
                reply.token_seen()
                lp, waiting[index] = reply.logprobs(index, waiting[index]), []
                yield _sse(chat_chunk(rid, model_id, created, index, {"content": value}, logprobs=lp) if chat else
                           completion_chunk(rid, model_id, created, index, value, logprobs=lp))
            elif what == "done":
                pending -= 1
                if splitters[index] is not None:
                    for delta in splitters[index].finish():
                        yield _sse(chat_chunk(rid, model_id, created, index, delta))
                    value = "tool_calls" if splitters[index].calls else value
                lp, waiting[index] = (reply.logprobs(index, waiting[index]) if waiting[index] else None), []
                yield _sse(chat_chunk(rid, model_id, created, index, {}, value, logprobs=lp) if chat else
                           completion_chunk(rid, model_id, created, index, "", value, logprobs=lp))
            else:
                yield _sse(error_body(value, type="server_error"))
                return
        completion_tokens = sum(len(s.token_ids) for s in seqs)
        reply.metrics.tokens(prompt_tokens, completion_tokens)
        if include_usage:
            kind = "chat.completion.chunk" if chat else "text_completion"
            yield _sse(usage_chunk(rid, model_id, created, kind, usage(prompt_tokens, completion_tokens)))
        yield _sse("[DONE]")
    finally:  # the client went away (or the stream ended): free the slots
        if pending:
            engine.cancel(seqs)
