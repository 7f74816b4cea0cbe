"""An OpenAI-compatible HTTP server over one model: FastAPI routes, SSE streaming.

This module owns the HTTP side of ``lmforge serve``: ``create_app`` (routes ``/v1/models``,
``/v1/completions``, ``/v1/chat/completions``, ``/v1/embeddings``, ``/tokenize`` (the rendered prompt, as
vLLM's route; the playground's "show prompt"), ``/metrics``, ``/health`` and the playground page at ``/``),
``serve`` (run it with uvicorn, bound to 127.0.0.1 unless told otherwise) and
``BackgroundServer`` (the same app on an ephemeral loopback port in a thread, for tests and
benchmarks). Requests are tokenised here and handed to ``deploy.batching.Engine``, whose
scheduler thread batches all running requests together; its events come back to the event
loop through ``loop.call_soon_threadsafe`` and are turned into the answer (one JSON body or a stream) by
``responses.respond``. A chat request's ``tools`` / ``tool_choice`` are checked and rendered into the prompt by
``deploy.tools``; the calls in the model's answer come back as ``message.tool_calls``.

Several models can be served: the base, LoRA adapters on it (``adapters``; a request's ``model`` picks one,
each has its own ``Engine`` so batches hold one adapter's rows) and an encoder for ``/v1/embeddings``.
Logprobs come from the engine (sampled tokens) or ``requests.prompt_logprobs`` (an echoed prompt, scored in
a worker thread); ``metrics.py`` counts requests, tokens and latencies for ``/metrics``.

With an API key set, every request but the static page ``/`` and ``/health`` (``/metrics`` included) must carry
``Authorization: Bearer <key>``; others get 401 in OpenAI's error shape. Every error is
answered as ``{"error": {"message", "type", "param", "code"}}``.

Limits, so that no request can take the server down: the body limit, read deadlines and API key are
``guards.py``'s, in front of the routes. Prompt text longer
than ``CHARS_PER_TOKEN`` characters per context token is refused before tokenising, and tokenising
runs in a worker thread, off the event loop. A non-streaming request whose client goes away is
cancelled within ``responses.POLL_S`` seconds plus one decode step, like a stream.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.deploy.batching import Engine, Sequence
from lmforge.deploy.guards import MAX_BODY_BYTES, ApiKeyCheck, BodyLimit, http_protocol
from lmforge.deploy.metrics import Metrics, MetricsMiddleware
from lmforge.deploy.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    TokenizeRequest,
    chat_messages,
    embedding_body,
    error_body,
    model_card,
)
from lmforge.deploy.requests import prompt_logprobs
from lmforge.deploy.responses import Reply, respond
from lmforge.deploy.serve_config import READ_TIMEOUT_S, ServeConfig
from lmforge.deploy.tools import ToolPlan, forced_call_states, render_prompt, tool_plan
from lmforge.errors import LmforgeError
from lmforge.generation.sampling import SamplingParams

log = logging.getLogger("lmforge.serve")
PLAYGROUND = Path(__file__).parent / "web" / "playground.html"
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; "
                                           "style-src 'unsafe-inline'; connect-src 'self'",
                "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}
CHARS_PER_TOKEN = 32  # prompt text beyond this many characters per context token cannot fit: refused untokenised


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
               max_body_bytes: int = MAX_BODY_BYTES, read_timeout: float = READ_TIMEOUT_S,
               adapters: dict[str, tuple[Any, Engine]] | None = None, embedder=None,
               embedding_id: str | None = None) -> FastAPI:
    """The FastAPI app serving ``lm`` through ``engine`` (started and stopped with the app).

    ``adapters``: more served models, name -> (LM, Engine), each a LoRA adapter on ``lm``'s base (see
    ``lora_models``); a request's ``model`` picks one. ``embedder``: an ``Encoder`` served at ``/v1/embeddings``
    as ``embedding_id``."""
    served = {name: (lm, engine) for name in (model_id, *aliases)}
    served.update(adapters or {})
    engines = [engine, *(e for _, e in (adapters or {}).values())]
    if embedder is not None and not embedding_id:
        raise LmforgeError("an embedding model needs an id (embedding_id)")
    max_chars = CHARS_PER_TOKEN * engine.width
    created = int(time.time())
    metrics = Metrics(lambda: engines)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        for e in engines:
            if not e.thread.is_alive():
                e.start()
        yield
        for e in engines:
            e.stop()

    app = FastAPI(title="lmforge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.metrics = metrics
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes, timeout=read_timeout)
    if api_key:  # added after the body limit, so it runs before it: no body is read for a request without the key
        app.add_middleware(ApiKeyCheck, api_key=api_key)
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # outermost: counts refusals (401, 413) too

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

    def known() -> str:
        names = [model_id, *(adapters or {})]
        return ", ".join(f"'{n}'" for n in names)

    def pick(name: str) -> tuple[Any, Engine]:
        """The (LM, Engine) serving the request's ``model``; 404 naming the served models otherwise."""
        if name in served:
            return served[name]
        hint = "; it is the embedding model: use /v1/embeddings" if name == embedding_id else ""
        raise APIError(404, f"The model '{name}' does not exist{hint}; this server serves {known()}",
                       param="model", code="model_not_found")

    def canonical(name: str) -> str:
        return name if name in (adapters or {}) else model_id

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

    async def chat_prompt(req: ChatRequest | TokenizeRequest) -> tuple[ToolPlan, str]:
        """A chat request's checked tools and its prompt text (chat template, generation prompt; with tools or
        tool messages in the history rendered by ``deploy.tools``)."""
        plan = tool_plan(req.tools, req.tool_choice, req.parallel_tool_calls)
        messages = chat_messages(req.messages)
        check_chars([m["content"] for m in messages] + ([json.dumps(req.tools)] if req.tools else []), "messages")
        if plan.tools or any(m["role"] == "tool" or "tool_calls" in m for m in messages):
            return plan, await run_in_threadpool(render_prompt, lm.tokenizer, messages, plan)
        return plan, await run_in_threadpool(lm.tokenizer.apply_chat_template, messages, add_generation_prompt=True)

    @functools.lru_cache(maxsize=65536)
    def token_text(token: int) -> tuple[str, bytes]:
        return token_piece(lm.tokenizer, token)

    @app.get("/", include_in_schema=False)
    async def playground():
        return HTMLResponse(PLAYGROUND.read_text(encoding="utf-8"), headers=PAGE_HEADERS)

    @app.get("/health")
    async def health():
        stats = engine.stats()
        return {"status": "ok" if engine.thread.is_alive() else "stopped", "running": stats["running"],
                "waiting": stats["waiting"]}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def cards() -> list[dict[str, Any]]:
        out = [model_card(model_id, created)]
        out += [model_card(name, created, parent=model_id) for name in adapters or {}]
        if embedder is not None:
            out.append(model_card(embedding_id, created))
        return out

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": cards()}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        for card in cards():
            if card["id"] == name:
                return card
        if name in served:  # an alias of the base model
            return model_card(model_id, created)
        raise APIError(404, f"The model '{name}' does not exist; this server serves {known()}", param="model",
                       code="model_not_found")

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        start = time.monotonic()
        chosen, eng = pick(req.model)
        check_supported(req)
        check_chars([req.prompt] if isinstance(req.prompt, str) else
                    [p for p in req.prompt if isinstance(p, str)], "prompt")
        prompts = await run_in_threadpool(_completion_prompts, req.prompt, lm.tokenizer)
        max_tokens = 16 if req.max_tokens is None else req.max_tokens
        for ids in prompts:
            check_lengths(len(ids), max(max_tokens, 1))
        params, stops, k = sampling(req), req.stop_list(), req.logprobs
        scored = [await run_in_threadpool(prompt_logprobs, chosen.model, ids, k) if req.echo and k is not None
                  else [] for ids in prompts]
        seqs = [Sequence(ids, max(max_tokens, 1), params, stop=stops, seed=req.seed_for(j), index=p * req.n + j,
                         logprobs=k)
                for p, ids in enumerate(prompts) for j in range(req.n)]
        echo = [lm.tokenizer.decode(s.prompt_ids, skip_special_tokens=True) if req.echo else "" for s in seqs]
        reply = Reply("text_completion", canonical(req.model), token_text, k, [scored[s.index // req.n] for s in seqs],
                      metrics, start)
        return await respond(request, eng, seqs, reply, req, echo, sum(len(p) for p in prompts),
                              submit=max_tokens > 0)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        start = time.monotonic()
        chosen, eng = pick(req.model)
        check_supported(req)
        if not lm.has_chat_template:
            raise APIError(400, f"the model '{model_id}' has no chat template; use /v1/completions",
                           param="messages")
        plan, text = await chat_prompt(req)
        ids = await run_in_threadpool(lm.tokenizer.encode, text, add_special_tokens=False)
        max_tokens = req.max_completion_tokens or req.max_tokens or max(1, engine.width - len(ids))
        check_lengths(len(ids), max_tokens)
        params, stops, k = sampling(req), req.stop_list(), req.logprob_k()
        schema = req.json_schema()  # structured output: each choice gets its own constraint state
        if plan.forced:  # a forced tool call: the continuation of FORCED_OPEN is a call of an allowed tool
            if schema is not None:
                raise APIError(400, "tool_choice 'required' or a named function cannot be combined with "
                                    "response_format", param="response_format")
            states = await run_in_threadpool(forced_call_states, lm, req.n, plan)
        else:
            try:
                states = await run_in_threadpool(lm.constraint_states, req.n, schema) if schema is not None else None
            except LmforgeError as e:  # an impossible schema: name it
                raise APIError(400, f"response_format: {e}", param="response_format") from None
        seqs = [Sequence(ids, max_tokens, params, stop=stops, seed=req.seed_for(j), index=j, logprobs=k,
                         constraint=states[j] if states else None) for j in range(req.n)]
        reply = Reply("chat.completion", canonical(req.model), token_text, k, [[] for _ in seqs], metrics, start,
                      tools=plan)
        return await respond(request, eng, seqs, reply, req, [""] * req.n, len(ids))

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        if req.model is not None:
            pick(req.model)
        if req.messages is None:
            check_chars([req.prompt], "prompt")
            ids = await run_in_threadpool(lm.tokenizer.encode, req.prompt, add_special_tokens=True)
            text = lm.tokenizer.decode(ids, skip_special_tokens=False)
        else:
            if not lm.has_chat_template:
                raise APIError(400, f"the model '{model_id}' has no chat template; send 'prompt' instead",
                               param="messages")
            text = (await chat_prompt(req))[1]
            ids = await run_in_threadpool(lm.tokenizer.encode, text, add_special_tokens=False)
        return {"count": len(ids), "max_model_len": engine.width, "tokens": ids, "prompt": text}

    @app.post("/v1/embeddings")
    async def embeddings(req: EmbeddingRequest):
        if embedder is None:
            raise APIError(404, "this server has no embedding model; start it with --embedding-model PATH",
                           param="model", code="model_not_found")
        if req.model != embedding_id:
            raise APIError(404, f"The model '{req.model}' does not exist; the embedding model of this server is "
                                f"'{embedding_id}'", param="model", code="model_not_found")
        texts = req.texts()
        check_chars(texts, "input")
        vectors, tokens = await run_in_threadpool(_embed, embedder, texts)
        return JSONResponse(embedding_body(embedding_id, vectors, req.encoding_format, tokens))

    return app


def _embed(embedder, texts: list[str]) -> tuple[list[list[float]], int]:
    """``Encoder.embed`` with ``lmforge embed``'s defaults (mean pooling, L2-normalised) and the tokens read."""
    tokens = sum(min(len(ids), embedder.config.max_seq_len) for ids in embedder.tokenizer.encode_batch(texts))
    return embedder.embed(texts).tolist(), tokens

def _byte_level_chars() -> dict[str, int]:
    """The byte-level BPE alphabet (GPT-2's): the printable character that stands for each byte -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


BYTE_LEVEL = _byte_level_chars()


def token_piece(tokenizer, token: int) -> tuple[str, bytes]:
    """A token as logprobs show it: its text and its UTF-8 bytes. A token holding part of a character (byte-level
    BPE, or a ``<0xNN>`` byte-fallback piece) reads as ``bytes:\\xNN...`` with its raw bytes, as OpenAI shows one."""
    text = tokenizer.decode([token], skip_special_tokens=False)
    if "\ufffd" not in text:
        return text, text.encode("utf-8")
    piece = tokenizer.backend.id_to_token(token) or ""
    raw = None
    if piece and all(c in BYTE_LEVEL for c in piece):
        raw = bytes(BYTE_LEVEL[c] for c in piece)
    elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        raw = bytes([int(piece[3:5], 16)])
    if raw is None or raw.decode("utf-8", errors="replace") != text:
        return text, text.encode("utf-8")
    return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), raw


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


def serve(lm, cfg: ServeConfig, *, model_id: str, api_key: str | None = None, adapters: dict | None = None,
          embedder=None, embedding_id: str | None = None) -> None:
    """Serve ``lm`` (loaded from ``cfg.model``) as ``model_id`` (``cfg.model`` is accepted as an alias) with
    ``cfg``'s address and limits until interrupted (SIGTERM: requests in flight get 10 s to finish).
    ``adapters``: {name: LM} of LoRA adapters on ``lm``, each decoded by its own engine; ``embedder``: an
    ``Encoder`` served at /v1/embeddings as ``embedding_id``."""
    import uvicorn

    host, port, max_batch, read_timeout = cfg.host, cfg.port, cfg.max_batch, cfg.read_timeout
    max_queue, context, aliases, log_level = cfg.max_queue, cfg.max_context, (cfg.model,), cfg.log_level
    max_body_bytes = int(cfg.max_body_mb * 1024 * 1024)

    def engine_of(m) -> Engine:
        return Engine(m.model, m.tokenizer, m.eos_ids, max_batch=max_batch, max_queue=max_queue, context=context,
                      compile=cfg.compile, prefill_chunk=cfg.prefill_chunk)

    engine = engine_of(lm)
    app = create_app(lm, engine, model_id=model_id, api_key=api_key, aliases=aliases, max_body_bytes=max_body_bytes,
                     read_timeout=read_timeout, adapters={n: (m, engine_of(m)) for n, m in (adapters or {}).items()},
                     embedder=embedder, embedding_id=embedding_id)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(f"warning: serving on {host} without an API key: anyone who can reach this port can use the model; "
              "set --api-key or LMFORGE_API_KEY", file=sys.stderr)
    shown = f"[{host}]" if ":" in host else host
    print(f"lmforge: serving '{model_id}' at http://{shown}:{port}/v1 (playground: http://{shown}:{port}/), "
          f"{max_batch} batch slots x {engine.width} tokens, API key {'required' if api_key else 'off'}",
          file=sys.stderr)
    if adapters or embedder is not None:
        extra = [f"LoRA adapter '{n}'" for n in adapters or {}] + ([f"embeddings '{embedding_id}'"] if embedder else [])
        print(f"lmforge: also serving {', '.join(extra)}", file=sys.stderr)
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
