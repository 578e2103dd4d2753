"""Schema-driven fuzzing of the registry API (schemathesis + hypothesis): no input may cause a 5xx.

Runs against a real registry process (real HTTP, real broker, SQLite) with an
admin key, so generated requests reach the handlers, not just the auth check.
Every operation gets valid (positive) and invalid (negative) cases; bounded to
a few examples each so the run takes seconds. (Schemathesis' own pytest plugin
does not load with this pytest version, so hypothesis drives the strategies.)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from tests.harness import Broker
from tests.registry_harness import ADMIN_KEY, RegistryProcess

pytestmark = pytest.mark.integration

EXAMPLES = 6
# 503 is the documented answer when the broker is away; never any other 5xx.
ALLOWED_5XX = {503}


@pytest.fixture
def registry(broker: Broker, tmp_path: Path) -> Iterator[RegistryProcess]:
    process = RegistryProcess(broker, tmp_path / "fuzzed-registry").start()
    yield process
    process.stop()


def test_no_input_causes_a_server_error(registry: RegistryProcess) -> None:
    schema = schemathesis.openapi.from_url(f"{registry.url}/openapi.json")
    auth = {"Authorization": f"Bearer {ADMIN_KEY}"}
    failures: list[str] = []
    calls = 0
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                database=None,
                phases=[Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            def run(case: schemathesis.Case) -> None:
                nonlocal calls
                calls += 1
                response = case.call(headers=auth, timeout=60)
                if response.status_code >= 500 and response.status_code not in ALLOWED_5XX:
                    failures.append(
                        f"{case.method} {case.formatted_path} {case.query} {str(case.body)[:200]}"
                        f" → {response.status_code}: {response.text[:300]}"
                    )
                elif response.status_code >= 400:
                    content_type = response.headers.get("content-type", [""])[0]
                    if not content_type.startswith("application/problem+json"):
                        failures.append(f"{case.method} {case.formatted_path} → non-problem {content_type}")

            try:
                run()
            except Unsatisfiable:
                # Nothing to make invalid (no parameters, no body): only positive cases apply.
                assert mode is GenerationMode.NEGATIVE, operation.label
    log = (registry.state_dir / "registry.log").read_text()
    assert not failures, "\n".join(failures[:20])
    assert "unhandled error" not in log, log[-4000:]
    print(f"{calls} generated requests over {len(operations)} operations, no 5xx")
