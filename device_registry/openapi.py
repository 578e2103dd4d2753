"""The OpenAPI document as the API really behaves: every error documented as problem+json.

FastAPI documents its own 422 as ``application/json`` (HTTPValidationError)
and leaves error responses declared by status only; the registry answers every
error as RFC 9457 ``application/problem+json``. This rewrite runs once, when
``/openapi.json`` is first served, and also documents the errors any request
with a body can get before its handler runs: 400 (a body that is not UTF-8
JSON), 413 (larger than ``IOTFLEET_REGISTRY__MAX_BODY_BYTES``) and 422 (nested
too deep, or invalid).
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from device_registry.problems import PROBLEM_JSON

PROBLEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "RFC 9457 problem details",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "instance": {"type": "string"},
        "errors": {
            "type": "array",
            "description": "422 only: one entry per invalid field",
            "items": {
                "type": "object",
                "properties": {
                    "field": {"type": "string"},
                    "message": {"type": "string"},
                    "type": {"type": "string"},
                },
            },
        },
    },
}
PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}

BODY_ERRORS = {
    400: "The body is not UTF-8 JSON",
    413: "The body is larger than IOTFLEET_REGISTRY__MAX_BODY_BYTES",
    422: "Validation failed (also: JSON nested too deep); `errors` lists each problem",
}
PARAMETER_ERRORS = {422: "Validation failed; `errors` lists each problem"}
NOT_PROBLEMS = {("/healthz", "get", "503")}
"""Error responses whose body is not a problem (the health report is served as is)."""


def honest_schema(app: FastAPI) -> dict[str, Any]:
    schema = get_openapi(
        title=app.title,
        version=app.version,
        description=app.description,
        routes=app.routes,
    )
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components["Problem"] = PROBLEM_SCHEMA
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            responses: dict[str, Any] = operation.setdefault("responses", {})
            extra: dict[int, str] = {}
            if "requestBody" in operation:
                extra.update(BODY_ERRORS)
            if operation.get("parameters") or "requestBody" in operation:
                for status, text in PARAMETER_ERRORS.items():
                    extra.setdefault(status, text)
            for code, text in extra.items():
                responses[str(code)] = {"description": text}
            for key, response in responses.items():
                if not key.isdigit() or int(key) < 400 or (path, method, key) in NOT_PROBLEMS:
                    continue
                response["content"] = {PROBLEM_JSON: {"schema": PROBLEM_REF}}
                if not response.get("description"):
                    response["description"] = HTTPStatus(int(key)).phrase
    return schema


def install_openapi(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = honest_schema(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
