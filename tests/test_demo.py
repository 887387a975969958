"""The demo as a trainer runs it, with its access trace (docs/traces.md)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from esn.client.trace import FIELDS
from esn.tools.demo import DemoOptions, run_demo

pytestmark = [pytest.mark.broker]


async def test_the_demo_writes_what_became_of_each_press(tmp_path: Path) -> None:
    """Its scenes press as a dispatcher (pre-empting a talker) and in an emergency: both
    are in the trace, granted at once, with the times of their answers."""
    trace = tmp_path / "access.csv"
    opts = DemoOptions(duration=10, handsets=20, groups=2, trace=str(trace))
    assert await run_demo(opts) in (0, 1)  # (its KPIs are judged elsewhere)
    rows = list(csv.DictReader(trace.read_text().splitlines()))
    assert list(rows[0]) == list(FIELDS)
    first = {r["caller"]: r for r in reversed(rows)}
    for caller in ("dispatcher", "emergency", "normal"):
        assert first[caller]["outcome"] == "immediate", rows
        assert float(first[caller]["access_ms"]) == float(first[caller]["answer_ms"]) > 0
