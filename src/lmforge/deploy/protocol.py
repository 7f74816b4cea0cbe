"""The OpenAI wire format: request bodies (validated), response and stream-chunk shapes, errors.

This module owns what the JSON looks like for ``/v1/completions``, ``/v1/chat/completions``,
``/v1/embeddings`` and ``/v1/models`` (https://platform.openai.com/docs/api-reference), vLLM's ``/tokenize``
(the rendered prompt and its token ids) and the error body
``{"error": {"message", "type", "param", "code"}}``. It holds no model and no HTTP server.

Supported request fields: model, prompt | messages, max_tokens (chat: also max_completion_tokens),
temperature, top_p, n, stop, seed, stream, stream_options.include_usage, echo (completions), user,
logprobs + top_logprobs (chat) and logprobs: k (completions, with ``echo`` and ``max_tokens: 0`` for
scoring a prompt; logprobs are the model's raw log_softmax, before temperature and the other sampling
settings); tools and tool_choice (chat; checked, rendered and parsed by ``deploy.tools``); response_format
(chat: ``json_object`` / ``json_schema``, structured output, see ``ChatRequest.json_schema``); and two common
extensions (as in vLLM): top_k and repetition_penalty. Fields that would change
the output in ways lmforge does not implement (logit_bias, functions, penalties, ...) are
refused with a 400 naming the field, never silently ignored. Sampling values are held to the ranges in
``generation.sampling`` (temperature 0 or in [0.01, 2], top_p in [1e-6, 1], repetition_penalty in
[0.01, 100], seed in [0, 2**63)), so an accepted request cannot make sampling fail; text holding a lone
UTF-16 surrogate (JSON "\\ud800"), which no tokenizer can encode, is refused too.
"""

from __future__ import annotations

import base64
import json
import struct
import time
import uuid
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from lmforge.generation.sampling import MIN_TEMPERATURE, MIN_TOP_P, REPETITION_PENALTY_RANGE, SEED_LIMIT


class APIError(Exception):
    """An error answered in OpenAI's shape with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


MAX_EMBEDDING_INPUTS = 2048  # texts in one /v1/embeddings request, as OpenAI allows
MAX_TOP_LOGPROBS = 20  # top_logprobs (chat) and logprobs (completions) go up to this, as OpenAI's chat allows


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


def lone_surrogate(value: Any, path: str = "") -> str | None:
    """Where in a parsed JSON value a string (or key) holds a lone surrogate, as "messages[0].content"; else None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "the request body"
    elif isinstance(value, dict):
        for k, v in value.items():
            where = lone_surrogate(k, path or "the request body") or lone_surrogate(v, f"{path}.{k}" if path else k)
            if where:
                return where
    elif isinstance(value, list):
        for i, v in enumerate(value):
            where = lone_surrogate(v, f"{path}[{i}]")
            if where:
                return where
    return None


def valid_unicode(data: Any) -> Any:
    """A model validator's check: refuse a request body holding a lone surrogate (see ``lone_surrogate``)."""
    where = lone_surrogate(data)
    if where is not None:
        raise PydanticCustomError("invalid_unicode", "'{param}' holds an invalid Unicode character (a lone UTF-16 "
                                  "surrogate such as \\ud800); send valid UTF-8 text", {"param": where})
    return data


class _Common(BaseModel):
    """Fields shared by both endpoints. ``None`` means "not given" (the endpoint picks the default)."""

    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=MIN_TOP_P, le=1)
    top_k: int | None = Field(None, ge=1)
    repetition_penalty: float | None = Field(None, ge=REPETITION_PENALTY_RANGE[0], le=REPETITION_PENALTY_RANGE[1])
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=SEED_LIMIT)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # refused unless left at their defaults (see ``unsupported``)
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        return valid_unicode(data)

    @field_validator("temperature")
    @classmethod
    def _temperature_floor(cls, t: float | None) -> float | None:
        if t is not None and 0 < t < MIN_TEMPERATURE:
            raise ValueError(f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE}, 2], got {t}")
        return t

    def seed_for(self, j: int) -> int | None:
        """The seed of choice j (seed + j, wrapped into [0, 2**63)), so the n choices differ but reproduce."""
        return None if self.seed is None else (self.seed + j) % SEED_LIMIT

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise APIError(400, f"stop takes at most 4 sequences, got {len(stops)}", param="stop")
        if any(not s for s in stops):
            raise APIError(400, "stop sequences must be non-empty strings", param="stop")
        return stops

    def unsupported(self) -> list[str]:
        bad = [f for f in ("frequency_penalty", "presence_penalty") if getattr(self, f) not in (None, 0)]
        return bad + (["logit_bias"] if self.logit_bias else [])


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0)  # 0 with echo: score the prompt only (lm-eval's log-likelihood)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    best_of: int | None = None
    suffix: str | None = None

    def unsupported(self) -> list[str]:
        extra = [f for f in ("suffix",) if getattr(self, f) is not None]
        return super().unsupported() + extra + (["best_of"] if self.best_of not in (None, 1) else [])


class ChatRequest(_Common):
    messages: list[dict[str, Any]]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> ChatRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs set to true")
        return self

    def logprob_k(self) -> int | None:
        """None: no logprobs; k: each token's logprob and the top k alternatives."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def unsupported(self) -> list[str]:
        bad = ["functions"] if self.functions else []  # the deprecated form; tools / tool_choice: deploy.tools
        return super().unsupported() + bad

    def json_schema(self) -> dict[str, Any] | bool | None:
        """``response_format`` as structured output: None (free text), True (``json_object``: any JSON object) or
        the schema of ``json_schema`` ({"type": "json_schema", "json_schema": {"name", "schema", "strict"}})."""
        rf = self.response_format
        if not rf:
            return None
        kind = rf.get("type")
        if kind == "text":
            return None
        if kind == "json_object":
            return True
        if kind != "json_schema":
            raise APIError(400, f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}",
                           param="response_format")
        spec = rf.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise APIError(400, "response_format.json_schema must be an object with a 'name' and a 'schema'",
                           param="response_format.json_schema")
        schema = spec.get("schema", True)
        if schema is not True and not isinstance(schema, dict):
            raise APIError(400, "response_format.json_schema.schema must be a JSON schema object",
                           param="response_format.json_schema.schema")
        return schema


ROLES = ("system", "developer", "user", "assistant", "tool")


def _tool_calls(i: int, calls: Any) -> list[dict[str, Any]]:
    """An assistant message's ``tool_calls``, checked: [{"id", "type": "function", "function": {"name",
    "arguments": a JSON object as a string}}]."""
    where = f"messages[{i}].tool_calls"
    if not isinstance(calls, list):
        raise APIError(400, f"{where} must be a list of tool calls", param=where)
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(fn.get("arguments"), str):
            raise APIError(400, f"{where}[{j}] must be {{\"id\", \"type\": \"function\", \"function\": "
                                "{\"name\": str, \"arguments\": str}}", param=f"{where}[{j}]")
        try:
            args = json.loads(fn["arguments"])
        except ValueError:
            args = None
        if not isinstance(args, dict):
            raise APIError(400, f"{where}[{j}].function.arguments must be a JSON object as a string, got "
                                f"{fn['arguments'][:80]!r}", param=f"{where}[{j}].function.arguments")
        call_id = call.get("id") if isinstance(call.get("id"), str) else f"call_{i}_{j}"
        out.append({"id": call_id, "type": "function", "function": {"name": fn["name"], "arguments": fn["arguments"]}})
    return out


def chat_messages(raw: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI chat messages -> [{"role", "content": str}] for a chat template ("developer" -> "system";
    content may be a string or a list of {"type": "text", "text": ...} parts). An assistant message may carry
    ``tool_calls`` (its content then may be null; kept, checked) and a "tool" message (a tool's result) keeps its
    ``tool_call_id``; ``deploy.tools.render_prompt`` renders both."""
    if not raw:
        raise APIError(400, "messages is empty; a conversation needs at least one message", param="messages")
    out = []
    for i, m in enumerate(raw):
        role, content = m.get("role"), m.get("content")
        calls = _tool_calls(i, m["tool_calls"]) if role == "assistant" and m.get("tool_calls") else None
        if calls and content is None:
            content = ""
        if role not in ROLES:
            raise APIError(400, f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}",
                           param=f"messages[{i}].role")
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise APIError(400, f"messages[{i}].content[{j}]: only text parts are supported",
                                   param=f"messages[{i}].content")
                parts.append(part["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string or a list of text parts",
                           param=f"messages[{i}].content")
        message: dict[str, Any] = {"role": "system" if role == "developer" else role, "content": content}
        if calls:
            message["tool_calls"] = calls
        if role == "tool" and isinstance(m.get("tool_call_id"), str):
            message["tool_call_id"] = m["tool_call_id"]
        out.append(message)
    return out


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def model_card(model_id: str, created: int, parent: str | None = None) -> dict[str, Any]:
    """A /v1/models entry; a LoRA adapter names its base as ``parent`` (and ``root``), as vLLM does."""
    card = {"id": model_id, "object": "model", "created": created, "owned_by": "lmforge"}
    return card | ({"parent": parent, "root": parent} if parent else {})


class TokenizeRequest(BaseModel):
    """``/tokenize`` (vLLM's route, used by the playground's "show prompt"): the prompt a request would send,
    as the model sees it. ``messages`` (chat, rendered with the chat template and the generation prompt) or
    ``prompt`` (a completion's text), exactly one; with ``messages``, ``tools`` and ``tool_choice`` are rendered as
    a chat request renders them (and ``parallel_tool_calls``)."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        return valid_unicode(data)

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give exactly one of 'messages' (chat) and 'prompt' (completion)")
        return self


class EmbeddingRequest(BaseModel):
    """/v1/embeddings: ``input`` is a string or a list of strings (token-id input is refused)."""

    model_config = ConfigDict(extra="ignore")
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        return valid_unicode(data)

    def texts(self) -> list[str]:
        if self.dimensions is not None:
            raise APIError(400, "lmforge does not support the parameter 'dimensions'", param="dimensions")
        texts = [self.input] if isinstance(self.input, str) else self.input
        if not texts:
            raise APIError(400, "input is empty", param="input")
        if not all(isinstance(t, str) for t in texts):
            raise APIError(400, "input must be a string or a list of strings; token ids are not supported",
                           param="input")
        if len(texts) > MAX_EMBEDDING_INPUTS:
            raise APIError(400, f"input holds {len(texts)} texts; at most {MAX_EMBEDDING_INPUTS} are taken at once",
                           param="input")
        return list(texts)


def embedding_body(model: str, vectors: list[list[float]], encoding_format: str, tokens: int) -> dict[str, Any]:
    """OpenAI's embeddings shape; base64 is the little-endian float32 bytes, as the ``openai`` client decodes."""
    def encode(vec: list[float]) -> list[float] | str:
        if encoding_format == "float":
            return vec
        return base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode("ascii")

    return {"object": "list", "model": model,
            "data": [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def completion_body(rid: str, model: str, choices: list[tuple[str, str]], use: dict[str, int],
                    logprobs: list[dict[str, Any] | None] | None = None) -> dict[str, Any]:
    """choices: (text, finish_reason) in index order; logprobs: each choice's ``completion_logprobs``."""
    logprobs = logprobs or [None] * len(choices)
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "text": t, "logprobs": lp, "finish_reason": f}
                        for i, ((t, f), lp) in enumerate(zip(choices, logprobs))],
            "usage": use}


def chat_body(rid: str, model: str, choices: list[tuple[str | dict[str, Any], str]], use: dict[str, int],
              logprobs: list[dict[str, Any] | None] | None = None) -> dict[str, Any]:
    """choices: (the assistant's text, or its whole message (with ``tool_calls``), finish_reason) in index order."""
    logprobs = logprobs or [None] * len(choices)
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "message": t if isinstance(t, dict) else {"role": "assistant", "content": t},
                         "logprobs": lp, "finish_reason": f} for i, ((t, f), lp) in enumerate(zip(choices, logprobs))],
            "usage": use}


def completion_chunk(rid: str, model: str, created: int, index: int, text: str,
                     finish_reason: str | None = None, logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]}


def chat_chunk(rid: str, model: str, created: int, index: int, delta: dict[str, Any],
               finish_reason: str | None = None, logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}


# A logprob entry as the engine gives it: (token id, logprob or None for a prompt's first token, top [(id, lp)]).
Entry = tuple[int, float | None, list[tuple[int, float]] | None]


def chat_logprobs(entries: list[Entry], token_text: Callable[[int], tuple[str, bytes]]) -> dict[str, Any]:
    """Chat's shape: {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]};
    ``token_text(id)`` -> (the token as text, its bytes)."""
    def item(t: int, lp: float) -> dict[str, Any]:
        text, raw = token_text(t)
        return {"token": text, "logprob": lp, "bytes": list(raw)}

    return {"content": [{**item(t, lp), "top_logprobs": [item(i, v) for i, v in top or []]}
                        for t, lp, top in entries], "refusal": None}


def completion_logprobs(entries: list[Entry], token_text: Callable[[int], tuple[str, bytes]],
                        offset: int = 0) -> dict[str, Any]:
    """The legacy completions shape: tokens, token_logprobs, top_logprobs (a {token: logprob} dict per token,
    None where the logprob is None), text_offset (each token's character offset in the choice's text, counted
    from ``offset``)."""
    tokens = [token_text(t)[0] for t, _, _ in entries]
    offsets = []
    for t, _, _ in entries:
        offsets.append(offset)
        offset += len(token_text(t)[1].decode("utf-8", errors="ignore"))
    return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [None if lp is None else {token_text(i)[0]: v for i, v in top or []}
                             for _, lp, top in entries],
            "text_offset": offsets}


def usage_chunk(rid: str, model: str, created: int, kind: str, use: dict[str, int]) -> dict[str, Any]:
    """The last chunk when stream_options.include_usage is set: no choices, just usage."""
    return {"id": rid, "object": kind, "created": created, "model": model, "choices": [], "usage": use}
