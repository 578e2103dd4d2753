"""A device as its own process, for tests that kill -9, SIGSTOP or cut it off the network.

``python -m tests.presence_device HOST PORT CLIENT_ID PASSWORD KEEPALIVE [STATUS_TOPIC]``:
connects (MQTT 5, username = client id, will "offline" on STATUS_TOPIC if given),
prints ``connected`` once the broker accepted it, then only keeps the connection
alive (it never publishes) until it is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from iotfleet import mqtt_client


def main(argv: list[str]) -> int:
    host, port, client_id, password, keepalive = argv[:5]
    status_topic = argv[5] if len(argv) > 5 else None
    accepted = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    client.username_pw_set(client_id, password)
    if status_topic:
        client.will_set(status_topic, b"offline", qos=1, retain=True)
    client.on_connect = lambda _c, _u, _f, reason, _p: accepted.set() if not reason.is_failure else None
    client.connect(host, int(port), keepalive=int(keepalive))
    client.loop_start()
    if not accepted.wait(10):
        print("refused", flush=True)
        return 1
    print("connected", flush=True)
    threading.Event().wait()  # until killed
    return 0


async def raw_connect(
    host: str, port: int, client_id: str, username: str, password: str, *, keepalive_s: int = 60
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """One bare MQTT 5 connection (no thread, no reconnect): thousands fit in a test's event loop."""
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(
        mqtt_client.connect_packet(
            client_id,
            username=username,
            password=password,
            keepalive_s=keepalive_s,
            session_expiry_s=0,
            receive_maximum=10,
        )
    )
    header = await reader.readexactly(2)
    body = await reader.readexactly(header[1])  # a CONNACK without properties is < 128 bytes
    if header[0] != 0x20 or body[1] != 0:
        writer.close()
        raise ConnectionError(f"CONNACK {body[1:2].hex()} for {client_id}")
    return reader, writer


async def raw_disconnect(writer: asyncio.StreamWriter, *, clean: bool) -> None:
    """Clean: DISCONNECT then close. Unclean: close the socket only (the broker sends the will)."""
    if clean:
        writer.write(mqtt_client.disconnect_packet())
        await writer.drain()
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


REPO = Path(__file__).resolve().parents[1]


@contextmanager
def device_process(
    argv_prefix: list[str], host: str, port: int, device_id: str, password: str, *, keepalive: int
) -> Iterator[subprocess.Popen[str]]:
    """A device in its own process; always killed (SIGKILL, after SIGCONT if it was stopped)."""
    proc = subprocess.Popen(
        [*argv_prefix, sys.executable, "-m", "tests.presence_device", host, str(port), device_id, password,
         str(keepalive)],
        cwd=REPO, stdout=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line == "connected", f"device process said {line!r}"
        yield proc
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
        proc.wait(timeout=10)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
