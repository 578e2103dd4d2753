"""Request-body bounds, applied before anything parses a body: size (413) and JSON nesting (422).

A pure ASGI middleware: an API request without a key is answered 401 before
its body is read; otherwise it reads the body (refusing past the size limit, from
``Content-Length`` at once or while a chunked body arrives), measures its
nesting depth without parsing it (``iotfleet.json_limits.raw_depth``) and
hands the same bytes on. Without it, a few KiB of ``[[[[…`` reached FastAPI's
parser and pydantic: too deep for one, a 500 for the other, or worse, stored
and then unserializable on every later read.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from device_registry.problems import TYPE_BASE, problem_response
from iotfleet.json_limits import MAX_BODY_DEPTH, raw_depth

BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class _TooLarge(Exception):
    pass


class BodyLimits:
    def __init__(self, app: ASGIApp, *, max_bytes: int, max_depth: int = MAX_BODY_DEPTH) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_depth = max_depth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if path.startswith("/api/") and _header(scope, b"authorization") is None:
            # Every API operation needs a key, and FastAPI parses a body before it checks
            # one: without a key, nothing is read (the same 401 the API gives).
            await self._unauthenticated(scope, path)(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._too_large(path)(scope, receive, send)
            return
        try:
            body = await self._read(receive)
        except _TooLarge:
            await self._too_large(path)(scope, receive, send)
            return
        if body and raw_depth(body, self.max_depth) > self.max_depth:
            message = f"JSON nested deeper than {self.max_depth} levels"
            response = problem_response(
                422,
                "Request validation failed",
                f"body: {message}",
                TYPE_BASE + "validation",
                instance=path,
                errors=[{"field": "body", "message": message, "type": "json_too_deep"}],
            )
            await response(scope, receive, send)
            return
        await self.app(scope, _replay(body, receive), send)

    async def _read(self, receive: Receive) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break  # disconnected: the app will see it too
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                raise _TooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    def _unauthenticated(self, scope: Scope, path: str) -> ASGIApp:
        state = getattr(scope.get("app"), "state", None)
        registry = getattr(state, "registry", None)
        if registry is not None:
            registry.metrics.auth_failures.labels("missing").inc()
        return problem_response(
            401,
            "Unauthorized",
            "an API key is required: send `Authorization: Bearer <key>`",
            TYPE_BASE + "unauthenticated",
            instance=path,
            headers={"WWW-Authenticate": 'Bearer realm="iotfleet"'},
        )

    def _too_large(self, path: str) -> ASGIApp:
        return problem_response(
            413,
            "Content Too Large",
            f"request body larger than {self.max_bytes} bytes (IOTFLEET_REGISTRY__MAX_BODY_BYTES);"
            " split bulk requests",
            TYPE_BASE + "body-too-large",
            instance=path,
        )


def _header(scope: Scope, wanted: bytes) -> bytes | None:
    for name, value in scope.get("headers", []):
        if name == wanted:
            return bytes(value)
    return None


def _content_length(scope: Scope) -> int | None:
    value = _header(scope, b"content-length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
