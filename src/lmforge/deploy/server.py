"""An OpenAI-compatible HTTP server over one model: FastAPI routes, SSE streaming.

This module owns the HTTP side of ``lmforge serve``: ``create_app`` (routes ``/v1/models``,
``/v1/completions``, ``/v1/chat/completions``, ``/health`` and the playground page at ``/``),
``serve`` (run it with uvicorn, bound to 127.0.0.1 unless told otherwise) and
``BackgroundServer`` (the same app on an ephemeral loopback port in a thread, for tests and
benchmarks). Requests are tokenised here and handed to ``deploy.batching.Engine``, whose
scheduler thread batches all running requests together; its events come back to the event
loop through ``loop.call_soon_threadsafe``.

With an API key set, every request but the static page ``/`` and ``/health`` must carry
``Authorization: Bearer <key>``; others get 401 in OpenAI's error shape. Every error is
answered as ``{"error": {"message", "type", "param", "code"}}``.

Limits, so that no request can take the server down: the body limit, read deadlines and API key are
``guards.py``'s, in front of the routes. Prompt text longer
than ``CHARS_PER_TOKEN`` characters per context token is refused before tokenising, and tokenising
runs in a worker thread, off the event loop. A non-streaming request whose client goes away is
cancelled within ``POLL_S`` seconds plus one decode step, like a stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.deploy.batching import Engine, EngineBusy, Sequence
from lmforge.deploy.guards import MAX_BODY_BYTES, ApiKeyCheck, BodyLimit, http_protocol
from lmforge.deploy.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    chat_body,
    chat_chunk,
    chat_messages,
    completion_body,
    completion_chunk,
    error_body,
    model_card,
    new_id,
    usage,
    usage_chunk,
)
from lmforge.deploy.serve_config import READ_TIMEOUT_S, ServeConfig
from lmforge.errors import LmforgeError
from lmforge.generation.sampling import SamplingParams

log = logging.getLogger("lmforge.serve")
PLAYGROUND = Path(__file__).parent / "web" / "playground.html"
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; "
                                           "style-src 'unsafe-inline'; connect-src 'self'",
                "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}
CHARS_PER_TOKEN = 32  # prompt text beyond this many characters per context token cannot fit: refused untokenised
POLL_S = 0.25  # how often a waiting non-streaming request checks that its client is still there


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    err = exc.errors()[0]
    if err.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}", None
    if err.get("type") == "invalid_unicode":
        return err["msg"], err.get("ctx", {}).get("param")
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if err.get("type") == "value_error":
        return err.get("msg", "").removeprefix("Value error, "), param
    if err.get("type") == "missing":
        return f"missing required parameter: '{param}'", param
    if not loc:
        return f"the request body must be a JSON object ({err.get('msg')})", None
    return f"invalid value for '{param}': {err.get('msg')}", param


def create_app(lm, engine: Engine, *, model_id: str, api_key: str | None = None, aliases: tuple[str, ...] = (),
               max_body_bytes: int = MAX_BODY_BYTES, read_timeout: float = READ_TIMEOUT_S) -> FastAPI:
    """The FastAPI app serving ``lm`` through ``engine`` (started and stopped with the app)."""
    names = {model_id, *aliases}
    max_chars = CHARS_PER_TOKEN * engine.width
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if not engine.thread.is_alive():
            engine.start()
        yield
        engine.stop()

    app = FastAPI(title="lmforge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes, timeout=read_timeout)
    if api_key:  # added last, so it runs first: no body is read for a request without the key
        app.add_middleware(ApiKeyCheck, api_key=api_key)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(LmforgeError)
    async def _bad_input(request: Request, exc: LmforgeError):
        return JSONResponse(error_body(str(exc)), status_code=400)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return JSONResponse(error_body(message, param=param), status_code=400)

    def check_chars(texts: list[str], param: str) -> None:
        n = sum(len(t) for t in texts)
        if n > max_chars:
            raise APIError(400, f"the prompt is {n} characters, more than can fit this model's maximum context "
                                f"length of {engine.width} tokens (at most {max_chars} characters are read); "
                                "shorten the prompt", param=param, code="context_length_exceeded")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        message = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else str(exc.detail)
        return JSONResponse(error_body(message, code=str(exc.status_code)), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):
        log.exception("request failed")
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", type="server_error"), status_code=500)

    def check_model(name: str) -> None:
        if name not in names:
            raise APIError(404, f"The model '{name}' does not exist; this server serves '{model_id}'",
                           param="model", code="model_not_found")

    def check_supported(req: CompletionRequest | ChatRequest) -> None:
        bad = req.unsupported()
        if bad:
            raise APIError(400, f"lmforge does not support the parameter '{bad[0]}'", param=bad[0])
        sequences = req.n * (len(req.prompt) if isinstance(req, CompletionRequest) and isinstance(req.prompt, list)
                             and req.prompt and not isinstance(req.prompt[0], int) else 1)
        if sequences > engine.max_batch + engine.max_queue:
            raise APIError(400, f"this request asks for {sequences} completions; the server takes at most "
                                f"{engine.max_batch + engine.max_queue} at once", param="n")

    def sampling(req: CompletionRequest | ChatRequest) -> SamplingParams:
        return SamplingParams(temperature=1.0 if req.temperature is None else req.temperature, top_k=req.top_k,
                              top_p=req.top_p, repetition_penalty=req.repetition_penalty or 1.0)

    def check_lengths(prompt_len: int, max_tokens: int) -> None:
        try:
            engine.check(prompt_len, max_tokens)
        except LmforgeError as e:
            raise APIError(400, str(e), param="max_tokens" if prompt_len < engine.width else "messages",
                           code="context_length_exceeded") from None

    @app.get("/", include_in_schema=False)
    async def playground():
        return HTMLResponse(PLAYGROUND.read_text(encoding="utf-8"), headers=PAGE_HEADERS)

    @app.get("/health")
    async def health():
        stats = engine.stats()
        return {"status": "ok" if engine.thread.is_alive() else "stopped", "running": stats["running"],
                "waiting": stats["waiting"]}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card(model_id, created)]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        check_model(name)
        return model_card(model_id, created)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        check_model(req.model)
        check_supported(req)
        check_chars([req.prompt] if isinstance(req.prompt, str) else
                    [p for p in req.prompt if isinstance(p, str)], "prompt")
        prompts = await run_in_threadpool(_completion_prompts, req.prompt, lm.tokenizer)
        max_tokens = req.max_tokens or 16
        for ids in prompts:
            check_lengths(len(ids), max_tokens)
        params, stops = sampling(req), req.stop_list()
        seqs = [Sequence(ids, max_tokens, params, stop=stops, seed=req.seed_for(j), index=p * req.n + j)
                for p, ids in enumerate(prompts) for j in range(req.n)]
        echo = [lm.tokenizer.decode(s.prompt_ids, skip_special_tokens=True) if req.echo else "" for s in seqs]
        return await _respond(request, engine, seqs, "text_completion", model_id, req, echo,
                              sum(len(p) for p in prompts))

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        check_model(req.model)
        check_supported(req)
        if not lm.has_chat_template:
            raise APIError(400, f"the model '{model_id}' has no chat template; use /v1/completions",
                           param="messages")
        messages = chat_messages(req.messages)
        check_chars([m["content"] for m in messages], "messages")
        ids = await run_in_threadpool(lm.encode_messages, messages)
        max_tokens = req.max_completion_tokens or req.max_tokens or max(1, engine.width - len(ids))
        check_lengths(len(ids), max_tokens)
        params, stops = sampling(req), req.stop_list()
        seqs = [Sequence(ids, max_tokens, params, stop=stops, seed=req.seed_for(j), index=j) for j in range(req.n)]
        return await _respond(request, engine, seqs, "chat.completion", model_id, req, [""] * req.n, len(ids))

    return app


def _completion_prompts(prompt: Any, tokenizer) -> list[list[int]]:
    """``prompt`` as OpenAI allows it (a string, strings, token ids, lists of token ids) -> token id lists."""
    if isinstance(prompt, str):
        prompt = [prompt]
    elif prompt and isinstance(prompt[0], int):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt is empty", param="prompt")
    out = []
    for i, p in enumerate(prompt):
        if isinstance(p, str):
            out.append(tokenizer.encode(p, add_special_tokens=True))
        else:
            bad = [t for t in p if not 0 <= t < tokenizer.vocab_size]
            if bad:
                raise APIError(400, f"prompt[{i}] holds token id {bad[0]}, outside the vocabulary "
                                    f"(size {tokenizer.vocab_size})", param="prompt")
            out.append(list(p))
    return out


async def _respond(request: Request, engine: Engine, seqs: list[Sequence], kind: str, model_id: str, req,
                   echo: list[str], prompt_tokens: int):
    """Submit the sequences and answer with one JSON body, or a stream of server-sent events."""
    loop, queue = asyncio.get_running_loop(), asyncio.Queue()

    def on_event(seq: Sequence, what: str, value: str) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, (seq.index, what, value))

    for s in seqs:
        s.on_event = on_event
    try:
        engine.submit(seqs)
    except EngineBusy as e:
        raise APIError(503, str(e), type="server_error", code="server_overloaded") from None
    rid = new_id("cmpl" if kind == "text_completion" else "chatcmpl")
    chat = kind == "chat.completion"
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        events = _stream(engine, seqs, queue, rid, model_id, chat, echo, include_usage, prompt_tokens)
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    texts, reasons, pending, watch = list(echo), [""] * len(seqs), len(seqs), ClientWatch(request)
    try:
        while pending:
            event = await _next_event(queue, engine, watch)
            if event is None:  # the client went away: the finally below frees the slots
                return Response(status_code=499)
            index, what, value = event
            if what == "text":
                texts[index] += value
            elif what == "done":
                reasons[index], pending = value, pending - 1
            else:
                raise APIError(500, value, type="server_error")
    finally:
        if pending:
            engine.cancel(seqs)
    use = usage(prompt_tokens, sum(len(s.token_ids) for s in seqs))
    body = (chat_body if chat else completion_body)(rid, model_id, list(zip(texts, reasons)), use)
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


async def _next_event(queue: asyncio.Queue, engine: Engine, watch: ClientWatch) -> tuple[int, str, str] | None:
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
    import json

    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def _stream(engine, seqs, queue, rid, model_id, chat, echo, include_usage, prompt_tokens):
    created, pending = int(time.time()), len(seqs)
    try:
        for s in seqs:
            if chat:
                yield _sse(chat_chunk(rid, model_id, created, s.index, {"role": "assistant", "content": ""}))
            elif echo[s.index]:
                yield _sse(completion_chunk(rid, model_id, created, s.index, echo[s.index]))
        while pending:  # a client that goes away cancels this generator (Starlette watches the connection)
            index, what, value = await _next_event(queue, engine, ClientWatch(None))
            if what == "text":
                yield _sse(chat_chunk(rid, model_id, created, index, {"content": value}) if chat else
                           completion_chunk(rid, model_id, created, index, value))
            elif what == "done":
                pending -= 1
                yield _sse(chat_chunk(rid, model_id, created, index, {}, value) if chat else
                           completion_chunk(rid, model_id, created, index, "", value))
            else:
                yield _sse(error_body(value, type="server_error"))
                return
        if include_usage:
            kind = "chat.completion.chunk" if chat else "text_completion"
            yield _sse(usage_chunk(rid, model_id, created, kind, usage(prompt_tokens,
                                                                       sum(len(s.token_ids) for s in seqs))))
        yield _sse("[DONE]")
    finally:  # the client went away (or the stream ended): free the slots
        if pending:
            engine.cancel(seqs)


def serve(lm, cfg: ServeConfig, *, model_id: str, api_key: str | None = None) -> None:
    """Serve ``lm`` (loaded from ``cfg.model``) as ``model_id`` (``cfg.model`` is accepted as an alias) with
    ``cfg``'s address and limits until interrupted (SIGTERM: requests in flight get 10 s to finish)."""
    import uvicorn

    host, port, max_batch, read_timeout = cfg.host, cfg.port, cfg.max_batch, cfg.read_timeout
    max_queue, context, aliases, log_level = cfg.max_queue, cfg.max_context, (cfg.model,), cfg.log_level
    max_body_bytes = int(cfg.max_body_mb * 1024 * 1024)

    engine = Engine(lm.model, lm.tokenizer, lm.eos_ids, max_batch=max_batch, max_queue=max_queue, context=context)
    app = create_app(lm, engine, model_id=model_id, api_key=api_key, aliases=aliases, max_body_bytes=max_body_bytes,
                     read_timeout=read_timeout)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(f"warning: serving on {host} without an API key: anyone who can reach this port can use the model; "
              "set --api-key or LMFORGE_API_KEY", file=sys.stderr)
    shown = f"[{host}]" if ":" in host else host
    print(f"lmforge: serving '{model_id}' at http://{shown}:{port}/v1 (playground: http://{shown}:{port}/), "
          f"{max_batch} batch slots x {engine.width} tokens, API key {'required' if api_key else 'off'}",
          file=sys.stderr)
    uvicorn.run(app, host=host, port=port, log_level=log_level, http=http_protocol(read_timeout),
                timeout_graceful_shutdown=10)


class BackgroundServer:
    """Run an app with uvicorn in a daemon thread on ``host`` (loopback) and an ephemeral port.

        with BackgroundServer(app) as srv:
            httpx.get(srv.url + "/health")
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, startup_timeout: float = 30.0):
        self.app, self.host, self.port, self.startup_timeout = app, host, port, startup_timeout
        self.server = None
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> BackgroundServer:
        import uvicorn

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=5,
                                                    http=http_protocol(READ_TIMEOUT_S)))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True,
                                       name="lmforge-http")
        self.thread.start()
        deadline = time.monotonic() + self.startup_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 15.0) -> None:
        if self.server is not None:
            self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
