"""A whole simulator run: credentials, observer, fleet process(es), live progress, verify, report."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import multiprocessing
import random
import signal
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import orjson
import psutil
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from iotfleet.settings import Settings
from simulators import provisioning
from simulators import verify as verifying
from simulators.fleet import DeviceCredentials, Fleet, FleetConfig, Stats
from simulators.observer import Observer, ObserverCredentials, command_load
from simulators.scenario import Scenario
from simulators.worker import config_to_dict, raise_fd_limit, worker_main


@dataclass
class RunPlan:
    scenario: Scenario
    devices: list[DeviceCredentials]
    mqtt_host: str
    mqtt_port: int
    settings: Settings
    observer: ObserverCredentials | None = None
    observer_note: str = ""
    api_url: str | None = None
    api_key: str | None = None
    verify_source: str = "auto"
    verify_timeout_s: float = 60.0
    report_path: Path | None = None
    live: bool = True
    credentials_note: str = ""
    credentials_path: Path | None = None  # where each device's next seq is recorded after the run
    source_addresses: list[str] = field(default_factory=list)  # see simulators/addresses.py
    per_source: int = 20_000
    stats_path: Path | None = None  # one JSON line of fleet-wide counters per second (for benchmarks)
    tls_cafile: Path | None = None  # MQTT over TLS, the broker's certificate checked against this CA
    tls_server_hostname: str | None = None

    def fleet_config(self) -> FleetConfig:
        s = self.scenario
        return FleetConfig(
            host=self.mqtt_host,
            port=self.mqtt_port,
            tls_cafile=str(self.tls_cafile) if self.tls_cafile is not None else None,
            tls_server_hostname=self.tls_server_hostname,
            interval_s=s.interval,
            jitter=s.jitter,
            batch=s.batch,
            qos=s.qos,
            # Each process ramps its own slice: split the rate so the total is as asked.
            ramp_up_per_s=s.ramp_up / s.process_count(),
            keepalive_s=s.keepalive,
            backoff_base_s=s.backoff_base,
            backoff_cap_s=s.backoff_cap,
            resend_unrouted=s.resend_unrouted,
            source_addresses=list(self.source_addresses),
            per_source=self.per_source,
            offline_buffer=s.offline_buffer,
            faults=list(s.faults),
            seed=s.seed,
            max_future_s=self.settings.ingest.max_future_s,
            max_past_s=self.settings.ingest.max_past_s,
        )


def percentiles(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"n": 0, "p50": None, "p95": None, "p99": None, "max": None}
    ordered = sorted(values)
    if len(ordered) == 1:
        p50 = p95 = p99 = ordered[0]
    else:
        cuts = statistics.quantiles(ordered, n=100, method="inclusive")
        p50, p95, p99 = cuts[49], cuts[94], cuts[98]
    return {
        "n": len(ordered),
        "p50": round(p50, 1),
        "p95": round(p95, 1),
        "p99": round(p99, 1),
        "max": round(ordered[-1], 1),
    }


@dataclass
class Progress:
    """What the live display shows; fed by the local fleet or by the workers' snapshots."""

    total: int
    duration_s: float
    started: float = field(default_factory=time.monotonic)
    snapshots: dict[int, dict[str, Any]] = field(default_factory=dict)
    last_published: int = 0
    last_at: float = field(default_factory=time.monotonic)
    rate: float = 0.0
    peak_rate: float = 0.0
    errors: list[str] = field(default_factory=list)
    all_connected_s: float | None = None  # seconds from the start until every device was connected

    def phase(self) -> str:
        return "running" if self.all_connected_s is not None else "connecting"

    def merged(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for snap in self.snapshots.values():
            for key, value in snap.items():
                if isinstance(value, int):
                    out[key] = out.get(key, 0) + value
                elif isinstance(value, dict):
                    bucket = out.setdefault(key, {})
                    for k, v in value.items():
                        bucket[k] = bucket.get(k, 0) + v
        return out

    def update_rate(self) -> None:
        now = time.monotonic()
        merged = self.merged()
        published = merged.get("readings_published", 0)
        if self.all_connected_s is None and merged.get("connected", 0) >= self.total:
            self.all_connected_s = now - self.started
        if now - self.last_at >= 1.0:
            self.rate = (published - self.last_published) / (now - self.last_at)
            self.peak_rate = max(self.peak_rate, self.rate)
            self.last_published, self.last_at = published, now


def _progress_rows(progress: Progress, observer: Observer | None) -> list[tuple[str, str]]:
    m = progress.merged()
    elapsed = time.monotonic() - progress.started
    errors = m.get("connect_failures", 0)
    rows = [
        ("elapsed", f"{elapsed:,.0f} s / {progress.duration_s:,.0f} s"),
        (
            "connected",
            f"{m.get('connected', 0):,} / {progress.total:,}"
            + (
                f" (all after {progress.all_connected_s:,.1f} s)"
                if progress.all_connected_s is not None
                else ""
            ),
        ),
        ("publish rate", f"{progress.rate:,.0f} readings/s (peak {progress.peak_rate:,.0f})"),
        (
            "readings",
            f"{m.get('readings_published', 0):,} published, {m.get('readings_acked', 0):,} broker-acked,"
            f" {m.get('readings_refused', 0):,} refused",
        ),
        (
            "connections",
            f"{m.get('connects', 0):,} connects, {m.get('reconnects', 0):,} reconnects, {errors:,} failures",
        ),
        (
            "commands",
            f"{m.get('commands_received', 0):,} received, {m.get('acks_sent', 0):,} acked,"
            f" {m.get('commands_ignored', 0):,} ignored",
        ),
    ]
    if observer is not None:
        o = observer.stats
        rows.append(("platform", f"{o.dead_letters:,} dead letters, {o.status_offline:,} offline events"))
    rss = m.get("rss_bytes", 0)
    if rss:
        per_device = rss / max(1, progress.total) / 1024
        rows.append(("memory", f"{rss / 2**20:,.0f} MiB RSS ({per_device:.1f} KiB/device)"))
    rows.extend(("error", error) for error in progress.errors[-3:])
    return rows


def _progress_table(rows: list[tuple[str, str]], phase: str) -> Table:
    table = Table(title=f"iotfleet simulate — {phase}", show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    for label, text in rows:
        table.add_row(f"[red]{label}[/]" if label == "error" else label, text)
    return table


class _LiveOrLog:
    """rich Live on a terminal; a log line every few seconds otherwise (CI logs, pipes)."""

    def __init__(self, console: Console, rows: Callable[[], list[tuple[str, str]]], enabled: bool) -> None:
        self.console = console
        self.rows = rows
        self.phase = "starting"
        self.live: Live | None = None
        self.enabled = enabled
        self.last_line = 0.0

    def __enter__(self) -> _LiveOrLog:
        if self.enabled and self.console.is_terminal:
            self.live = Live(
                _progress_table(self.rows(), self.phase), console=self.console, refresh_per_second=4
            )
            self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.update(_progress_table(self.rows(), self.phase))
            self.live.__exit__(None, None, None)

    def refresh(self, phase: str | None = None) -> None:
        if phase:
            self.phase = phase
        if self.live is not None:
            self.live.update(_progress_table(self.rows(), self.phase))
        elif self.enabled and time.monotonic() - self.last_line >= 5.0:
            self.last_line = time.monotonic()
            line = " | ".join(f"{label}: {text}" for label, text in self.rows()[:6])
            self.console.print(f"[{self.phase}] {line}", markup=False, highlight=False)


def _on_interrupt(display: _LiveOrLog, stop: Callable[[], None]) -> None:
    """First Ctrl-C: stop the fleet cleanly and still report; a second one aborts."""
    loop = asyncio.get_running_loop()

    def handler() -> None:
        display.phase = "stopping (Ctrl-C again aborts)"
        loop.remove_signal_handler(signal.SIGINT)
        stop()

    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        loop.add_signal_handler(signal.SIGINT, handler)


async def _run_local(
    plan: RunPlan, progress: Progress, display: _LiveOrLog
) -> tuple[dict[str, Any], list[dict[str, Any]], list[float]]:
    raise_fd_limit(len(plan.devices) + 256)
    fleet = Fleet(plan.devices, plan.fleet_config())
    process = psutil.Process()
    _on_interrupt(display, fleet.request_stop)

    def tick() -> None:
        snapshot = fleet.stats.snapshot()
        snapshot["rss_bytes"] = process.memory_info().rss
        progress.snapshots[0] = snapshot
        progress.update_rate()
        display.refresh("stopping" if fleet.stopping else progress.phase())

    await fleet.run(plan.scenario.duration, on_tick=tick)
    tick()
    return progress.snapshots[0], fleet.outcomes(), fleet.stats.command_latency_ms


async def _run_workers(
    plan: RunPlan, progress: Progress, display: _LiveOrLog
) -> tuple[dict[str, Any], list[dict[str, Any]], list[float]]:
    n = plan.scenario.process_count()
    slices = [plan.devices[i::n] for i in range(n)]
    context = multiprocessing.get_context("spawn")  # no inherited event loop or sockets
    loop = asyncio.get_running_loop()
    base_config = plan.fleet_config()
    done: dict[int, asyncio.Future[tuple[Any, ...]]] = {}
    pipes: list[Connection] = []
    processes = []
    for index, devices in enumerate(slices):
        if not devices:
            continue
        parent_end, child_end = context.Pipe(duplex=True)  # stats up, "stop" down
        # Worker i holds devices i, i+n, i+2n, …: it knows their fleet-wide index (source address).
        config = config_to_dict(dataclasses.replace(base_config, index_offset=index, index_stride=n))
        proc = context.Process(
            target=worker_main,
            args=(child_end, [d.as_dict() for d in devices], config, plan.scenario.duration),
            name=f"iotfleet-sim-{index}",
            daemon=True,
        )
        proc.start()
        child_end.close()
        processes.append(proc)
        pipes.append(parent_end)
        future: asyncio.Future[tuple[Any, ...]] = loop.create_future()
        done[index] = future

        def on_readable(index: int = index, pipe: Connection = parent_end) -> None:
            try:
                message = pipe.recv()
            except (EOFError, OSError):
                loop.remove_reader(pipe.fileno())
                if not done[index].done():
                    done[index].set_exception(RuntimeError(f"fleet process {index} exited without a report"))
                return
            if message[0] == "stats":
                progress.snapshots[index] = message[1]
                progress.update_rate()
                display.refresh(progress.phase())
            elif message[0] == "done":
                progress.snapshots[index] = message[1]
                loop.remove_reader(pipe.fileno())
                done[index].set_result(message)
            elif message[0] == "error":
                progress.errors.append(f"process {index}: {message[1]}")
                loop.remove_reader(pipe.fileno())
                done[index].set_exception(RuntimeError(f"fleet process {index}: {message[1]}"))

        loop.add_reader(parent_end.fileno(), on_readable)

    def stop_workers() -> None:
        for pipe in pipes:
            with contextlib.suppress(OSError):
                pipe.send(("stop",))

    _on_interrupt(display, stop_workers)
    try:
        results = await asyncio.gather(*done.values())
    finally:
        for pipe in pipes:
            with contextlib.suppress(Exception):
                loop.remove_reader(pipe.fileno())
            pipe.close()
        for proc in processes:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
    outcomes: list[dict[str, Any]] = []
    latencies: list[float] = []
    for message in results:
        outcomes.extend(message[2])
        latencies.extend(message[3])
    return progress.merged(), outcomes, latencies


async def run_plan(plan: RunPlan, console: Console) -> dict[str, Any]:
    """Run the fleet; return the report (also written to ``plan.report_path``)."""
    scenario = plan.scenario
    started_wall = time.time()
    observer: Observer | None = None
    observer_note = plan.observer_note
    if plan.observer is not None:
        observer = Observer(plan.observer, {d.id: d.type for d in plan.devices})
        try:
            await observer.start()
        except RuntimeError as exc:
            observer_note = f"observer unavailable: {exc}"
            observer = None
    progress = Progress(total=len(plan.devices), duration_s=scenario.duration)
    display = _LiveOrLog(console, lambda: _progress_rows(progress, observer), plan.live)
    stop_commands = asyncio.Event()
    commander: asyncio.Task[None] | None = None
    if observer is not None and scenario.commands.rate_per_s > 0:
        commander = asyncio.create_task(
            command_load(observer, scenario.commands.rate_per_s, stop_commands, random.Random(scenario.seed))
        )
        # No new commands once the fleet starts stopping: they would arrive at departing devices.
        asyncio.get_running_loop().call_later(max(0.0, scenario.duration - 0.5), stop_commands.set)
    stats_writer = (
        asyncio.create_task(_write_stats(plan.stats_path, progress, display))
        if plan.stats_path is not None
        else None
    )
    with display:
        try:
            if scenario.process_count() > 1:
                fleet_stats, outcomes, latencies = await _run_workers(plan, progress, display)
            else:
                fleet_stats, outcomes, latencies = await _run_local(plan, progress, display)
        finally:
            stop_commands.set()
            if commander is not None:
                await commander
        ended_wall = time.time()
        if plan.credentials_path is not None:
            provisioning.record_next_seqs(plan.credentials_path, outcomes)
        # Dead letters trail the readings by the ingest's batch age: wait for the expected ones,
        # but not long when none come at all (no ingest running) or they stop coming.
        if observer is not None:
            expected_rejects = sum(len(o["rejected"]) for o in outcomes)
            await _settle(
                lambda: observer.stats.dead_letters,
                expected_rejects,
                lambda: display.refresh("waiting for dead letters"),
            )
            # The devices' final retained "offline" is still on its way to the observer.
            expected_offline = fleet_stats.get("offline_published", 0) + fleet_stats.get(
                "disconnects_injected", 0
            )
            await _settle(
                lambda: observer.stats.status_offline,
                expected_offline,
                lambda: display.refresh("waiting for status"),
                quiet_s=2.0,
            )
        verify_result: verifying.VerifyResult | None = None
        verify_error: str | None = None
        if scenario.verify:
            display.refresh("verifying")
            try:
                source = await verifying.pick_source(
                    plan.verify_source,
                    plan.settings.influx,
                    plan.api_url,
                    plan.api_key,
                    outcomes[0] if outcomes else {"id": "none"},
                    devices=len(outcomes),
                )
                verify_result = await verifying.verify(
                    source,
                    outcomes,
                    start_ms=int(started_wall * 1000),
                    end_ms=int(time.time() * 1000),
                    settle_timeout_s=plan.verify_timeout_s,
                    on_progress=display.refresh,
                )
            except verifying.VerifyError as exc:
                verify_error = str(exc)
        display.refresh("done")
    if stats_writer is not None:
        stats_writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await stats_writer
        _append_stats(plan.stats_path, progress, "done")
    if observer is not None:
        await observer.stop()
    report = build_report(
        plan,
        fleet=fleet_stats,
        outcomes=outcomes,
        latencies=latencies,
        observer=observer,
        observer_note=observer_note,
        progress=progress,
        started_wall=started_wall,
        ended_wall=ended_wall,
    )
    if verify_result is not None:
        report["verify"] = verify_result.as_dict()
    elif verify_error is not None:
        report["verify"] = {"ok": False, "error": verify_error}
    if plan.report_path is not None:
        plan.report_path.parent.mkdir(parents=True, exist_ok=True)
        plan.report_path.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    return report


def _append_stats(path: Path | None, progress: Progress, phase: str) -> None:
    if path is None:
        return
    line = {"t": round(time.time(), 3), "phase": phase, "devices": progress.total, **progress.merged()}
    with path.open("ab") as handle:
        handle.write(orjson.dumps(line) + b"\n")


async def _write_stats(path: Path, progress: Progress, display: _LiveOrLog) -> None:
    """One JSON line of fleet-wide counters per second: what a benchmark driving the fleet watches."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")  # noqa: ASYNC240
    while True:
        _append_stats(path, progress, display.phase)
        await asyncio.sleep(1.0)


async def _settle(
    count: Callable[[], int], target: int, tick: Callable[[], None], quiet_s: float = 3.0
) -> None:
    """Wait until ``count()`` reaches ``target`` or has not moved for ``quiet_s`` (at most 15 s)."""
    started = last_change = time.monotonic()
    last = count()
    while count() < target and time.monotonic() - started < 15.0:
        tick()
        await asyncio.sleep(0.2)
        if count() != last:
            last, last_change = count(), time.monotonic()
        elif time.monotonic() - last_change > quiet_s:
            return


def build_report(
    plan: RunPlan,
    *,
    fleet: dict[str, Any],
    outcomes: list[dict[str, Any]],
    latencies: list[float],
    observer: Observer | None,
    observer_note: str,
    progress: Progress,
    started_wall: float,
    ended_wall: float,
) -> dict[str, Any]:
    scenario = plan.scenario
    duration = max(1e-9, ended_wall - started_wall)
    by_type: dict[str, int] = {}
    for device in plan.devices:
        by_type[device.type] = by_type.get(device.type, 0) + 1
    faulty = [o for o in outcomes if o["faults"]]
    rss = fleet.get("rss_bytes", 0)
    report: dict[str, Any] = {
        "scenario": scenario.name,
        "started_at": datetime.fromtimestamp(started_wall, UTC).isoformat(),
        "duration_s": round(duration, 1),
        "devices": len(plan.devices),
        "devices_by_type": by_type,
        "processes": scenario.process_count(),
        "settings": {
            "interval_s": scenario.interval,
            "jitter": scenario.jitter,
            "batch": scenario.batch,
            "qos": scenario.qos,
            "ramp_up_per_s": scenario.ramp_up,
            "broker": f"{plan.mqtt_host}:{plan.mqtt_port}",
            "tls": plan.tls_cafile is not None,
            "credentials": plan.credentials_note,
        },
        "published": {
            "readings": fleet.get("readings_published", 0),
            "messages": fleet.get("messages_published", 0),
            "broker_acked": fleet.get("readings_acked", 0),
            "refused_by_broker": fleet.get("readings_refused", 0),
            "resent_after_reconnect": fleet.get("readings_resent", 0),
            "unrouted_puback_0x10": fleet.get("readings_unrouted", 0),
            "unrouted_resent": fleet.get("readings_unrouted_resent", 0),
            "unrouted_given_up": fleet.get("readings_unrouted_given_up", 0),
            "dropped_offline_buffer_full": fleet.get("readings_dropped", 0),
            "rate_per_s": round(fleet.get("readings_published", 0) / duration, 1),
            "peak_rate_per_s": round(progress.peak_rate, 1),
            "bytes": fleet.get("bytes_sent", 0),
        },
        "connections": {
            "connects": fleet.get("connects", 0),
            "reconnects": fleet.get("reconnects", 0),
            "connect_failures": fleet.get("connect_failures", 0),
            "connect_errors": fleet.get("connect_errors", {}),
            "connects_by_source_address": fleet.get("connects_by_source", {}),
            "source_addresses": plan.source_addresses or "chosen by the OS",
            "backoff": {"base_s": scenario.backoff_base, "cap_s": scenario.backoff_cap, "jitter": "full"},
            "disconnects": fleet.get("disconnects", 0),
            "offline_published_at_end": fleet.get("offline_published", 0),
            "all_connected_after_s": (
                round(progress.all_connected_s, 1) if progress.all_connected_s is not None else None
            ),
        },
        "faults": {
            "devices_with_faults": len(faulty),
            "readings_expected_rejected": sum(len(o["rejected"]) for o in outcomes),
            "malformed_sent": fleet.get("malformed_sent", 0),
            "out_of_range_sent": fleet.get("out_of_range_sent", 0),
            "skewed_sent": fleet.get("skewed_sent", 0),
            "spikes_sent": fleet.get("spikes_sent", 0),
            "stuck_sent": fleet.get("stuck_sent", 0),
            "duplicates_sent": fleet.get("duplicates_sent", 0),
            "out_of_order_sent": fleet.get("out_of_order_sent", 0),
            "disconnects_injected": fleet.get("disconnects_injected", 0),
            "storms_injected": fleet.get("storms_injected", 0),
        },
        "commands": {
            "received": fleet.get("commands_received", 0),
            "acked": fleet.get("acks_sent", 0),
            "ignored": fleet.get("commands_ignored", 0),
            "invalid": fleet.get("commands_invalid", 0),
            "ack_refused_by_broker": fleet.get("acks_refused", 0),
            "delivery_latency_ms": percentiles(latencies),
        },
        "resources": {
            "rss_bytes": rss,
            "rss_per_device_bytes": round(rss / max(1, len(plan.devices))),
        },
    }
    if observer is not None:
        o = observer.stats
        report["platform"] = {"observer": f"mqtt:{observer.creds.username}", **o.as_dict()}
        report["commands"]["sent_by_simulator"] = o.commands_sent
        report["commands"]["round_trip_ms"] = percentiles(o.rtt_ms)
    else:
        report["platform"] = {"observer": None, "note": observer_note or "no observer account"}
    return report


def render_report(report: dict[str, Any], console: Console) -> None:
    table = Table(title=f"simulator report — {report['scenario']}", show_lines=False)
    table.add_column("", style="bold")
    table.add_column("value", justify="right")
    pub = report["published"]
    con = report["connections"]
    cmd = report["commands"]
    table.add_row("devices", f"{report['devices']:,} in {report['processes']} process(es)")
    table.add_row("duration", f"{report['duration_s']:,} s")
    table.add_row("readings published", f"{pub['readings']:,} ({pub['messages']:,} messages)")
    table.add_row("broker-acked", f"{pub['broker_acked']:,}")
    table.add_row("refused by broker", f"{pub['refused_by_broker']:,}")
    table.add_row("publish rate", f"{pub['rate_per_s']:,} /s (peak {pub['peak_rate_per_s']:,} /s)")
    table.add_row("connects / reconnects", f"{con['connects']:,} / {con['reconnects']:,}")
    table.add_row("connect failures", f"{con['connect_failures']:,}")
    platform = report["platform"]
    if platform.get("observer"):
        table.add_row("rejected by platform", f"{platform['dead_letters']:,} dead letters")
        table.add_row("LWT/offline events", f"{platform['status_offline']:,}")
    else:
        table.add_row("rejected by platform", f"n/a ({platform.get('note')})")
    table.add_row("expected rejected (faults)", f"{report['faults']['readings_expected_rejected']:,}")
    table.add_row("commands received / acked", f"{cmd['received']:,} / {cmd['acked']:,}")
    rtt = cmd.get("round_trip_ms")
    if rtt and rtt["n"]:
        table.add_row("command round trip ms", f"p50 {rtt['p50']}  p95 {rtt['p95']}  p99 {rtt['p99']}")
    res = report["resources"]
    if res["rss_bytes"]:
        table.add_row(
            "RSS",
            f"{res['rss_bytes'] / 2**20:,.0f} MiB ({res['rss_per_device_bytes'] / 1024:.1f} KiB/device)",
        )
    verify = report.get("verify")
    if verify is not None:
        if "error" in verify:
            table.add_row("verify", f"[red]failed: {verify['error']}[/]")
        else:
            style = "green" if verify["ok"] else "red"
            table.add_row(
                "verify",
                f"[{style}]{verify['stored']:,}/{verify['expected']:,} stored, {verify['missing']:,} missing,"
                f" {verify['duplicates']:,} duplicate seq[/] ({verify['source']})",
            )
    console.print(Group(table))
    for reason, count in list(platform.get("dead_letter_reasons", {}).items())[:5]:
        console.print(f"  dead letter reason: {reason} × {count}")
    if verify and verify.get("samples"):
        for sample in verify["samples"][:5]:
            console.print(
                f"  [red]{sample['device']}[/]: missing {sample['missing'] or '-'}, duplicate {sample['duplicates'] or '-'}"
            )


def stats_fields() -> tuple[str, ...]:
    return Stats.FIELDS
