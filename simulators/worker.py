"""One fleet process: runs a slice of the devices and reports to the parent over a pipe.

``--processes N`` starts N of these (multiprocessing, spawn) so a fleet uses
more cores; the parent keeps the observer, the progress display, the
verification and the report. Messages on the pipe are small tuples:
``("stats", snapshot)`` every half second, then ``("done", snapshot, outcomes,
command_latencies)`` or ``("error", text)``.
"""

from __future__ import annotations

import asyncio
import resource
import signal
from multiprocessing.connection import Connection
from typing import Any

import psutil

from simulators.faults import FaultSpec
from simulators.fleet import DeviceCredentials, Fleet, FleetConfig


def raise_fd_limit(wanted: int) -> int:
    """Raise the open-files limit toward ``wanted``; return the new soft limit.

    One socket per device: a 50,000-device process needs 50,000 fds. The soft
    limit goes up to the hard limit; the hard limit too where the process may
    (root / CAP_SYS_RESOURCE, up to fs.nr_open). What is left short shows up as
    "Too many open files" connect failures in the report.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and wanted > hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            return wanted
        except (ValueError, OSError):  # not privileged, or above fs.nr_open: the hard limit it is
            pass
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft


def config_to_dict(config: FleetConfig) -> dict[str, Any]:
    out = dict(config.__dict__)
    out["faults"] = [f.model_dump() for f in config.faults]
    return out


def config_from_dict(data: dict[str, Any]) -> FleetConfig:
    data = dict(data)
    data["faults"] = [FaultSpec.model_validate(f) for f in data["faults"]]
    return FleetConfig(**data)


def worker_main(
    conn: Connection, devices: list[dict[str, Any]], config: dict[str, Any], duration: float
) -> None:
    # Ctrl-C reaches the whole process group: the parent decides and sends "stop" down the pipe.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise_fd_limit(len(devices) + 256)
    try:
        asyncio.run(_run(conn, devices, config, duration))
    except Exception as exc:  # reported to the parent, which shows it
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


async def _run(
    conn: Connection, devices: list[dict[str, Any]], config: dict[str, Any], duration: float
) -> None:
    fleet = Fleet([DeviceCredentials(**d) for d in devices], config_from_dict(config))
    process = psutil.Process()

    def report() -> None:
        snapshot = fleet.stats.snapshot()
        snapshot["rss_bytes"] = process.memory_info().rss
        conn.send(("stats", snapshot))

    def on_command() -> None:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the parent is gone: stop rather than run headless
            message = ("stop",)
        if message[0] == "stop":
            asyncio.get_running_loop().remove_reader(conn.fileno())
            fleet.request_stop()

    asyncio.get_running_loop().add_reader(conn.fileno(), on_command)
    await fleet.run(duration, on_tick=report)
    snapshot = fleet.stats.snapshot()
    snapshot["rss_bytes"] = process.memory_info().rss
    conn.send(("done", snapshot, fleet.outcomes(), fleet.stats.command_latency_ms))
