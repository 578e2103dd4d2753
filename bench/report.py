"""Write one section of docs/benchmarks.md (each benchmark owns its section; the rest is kept)."""

from __future__ import annotations

import re
import statistics
from collections.abc import Sequence
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def replace_section(title: str, body: str, doc: Path = DOC) -> None:
    """Replace the ``## title`` section's body (up to the next ``## ``), or append the section."""
    text = doc.read_text() if doc.exists() else "# iotfleet benchmarks\n"
    heading = f"## {title}\n"
    block = f"{heading}\n{body.strip()}\n\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = (
        pattern.sub(lambda _m: block, text, count=1)
        if pattern.search(text)
        else text.rstrip() + "\n\n" + block
    )
    doc.write_text(text.rstrip() + "\n")


def spread(values: Sequence[float]) -> str:
    """min / median / max of repeated runs."""
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:,.0f}"
    return f"{min(values):,.0f} / {statistics.median(values):,.0f} / {max(values):,.0f}"
