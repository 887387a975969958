"""The demo as a trainer runs it, with its traces (docs/traces.md)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from esn.client.trace import FIELDS, FLOOR_FIELDS, MESSAGE_FIELDS
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


async def test_the_demo_writes_every_message_and_floor_state_change(tmp_path: Path) -> None:
    """`--trace-dir`: beside the access trace, every control and floor message each
    handset sent or received (voice left out), and each change of its floor state, in
    time order; a press reads request out, granted in, and the floor going from
    no_permission through pending_request to has_permission."""
    folder = tmp_path / "traces"
    opts = DemoOptions(duration=6, handsets=20, groups=2, trace_dir=str(folder))
    assert await run_demo(opts) in (0, 1)
    assert (folder / "access.csv").exists()
    messages = list(csv.DictReader((folder / "messages.csv").read_text().splitlines()))
    floors = list(csv.DictReader((folder / "floor.csv").read_text().splitlines()))
    assert list(messages[0]) == list(MESSAGE_FIELDS) and list(floors[0]) == list(FLOOR_FIELDS)
    for trace in (messages, floors):
        times = [float(r["t_s"]) for r in trace]
        assert times == sorted(times) and times[0] >= 0
    assert "media" not in {r["type"] for r in messages}
    sent = next(r for r in messages if r["dir"] == "out" and r["type"] == "request")
    answer = next(
        r
        for r in messages
        if r["dir"] == "in" and r["unit"] == sent["unit"] and r["ref"] == sent["ref"]
    )
    assert answer["type"] in ("granted", "queued", "deny") and answer["tg"] == sent["tg"]
    mine = [
        (r["from"], r["to"]) for r in floors if (r["unit"], r["tg"]) == (sent["unit"], sent["tg"])
    ]
    assert mine[0] == ("no_permission", "pending_request")
    assert ("pending_request", "has_permission") in mine or answer["type"] != "granted"
    assert any(r["type"] == "mic_open" and r["dir"] == "in" for r in messages)  # (on the wire)
