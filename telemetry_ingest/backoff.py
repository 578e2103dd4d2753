"""How long the ingest waits before retrying an InfluxDB write (the pipeline's and the journal's drainer)."""

from __future__ import annotations

import random
import time

BACKOFF_FIRST_S = 0.1
BACKOFF_CAP_S = 5.0


def retry_delay(attempt: int, stop_deadline: float | None) -> float:
    """Exponential backoff with jitter (0.5-1x), capped, and never past a stop deadline (monotonic s)."""
    delay: float = min(BACKOFF_CAP_S, BACKOFF_FIRST_S * 2**attempt) * random.uniform(0.5, 1.0)
    if stop_deadline is not None:
        delay = max(0.0, min(delay, stop_deadline - time.monotonic()))
    return delay
