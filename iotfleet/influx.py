"""InfluxDB over the v1 HTTP API (``/write`` line protocol, ``/query`` InfluxQL).

The v1 API is served by InfluxDB 1.x, by 2.x (v1 compatibility) and by 3.x, so
this one client covers all of them: basic auth for 1.x, ``Authorization: Token``
for 2.x/3.x. Timestamps are written with millisecond precision.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import httpx
import orjson

from iotfleet.errors import IotfleetError
from iotfleet.settings import InfluxSettings
from iotfleet.tls_clients import http_verify


class InfluxError(IotfleetError):
    """Raised when InfluxDB refuses a write or a query, or cannot be reached."""

    def __init__(self, message: str, status: int | None = None, retryable: bool = True) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable


# --- line protocol -----------------------------------------------------------

_MEASUREMENT_ESCAPES = str.maketrans({",": r"\,", " ": r"\ ", "\n": r"\n"})
_TAG_ESCAPES = str.maketrans({",": r"\,", " ": r"\ ", "=": r"\=", "\n": r"\n"})


def escape_measurement(name: str) -> str:
    return name.replace("\\", "\\\\").translate(_MEASUREMENT_ESCAPES)


def escape_tag(text: str) -> str:
    """Escape a tag key, tag value or field key."""
    return text.replace("\\", "\\\\").translate(_TAG_ESCAPES)


def encode_field_value(value: Any) -> str:
    """Line-protocol literal: ints get ``i``, bools true/false, strings quoted."""
    if isinstance(value, bool):  # before int: bool is an int subclass
        return "true" if value else "false"
    if isinstance(value, int):
        return f"{value}i"
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"InfluxDB cannot store {value!r}")
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    raise TypeError(f"unsupported field type {type(value).__name__}")


def encode_point(
    measurement: str, tags: Mapping[str, str], fields: Mapping[str, Any], timestamp_ms: int
) -> str:
    """One line of line protocol (no trailing newline). Tags are sorted, as InfluxDB prefers."""
    if not fields:
        raise ValueError("a point needs at least one field")
    head = escape_measurement(measurement)
    if tags:
        head += "," + ",".join(f"{escape_tag(k)}={escape_tag(v)}" for k, v in sorted(tags.items()) if v != "")
    body = ",".join(f"{escape_tag(k)}={encode_field_value(v)}" for k, v in fields.items())
    return f"{head} {body} {timestamp_ms}"


# --- InfluxQL literals -------------------------------------------------------


def quote_identifier(name: str) -> str:
    """A double-quoted InfluxQL identifier."""
    if "\n" in name or "\x00" in name:
        raise ValueError("identifier may not contain newline or NUL")
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def quote_string(value: str) -> str:
    """A single-quoted InfluxQL string literal."""
    if "\n" in value or "\x00" in value:
        raise ValueError("string may not contain newline or NUL")
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


# --- the client --------------------------------------------------------------


class InfluxClient:
    """Async client of the v1 API on a pooled httpx connection pool."""

    def __init__(self, settings: InfluxSettings, *, max_connections: int = 8) -> None:
        self.settings = settings
        headers = {}
        auth: httpx.BasicAuth | None = None
        if settings.token is not None:
            headers["Authorization"] = f"Token {settings.token.get_secret_value()}"
        elif settings.username:
            password = settings.password.get_secret_value() if settings.password else ""
            auth = httpx.BasicAuth(settings.username, password)
        self._http = httpx.AsyncClient(
            base_url=settings.url,
            headers=headers,
            auth=auth,
            timeout=settings.timeout_s,
            verify=http_verify(settings.url, settings.ca_file, "IOTFLEET_INFLUX__CA_FILE"),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        )

    async def __aenter__(self) -> InfluxClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def ping(self) -> bool:
        try:
            response = await self._http.get("/ping")
        except httpx.HTTPError:
            return False
        return response.status_code == 204

    async def write(self, lines: bytes | str, *, database: str | None = None, precision: str = "ms") -> None:
        """Write line protocol (ms precision unless told); raise InfluxError (retryable or not) on refusal."""
        params = {
            "db": database or self.settings.database,
            "rp": self.settings.retention_policy,
            "precision": precision,
        }
        body = lines.encode() if isinstance(lines, str) else lines
        try:
            response = await self._http.post("/write", params=params, content=body)
        except httpx.HTTPError as exc:
            raise InfluxError(f"InfluxDB write failed: {exc!r}") from exc
        if response.status_code == 204:
            return
        # 4xx (bad line, field type conflict, unknown db) will not succeed on retry;
        # 5xx and timeouts will.
        raise InfluxError(
            f"InfluxDB refused write ({response.status_code}): {response.text[:500]}",
            status=response.status_code,
            retryable=response.status_code >= 500,
        )

    async def query(
        self, influxql: str, *, database: str | None = None, params: Mapping[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        """Run InfluxQL (bind parameters via ``params``); return the ``results`` list, errors raised."""
        form: dict[str, str] = {"q": influxql, "db": database or self.settings.database, "epoch": "ms"}
        if params:
            form["params"] = orjson.dumps(dict(params)).decode()
        try:
            response = await self._http.post("/query", data=form)
        except httpx.HTTPError as exc:
            raise InfluxError(f"InfluxDB query failed: {exc!r}") from exc
        if response.status_code != 200:
            raise InfluxError(
                f"InfluxDB query refused ({response.status_code}): {response.text[:500]}",
                status=response.status_code,
                retryable=response.status_code >= 500,
            )
        payload = orjson.loads(response.content)
        results: list[dict[str, Any]] = payload.get("results", [])
        for result in results:
            if "error" in result:
                raise InfluxError(f"InfluxQL error: {result['error']}", status=400, retryable=False)
        return results

    async def ensure_database(self) -> None:
        """Create the database and make the configured retention policy its default (idempotent)."""
        db = quote_identifier(self.settings.database)
        rp = quote_identifier(self.settings.retention_policy)
        duration = self.settings.retention
        await self.query(f"CREATE DATABASE {db}", database="_internal")
        existing = await self.query(f"SHOW RETENTION POLICIES ON {db}")
        names = {row[0] for series in existing[0].get("series", []) for row in series.get("values", [])}
        verb = "ALTER" if self.settings.retention_policy in names else "CREATE"
        await self.query(
            f"{verb} RETENTION POLICY {rp} ON {db} DURATION {duration} REPLICATION 1 DEFAULT",
            database=self.settings.database,
        )


def series_rows(results: list[dict[str, Any]]) -> Iterable[dict[str, Any]]:
    """Flatten a query result into dicts of column → value (plus the series' tags)."""
    for result in results:
        for series in result.get("series", []):
            columns = series["columns"]
            tags = series.get("tags", {})
            for values in series.get("values", []):
                row = dict(zip(columns, values, strict=True))
                row.update(tags)
                yield row
