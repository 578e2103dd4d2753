"""Fault injection: what a fault does to a device, and which devices get it.

A fault applies to explicit device ids, to a fraction of the fleet (optionally
of some types only), or both. The selection is deterministic for a given seed,
so a scenario replays the same faulty devices. Payload faults fire per reading
with ``probability``; connection faults fire every ``every_s`` seconds (or
once at ``at_s``); command faults apply to every command the device receives.

What the platform should see, per kind:

==================  ===========================================================
malformed           invalid JSON on telemetry → dead letter (parse error)
out_of_range        a field outside the catalogue's range → dead letter naming the field
stuck               one field (or all) frozen at its last value: valid, flat line
spike               one reading with a large in-range jump: valid, anomalous
clock_skew          device ts shifted by ``skew_s``: stored at the wrong time, or dead
                    letter when beyond the platform's past/future limits
duplicate           the same reading (same seq and ts) published twice: stored once
out_of_order        a reading held back and sent after its successor: stored, seq order restored
disconnect          TCP dropped without DISCONNECT: the broker publishes the retained LWT offline
reconnect_storm     the selected devices drop at the same instant and all reconnect at once
ignore_commands     commands received (MQTT-acked) but never answered on ``acks``
slow_ack            acks sent ``delay_s`` late
==================  ===========================================================
"""

from __future__ import annotations

import hashlib
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from iotfleet.catalogue import DEVICE_TYPES


class FaultKind(StrEnum):
    MALFORMED = "malformed"
    OUT_OF_RANGE = "out_of_range"
    STUCK = "stuck"
    SPIKE = "spike"
    CLOCK_SKEW = "clock_skew"
    DUPLICATE = "duplicate"
    OUT_OF_ORDER = "out_of_order"
    DISCONNECT = "disconnect"
    RECONNECT_STORM = "reconnect_storm"
    IGNORE_COMMANDS = "ignore_commands"
    SLOW_ACK = "slow_ack"


PAYLOAD_FAULTS = frozenset(
    {
        FaultKind.MALFORMED,
        FaultKind.OUT_OF_RANGE,
        FaultKind.STUCK,
        FaultKind.SPIKE,
        FaultKind.CLOCK_SKEW,
        FaultKind.DUPLICATE,
        FaultKind.OUT_OF_ORDER,
    }
)
# Faults that apply to every reading / command of the selected devices unless told otherwise.
_ALWAYS_ON = frozenset({FaultKind.STUCK, FaultKind.CLOCK_SKEW, FaultKind.IGNORE_COMMANDS, FaultKind.SLOW_ACK})


class FaultSpec(BaseModel):
    """One fault of a scenario (YAML ``faults:`` list item) or of ``--fault``."""

    model_config = ConfigDict(extra="forbid")

    kind: FaultKind
    fraction: float = Field(0.0, ge=0.0, le=1.0, description="Share of the (selected types') devices")
    devices: list[str] = Field(default_factory=list, description="Explicit device ids")
    types: list[str] | None = Field(None, description="Restrict the fraction to these device types")
    probability: float | None = Field(
        None, ge=0.0, le=1.0, description="Per reading (payload faults); default 0.1, or 1 for stuck/skew"
    )
    field: str | None = Field(None, description="Field for out_of_range / spike / stuck (default: per type)")
    skew_s: float = Field(
        120.0,
        description="clock_skew: seconds added to the device clock (beyond the ingest limits: dead letter)",
    )
    delay_s: float = Field(5.0, ge=0.0, description="slow_ack: seconds before the ack")
    every_s: float | None = Field(
        None, gt=0.0, description="disconnect/storm: period; default: once per run for a storm, 60 s else"
    )
    at_s: float | None = Field(None, ge=0.0, description="disconnect/storm: first occurrence after start")
    offline_s: float = Field(2.0, ge=0.0, description="disconnect: how long the device stays away")
    after_s: float = Field(0.0, ge=0.0, description="payload faults: active only after this many seconds")

    @model_validator(mode="after")
    def _check(self) -> FaultSpec:
        if not self.devices and self.fraction == 0.0:
            raise ValueError(f"fault {self.kind}: give 'fraction' (0-1) and/or 'devices' (ids)")
        for name in self.types or ():
            if name not in DEVICE_TYPES:
                raise ValueError(f"fault {self.kind}: unknown device type {name!r}")
        return self

    @property
    def rate(self) -> float:
        if self.probability is not None:
            return self.probability
        return 1.0 if self.kind in _ALWAYS_ON else 0.1

    def selects(self, device_id: str, device_type: str, seed: int, index: int) -> bool:
        """Deterministic membership: the same seed picks the same devices."""
        if device_id in self.devices:
            return True
        if self.fraction <= 0.0 or (self.types is not None and device_type not in self.types):
            return False
        digest = hashlib.blake2b(f"{seed}:{index}:{device_id}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") / 2**64 < self.fraction


class DeviceFaults:
    """The faults active on one device (None on healthy devices: no memory cost)."""

    __slots__ = (
        "disconnect",
        "duplicate",
        "ignore_commands",
        "malformed",
        "out_of_order",
        "out_of_range",
        "reconnect_storm",
        "skew_ms",
        "slow_ack_s",
        "spike",
        "stuck",
        "stuck_values",
    )

    def __init__(self) -> None:
        self.malformed: FaultSpec | None = None
        self.out_of_range: FaultSpec | None = None
        self.stuck: FaultSpec | None = None
        self.stuck_values: dict[str, Any] | None = None
        self.spike: FaultSpec | None = None
        self.skew_ms = 0
        self.duplicate: FaultSpec | None = None
        self.out_of_order: FaultSpec | None = None
        self.disconnect: FaultSpec | None = None
        self.reconnect_storm: FaultSpec | None = None
        self.ignore_commands = False
        self.slow_ack_s = 0.0

    def add(self, spec: FaultSpec) -> None:
        kind = spec.kind
        if kind == FaultKind.CLOCK_SKEW:
            self.skew_ms = int(spec.skew_s * 1000)
        elif kind == FaultKind.IGNORE_COMMANDS:
            self.ignore_commands = True
        elif kind == FaultKind.SLOW_ACK:
            self.slow_ack_s = spec.delay_s
        else:
            setattr(self, kind.value, spec)

    def kinds(self) -> list[str]:
        out: list[str] = [
            k.value
            for k in FaultKind
            if k.value in self.__slots__ and getattr(self, k.value) not in (None, False)
        ]
        if self.skew_ms:
            out.append(FaultKind.CLOCK_SKEW.value)
        if self.slow_ack_s:
            out.append(FaultKind.SLOW_ACK.value)
        return out


def assign_faults(
    devices: list[tuple[str, str]], specs: list[FaultSpec], seed: int
) -> dict[str, DeviceFaults]:
    """Faults per device id, for the devices that have any."""
    known = {device_id for device_id, _ in devices}
    for spec in specs:
        unknown = [d for d in spec.devices if d not in known]
        if unknown:
            raise ValueError(f"fault {spec.kind}: device(s) not in the fleet: {', '.join(unknown[:5])}")
    out: dict[str, DeviceFaults] = {}
    for device_id, device_type in devices:
        for index, spec in enumerate(specs):
            if spec.selects(device_id, device_type, seed, index):
                out.setdefault(device_id, DeviceFaults()).add(spec)
    return out
