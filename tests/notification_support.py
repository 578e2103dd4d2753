"""Notification test support: a real HTTP webhook receiver and a real SMTP sink, on free loopback ports.

The receiver does what the README asks of a receiver: it verifies the HMAC-SHA256
signature over the exact body bytes and deduplicates on the delivery id. It can be
taken down (its port closed: connection refused) and brought back on the same port,
answer a status other than 200 for chosen deliveries, and hold each request for a
while (so a registry can be killed while requests are in flight).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from aiosmtpd.controller import Controller

from iotfleet.stack import probes


@dataclass
class Received:
    delivery_id: str
    event: str
    attempt: int
    signature_ok: bool
    body: dict[str, Any]
    at: float


@dataclass
class WebhookReceiver:
    secret: str = ""
    port: int = field(default_factory=probes.free_port)
    hold_s: float = 0.0
    fail_first: dict[str, int] = field(default_factory=dict)
    """Per event name: answer 500 to the first attempt of each delivery of that event."""
    requests: list[Received] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/iotfleet"

    def start(self) -> WebhookReceiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                raw = self.rfile.read(length)
                expected = "sha256=" + hmac.new(receiver.secret.encode(), raw, hashlib.sha256).hexdigest()
                signature = self.headers.get("X-Iotfleet-Signature-256", "")
                body = json.loads(raw)
                item = Received(
                    delivery_id=self.headers.get("X-Iotfleet-Delivery", ""),
                    event=body.get("event", ""),
                    attempt=int(self.headers.get("X-Iotfleet-Attempt", "0")),
                    signature_ok=hmac.compare_digest(expected, signature),
                    body=body,
                    at=time.monotonic(),
                )
                if receiver.hold_s:
                    time.sleep(receiver.hold_s)
                code = 200
                if item.attempt == 1 and receiver.fail_first.get(item.event):
                    code = receiver.fail_first[item.event]
                with receiver._lock:
                    receiver.requests.append(item)
                try:
                    self.send_response(code)
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"ok")
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the registry was killed while this request was in flight (the test does that)

            def log_message(self, *_args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="webhook-receiver", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def snapshot(self) -> list[Received]:
        with self._lock:
            return list(self.requests)

    def delivered(self) -> dict[str, Received]:
        """What a deduplicating receiver keeps: the first accepted (2xx) request per delivery id."""
        kept: dict[str, Received] = {}
        for item in self.snapshot():
            failed_first = item.attempt == 1 and self.fail_first.get(item.event)
            if not failed_first and item.delivery_id not in kept:
                kept[item.delivery_id] = item
        return kept

    def duplicates(self) -> int:
        counts = Counter(
            i.delivery_id for i in self.snapshot() if not (i.attempt == 1 and self.fail_first.get(i.event))
        )
        return sum(n - 1 for n in counts.values())


class _Collect:
    def __init__(self, sink: SmtpSink) -> None:
        self.sink = sink

    async def handle_DATA(self, _server: Any, _session: Any, envelope: Any) -> str:
        with self.sink.lock:
            self.sink.messages.append(message_from_bytes(envelope.content))
        return "250 OK"


class SmtpSink:
    """aiosmtpd on a free loopback port, keeping every message it is sent."""

    def __init__(self) -> None:
        self.port = probes.free_port()
        self.messages: list[Message] = []
        self.lock = threading.Lock()
        self.controller = Controller(_Collect(self), hostname="127.0.0.1", port=self.port)

    def start(self) -> SmtpSink:
        self.controller.start()
        return self

    def stop(self) -> None:
        self.controller.stop()

    def snapshot(self) -> list[Message]:
        with self.lock:
            return list(self.messages)
