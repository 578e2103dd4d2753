"""What every service does the same way: logging, lifecycle lines, signals, /healthz and /metrics.

Services log one line per lifecycle event (starting, ready, degraded, stopping,
stopped) through ``ServiceLifecycle``; background services (ingest, rules)
serve ``/healthz`` (JSON) and ``/metrics`` (Prometheus) with ``HealthServer``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import REGISTRY as DEFAULT_REGISTRY
from prometheus_client import CollectorRegistry, make_wsgi_app

from iotfleet.errors import ConfigError
from iotfleet.settings import HealthSettings

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

HealthCheck = Callable[[], dict[str, Any]]
"""Returns {"status": "ok" | "degraded" | "down", ...details}."""


def configure_logging(level: str = "INFO") -> None:
    """One format for every service, to stderr (the supervisor captures it per service)."""
    logging.basicConfig(
        level=level, format=LOG_FORMAT, datefmt="%Y-%m-%dT%H:%M:%S", stream=sys.stderr, force=True
    )
    # Per-request lines of the HTTP clients drown the lifecycle lines.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def fail_fast(error: ConfigError, service: str) -> None:
    """Print a configuration error naming the setting and exit 2 (no traceback: it is not a bug)."""
    print(f"{service}: {error}", file=sys.stderr)
    raise SystemExit(2)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # health probes every few seconds would flood the service log


class _ThreadingWSGIServer(WSGIServer):
    daemon_threads = True

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(target=self._handle, args=(request, client_address), daemon=True)
        thread.start()

    def _handle(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)


@dataclass
class HealthServer:
    """/healthz and /metrics on a background thread (port 0 in settings: no server)."""

    settings: HealthSettings
    check: HealthCheck
    registry: CollectorRegistry = DEFAULT_REGISTRY
    _server: WSGIServer | None = field(default=None, init=False)

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/healthz":
            try:
                body = self.check()
            except Exception as exc:  # a failing check is itself a health answer
                body = {"status": "down", "error": repr(exc)}
            status = "200 OK" if body.get("status") == "ok" else "503 Service Unavailable"
            start_response(status, [("Content-Type", "application/json")])
            return [json.dumps(body).encode()]
        if path == "/metrics":
            return make_wsgi_app(self.registry)(environ, start_response)  # type: ignore[no-any-return]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found: try /healthz or /metrics\n"]

    @property
    def port(self) -> int:
        return self._server.server_port if self._server else 0

    def start(self) -> None:
        if not self.settings.port:
            return
        try:
            self._server = make_server(
                self.settings.host,
                self.settings.port,
                self._app,
                server_class=_ThreadingWSGIServer,
                handler_class=_QuietHandler,
            )
        except OSError as exc:
            raise ConfigError(
                f"cannot serve health on {self.settings.host}:{self.settings.port} ({exc.strerror}); "
                "change IOTFLEET_HEALTH__PORT"
            ) from None
        threading.Thread(target=self._server.serve_forever, name="health", daemon=True).start()

    def stop(self) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()


class ServiceLifecycle:
    """Lifecycle lines and a stop event set by SIGTERM/SIGINT."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.log = logging.getLogger(name)
        self.stop_requested = threading.Event()

    def install_signal_handlers(self) -> None:
        def request_stop(signum: int, _frame: object) -> None:
            if not self.stop_requested.is_set():
                self.log.info("stopping (signal %s)", signal.Signals(signum).name)
            self.stop_requested.set()

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)

    def starting(self, **details: object) -> None:
        self.log.info("starting %s", _fmt(details))

    def ready(self, **details: object) -> None:
        self.log.info("ready %s", _fmt(details))

    def degraded(self, reason: str) -> None:
        self.log.warning("degraded: %s", reason)

    def recovered(self, what: str) -> None:
        self.log.info("recovered: %s", what)

    def stopped(self, **details: object) -> None:
        self.log.info("stopped %s", _fmt(details))


def _fmt(details: dict[str, object]) -> str:
    return " ".join(f"{k}={v}" for k, v in details.items())


def process_alive(pid: int) -> bool:
    """Whether a process with this pid runs (a zombie child counts as dead; another user's as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False
