"""What stands in front of the routes of ``lmforge serve``, at the ASGI and HTTP/1.1 level: the request-body
limit and read deadline (``BodyLimit``: 413 above ``max_body_bytes``, 408 past ``read_timeout``), the deadline
for a request head (``http_protocol``; uvicorn itself waits for one forever) and the API key (``ApiKeyCheck``:
401 in OpenAI's error shape on every path but ``OPEN_PATHS``)."""

from __future__ import annotations

import asyncio
import secrets

from fastapi.responses import JSONResponse

from lmforge.deploy.protocol import error_body
from lmforge.deploy.serve_config import MAX_BODY_MB

OPEN_PATHS = ("/", "/health")  # reachable without the API key: a static page and a liveness probe
MAX_BODY_BYTES = int(MAX_BODY_MB * 1024 * 1024)  # default request-body limit (ServeConfig.max_body_mb)


class BodyLimit:
    """ASGI middleware: read the whole request body first, at most ``max_bytes`` (413 from the
    Content-Length header without reading, or once the bytes received pass it) within ``timeout``
    seconds (408); the route then reads it from memory."""

    def __init__(self, app, max_bytes: int, timeout: float):
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.strip().isdigit():
                return await _refuse(scope, receive, send, 400, "the Content-Length header is not a number")
            if int(length) > self.max_bytes:
                return await _refuse(scope, receive, send, 413, self._too_large(int(length)))
        loop = asyncio.get_running_loop()
        deadline, chunks, size = loop.time() + self.timeout, [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                return await _refuse(scope, receive, send, 408, f"the request body did not arrive within "
                                                                f"{self.timeout:g} s")
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await _refuse(scope, receive, send, 413, self._too_large(None))
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, delivered = b"".join(chunks), False
        del chunks

        async def replay():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: http.disconnect when the client goes away

        await self.app(scope, replay, send)

    def _too_large(self, length: int | None) -> str:
        size = f"{length} bytes" if length is not None else "larger"
        return f"the request body is {size}; this server accepts at most {self.max_bytes} bytes (--max-body-mb)"


async def _refuse(scope, receive, send, status: int, message: str) -> None:
    response = JSONResponse(error_body(message, code=str(status)), status_code=status, headers={"Connection": "close"})
    await response(scope, receive, send)


def http_protocol(head_timeout: float):
    """uvicorn's h11 HTTP/1.1 protocol plus a deadline for the request head: a connection that has not
    sent a complete request line and headers ``head_timeout`` seconds after it opened (or after its
    previous response) is closed. uvicorn itself waits for a request head forever."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeadTimeoutH11(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            self._head_timer = self.loop.call_later(head_timeout, self._head_late)

        def _head_late(self) -> None:
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()  # still no complete request head

    return HeadTimeoutH11


class ApiKeyCheck:
    """ASGI middleware: 401 unless the request carries the key (``Authorization: Bearer`` or ``api-key``)."""

    def __init__(self, app, api_key: str):
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        auth = headers.get(b"authorization", b"")
        given = auth[7:].strip() if auth[:7].lower() == b"bearer " else headers.get(b"api-key", b"")
        if secrets.compare_digest(given, self.key):
            return await self.app(scope, receive, send)
        message = ("Incorrect API key provided." if given else
                   "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.")
        response = JSONResponse(error_body(message, code="invalid_api_key"), status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)
