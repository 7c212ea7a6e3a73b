"""ASGI middlewares that refuse a request before any route sees it: a missing or wrong API key
(401), a body over `--max-request-bytes` (413), any new request while the server drains (503).
All answer with OpenAI error objects. JSONBody makes every body JSON, whatever its Content-Type.

They are plain ASGI callables rather than Starlette `BaseHTTPMiddleware`s: the body limit has to
sit between the socket and the route's `receive`, which a `call_next` middleware cannot do, and
a `call_next` middleware passes every chunk of a streamed answer through a task and a memory
stream of its own (the HTTP process's largest CPU cost when many streams run).
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Protocol

from fovea.server import responses

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Routes open without the API key: a load balancer's probe carries no credentials.
OPEN_PATHS = frozenset({"/health"})


def _header(scope: Scope, name: bytes) -> bytes | None:
    """The first value of header `name` (lower case), as sent."""
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value)
    return None


class ApiKeyAuth:
    """Every HTTP route but `OPEN_PATHS` needs `Authorization: Bearer <key>`. The comparison
    takes the same time wherever the tokens differ (`hmac.compare_digest`); neither the expected
    nor the given key is logged or echoed."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._key = api_key.encode()

    def _authorized(self, scope: Scope) -> bool:
        scheme, _, token = (_header(scope, b"authorization") or b"").strip().partition(b" ")
        # The scheme is case-insensitive (RFC 9110 11.1); compare_digest runs even for a wrong
        # scheme so the time taken does not tell the two failures apart.
        ok = hmac.compare_digest(token.strip(), self._key)
        return ok and scheme.lower() == b"bearer"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        body = responses.error_body(
            401,
            "missing or invalid API key: send the header 'Authorization: Bearer <API key>'",
            code="invalid_api_key",
        )
        body["error"]["type"] = "invalid_request_error"  # what OpenAI sends with a 401
        await responses.json(body, 401)(scope, receive, send)


class Draining(Protocol):
    @property
    def active(self) -> bool: ...


class RefuseWhileDraining:
    """Once the server drains (`drain.active`), every new HTTP request gets a 503; requests
    already running are not affected."""

    def __init__(self, app: ASGIApp, drain: Draining) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.drain.active:
            refusal = responses.error(503, "the server is shutting down; retry on another replica")
            await refusal(scope, receive, send)
            return
        await self.app(scope, receive, send)


class BodyLimit:
    """Refuses (413) a request body over `max_bytes`: from Content-Length before reading a
    byte, else by counting while it arrives (chunked uploads), reading no further than one chunk
    past the limit. Every route reads its whole JSON body anyway, so the body is read here,
    whole, and replayed to the app; at most `max_bytes` (plus one chunk) is ever held."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _refuse(self) -> Any:
        return responses.error(
            413,
            f"request body is larger than the {self.max_bytes}-byte limit (--max-request-bytes)",
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = _header(scope, b"content-length")
        # uvicorn has already refused a Content-Length that is not a number.
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._refuse()(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left mid-upload: nobody to answer
                return
            chunk = bytes(message.get("body", b""))
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse()(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replay(body, receive), send)


def _replay(body: Message, receive: Receive) -> Receive:
    """A `receive` that gives `body` once, then defers to `receive` (where the app waits for
    the client's disconnect)."""
    pending = [body]

    async def replayed() -> Message:
        if pending:
            return pending.pop()
        return await receive()

    return replayed


_JSON = b"application/json"


class JSONBody:
    """Every route that takes a body takes JSON, so a body is parsed as JSON whatever its
    Content-Type says, as SGLang does: `curl -d '{...}'` sends
    application/x-www-form-urlencoded, other clients text/plain or nothing. A body that is not
    JSON then gets FastAPI's json_invalid error, answered as 400 "invalid JSON" with the
    position (responses.describe_validation)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH"):
            kind = (_header(scope, b"content-type") or b"").split(b";")[0].strip().lower()
            if kind != _JSON and not kind.endswith(b"+json"):
                headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
                scope = {**scope, "headers": [*headers, (b"content-type", _JSON)]}
        await self.app(scope, receive, send)
