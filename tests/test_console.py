"""The dispatcher console, driven headless with Textual's pilot against a real Mosquitto
and server, with simulated handsets on the other side."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from typing import Any

import pytest
from rich.text import Text
from textual.widgets import DataTable, Static

from esn.client.handset import Handset
from esn.console.app import ConsoleApp
from esn.console.map import Point, View, render, scale_bar
from esn.console.model import ConsoleModel
from esn.core.fleet import parse_fleet
from esn.protocol import messages as m
from esn.server.shell import Config, Server
from esn.tools.broker import Mosquitto
from esn.transport import BrokerConfig
from tests.conftest import FLEET, HandsetFactory, eventually


@pytest.fixture(params=["memory", "gmqtt"])
def mqtt_client(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def row(app: ConsoleApp, table: str, key: str) -> list[str]:
    """The cells of a table row as text; empty cells while the row is not there yet."""
    t = app.query_one(f"#{table}", DataTable)
    return [str(c) for c in t.get_row(key)] if key in t.rows else [""] * len(t.columns)


def cell(app: ConsoleApp, table: str, key: str, column: str) -> str:
    """One cell of a table row, by its column's heading, as plain text."""
    t = app.query_one(f"#{table}", DataTable)
    index = [str(c.label) for c in t.ordered_columns].index(column)
    return Text.from_markup(row(app, table, key)[index]).plain


def status_line(app: ConsoleApp) -> str:
    return str(app.query_one("#status", Static).render())


async def select(app: ConsoleApp, pilot: Any, table: str, key: str) -> None:
    """Focus a table and move its cursor to a row, as a dispatcher would with the arrows."""
    await eventually(lambda: key in app.query_one(f"#{table}", DataTable).rows)
    t = app.query_one(f"#{table}", DataTable)
    t.focus()
    for _ in range(200):  # (rows come and go while it moves: up or down, as it stands)
        if str(t.coordinate_to_cell_key(t.cursor_coordinate).row_key.value) == key:
            await pilot.pause()
            return
        above = key in t.rows and t.get_row_index(key) < t.cursor_row
        await pilot.press("up" if above else "down")
    raise AssertionError(f"could not select {key} in {table}")


@pytest.fixture
async def console(
    server: Server, broker: BrokerConfig, prefix: str, mqtt_client: str
) -> AsyncIterator[tuple[ConsoleApp, Any]]:
    app = ConsoleApp(broker, "disp", prefix=prefix, mqtt_client=mqtt_client)
    async with app.run_test(size=(180, 50), notifications=True) as pilot:
        await eventually(lambda: app.link.transport.connected)
        await eventually(lambda: app.model.server_state == "online")
        yield app, pilot


async def test_console_shows_a_talker(
    console: tuple[ConsoleApp, Any], handset: HandsetFactory
) -> None:
    app, _ = console
    u1 = await handset("u1", "tg-1")
    await u1.press("tg-1")
    await eventually(lambda: row(app, "groups", "tg-1")[1:3] == ["taken", "u1"])
    assert any("u1 talks" in e.text for e in app.model.events)
    u1.release("tg-1")
    await eventually(lambda: row(app, "groups", "tg-1")[1] == "idle")


async def test_console_shows_an_emergency_and_acknowledges_it(
    console: tuple[ConsoleApp, Any], handset: HandsetFactory
) -> None:
    app, pilot = console
    u1 = await handset("u1", "tg-1")
    u1.send(m.EmergencyAlert(tg="tg-1", lat=51.5, lon=-0.1))
    await eventually(lambda: "SOS u1 no ack" in cell(app, "groups", "tg-1", "Emergency"))
    assert cell(app, "units", "u1", "Emerg").strip() == "SOS"
    acked = u1.expect(
        lambda i: isinstance(i.msg, m.EmergencyState) and i.msg.state == "acknowledged"
    )
    await select(app, pilot, "groups", "tg-1")
    await pilot.press("a")
    assert (await acked).msg.by == "disp"  # type: ignore[attr-defined]
    await eventually(lambda: any("acknowledged by disp" in e.text for e in app.model.events))
    await eventually(lambda: "SOS u1 ✓disp" in cell(app, "groups", "tg-1", "Emergency"))
    assert cell(app, "units", "u1", "Emerg").strip() == "SOS ✓"
    # a force-release ends the group's emergency: the unit is no longer shown in one
    await pilot.press("f")
    await eventually(lambda: cell(app, "groups", "tg-1", "Emergency") == "")
    await eventually(lambda: cell(app, "units", "u1", "Emerg") == "")


async def test_console_ptt_preempts_a_handset_and_shows_access_time(
    console: tuple[ConsoleApp, Any], handset: HandsetFactory
) -> None:
    app, pilot = console
    u1 = await handset("u1", "tg-1")
    await u1.press("tg-1")
    revoked = u1.expect(lambda i: isinstance(i.msg, m.Revoke))
    await select(app, pilot, "groups", "tg-1")
    await pilot.press("space")
    assert (await revoked).msg.cause == "preempted"  # type: ignore[attr-defined]
    await eventually(lambda: row(app, "groups", "tg-1")[2] == "disp")
    await eventually(lambda: any(e.text.endswith("pre-empting u1") for e in app.model.events))
    await eventually(lambda: "last access" in status_line(app))
    assert app.last_access_ms is not None and app.last_access_ms > 0
    await pilot.press("space")  # PTT again: release
    await eventually(lambda: row(app, "groups", "tg-1")[1] == "idle")


async def test_console_regroups_marked_units(
    console: tuple[ConsoleApp, Any], handset: HandsetFactory
) -> None:
    app, pilot = console
    u1 = await handset("u1", "tg-1")
    u2 = await handset("u2", "tg-1")
    regrouped = [h.expect(lambda i: isinstance(i.msg, m.Regrouped)) for h in (u1, u2)]
    for unit in ("u1", "u2"):
        await select(app, pilot, "units", unit)
        await pilot.press("x")
    await pilot.press("r")
    await pilot.press(*"inc-9", "enter")
    await pilot.press(*"Fire", "enter")
    for fut in regrouped:
        assert (await fut).msg == m.Regrouped(tg="inc-9", name="Fire")
    await eventually(lambda: "(temp)" in "".join(row(app, "groups", "inc-9")))
    assert not app.marked


async def test_console_says_why_the_server_refused(console: tuple[ConsoleApp, Any]) -> None:
    app, pilot = console
    await select(app, pilot, "groups", "tg-1")
    await pilot.press("a")  # nothing to acknowledge
    await eventually(lambda: any("no emergency" in e.text for e in app.model.events))
    await pilot.press("u")  # tg-1 is no temporary group: the server refuses
    await eventually(lambda: any("ungroup refused" in e.text for e in app.model.events))


@pytest.mark.broker
async def test_console_keeps_working_after_a_broker_restart(prefix: str) -> None:
    with Mosquitto() as own:
        cfg = BrokerConfig.from_url(own.url)
        srv = Server(Config(broker=cfg, prefix=prefix), parse_fleet(FLEET))
        await srv.start()
        u1 = Handset("u1", cfg, prefix=prefix)
        app = ConsoleApp(cfg, "disp", prefix=prefix)
        try:
            await u1.start()
            await u1.affiliate("tg-1")
            async with app.run_test(size=(180, 50)):
                await eventually(lambda: app.model.server_state == "online")
                await u1.press("tg-1")
                await eventually(lambda: row(app, "groups", "tg-1")[2] == "u1")
                u1.release("tg-1")
                own.stop()
                await eventually(lambda: not app.link.transport.connected)
                own.start()
                await eventually(
                    lambda: (
                        app.link.transport.connected
                        and srv.transport.connected
                        and u1.transport.connected
                    ),
                    timeout=20,
                )
                await eventually(lambda: "tg-1" in srv.network.affiliations.get("u1", ()))
                await u1.press("tg-1")
                await eventually(lambda: row(app, "groups", "tg-1")[1:3] == ["taken", "u1"])
                assert any("connection back" in e.text for e in app.model.events)
        finally:
            await u1.stop()
            await srv.stop()


def test_map_draws_units_and_marks_emergencies_and_the_selection() -> None:
    points = [
        Point("a", 51.50, -0.10),
        Point("b", 51.60, -0.20, emergency=True),
        Point("c", 51.40, 0.00),
    ]
    text = render(points, 20, 6, View(), selected="c")
    assert text.plain.count("\n") == 5
    dots = [ch for ch in text.plain if "\u2800" < ch <= "\u28ff"]
    assert len(dots) == 3
    styles = {str(span.style) for span in text.spans}
    assert "bold red" in styles and "reverse bold yellow" in styles
    scaled = render(points, 40, 8, View(), selected="c", scale=True)
    lines = scaled.plain.split("\n")
    assert len(lines) == 8 and lines[-1].startswith("├") and lines[-1].endswith(" km")
    # (about 14 km across 40 cells: a 5 km bar, at most a third of the width)
    assert "5 km" in lines[-1] and len(lines[-1].split(" ")[0]) <= 40 // 3 + 1
    assert " c" in scaled.plain and " b" in scaled.plain  # the selected and the SOS named
    assert " a" not in scaled.plain
    assert scale_bar(89.9, 90.3, 0, 1, 40) == ""  # (panned past a pole: no distance)
    assert len(scale_bar(51.5, 51.5001, 0, 0.0001, 40)) <= 40  # (zoomed far in: it fits)
    zoomed = View()
    zoomed.zoom_by(8)  # only the centre unit stays in view
    assert len([ch for ch in render(points, 20, 6, zoomed).plain if ch != " " and ch != "\n"]) == 1


async def test_console_logs_short_messages_with_sender_recipient_and_text_both_ways(
    console: tuple[ConsoleApp, Any], handset: HandsetFactory
) -> None:
    app, pilot = console
    u1 = await handset("u1", "tg-1")
    u1.send(m.Sds(to="unit:disp", text="need a van [/] [@click=app.quit]x[/]", ref=1))
    said = "SDS u1 → unit:disp: need a van [/] [@click=app.quit]x[/]"
    await eventually(lambda: any(e.text == said for e in app.model.events))
    await pilot.pause()  # (the toast is drawn: its brackets are words, not markup)
    assert app.is_running
    got = u1.expect(lambda i: isinstance(i.msg, m.Sds))
    await select(app, pilot, "units", "u1")
    await pilot.press("s")
    await pilot.press(*"on its way", "enter")
    assert (await got).msg.text == "on its way"  # type: ignore[attr-defined]
    await eventually(
        lambda: any(
            e.text == "SDS disp → unit:u1: on its way (delivered)" for e in app.model.events
        )
    )


async def test_a_console_of_a_unit_that_is_no_dispatcher_says_so_at_once(
    server: Server, broker: BrokerConfig, prefix: str, mqtt_client: str
) -> None:
    app = ConsoleApp(broker, "u9", prefix=prefix, mqtt_client=mqtt_client)
    async with app.run_test(size=(120, 40)):
        await eventually(lambda: "NOT A DISPATCHER" in status_line(app))
        assert any("u9 is not a dispatcher" in e.text for e in app.model.events)


async def test_at_80_by_24_floor_queue_and_emergency_fit_and_the_keys_are_one_press_away(
    server: Server, broker: BrokerConfig, prefix: str, mqtt_client: str, handset: HandsetFactory
) -> None:
    names = {"tg-1": "Response North"}
    app = ConsoleApp(broker, "disp", prefix=prefix, mqtt_client=mqtt_client, names=names)
    async with app.run_test(size=(80, 24)) as pilot:
        u1 = await handset("u1", "tg-1")
        u1.send(m.EmergencyAlert(tg="tg-1"))
        await eventually(lambda: "SOS" in cell(app, "groups", "tg-1", "Emergency"))
        assert cell(app, "groups", "tg-1", "Group") == "Response North"
        groups = app.query_one("#groups", DataTable)
        assert not app.query_one("#map").display  # (the map gives way)
        shown = groups.scrollable_content_region.width
        columns = [c for c in groups.ordered_columns]
        upto = [str(c.label) for c in columns].index("Emergency") + 1
        assert sum(c.get_render_width(groups) for c in columns[:upto]) <= shown
        await pilot.press("question_mark")
        await pilot.pause()
        keys = app.screen.query_one("#keys", DataTable)
        assert keys.row_count >= 20  # every key, with what it does
        await pilot.press("escape")


async def test_ages_keep_counting_when_the_server_goes_away(
    console: tuple[ConsoleApp, Any], handset: HandsetFactory, server: Server
) -> None:
    app, _ = console
    u1 = await handset("u1", "tg-1")
    u1.send(m.Location(lat=51.5, lon=-0.1))
    await eventually(lambda: cell(app, "units", "u1", "Age") in ("0s", "1s"))
    await server.stop()
    await eventually(lambda: "offline" in app.model.server_state)
    await eventually(lambda: _seconds(cell(app, "units", "u1", "Age")) >= 3, timeout=6)


def _seconds(age: str) -> int:
    return int(age[:-1]) if age.endswith("s") else -1


def test_each_units_sos_is_acknowledged_on_its_own_and_forged_words_stay_words() -> None:
    """Two SOS in one group: acknowledging one leaves the other unacknowledged, even when
    it repeats its alert; an acknowledgement of nobody's emergency changes nothing; and
    a forged sequence number cannot silence the group's log."""
    model = ConsoleModel("esn")
    event = "esn/tg/tg-1/down/event"
    for unit in ("u1", "u2"):
        model.apply(event, m.Emergency(unit=unit, tg="tg-1"))
    model.apply(event, m.EmergencyState(tg="tg-1", state="acknowledged", by="d", unit="u2"))
    model.apply(event, m.Emergency(unit="u1", tg="tg-1"))  # (u1 repeats its alert)
    g = model.groups["tg-1"]
    assert (model.acked_by(g, "u1"), model.acked_by(g, "u2")) == (None, "d")
    model.apply(event, m.EmergencyState(tg="tg-1", state="acknowledged", by="d", unit="u9"))
    assert "u9" not in g.acked
    floor = "esn/tg/tg-1/down/floor"
    model.apply(floor, m.Taken(tg="tg-1", talker="x", call="c", prio=1, kind="normal", seq=2**62))
    model.apply(floor, m.Taken(tg="tg-1", talker="u1", call="c", prio=1, kind="normal", seq=1))
    assert model.events[-1].text == "u1 talks, prio 1"


async def test_two_sos_in_one_group_are_acknowledged_each_from_the_units_panel(
    console: tuple[ConsoleApp, Any], handset: HandsetFactory
) -> None:
    app, pilot = console
    u1 = await handset("u1", "tg-1")
    u2 = await handset("u2", "tg-1")
    acked = [
        h.expect(lambda i: isinstance(i.msg, m.EmergencyState) and i.msg.state == "acknowledged")
        for h in (u1, u2)
    ]
    for h in (u1, u2):
        h.send(m.EmergencyAlert(tg="tg-1"))
        await eventually(functools.partial(_shows_sos, app, h.unit))
    await select(app, pilot, "units", "u1")  # (the group's last SOS is u2's)
    await pilot.press("a")
    assert (await acked[0]).msg.by == "disp"  # type: ignore[attr-defined]
    await eventually(lambda: cell(app, "units", "u1", "Emerg").strip() == "SOS ✓")
    assert cell(app, "units", "u2", "Emerg").strip() == "SOS"
    assert "SOS u2 no ack" in cell(app, "groups", "tg-1", "Emergency")
    acked[1].cancel()


def _shows_sos(app: ConsoleApp, unit: str) -> bool:
    return cell(app, "units", unit, "Emerg").strip() == "SOS"
