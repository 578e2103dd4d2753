"""How the registry is served: plain HTTP on its loopback address, plus HTTPS when asked.

One process, one app, two uvicorn servers on one event loop: the plain listener
(``IOTFLEET_REGISTRY__HOST``/``__PORT``, loopback by default) keeps serving the
platform's own clients, and the HTTPS listener (``IOTFLEET_REGISTRY__HTTPS_HOST`` /
``__HTTPS_PORT``, with ``__TLS_CERTFILE``/``__TLS_KEYFILE``) serves operators on the
network. The plain server owns the app's lifespan and the signals; the HTTPS
server starts once the lifespan is done (its requests need the app's state) and
stops with it. Its socket is bound before anything starts, so a taken port or an
unreadable certificate fails the start with the setting's name.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Generator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn

from iotfleet.errors import ConfigError
from iotfleet.settings import RegistrySettings

# A bulk request can run for minutes; a stop must not wait for it (its broker entries are
# undone, or deleted by the next reconcile).
GRACEFUL_SHUTDOWN_S = 10


@dataclass(frozen=True)
class HttpsListener:
    host: str
    port: int
    certfile: Path
    keyfile: Path

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.port}"


def https_listener(registry: RegistrySettings) -> HttpsListener | None:
    """The HTTPS listener the settings ask for (None: plain HTTP only); ConfigError naming a missing setting."""
    if registry.https_host is None:
        return None
    missing = [
        name
        for name, value in (
            ("IOTFLEET_REGISTRY__TLS_CERTFILE", registry.tls_certfile),
            ("IOTFLEET_REGISTRY__TLS_KEYFILE", registry.tls_keyfile),
        )
        if value is None
    ]
    if missing:
        raise ConfigError(f"IOTFLEET_REGISTRY__HTTPS_HOST is set: {' and '.join(missing)} must be set too")
    assert registry.tls_certfile is not None and registry.tls_keyfile is not None
    listener = HttpsListener(
        registry.https_host, registry.https_port, registry.tls_certfile, registry.tls_keyfile
    )
    _check_certificate(listener)
    return listener


def _check_certificate(listener: HttpsListener) -> None:
    # uvicorn loads the pair only when it starts serving; a bad pair found then would take the
    # whole registry down after its lifespan. Loaded once here instead, with the setting's name.
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
            listener.certfile, listener.keyfile
        )
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"IOTFLEET_REGISTRY__TLS_CERTFILE / __TLS_KEYFILE: cannot load {listener.certfile} with"
            f" {listener.keyfile}: {exc}"
        ) from None


class _Follower(uvicorn.Server):
    """The HTTPS server: no signal handling of its own (the plain server's stops it)."""

    @contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class _Leader(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, followers: list[uvicorn.Server]) -> None:
        super().__init__(config)
        self.followers = followers

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        for follower in self.followers:
            follower.should_exit = True
            follower.force_exit = self.force_exit


def _bind(listener: HttpsListener) -> socket.socket:
    family = socket.AF_INET6 if ":" in listener.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((listener.host, listener.port))
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"IOTFLEET_REGISTRY__HTTPS_HOST / __HTTPS_PORT: cannot listen on {listener.host}:{listener.port}: {exc}"
        ) from None
    sock.set_inheritable(True)
    return sock


def serve(app: Any, registry: RegistrySettings, https: HttpsListener | None) -> None:
    """Run the registry's listeners until SIGTERM/SIGINT."""
    common: dict[str, Any] = {"log_level": "warning", "timeout_graceful_shutdown": GRACEFUL_SHUTDOWN_S}
    if https is None:
        uvicorn.run(app, host=registry.host, port=registry.port, **common)
        return
    sock = _bind(https)
    secure = _Follower(
        uvicorn.Config(
            app,
            lifespan="off",  # the plain server runs the app's lifespan, once
            ssl_certfile=str(https.certfile),
            ssl_keyfile=str(https.keyfile),
            **common,
        )
    )
    plain = _Leader(uvicorn.Config(app, host=registry.host, port=registry.port, **common), [secure])
    asyncio.run(_serve_both(plain, secure, sock))


async def _serve_both(plain: uvicorn.Server, secure: uvicorn.Server, sock: socket.socket) -> None:
    leader = asyncio.create_task(plain.serve())
    while not plain.started:  # the lifespan (migrations, broker links) first
        if leader.done():
            sock.close()
            await leader  # its error, or a clean stop before it started
            return
        await asyncio.sleep(0.05)
    follower = asyncio.create_task(secure.serve(sockets=[sock]))
    await leader
    secure.should_exit = True
    await follower
