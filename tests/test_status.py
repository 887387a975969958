"""Pre-coded status messages (docs/protocol.md, 11.11): the fleet's codes, the core's rules
with explicit time, the wire on a real broker, and what the console shows."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from rich.text import Text

from esn.client.handset import Refused
from esn.console.app import ConsoleApp
from esn.console.model import ConsoleModel
from esn.core.actions import Action, StatusChanged
from esn.core.fleet import DEFAULT_STATUSES, FleetError, parse_fleet
from esn.core.network import Network
from esn.protocol import codec
from esn.protocol import messages as m
from esn.server.shell import Server
from esn.store import pack, unpack
from esn.transport import BrokerConfig, make_transport
from tests.conftest import HandsetFactory, eventually, told
from tests.test_console import row
from tests.test_durable import Restartable

FLEET = parse_fleet(
    {
        "talkgroup": [{"id": "tg1"}],
        "unit": [{"id": "disp", "role": "dispatcher", "priority": 250}],
        "status": [{"code": 3, "text": "at scene"}, {"code": 40001, "text": "need water"}],
    }
)


def published(actions: list[Action], net: Network) -> list[m.UnitStatus | None]:
    """What the shell publishes for these actions (None: the unit's status cleared)."""
    return [net.status_msg(a.unit) for a in actions if isinstance(a, StatusChanged)]


# --- the fleet file -------------------------------------------------------------------


def test_a_fleet_without_statuses_has_the_default_ones() -> None:
    assert parse_fleet({}).statuses == DEFAULT_STATUSES
    assert FLEET.statuses == {3: "at scene", 40001: "need water"}


@pytest.mark.parametrize(
    ("status", "why"),
    [
        ([{"code": 3}], "needs both code and text"),
        ([{"code": 70000, "text": "x"}], "status[0].code: must be within 0..65535"),
        ([{"code": 1, "text": "a"}, {"code": 1, "text": "b"}], "status[1].code: 1 is defined"),
        ([{"code": 1, "text": " "}], "status[0].text: must be 1-64 printable"),
        ([{"code": 1, "text": "a\nb"}], "printable"),
        ([{"code": "1", "text": "a"}], "status[0].code: must be int"),
        ([{"code": 1, "text": "a", "colour": "red"}], "unknown key 'colour'"),
        ({"code": 1, "text": "a"}, "[[status]] tables"),
        ([{"code": i, "text": "a"} for i in range(257)], "at most 256"),
    ],
)
def test_a_bad_status_table_stops_the_server_with_one_line(status: Any, why: str) -> None:
    with pytest.raises(FleetError) as raised:
        parse_fleet({"status": status})
    assert why in str(raised.value) and "\n" not in str(raised.value)


# --- the core, with explicit time -----------------------------------------------------


def test_a_status_is_kept_published_in_the_fleets_words_and_confirmed() -> None:
    net = Network(FLEET, wall_offset=1000.0)
    out = net.unit_message("u1", m.UnitStatus(code=3, text="on holiday", ref=7), 2.5)
    assert published(out, net) == [
        m.UnitStatus(code=3, unit="u1", text="at scene", ts=1002_500_000_000)
    ]
    assert told(out, "u1") == [m.Ok(op="unit_status", ref=7)]
    later = net.unit_message("u1", m.UnitStatus(code=40001, ref=8), 9.0)
    assert published(later, net) == [
        m.UnitStatus(code=40001, unit="u1", text="need water", ts=1009_000_000_000)
    ]


def test_a_code_the_fleet_does_not_have_changes_nothing() -> None:
    net = Network(FLEET)
    net.unit_message("u1", m.UnitStatus(code=3, ref=1), 1.0)
    out = net.unit_message("u1", m.UnitStatus(code=4, ref=2), 2.0)
    assert published(out, net) == []
    [error] = told(out, "u1")
    assert isinstance(error, m.Error) and error.cause == "invalid_field" and "4" in error.detail
    assert net.status_msg("u1") is not None and net.status_msg("u1").code == 3  # type: ignore[union-attr]


def test_a_status_naming_another_unit_is_dropped_unanswered() -> None:
    net = Network(FLEET)
    assert net.unit_message("u1", m.UnitStatus(code=3, unit="u2", ref=1), 1.0) == []
    assert net.rejected == {"spoofed": 1} and net.statuses == {}


def test_a_repeat_is_confirmed_again_and_published_once() -> None:
    net = Network(FLEET)
    first = net.unit_message("u1", m.UnitStatus(code=3, ref=5), 1.0)
    again = net.unit_message("u1", m.UnitStatus(code=3, ref=5), 1.2)
    assert len(published(first, net)) == 1 and published(again, net) == []
    assert told(again, "u1") == told(first, "u1")
    assert net.statuses["u1"] == (3, 1.0)  # the time of the first


def test_statuses_are_rate_limited_and_refused_once_a_second() -> None:
    net = Network(FLEET)
    outs = [net.unit_message("u1", m.UnitStatus(code=3, ref=i), 1.0) for i in range(8)]
    assert sum(bool(published(o, net)) for o in outs) == 5  # the burst
    assert [type(told(o, "u1")[0]).__name__ for o in outs[5:6]] == ["Error"]
    assert outs[6:] == [[], []]  # further refusals are silent
    assert published(net.unit_message("u1", m.UnitStatus(code=3, ref=99), 2.0), net)  # 1/s again


def test_made_up_units_cannot_grow_the_statuses_kept_nor_push_out_the_fleets() -> None:
    """Open registration: a flood of made-up ids keeps at most `max_units` statuses of
    units not in the fleet; the one heard from longest ago goes (and is cleared at the
    broker), and nobody is refused for good."""
    net = Network(FLEET, max_units=2)
    net.unit_message("disp", m.UnitStatus(code=3, ref=1), 1.0)
    for i, unit in enumerate(("x1", "x2", "x1", "x3")):
        out = net.unit_message(unit, m.UnitStatus(code=3, ref=10 + i), 2.0 + i)
    assert told(out, "x3") == [m.Ok(op="unit_status", ref=13)]
    assert [a.unit for a in out if isinstance(a, StatusChanged)] == ["x3", "x2"]
    assert net.status_msg("x2") is None  # (so the shell clears it)
    assert set(net.statuses) == {"disp", "x1", "x3"}


def test_a_status_outlives_a_restart_and_a_forged_one_does_not() -> None:
    net = Network(FLEET, wall_offset=1000.0)
    net.unit_message("u1", m.UnitStatus(code=40001, ref=1), 5.0)
    records = {k: unpack(pack(net.record(k))) for k in net.changed}
    records["unit/u2"] = {"groups": [], "answers": [], "status": [99, 1003.0]}
    records["unit/u3"] = {"groups": [], "answers": [], "status": [3, float("nan")]}
    records["unit/u4"] = {"groups": [], "answers": [], "status": [3, 9e9]}  # in the future
    again = Network(FLEET, wall_offset=2000.0)
    problems = again.load(records, 10.0)
    assert again.status_msg("u1") == net.status_msg("u1")
    assert [p.split(":")[0] for p in problems] == ["unit/u2", "unit/u3"]
    assert "not a status of the fleet" in problems[0] and "not a time" in problems[1]
    assert again.statuses["u4"] == (3, 2010.0)  # a clock stepped back: now
    # consoles may have been shown the statuses not kept: they are cleared at once
    assert published(again.settle(10.0), again) == [None, None]
    # the repeat of the status sent before the restart is told the same
    assert told(again.unit_message("u1", m.UnitStatus(code=40001, ref=1), 11.0), "u1") == [
        m.Ok(op="unit_status", ref=1)
    ]


# --- on the wire ----------------------------------------------------------------------


async def retained(
    broker: BrokerConfig, mqtt_client: str, topic: str, count: int = 1
) -> list[m.UnitStatus]:
    """What a console connecting now is handed on `topic` (a wildcard may match several)."""
    got: list[m.UnitStatus] = []
    done = asyncio.Event()
    link = make_transport(mqtt_client, broker, client_id=f"console-{time.monotonic_ns()}")

    def on_message(t: str, payload: bytes) -> None:
        if payload:
            msg = codec.decode(payload)
            assert isinstance(msg, m.UnitStatus) and t.endswith(f"/unit/{msg.unit}/status")
            got.append(msg)
        if len(got) >= count:
            done.set()

    link.on_message = on_message
    await link.start()
    try:
        await link.subscribe(topic)
        await asyncio.wait_for(done.wait(), 5)
    finally:
        await link.stop()
    return got


async def test_a_console_that_starts_later_is_told_each_units_last_status(
    server: Server, handset: HandsetFactory, broker: BrokerConfig, prefix: str, mqtt_client: str
) -> None:
    u1 = await handset("u1")
    u2 = await handset("u2")
    assert (await u1.report_status(3)).op == "unit_status"
    await u1.report_status(5)
    await u2.report_status(2)
    with pytest.raises(Refused, match="no status 99"):
        await u2.report_status(99)
    seen = await retained(broker, mqtt_client, f"{prefix}/unit/+/status", count=2)
    by_unit = {s.unit: (s.code, s.text) for s in seen}
    assert by_unit == {"u1": (5, "returning"), "u2": (2, "en route")}
    assert all(s.ts and abs(s.ts / 1e9 - time.time()) < 60 for s in seen)


async def test_a_status_outlives_a_server_restart_and_a_broker_that_forgot_it(
    broker: BrokerConfig, prefix: str, mqtt_client: str, tmp_path: Path, handset: HandsetFactory
) -> None:
    """Tried: a unit reports "at scene"; the server stops, the broker loses what it kept
    retained, a new server starts on the same state file. Expect: consoles are told the
    status again, with the time the unit sent it."""
    srv = Restartable(broker, prefix, mqtt_client, tmp_path / "state.sqlite3")
    await srv.start()
    try:
        u1 = await handset("u1")
        await u1.report_status(3)
        [before] = await retained(broker, mqtt_client, f"{prefix}/unit/u1/status")
        await srv.stop()
        wiper = make_transport(mqtt_client, broker, client_id="wiper")
        await wiper.start()
        wiper.publish(f"{prefix}/unit/u1/status", b"", qos=1, retain=True)
        await wiper.stop()
        await srv.start()
        [after] = await retained(broker, mqtt_client, f"{prefix}/unit/u1/status")
        assert after == before and after.text == "at scene"
    finally:
        await srv.stop()


# --- the console ----------------------------------------------------------------------


def test_the_console_logs_news_not_the_history_it_starts_with() -> None:
    model = ConsoleModel()
    old = m.UnitStatus(code=3, unit="u1", text="at scene", ts=10**18)
    model.apply("esn/unit/u1/status", old, history=True)  # (retained, handed over)
    assert model.units["u1"].status == "at scene" and not model.events
    new = m.UnitStatus(code=5, unit="u1", text="returning", ts=10**18 + 10**9)
    model.apply("esn/unit/u1/status", new)
    model.apply("esn/unit/u1/status", new)  # a duplicate
    model.apply("esn/unit/u1/status", old)  # late: older than the one shown
    assert [e.text for e in model.events] == ["u1 status 5: returning"]
    assert model.units["u1"].status == "returning"
    fresh = m.UnitStatus(code=1, unit="u2", text="available", ts=10**18)
    model.apply("esn/unit/u2/status", fresh)  # a unit's first status, as it happens
    model.apply("esn/tg/tg1/down/event", m.UnitStatus(code=3, unit="u2", text="lie", ts=2 * 10**18))
    assert model.units["u2"].status == "available" and len(model.events) == 2
    model.cleared("esn/unit/u2/status")  # the server no longer keeps it
    model.cleared("esn/tg/u1/status")  # (not a status topic)
    assert model.units["u2"].status is None and model.units["u1"].status == "returning"


async def test_the_console_shows_each_units_status_and_its_age(
    server: Server, broker: BrokerConfig, prefix: str, mqtt_client: str, handset: HandsetFactory
) -> None:
    u1 = await handset("u1")
    await u1.report_status(3)
    app = ConsoleApp(broker, "disp", prefix=prefix, mqtt_client=mqtt_client)
    async with app.run_test(size=(180, 50)):
        await eventually(lambda: row(app, "units", "u1")[2].startswith("at scene "))
        assert row(app, "units", "u1")[2].endswith("s")  # its age, in seconds
        await u1.report_status(1)
        await eventually(lambda: row(app, "units", "u1")[2].startswith("available "))
        assert any(e.text == "u1 status 1: available" for e in app.model.events)


async def test_a_status_text_is_shown_as_written_never_as_markup(
    server: Server, broker: BrokerConfig, prefix: str, mqtt_client: str
) -> None:
    """Tried: in the open profile anyone may publish a retained status of their making;
    one whose text is console markup (`[/]` would stop a console that parsed it). Expect:
    the console starts, and shows the text as written, in the table and the log."""
    liar = make_transport(mqtt_client, broker, client_id="liar")
    await liar.start()
    lie = m.UnitStatus(code=3, unit="u7", text="at [/] [b]scene", ts=time.time_ns())
    liar.publish(f"{prefix}/unit/u7/status", codec.encode(lie), qos=1, retain=True)
    await liar.stop()
    app = ConsoleApp(broker, "disp", prefix=prefix, mqtt_client=mqtt_client)

    def shown() -> str:  # the cell as the screen shows it
        return Text.from_markup(row(app, "units", "u7")[2]).plain

    async with app.run_test(size=(180, 50)) as pilot:
        await eventually(lambda: shown().startswith("at [/] [b]scene "))
        fresh = m.UnitStatus(code=4, unit="u7", text="[red]busy[/red]", ts=time.time_ns())
        app.model.apply(f"{prefix}/unit/u7/status", fresh)
        await eventually(lambda: shown().startswith("[red]busy[/red] "))
        await pilot.pause()  # (the log drawn too)
        assert app.is_running
