"""RFC 9457 problem details: every error the API returns is ``application/problem+json``.

Raise ``Problem`` (or a subclass) from a route; validation errors become 422
with an ``errors`` list; an unexpected exception becomes a 500 problem (and is
logged with its traceback) so clients never get an HTML or plain-text error.
"""

from __future__ import annotations

import logging
import re
from functools import lru_cache
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("registry.problems")

PROBLEM_JSON = "application/problem+json"
TYPE_BASE = "urn:iotfleet:problem:"


class Problem(Exception):
    """An error answered as problem+json; ``slug`` names the problem type."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        slug: str | None = None,
        title: str | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.title = title or HTTPStatus(status).phrase
        self.type = TYPE_BASE + (slug or HTTPStatus(status).phrase.lower().replace(" ", "-"))
        self.headers = headers
        self.extra = extra


class NotFound(Problem):
    def __init__(self, what: str, key: str) -> None:
        super().__init__(404, f"{what} {key!r} does not exist", slug="not-found", title=f"{what} not found")


class Conflict(Problem):
    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(409, detail, slug="conflict", **extra)


class BrokerUnavailable(Problem):
    def __init__(self, detail: str) -> None:
        super().__init__(
            503,
            detail,
            slug="broker-unavailable",
            title="MQTT broker unavailable",
            headers={"Retry-After": "5"},
        )


def problem_response(
    status: int,
    title: str,
    detail: str,
    type_: str,
    *,
    instance: str | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    body: dict[str, Any] = {"type": type_, "title": title, "status": status, "detail": detail}
    if instance:
        body["instance"] = instance
    body.update(extra)
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def _loc(loc: tuple[Any, ...] | list[Any]) -> str:
    return ".".join(str(part) for part in loc)


def install_problem_handlers(app: FastAPI) -> None:
    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        return problem_response(
            exc.status,
            exc.title,
            exc.detail,
            exc.type,
            instance=request.url.path,
            headers=exc.headers,
            **exc.extra,
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"field": _loc(err.get("loc", ())), "message": err.get("msg", ""), "type": err.get("type", "")}
            for err in exc.errors()
        ]
        summary = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:5])
        if len(errors) > 5:
            summary += f" (and {len(errors) - 5} more)"
        return problem_response(
            422,
            "Request validation failed",
            summary,
            TYPE_BASE + "validation",
            instance=request.url.path,
            errors=errors,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(status).description
        headers = getattr(exc, "headers", None)
        if status == 405:
            # Starlette's Allow names the methods of the first route matching the path
            # only; a path served by several routes (GET, PATCH, DELETE) has them all.
            methods = allowed_methods(request)
            if methods:
                headers = {**(headers or {}), "Allow": ", ".join(methods)}
        return problem_response(
            status,
            HTTPStatus(status).phrase,
            detail,
            TYPE_BASE + HTTPStatus(status).phrase.lower().replace(" ", "-"),
            instance=request.url.path,
            headers=headers,
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem_response(
            500,
            "Internal Server Error",
            "unexpected error; the registry log has the details",
            TYPE_BASE + "internal",
            instance=request.url.path,
        )


def allowed_methods(request: Request) -> list[str] | None:
    """The methods the OpenAPI document lists for this request's path (None: not an API path)."""
    path = request.url.path
    matching = [
        (template.count("{"), operations)
        for template, operations in request.app.openapi().get("paths", {}).items()
        if _template_re(template).fullmatch(path)
    ]
    if not matching:
        return None
    # The most literal templates win, as in routing: /devices/bulk is not /devices/{device_id}.
    fewest = min(params for params, _ in matching)
    return sorted({m.upper() for params, ops in matching if params == fewest for m in ops})


@lru_cache(maxsize=512)
def _template_re(template: str) -> re.Pattern[str]:
    parts = re.split(r"(\{[^}/]+\})", template)
    return re.compile("".join("[^/]+" if p.startswith("{") else re.escape(p) for p in parts))


PROBLEM_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {
        "description": HTTPStatus(status).phrase,
        "content": {
            PROBLEM_JSON: {
                "schema": {
                    "type": "object",
                    "required": ["type", "title", "status", "detail"],
                    "properties": {
                        "type": {"type": "string"},
                        "title": {"type": "string"},
                        "status": {"type": "integer"},
                        "detail": {"type": "string"},
                        "instance": {"type": "string"},
                        "errors": {"type": "array", "items": {"type": "object"}},
                    },
                }
            }
        },
    }
    for status in (401, 403)
}
"""Documented on every authenticated route (OpenAPI): missing/invalid key and insufficient role."""
