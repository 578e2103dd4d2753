"""A partitioned engine while its PostgreSQL is stopped and started again (docs/rules.md,
"PostgreSQL down"): the transition whose write could not be stored is neither published
unstored nor lost; it fires, once, when the database is back."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from iotfleet import topics
from iotfleet.stack import probes
from rules_engine import wire
from tests.devices import provision
from tests.harness import Broker
from tests.registry_harness import PG_BIN, Postgres
from tests.rules_support import Listener, SimThermostat, engine_settings, start_engine, wait, write_rules

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RULE = {
    "name": "overheat-db",
    "when": {"field": "temperature_c", "op": ">", "value": 30},
    "clear_when": {"field": "temperature_c", "op": "<", "value": 26},
    "then": [{"alert": {"severity": "major", "message": "overheating"}}],
}


class StoppablePostgres(Postgres):
    """The harness's cluster, stopped and started again on the same data directory."""

    def pause(self) -> None:
        # "fast", not "immediate": the harness runs with synchronous_commit=off, so an immediate
        # stop would lose the last commits (a production database keeps them: synchronous_commit
        # on), and the test would see a re-fire caused by the harness, not the engine.
        self._as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def resume(self) -> None:
        options = (
            f"-p {self.port} -k {self.sockets} -c listen_addresses=127.0.0.1"
            " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        self._as_postgres(
            str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-o", options,
            "-l", str(self.root / "pg.log"), "-w", "start",
        )  # fmt: skip


def test_a_transition_written_while_the_database_is_down_fires_once_when_it_is_back(
    broker: Broker, tmp_path: Path, uid: Callable[[str], str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "rules-engine")  # the lifecycle lines, if it fails
    pg = StoppablePostgres(Path(tempfile.mkdtemp(prefix="iotfleet-pg-")), probes.free_port()).start()
    device_id = uid("db")
    passwords = provision(broker, [("thermostat", device_id)])
    device = SimThermostat(broker, device_id, passwords[device_id]).connect()
    listener = Listener(broker, topics.ALERT_EVENTS)
    rules = write_rules(
        tmp_path / "rules.json", [{**RULE, "scope": {"device_type": "thermostat", "device_ids": [device_id]}}]
    )
    settings = engine_settings(
        broker,
        tmp_path / "state",
        rules_file=rules,
        partitions=2,
        shared_store_url=pg.create_database(),
        lease_ttl_s=1.0,
        handover_buffer_s=60,
        replica="solo",
        device_types=["thermostat"],
    )
    engine = start_engine(settings)
    owner = engine.partitions
    assert owner is not None

    def held() -> int:
        return engine.call(lambda: len(owner.owned))

    def events(kind: str) -> list[int]:
        return [e["at"] for e in listener.events(topics.ALERT_EVENTS, kind) if e["device_id"] == device_id]

    try:
        wait(lambda: held() == 2, "both partitions held", timeout=15)
        base = wire.now_ms() - 10_000
        device.publish(35.0, ts=base)
        wait(lambda: events("raised") == [base], "the first firing")

        pg.pause()
        device.publish(20.0, ts=base + 10)  # a clear whose write cannot be stored
        wait(lambda: held() == 0, "partitions given up past the TTL", timeout=15)
        device.publish(35.0, ts=base + 20)  # while nobody owns the partition: buffered only
        assert events("cleared") == []  # nothing published without its state stored

        pg.resume()
        wait(lambda: held() == 2, "partitions taken back", timeout=30)
        wait(lambda: events("raised") == [base, base + 20], "the firing after the clear", timeout=15)
        assert events("cleared") == [base + 10]
        raised_ids = {e["id"] for e in listener.events(topics.ALERT_EVENTS, "raised")}
        assert len(raised_ids) == 2
    finally:
        engine.stop()
        device.disconnect()
        listener.close()
        pg.stop()
