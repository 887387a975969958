"""Incident hotspots: where emergencies and imminent-peril calls concentrate, counted by
map cell for Prometheus and Grafana, and shaded on the console's map."""

from __future__ import annotations

import time
from typing import Any

from rich.text import Text

from esn.console.app import ConsoleApp
from esn.console.map import Point, View, render
from esn.console.model import ConsoleModel
from esn.protocol import messages as m
from esn.server import hotspots
from esn.server.hotspots import Hotspots, cell_of
from esn.server.shell import Server
from tests.conftest import HandsetFactory, eventually
from tests.test_console import console as console  # (the fixture, used here)


def test_incidents_are_counted_by_cell_once_per_unit_and_minute() -> None:
    h = Hotspots()
    assert cell_of(51.5072, -0.1276) == "51.50,-0.15"
    assert cell_of(51.55, 0.3) == "51.55,0.30"  # (a grid line is its cell's south-west side)
    h.incident("u1", "emergency", 0.0, 51.51, -0.12)  # an alert, with its position
    h.incident("u1", "emergency", 5.0)  # its emergency call: the same incident
    h.located("u2", 51.52, -0.13)
    h.incident("u2", "imminent", 6.0)  # at its last reported position
    h.incident("u3", "emergency", 7.0)  # never located
    h.incident("u1", "emergency", 70.0)  # a minute later: a new one
    assert h.recent(80.0) == {
        ("51.50,-0.15", "emergency"): 2,
        ("51.50,-0.15", "imminent"): 1,
        ("unknown", "emergency"): 1,
    }
    assert h.totals == {"emergency": 3, "imminent": 1}
    assert h.recent(70.0 + hotspots.WINDOW_S + 1) == {}  # (the last 15 minutes only)


def test_made_up_positions_cannot_grow_the_cells_exported() -> None:
    """Made-up positions, one a minute: the busiest cells stay shown, the rest are summed."""
    h = Hotspots()
    for _ in range(3):  # a real hotspot
        h.incident("u", "emergency", 0.0, 51.5, -0.1)
        h.incident("u", "emergency", 0.0)  # (a repeat: not counted)
    for i in range(hotspots.MAX_CELLS + 50):
        h.incident(f"x{i}", "emergency", 1.0, -80 + i * 0.1, 10.0)
    h.incident("v", "emergency", 1.0, 51.5, -0.1)
    recent = h.recent(2.0)
    assert len(recent) == hotspots.MAX_CELLS and recent[("51.50,-0.10", "emergency")] == 2
    assert sum(recent.values()) == hotspots.MAX_CELLS + 52


async def test_the_server_exports_where_incidents_happen(
    server: Server, handset: HandsetFactory
) -> None:
    sos = await handset("u1", "tg-1")
    peril = await handset("u2", "tg-2")
    sos.send(m.EmergencyAlert(tg="tg-1", lat=51.52, lon=-0.11, ref=sos.next_ref()))
    peril.send(m.Location(lat=53.48, lon=-2.24))  # Manchester
    await peril.ask(m.Affiliate(groups=["tg-2"], ref=peril.next_ref()))  # (located by now)
    assert isinstance(await peril.press("tg-2", kind="imminent"), m.Granted)
    registry = server.metrics.registry

    def recent(cell: str, kind: str) -> float | None:
        return registry.get_sample_value("esn_incidents_recent", {"cell": cell, "kind": kind})

    await eventually(lambda: recent("51.50,-0.15", "emergency") == 1)
    assert recent("53.45,-2.25", "imminent") == 1
    for kind in ("emergency", "imminent"):
        assert registry.get_sample_value("esn_incidents_total", {"kind": kind}) == 1


def test_the_map_shades_hotspots_and_counts_where_no_unit_is() -> None:
    units = [Point("u1", 51.50, -0.20), Point("u2", 51.60, 0.00)]
    heat = [(51.55, -0.10)] * 2 + [(51.50, -0.20)]
    plain = render(units, 20, 10, View())
    shaded = render(units, 20, 10, View(), heat=heat)
    assert "2" in shaded.plain and "2" not in plain.plain  # two incidents in one empty cell
    assert shaded.plain.replace("2", " ") == plain.plain  # the units' dots are all still there
    styles = {str(span.style) for span in shaded.spans}
    assert any("on dark_orange3" in s for s in styles) and any("on grey30" in s for s in styles)
    assert isinstance(render(units, 20, 10, View(), heat=[(0.0, 0.0)]), Text)  # outside: left out


def test_the_console_keeps_the_last_minutes_incidents_where_they_were() -> None:
    model = ConsoleModel()
    model.apply("esn/loc/u1", m.Location(lat=51.5, lon=-0.1, unit="u1", ts=time.time_ns()))
    model.apply("esn/tg/tg1/down/event", m.Emergency(unit="u1", tg="tg1", lat=51.51, lon=-0.12))
    taken = m.Taken(tg="tg1", talker="u1", call="c1", prio=100, kind="emergency", seq=1)
    model.apply("esn/tg/tg1/down/floor", taken)  # its emergency call: the same incident
    peril = m.Taken(tg="tg2", talker="u1", call="c2", prio=100, kind="imminent", seq=1)
    model.apply("esn/tg/tg2/down/floor", peril)  # at its last position
    model.apply(
        "esn/tg/tg2/down/floor",
        m.Taken(tg="tg2", talker="u9", call="c2", prio=1, kind="imminent", seq=2),
    )  # (nowhere known: not on the map)
    assert [(i.kind, i.lat, i.lon) for i in model.hotspots()] == [
        ("emergency", 51.51, -0.12),
        ("imminent", 51.51, -0.12),
    ]
    assert model.hotspots(time.time() + hotspots.WINDOW_S + 1) == []


async def test_the_console_map_shows_the_hotspots_and_hides_them_on_h(
    console: tuple[ConsoleApp, Any], handset: HandsetFactory
) -> None:
    app, pilot = console
    u1 = await handset("u1", "tg-1")
    u1.send(m.EmergencyAlert(tg="tg-1", lat=51.52, lon=-0.11, ref=u1.next_ref()))

    def title() -> str:
        return str(app.query_one("#map").border_title)

    await eventually(lambda: "hotspots, 15 min: 1" in title())
    await pilot.press("h")
    await eventually(lambda: "hotspots off" in title())
