"""Hostile telemetry: the corpus, the services as real processes, a well-behaved device and its latency.

Used by tests/unit/test_admission.py (the corpus against the admission check alone),
tests/integration/test_hostile_telemetry.py (against the real broker, ingest and rules
engine) and bench/hostile.py (the flood).
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import psutil

from iotfleet import admission as a
from iotfleet.catalogue.base import MAX_TS_MS
from iotfleet.influx import quote_string
from iotfleet.stack import probes
from tests.harness import Broker, Influxd, env_for
from tests.ingest_support import IngestProcess, Publisher, telemetry, wait_for

DAY_MS = 86_400_000
ACCEPTED = ""  # expected "reason" of a hostile-looking payload that is valid JSON and a valid reading


@dataclass(frozen=True)
class Case:
    name: str
    payload: bytes
    reason: str  # the dead letter's reason, or ACCEPTED


def good_reading(now_ms: int, seq: int = 1, temperature: float = 21.5) -> dict[str, Any]:
    return {
        "ts": now_ms,
        "seq": seq,
        "temperature_c": temperature,
        "humidity_pct": 40.0,
        "setpoint_c": 21.0,
        "mode": "heat",
    }


def _with(now_ms: int, **changes: Any) -> bytes:
    body = {**good_reading(now_ms), **changes}
    # The stdlib encoder: it writes integers beyond 64 bits, which orjson refuses to.
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def _raw(now_ms: int, fields: str) -> bytes:
    """A reading written by hand (duplicate keys, tokens orjson would not write)."""
    return ('{"ts":' + str(now_ms) + ',"seq":1,' + fields + "}").encode()


REST = '"humidity_pct":40.0,"setpoint_c":21.0,"mode":"heat"'


def corpus(now_ms: int, max_payload_bytes: int = 256 * 1024) -> list[Case]:
    """Hostile thermostat payloads, each with the reason the admission check gives it."""
    good = good_reading(now_ms)
    valid = orjson.dumps(good)
    big_batch = orjson.dumps([good] * (max_payload_bytes // len(valid) + 10))
    cases = [
        # --- sizes ---------------------------------------------------------------------------
        Case(
            "one byte over the limit",
            b" " * (max_payload_bytes - len(valid) + 1) + valid,
            a.PAYLOAD_TOO_LARGE,
        ),
        Case("valid readings over the limit", big_batch, a.PAYLOAD_TOO_LARGE),
        Case(
            "500 KB of {} (between the ingest's and the broker's limits)",
            b"[" + b"{}," * 166_000 + b"{}]",
            a.PAYLOAD_TOO_LARGE,
        ),
        Case("262,141 bytes of [{},{},...]", b"[" + b"{}," * 87_379 + b"{}]", a.BATCH_TOO_LARGE),
        Case("1,001 valid readings", orjson.dumps([good] * 1_001), a.BATCH_TOO_LARGE),
        Case("80,000 empty arrays", b"[" + b"[]," * 79_999 + b"[]]", a.WRONG_SHAPE),
        Case("80,000 numbers", b"[" + b"1," * 79_999 + b"1]", a.WRONG_SHAPE),
        Case("empty payload", b"", a.NOT_JSON),
        Case("empty array", b"[]", a.EMPTY_BATCH),
        Case("empty object", b"{}", a.MISSING_FIELD),
        Case("null", b"null", a.WRONG_SHAPE),
        Case("true", b"true", a.WRONG_SHAPE),
        Case("a string", b'"reading"', a.WRONG_SHAPE),
        Case("a number", b"42", a.WRONG_SHAPE),
        Case("whitespace only", b" \n\t ", a.NOT_JSON),
        # --- depth ---------------------------------------------------------------------------
        Case("100,000 nested arrays", b"[" * 100_000 + b"]" * 100_000, a.TOO_DEEP),
        Case("100,000 nested arrays, unclosed", b"[" * 100_000, a.TOO_DEEP),
        Case("50 nested objects", b'{"a":' * 50 + b"1" + b"}" * 50, a.TOO_DEEP),
        Case("9 nested arrays", b"[" * 9 + b"1" + b"]" * 9, a.TOO_DEEP),
        Case("nested value in a field", _with(now_ms, temperature_c={"v": [1, [2, [3]]]}), a.WRONG_TYPE),
        Case("array of arrays of readings", orjson.dumps([[good]]), a.WRONG_SHAPE),
        Case("brackets inside strings are not depth", _with(now_ms, mode="[" * 1000), a.INVALID_VALUE),
        # --- encodings -----------------------------------------------------------------------
        Case("invalid UTF-8", b"\xff\xfe" + valid, a.INVALID_UTF8),
        Case("UTF-16", valid.decode().encode("utf-16"), a.INVALID_UTF8),
        Case(
            "latin-1 value",
            _raw(now_ms, '"temperature_c":21.5,' + REST).replace(b"heat", b"h\xe9at"),
            a.INVALID_UTF8,
        ),
        Case("overlong UTF-8", valid.replace(b"heat", b"he\xc0\xafat"), a.INVALID_UTF8),
        Case("UTF-8 BOM", b"\xef\xbb\xbf" + valid, a.NOT_JSON),
        Case("NUL byte", valid[:-1] + b"\x00}", a.NOT_JSON),
        Case("truncated", valid[:-5], a.NOT_JSON),
        Case("trailing garbage", valid + b"xyz", a.NOT_JSON),
        Case("two objects", valid + valid, a.NOT_JSON),
        Case("a comment", b"/* hi */" + valid, a.NOT_JSON),
        Case("single quotes", valid.replace(b'"', b"'"), a.NOT_JSON),
        Case(
            "lone surrogate escape",
            _raw(now_ms, '"temperature_c":21.5,' + REST.replace("heat", "\\ud800")),
            a.NOT_JSON,
        ),
        # --- numbers -------------------------------------------------------------------------
        Case("NaN", _raw(now_ms, '"temperature_c":NaN,' + REST), a.OUT_OF_RANGE),
        Case("Infinity", _raw(now_ms, '"temperature_c":Infinity,' + REST), a.OUT_OF_RANGE),
        Case("-Infinity", _raw(now_ms, '"temperature_c":-Infinity,' + REST), a.OUT_OF_RANGE),
        Case("1e400", _raw(now_ms, '"temperature_c":1e400,' + REST), a.OUT_OF_RANGE),
        Case("huge int value", _raw(now_ms, '"temperature_c":' + "9" * 30 + "," + REST), a.OUT_OF_RANGE),
        Case("5,000-digit int", _raw(now_ms, '"temperature_c":' + "9" * 5_000 + "," + REST), a.OUT_OF_RANGE),
        Case("seq 2^64", _with(now_ms, seq=2**64), a.OUT_OF_RANGE),
        Case("seq -1", _with(now_ms, seq=-1), a.OUT_OF_RANGE),
        Case(
            "seq 1.0",
            _raw(now_ms, '"temperature_c":21.5,' + REST).replace(b'"seq":1', b'"seq":1.0'),
            a.WRONG_TYPE,
        ),
        Case("number as string", _with(now_ms, temperature_c="21.5"), a.WRONG_TYPE),
        Case("bool as number", _with(now_ms, temperature_c=True), a.WRONG_TYPE),
        Case("just over the range", _with(now_ms, humidity_pct=100.0000001), a.OUT_OF_RANGE),
        Case("-0", _raw(now_ms, '"temperature_c":-0,' + REST), ACCEPTED),
        Case(
            "-0.0 and 1e-400",
            _raw(now_ms, '"temperature_c":-0.0,' + REST).replace(b"40.0", b"1e-400"),
            ACCEPTED,
        ),
        # --- timestamps ----------------------------------------------------------------------
        Case("ts now + 1 day", _with(now_ms, ts=now_ms + DAY_MS), a.TS_IN_FUTURE),
        Case("ts year 2100", _with(now_ms, ts=MAX_TS_MS), a.TS_IN_FUTURE),
        Case("ts past 2100", _with(now_ms, ts=MAX_TS_MS + 1), a.OUT_OF_RANGE),
        Case("ts in seconds", _with(now_ms, ts=now_ms // 1000), a.OUT_OF_RANGE),
        Case("ts in microseconds", _with(now_ms, ts=now_ms * 1000), a.OUT_OF_RANGE),
        Case("ts negative", _with(now_ms, ts=-1), a.OUT_OF_RANGE),
        Case("ts 40 days ago", _with(now_ms, ts=now_ms - 40 * DAY_MS), a.TS_TOO_OLD),
        Case("ts RFC 3339 without offset", _with(now_ms, ts="2026-01-01T00:00:00"), a.INVALID_VALUE),
        Case("ts words", _with(now_ms, ts="yesterday"), a.INVALID_VALUE),
        Case("ts RFC 3339 in 2099", _with(now_ms, ts="2099-01-01T00:00:00Z"), a.TS_IN_FUTURE),
        Case("ts float", _with(now_ms, ts=float(now_ms)), a.WRONG_TYPE),
        Case(
            "one future reading in a batch",
            orjson.dumps([good, {**good, "ts": now_ms + DAY_MS}]),
            a.TS_IN_FUTURE,
        ),
        # --- keys ----------------------------------------------------------------------------
        Case(
            "duplicate key", _raw(now_ms, '"temperature_c":21.5,"temperature_c":84,' + REST), a.DUPLICATE_KEY
        ),
        Case(
            "duplicate key, escaped",
            _raw(now_ms, '"temperature_c":21.5,"temperature\\u005fc":84,' + REST),
            a.DUPLICATE_KEY,
        ),
        Case(
            "duplicate key, spaced",
            _raw(now_ms, '"temperature_c":21.5,"temperature_c" :84,' + REST),
            a.DUPLICATE_KEY,
        ),
        Case(
            "duplicate ts, second in the future",
            _raw(now_ms, f'"ts":{now_ms + DAY_MS},"temperature_c":21.5,' + REST),
            a.DUPLICATE_KEY,
        ),
        Case(
            "duplicate key in a batch's 2nd reading",
            b"["
            + valid
            + b","
            + _raw(now_ms, '"temperature_c":21.5,' + REST).replace(b'"seq":1', b'"seq":1,"seq":2')
            + b"]",
            a.DUPLICATE_KEY,
        ),
        Case("unknown field", _with(now_ms, colour="red"), a.UNKNOWN_FIELD),
        Case("line-protocol key", _with(now_ms, **{"temp,erature c=1": 1}), a.UNKNOWN_FIELD),
        Case("tag override key", _with(now_ms, device_id="someone-else"), a.UNKNOWN_FIELD),
        Case("time key", _with(now_ms, time=1), a.UNKNOWN_FIELD),
        Case("unicode key", _with(now_ms, **{"températuré_c": 1}), a.UNKNOWN_FIELD),
        Case("newline key", _with(now_ms, **{"a\nb": 1}), a.UNKNOWN_FIELD),
        Case("empty key", _with(now_ms, **{"": 1}), a.UNKNOWN_FIELD),
        Case("10,000 unknown keys", _with(now_ms, **{f"k{i}": i for i in range(10_000)}), a.UNKNOWN_FIELD),
        Case("200 KB key", _with(now_ms, **{"k" * 200_000: 1}), a.UNKNOWN_FIELD),
        Case(
            "line protocol in a value",
            _with(now_ms, mode="heat\nthermostat,device_id=x temperature_c=99"),
            a.INVALID_VALUE,
        ),
        Case("quote and backslash in a value", _with(now_ms, mode='he"a\\t'), a.INVALID_VALUE),
        Case("200 KB value", _with(now_ms, mode="h" * 200_000), a.INVALID_VALUE),
        Case("unicode escapes spelling a valid value", valid.replace(b'"heat"', b'"h\\u0065at"'), ACCEPTED),
        # --- arrays --------------------------------------------------------------------------
        Case("900 bad readings", orjson.dumps([{"x": 1}] * 900), a.MISSING_FIELD),
        Case("null in a batch", orjson.dumps([good, None]), a.WRONG_SHAPE),
        Case("array as a field", _with(now_ms, temperature_c=[21.5]), a.WRONG_TYPE),
        Case("batch with one bad value", orjson.dumps([good, {**good, "mode": "hot"}]), a.INVALID_VALUE),
    ]
    return cases


# --- processes -----------------------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    return float(psutil.Process(pid).memory_info().rss) / 1e6


class RulesProcess:
    """``python -m rules_engine.main`` on a rules file, as a real subprocess."""

    def __init__(
        self, broker: Broker, influxd: Influxd, state_dir: Path, rules: list[dict[str, Any]]
    ) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        rules_file = state_dir / "rules.json"
        rules_file.write_text(json.dumps(rules))
        self.health_port = probes.free_port()
        self.env = env_for(broker, influxd, "unused", state_dir)
        self.env.update(
            {
                "IOTFLEET_MQTT__USERNAME": "iotfleet-rules",
                "IOTFLEET_MQTT__PASSWORD": broker.passwords["iotfleet-rules"],
                "IOTFLEET_MQTT__SESSION_EXPIRY_S": "60",
                "IOTFLEET_RULES__CLIENT_ID": f"rules-{secrets.token_hex(4)}",
                "IOTFLEET_RULES__RULES_FILE": str(rules_file),
                "IOTFLEET_HEALTH__PORT": str(self.health_port),
            }
        )
        self.log_path = state_dir / "rules-engine.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> RulesProcess:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "rules_engine.main"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    def wait_healthy(self, timeout: float = 30) -> None:
        def ok() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"rules engine exited:\n{self.log()}")
            try:
                return httpx.get(f"http://127.0.0.1:{self.health_port}/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ok, timeout=timeout, what="rules engine healthy")

    def metric(self, name: str, **labels: str) -> float:
        text = httpx.get(f"http://127.0.0.1:{self.health_port}/metrics", timeout=5).text
        total = 0.0
        for line in text.splitlines():
            if (line.startswith(name + "{") or line.startswith(name + " ")) and all(
                f'{k}="{v}"' in line for k, v in labels.items()
            ):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


HOT_RULE: dict[str, Any] = {
    "name": "hot",
    "scope": {"device_type": "thermostat"},
    "when": {"field": "temperature_c", "op": ">", "value": 80},
    "clear_when": {"field": "temperature_c", "op": "<", "value": 70},
    "then": [{"alert": {"severity": "critical", "message": "too hot"}}],
}


def start_services(
    broker: Broker, influxd: Influxd, database: str, work: Path, rules: list[dict[str, Any]]
) -> tuple[IngestProcess, RulesProcess]:
    # Its own session, not a member of the shared group: on the session-wide broker an earlier
    # test's offline ingest session may still hold a share of the group's messages.
    ingest = IngestProcess(
        broker,
        influxd,
        database,
        work / "ingest",
        replica=secrets.token_hex(3),
        extra_env={"IOTFLEET_INGEST__SHARED_SUBSCRIPTION": "false", "IOTFLEET_MQTT__SESSION_EXPIRY_S": "60"},
    ).start()
    engine = RulesProcess(broker, influxd, work / "rules", rules).start()
    ingest.wait_healthy(timeout=30)
    engine.wait_healthy(timeout=30)
    return ingest, engine


# --- a well-behaved device and its latency -------------------------------------------------------


class GoodDevice(threading.Thread):
    """Publishes a valid reading every ``interval_s`` (ts = publish time) and, on a second thread,
    polls InfluxDB for them: latency = when a reading is first seen queryable - its ts."""

    def __init__(
        self, publisher: Publisher, influxd: Influxd, database: str, device_id: str, interval_s: float = 0.05
    ) -> None:
        super().__init__(daemon=True)
        self.publisher = publisher
        self.influxd = influxd
        self.database = database
        self.device_id = device_id
        self.interval_s = interval_s
        self.sent: dict[int, int] = {}  # seq -> ts
        self.latency_ms: dict[int, float] = {}
        self._halt = threading.Event()
        self._poller = threading.Thread(target=self._poll, daemon=True)

    def run(self) -> None:
        self._poller.start()
        seq = 0
        topic = telemetry("thermostat", self.device_id)
        while not self._halt.is_set():
            seq += 1
            ts = time.time_ns() // 1_000_000
            self.sent[seq] = ts
            self.publisher.publish(topic, orjson.dumps(good_reading(ts, seq)))
            self._halt.wait(self.interval_s)

    def _poll(self) -> None:
        since = time.time_ns() // 1_000_000 - 1_000
        q = (
            f"SELECT seq FROM thermostat WHERE device_id = {quote_string(self.device_id)}"
            f" AND time > {since}ms"
        )
        with httpx.Client(timeout=10) as http:
            while not self._halt.is_set() or len(self.latency_ms) < len(self.sent):
                try:
                    body = http.post(
                        f"{self.influxd.url}/query", data={"q": q, "db": self.database, "epoch": "ms"}
                    ).json()
                except httpx.HTTPError:
                    continue
                seen = time.time_ns() / 1e6
                for result in body.get("results", []):
                    for series in result.get("series", []):
                        for ts, seq in series["values"]:
                            if seq not in self.latency_ms:
                                self.latency_ms[int(seq)] = seen - ts
                if self._halt.is_set() and time.monotonic() > self._give_up:
                    return
                time.sleep(0.01)

    _give_up = float("inf")

    def stop(self, drain_s: float = 15.0) -> None:
        self._give_up = time.monotonic() + drain_s
        self._halt.set()
        self.join(timeout=5)
        self._poller.join(timeout=drain_s + 5)

    def p99_ms(self) -> float:
        return percentile(list(self.latency_ms.values()), 0.99)

    def missing(self) -> list[int]:
        return sorted(set(self.sent) - set(self.latency_ms))


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def load_average() -> float:
    return os.getloadavg()[0]
