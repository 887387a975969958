"""Pre-coded status messages (docs/protocol.md, 11.11): the fleet's codes, the core's rules
with explicit time, the wire on a real broker, and what the console shows."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from esn.client.handset import Refused
from esn.console.app import ConsoleApp
from esn.console.model import ConsoleModel
from esn.core.actions import Action, StatusAccepted, ToUnit
from esn.core.fleet import DEFAULT_STATUSES, FleetError, parse_fleet
from esn.core.network import Network
from esn.protocol import codec
from esn.protocol import messages as m
from esn.server.shell import Server
from esn.store import pack, unpack
from esn.transport import BrokerConfig, make_transport
from tests.conftest import HandsetFactory, eventually
from tests.test_console import row
from tests.test_durable import Restartable

FLEET = parse_fleet(
    {
        "talkgroup": [{"id": "tg1"}],
        "unit": [{"id": "disp", "role": "dispatcher", "priority": 250}],
        "status": [{"code": 3, "text": "at scene"}, {"code": 40001, "text": "need water"}],
    }
)


def told(actions: list[Action], unit: str) -> list[m.Message]:
    return [a.msg for a in actions if isinstance(a, ToUnit) and a.unit == unit]


def published(actions: list[Action]) -> list[m.UnitStatus]:
    return [a.msg for a in actions if isinstance(a, StatusAccepted)]


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
    assert published(out) == [m.UnitStatus(code=3, unit="u1", text="at scene", ts=1002_500_000_000)]
    assert told(out, "u1") == [m.Ok(op="unit_status", ref=7)]
    later = net.unit_message("u1", m.UnitStatus(code=40001, ref=8), 9.0)
    assert net.status_msg("u1") == published(later)[0]
    assert published(later)[0].text == "need water"


def test_a_code_the_fleet_does_not_have_changes_nothing() -> None:
    net = Network(FLEET)
    net.unit_message("u1", m.UnitStatus(code=3, ref=1), 1.0)
    out = net.unit_message("u1", m.UnitStatus(code=4, ref=2), 2.0)
    assert published(out) == []
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
    assert len(published(first)) == 1 and published(again) == []
    assert told(again, "u1") == told(first, "u1")
    assert net.statuses["u1"] == (3, 1.0)  # the time of the first


def test_statuses_are_rate_limited_and_refused_once_a_second() -> None:
    net = Network(FLEET)
    outs = [net.unit_message("u1", m.UnitStatus(code=3, ref=i), 1.0) for i in range(8)]
    assert sum(bool(published(o)) for o in outs) == 5  # the burst
    assert [type(told(o, "u1")[0]).__name__ for o in outs[5:6]] == ["Error"]
    assert outs[6:] == [[], []]  # further refusals are silent
    assert published(net.unit_message("u1", m.UnitStatus(code=3, ref=99), 2.0))  # 1/s again


def test_made_up_units_cannot_grow_the_statuses_kept() -> None:
    net = Network(FLEET, max_units=2)
    for unit in ("x1", "x2", "x3"):
        out = net.unit_message(unit, m.UnitStatus(code=3, ref=1), 1.0)
    [refused] = told(out, "x3")
    assert isinstance(refused, m.Error) and refused.cause == "forbidden"
    assert set(net.statuses) == {"x1", "x2"}
    ok = told(net.unit_message("disp", m.UnitStatus(code=3, ref=1), 1.0), "disp")
    assert ok == [m.Ok(op="unit_status", ref=1)]  # the fleet's own always may


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
    assert "not in the fleet" in problems[0] and "not a time" in problems[1]
    assert again.statuses["u4"] == (3, 2010.0)  # a clock stepped back: now
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
    now_ns = int(time.time() * 1e9)
    old = m.UnitStatus(code=3, unit="u1", text="at scene", ts=now_ns - 3600 * 10**9)
    model.apply("esn/unit/u1/status", old)
    assert model.units["u1"].status == "at scene" and not model.events
    new = m.UnitStatus(code=5, unit="u1", text="returning", ts=now_ns)
    model.apply("esn/unit/u1/status", new)
    model.apply("esn/unit/u1/status", new)  # a duplicate
    assert [e.text for e in model.events] == ["u1 status 5: returning"]
    fresh = m.UnitStatus(code=1, unit="u2", text="available", ts=now_ns)
    model.apply("esn/unit/u2/status", fresh)  # a unit's first status, as it happens
    model.apply("esn/tg/tg1/down/event", m.UnitStatus(code=3, unit="u2", text="lie", ts=now_ns))
    assert model.units["u2"].status == "available" and len(model.events) == 2


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
