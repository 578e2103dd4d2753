"""TLS for simulated devices: a small memory-BIO bridge between a TCP connection and ``MqttConnection``.

Why not ``loop.create_connection(ssl=...)``: asyncio's SSL protocol (CPython 3.11+)
gives every connection its own 256 KiB read buffer (``SSLProtocol.max_size``),
2.5 GB for a 10,000-device process, where the whole plain connection costs a few
KB. This bridge keeps per connection only what TLS itself needs (OpenSSL's
``SSL`` object and two memory BIOs) and decrypts into short-lived chunks.

Contexts (the CA store, the client certificate) are built once per process and
shared: one for every password device; one per certificate device (Python's
``ssl`` sets a client certificate on a context, not on a connection), built on
its first connect and kept for its reconnects.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

READ_CHUNK = 16 * 1024  # one TLS record at most: decrypted chunks are short-lived, never kept


@dataclass(frozen=True)
class TlsOptions:
    """How the fleet's devices speak TLS (picklable: sent to each fleet process)."""

    cafile: str
    server_hostname: str | None = None  # default: the broker host (the server certificate's SANs have it)


class ClientContexts:
    """The SSL contexts of one process: one shared for password devices, one per certificate device."""

    def __init__(self, options: TlsOptions) -> None:
        self.options = options
        self._cadata = Path(options.cafile).read_text()
        self.shared = self._new()
        self._per_device: dict[str, ssl.SSLContext] = {}

    def _new(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the chain and the host name
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_verify_locations(cadata=self._cadata)
        return context

    def for_device(self, device_id: str, cert_file: str | None) -> ssl.SSLContext:
        if cert_file is None:
            return self.shared
        context = self._per_device.get(device_id)
        if context is None:
            context = self._new()
            context.load_cert_chain(cert_file)
            self._per_device[device_id] = context
        return context


class TlsBridge(asyncio.Protocol, asyncio.Transport):
    """The TCP connection's protocol and the MQTT connection's transport, TLS in between."""

    __slots__ = ("_done", "_error", "_incoming", "_inner", "_outgoing", "_ssl", "_tcp")

    def __init__(self, context: ssl.SSLContext, server_hostname: str, inner: asyncio.Protocol) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl: ssl.SSLObject = context.wrap_bio(
            self._incoming, self._outgoing, server_hostname=server_hostname
        )
        self._inner = inner
        self._tcp: asyncio.Transport | None = None
        self._done: asyncio.Future[None] | None = asyncio.get_running_loop().create_future()
        self._error: Exception | None = None  # why TLS failed: reported as the connection's end

    async def handshake(self) -> None:
        """Until the handshake is done (the inner protocol is then connected), or its error."""
        if self._done is not None:
            await asyncio.shield(self._done)

    # --- the TCP side (asyncio.Protocol) ------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._tcp = transport
        self._step_handshake()

    def data_received(self, data: bytes) -> None:
        self._incoming.write(data)
        if self._done is not None:
            self._step_handshake()
            if self._done is not None:
                return
        self._read_records()

    def _step_handshake(self) -> None:
        try:
            self._ssl.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except (ssl.SSLError, OSError) as exc:  # wrong CA, host name, refused certificate, …
            self._flush()
            self._fail(exc)
            return
        self._flush()
        done, self._done = self._done, None
        self._inner.connection_made(self)
        if done is not None and not done.done():
            done.set_result(None)

    def _read_records(self) -> None:
        inner = self._inner
        while True:
            try:
                chunk = self._ssl.read(READ_CHUNK)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:  # the broker's close_notify
                self._flush()
                self.close()
                return
            except (ssl.SSLError, OSError) as exc:  # e.g. an alert after a TLS 1.3 handshake: bad cert
                self._fail(exc)
                return
            if not chunk:
                break
            inner.data_received(chunk)
            if self._tcp is None:
                return
        self._flush()

    def _fail(self, exc: Exception) -> None:
        self._error = exc
        tcp = self._tcp
        if self._done is not None and not self._done.done():
            self._done.set_exception(exc)
        if tcp is not None:
            tcp.abort()

    def _flush(self) -> None:
        if self._outgoing.pending and self._tcp is not None:
            self._tcp.write(self._outgoing.read())

    def connection_lost(self, exc: Exception | None) -> None:
        self._tcp = None
        if self._done is not None:
            if not self._done.done():
                self._done.set_exception(
                    exc or ConnectionResetError("connection closed during the TLS handshake")
                )
            return
        self._inner.connection_lost(self._error or exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    # --- the MQTT side (asyncio.Transport) -----------------------------------------------
    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._tcp is None:
            return
        try:
            self._ssl.write(data)
        except (ssl.SSLError, OSError) as exc:
            self._fail(exc)
            return
        self._flush()

    def close(self) -> None:
        tcp = self._tcp
        if tcp is None:
            return
        try:
            self._ssl.unwrap()  # queues close_notify
        except (ssl.SSLError, OSError):
            pass
        self._flush()
        tcp.close()

    def abort(self) -> None:
        if self._tcp is not None:
            self._tcp.abort()

    def is_closing(self) -> bool:
        return self._tcp is None or self._tcp.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self._ssl
        return self._tcp.get_extra_info(name, default) if self._tcp is not None else default

    def get_write_buffer_size(self) -> int:
        return self._tcp.get_write_buffer_size() if self._tcp is not None else 0
