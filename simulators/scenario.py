"""Scenario files: a versionable YAML description of a fleet run. CLI flags override its values.

Example (see ``simulators/scenarios/*.yaml``)::

    name: demo
    types: {thermostat: 10, air_quality: 10, smart_plug: 10, gps_tracker: 10}
    duration: 10m          # 90, "90s", "5m", "1h"
    interval: 5s
    jitter: 0.2
    faults:
      - {kind: out_of_range, fraction: 0.05, probability: 0.05}
      - {kind: disconnect, fraction: 0.05, every_s: 120}
    commands: {rate_per_s: 0.5}
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

from iotfleet.catalogue import DEVICE_TYPES
from iotfleet.errors import ConfigError
from simulators.faults import FaultSpec

_DURATION_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86_400.0, None: 1.0}

SCENARIO_DIR = Path(__file__).parent / "scenarios"


def parse_duration(value: Any) -> float:
    """Seconds from 90, 1.5, "90", "90s", "500ms", "5m", "1h", "1d"."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        match = _DURATION_RE.match(value)
        if match:
            return float(match.group(1)) * _UNITS[match.group(2)]
    raise ValueError(f"invalid duration {value!r}: use seconds or a number with ms/s/m/h/d (e.g. 90s, 5m)")


Duration = Annotated[float, BeforeValidator(parse_duration)]


class CommandLoad(BaseModel):
    """Commands the simulator sends to its own devices (through the observer account)."""

    model_config = ConfigDict(extra="forbid")
    rate_per_s: float = Field(0.0, ge=0.0, le=10_000.0)
    ttl_s: int = Field(60, ge=1)


class Scenario(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "adhoc"
    description: str = ""
    devices: int | None = Field(None, ge=1, le=1_000_000, description="Total, spread over all types")
    types: dict[str, int] | None = Field(None, description="Devices per type (overrides the spread)")
    duration: Duration = Field(60.0, gt=0.0)
    interval: Duration = Field(10.0, gt=0.0)
    jitter: float = Field(0.1, ge=0.0, le=0.9)
    batch: int = Field(1, ge=1, le=1_000)
    qos: Literal[0, 1] = 1
    ramp_up: float = Field(1_000.0, gt=0.0, description="Connections started per second")
    processes: int | None = Field(
        None,
        ge=1,
        le=64,
        description="Fleet processes (default: one per core, at most one per 1,000 devices)",
    )
    backoff_base: Duration = Field(0.5, gt=0.0, description="Reconnect backoff: first window")
    backoff_cap: Duration = Field(30.0, gt=0.0, description="Reconnect backoff: largest window")
    resend_unrouted: bool = Field(
        True,
        description="Send a telemetry publish again after PUBACK 0x10 (no subscriber yet): the device contract",
    )
    seed: int = 0
    keepalive: int = Field(60, ge=5, le=3_600)
    offline_buffer: int = Field(1_000, ge=0)
    faults: list[FaultSpec] = Field(default_factory=list)
    commands: CommandLoad = CommandLoad()
    verify: bool = False

    @field_validator("types")
    @classmethod
    def _known_types(cls, value: dict[str, int] | None) -> dict[str, int] | None:
        if value is None:
            return None
        for name, count in value.items():
            if name not in DEVICE_TYPES:
                raise ValueError(f"unknown device type {name!r} (known: {', '.join(DEVICE_TYPES)})")
            if count < 0:
                raise ValueError(f"negative count for {name}")
        return value

    def process_count(self) -> int:
        """``processes`` if set, else one per core but at most one per 1,000 devices (a spawned
        interpreter costs ~1 s and ~30 MB; 100 devices do not need two)."""
        if self.processes is not None:
            return self.processes
        total = sum(self.counts().values())
        return max(1, min(os.cpu_count() or 1, -(-total // 1_000)))

    def counts(self) -> dict[str, int]:
        """Devices per type: ``types`` scaled to ``devices`` if both are set, else whichever is."""
        from simulators.provisioning import spread

        if self.types and self.devices is not None:
            total = sum(self.types.values()) or 1
            scaled = {t: self.devices * n // total for t, n in self.types.items()}
            # Hand out the remainder so the total is exact.
            for t in list(scaled)[: self.devices - sum(scaled.values())]:
                scaled[t] += 1
            return {t: n for t, n in scaled.items() if n}
        if self.types:
            return {t: n for t, n in self.types.items() if n}
        return spread(self.devices if self.devices is not None else 40)


def load_scenario(path: Path) -> Scenario:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        bundled = SCENARIO_DIR / path.name
        if not path.is_absolute() and bundled.exists():
            return load_scenario(bundled)
        raise ConfigError(f"scenario file {path} not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"scenario file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"scenario file {path}: expected a mapping at the top level")
    try:
        return Scenario.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"scenario file {path}: {problems}") from None
