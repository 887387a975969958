"""The demo as a trainer runs it, with its traces (docs/traces.md)."""

from __future__ import annotations

import asyncio
import csv
from pathlib import Path

import pytest

from esn.cli import _broker, build_parser
from esn.client.handset import Handset
from esn.client.trace import FIELDS, FLOOR_FIELDS, MESSAGE_FIELDS
from esn.protocol import messages as m
from esn.tools.broker import Mosquitto
from esn.tools.demo import DemoOptions, run_demo
from esn.transport import BrokerConfig
from tests.conftest import eventually

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


async def test_the_demo_runs_on_a_users_fleet_and_prints_a_console_command_that_runs(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`esn demo --fleet examples/fleet.toml`: the sample fleet's open groups carry the
    traffic, and the console line it prints parses as `./run esn console` would take it."""
    opts = DemoOptions(duration=8, handsets=20, fleet="examples/fleet.toml")
    code = await run_demo(opts)
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    assert "in 4 talkgroups" in out  # (Firearms is members-only, All-call receive-only)
    line = next(x for x in out.splitlines() if x.startswith("console, in another terminal: "))
    command = line.split(": ", 1)[1].split()
    assert command[:3] == ["./run", "esn", "console"]
    args = build_parser().parse_args(command[2:])
    assert (args.unit, args.fleet) == ("disp-2", str(Path(command[command.index("--fleet") + 1])))


async def test_the_secure_demo_prints_a_console_command_whose_credentials_log_in(
    capsys: pytest.CaptureFixture[str],
) -> None:
    demo = asyncio.create_task(
        run_demo(DemoOptions(duration=6, handsets=20, groups=2, secure=True))
    )
    printed: list[str] = []

    def console_line() -> bool:
        printed.extend(capsys.readouterr().out.splitlines())
        return any(x.startswith("console, in another terminal: ") for x in printed)

    try:
        await eventually(console_line, timeout=30)
        line = next(x for x in printed if x.startswith("console, in another terminal: "))
        args = build_parser().parse_args(line.split(": ", 1)[1].split()[2:])
        assert args.credentials and args.unit == "disp-2"
        console = Handset("disp-2", _broker(args))
        await console.start()  # (refused by the broker without the right password)
        assert console.transport.connected
        await console.stop()
        assert await demo == 0
    finally:
        demo.cancel()


async def test_a_console_holding_a_scenes_floor_fails_the_demo_with_the_reason(
    capsys: pytest.CaptureFixture[str], mosquitto: Mosquitto
) -> None:
    """A trainee at the console takes the first group's floor in an emergency call and keeps it:
    the dispatcher's pre-emption cannot happen, and the demo says why, not just that."""
    opts = DemoOptions(duration=8, handsets=20, groups=2, broker_url=mosquitto.url)
    demo = asyncio.create_task(run_demo(opts))
    printed: list[str] = []

    def started() -> bool:
        printed.extend(capsys.readouterr().out.splitlines())
        return any(x.startswith("console, in another terminal: ") for x in printed)

    trainee = Handset("disp-2", BrokerConfig.from_url(mosquitto.url))
    try:
        await eventually(started, timeout=30)
        await trainee.start()
        await trainee.affiliate("tg-1001")
        # (an emergency call: nothing of the demo's may pre-empt it)
        assert isinstance(await trainee.press("tg-1001", kind="emergency"), m.Granted)
        assert await demo == 1
    finally:
        demo.cancel()
        await trainee.stop()
    out = "\n".join(printed) + capsys.readouterr().out
    line = next(x for x in out.splitlines() if "dispatcher pre-empts a talking handset" in x)
    assert line.startswith("  ✘") and "(a console holds" in line, line
