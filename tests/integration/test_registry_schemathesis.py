"""Schema-driven fuzzing of the registry API: Schemathesis' full default check set must pass.

Runs ``schemathesis run`` (the CLI: every phase — examples, coverage, fuzzing,
stateful — and every default check: server errors, status codes, content
types, response headers and schemas, positive and negative data, missing
headers, unsupported methods and ``Allow``, use after free, resource
availability, ignored auth) against a real registry process (real HTTP, real
broker and InfluxDB, SQLite) with an admin key, so generated requests reach
the handlers. Bounded (a few examples per operation, one worker, a fixed seed)
so it takes well under a minute. ``schemathesis.toml`` next to this file holds
the one narrow exception and why.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import Broker, Influxd
from tests.registry_harness import ADMIN_KEY, RegistryProcess

pytestmark = pytest.mark.integration

EXAMPLES = 5
SEED = 20261201
CONFIG = Path(__file__).with_name("schemathesis.toml")


@pytest.fixture
def registry(broker: Broker, influxd: Influxd, database: str, tmp_path: Path) -> Iterator[RegistryProcess]:
    process = RegistryProcess(
        broker,
        tmp_path / "fuzzed-registry",
        extra_env={
            "IOTFLEET_INFLUX__URL": influxd.url,
            "IOTFLEET_INFLUX__DATABASE": database,
            # Generated webhook channels name arbitrary hosts: record their deliveries, send none.
            "IOTFLEET_NOTIFICATIONS__SEND": "false",
        },
    ).start()
    yield process
    process.stop()


def test_full_default_check_set_passes(registry: RegistryProcess, tmp_path: Path) -> None:
    cli = Path(sys.executable).with_name("schemathesis")
    argv = [
        str(cli),
        "--config-file",
        str(CONFIG),
        "run",
        f"{registry.url}/openapi.json",
        "--header",
        f"Authorization: Bearer {ADMIN_KEY}",
        "--max-examples",
        str(EXAMPLES),
        "--seed",
        str(SEED),
        "--workers",
        "1",
        "--no-shrink",
        "--request-timeout",
        "30",
        "--report",
        "junit",
        "--report-dir",
        str(tmp_path / "report"),
    ]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "", "NO_COLOR": "1"}
    result = subprocess.run(
        argv, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path, check=False
    )
    output = result.stdout + result.stderr
    summary = output[output.rfind("SUMMARY") - 40 :] if "SUMMARY" in output else output[-3000:]
    assert result.returncode == 0, output[-12000:]
    tested = re.search(r"Tested: (\d+)", summary)
    assert tested is not None and int(tested.group(1)) >= 35, summary  # every operation, not a handful
    assert "failures" not in summary.split("Test cases:")[-1], summary
    log = (registry.state_dir / "registry.log").read_text()
    assert "unhandled error" not in log, log[-4000:]
    print(summary)
