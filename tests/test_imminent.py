"""Imminent-peril group calls (docs/protocol.md, 11.12): between normal and emergency, with
its own pre-emption rules, raised in place during a call and cancelled during one. The
core with explicit time, then the wire on a real broker and the console."""

from __future__ import annotations

from typing import Any

import pytest

from esn.console.app import ConsoleApp
from esn.core.actions import Action
from esn.core.fleet import parse_fleet
from esn.core.network import Network
from esn.protocol import messages as m
from esn.server.shell import Server
from esn.store import pack, unpack
from esn.transport import BrokerConfig
from tests.conftest import HandsetFactory, eventually
from tests.conftest import told as to
from tests.test_console import cell, select
from tests.test_core_floor import FLEET, group, req


@pytest.fixture
def net() -> Network:
    n = Network(parse_fleet(FLEET))
    for u in ("a", "b", "c", "disp", "boss"):
        n.unit_message(u, m.Affiliate(groups=["tg1"]), 0.0)
    return n


def cancel(net: Network, unit: str, now: float, ref: int = 1) -> list[Action]:
    return net.unit_message(unit, m.ImminentCancel(tg="tg1", ref=ref), now)


def taken(actions: list[Action]) -> list[m.Taken]:
    return [x for x in group(actions) if isinstance(x, m.Taken)]


def test_an_imminent_peril_call_puts_the_group_in_imminent_peril(net: Network) -> None:
    out = req(net, "a", 1.0, kind="imminent", ref=5)
    [granted] = to(out, "a")
    assert isinstance(granted, m.Granted) and granted.kind == "imminent"
    state = net.state_msg("tg1", 1.0)
    assert (state.imminent, state.emergency, state.kind) == (True, False, "imminent")
    # a normal request waits, however high its priority; a higher imminent one pre-empts
    assert isinstance(to(req(net, "boss", 1.1), "boss")[0], m.Queued)
    out = req(net, "boss", 1.2, kind="imminent")
    assert isinstance(to(out, "a")[0], m.Revoke) and net.floors["tg1"].holder.unit == "boss"  # type: ignore[union-attr]
    # the group stays in imminent peril for both until each ends his own
    assert net.floors["tg1"].perils == {"a", "boss"}


def test_a_call_is_raised_in_place_normal_imminent_emergency(net: Network) -> None:
    req(net, "a", 1.0)
    call = net.state_msg("tg1", 1.0).call
    up = req(net, "a", 2.0, kind="imminent")
    assert [(t.kind, t.call) for t in taken(up)] == [("imminent", call)]
    assert net.state_msg("tg1", 2.0).imminent is True
    up = req(net, "a", 3.0, kind="emergency")
    assert [(t.kind, t.call) for t in taken(up)] == [("emergency", call)]
    state = net.state_msg("tg1", 3.0)
    assert (state.imminent, state.emergency) == (None, True)  # the emergency supersedes it


def test_cancelled_during_the_call_the_talker_goes_on_at_normal(net: Network) -> None:
    req(net, "a", 1.0, kind="imminent", ref=5)
    call = net.state_msg("tg1", 1.0).call
    out = cancel(net, "a", 2.0, ref=9)
    assert m.Ok(op="imminent_cancel", ref=9) in to(out, "a")
    granted = [x for x in to(out, "a") if isinstance(x, m.Granted)]
    assert [(g.kind, g.call, g.ref) for g in granted] == [("normal", call, 5)]
    assert m.ImminentCancel(tg="tg1", unit="a") in group(out)
    assert [(t.talker, t.kind) for t in taken(out)] == [("a", "normal")]
    state = net.state_msg("tg1", 2.0)
    assert (state.imminent, state.kind, state.talker) == (None, "normal", "a")
    # the call is an ordinary one now: a priority above the threshold takes it
    assert isinstance(to(req(net, "boss", 3.0), "boss")[0], m.Granted)


def test_only_its_originator_or_a_dispatcher_ends_an_imminent_peril(net: Network) -> None:
    req(net, "a", 1.0, kind="imminent")
    [refused] = to(cancel(net, "b", 2.0), "b")
    assert isinstance(refused, m.Error) and refused.cause == "invalid_field"
    assert "no imminent peril of yours" in refused.detail
    assert net.state_msg("tg1", 2.0).imminent is True
    out = cancel(net, "disp", 3.0)
    assert m.Ok(op="imminent_cancel", ref=1) in to(out, "disp")
    assert net.floors["tg1"].perils == set() and net.floors["tg1"].holder.kind == "normal"  # type: ignore[union-attr]
    [nothing] = to(cancel(net, "disp", 4.0, ref=2), "disp")
    assert isinstance(nothing, m.Error) and "no imminent peril in tg1" in nothing.detail


def test_an_emergency_cancelled_during_its_call_keeps_v1s_rule(net: Network) -> None:
    """v1: `emergency_cancel` ends the group's emergency, not the call's kind (a v1 client
    reclaiming after `online` asks at the kind it was granted)."""
    req(net, "a", 1.0, kind="emergency", ref=3)
    out = net.unit_message("a", m.EmergencyCancel(tg="tg1", ref=4), 2.0)
    assert taken(out) == [] and not [x for x in to(out, "a") if isinstance(x, m.Granted)]
    state = net.state_msg("tg1", 2.0)
    assert (state.emergency, state.kind, state.talker) == (False, "emergency", "a")


def test_cancelled_after_its_talk_time_the_talker_is_not_told_to_go_on(net: Network) -> None:
    req(net, "a", 1.0, kind="imminent", ref=5)
    revoked = net.on_timer(11.0)  # T2 (10 s): revoke, T3 grace (1 s) starts
    assert isinstance(to(revoked, "a")[0], m.Revoke)
    out = cancel(net, "a", 11.5)
    assert m.Ok(op="imminent_cancel", ref=1) in to(out, "a")
    assert not [x for x in to(out, "a") if isinstance(x, m.Granted)]
    assert [(t.talker, t.kind) for t in taken(out)] == [("a", "normal")]


def test_an_emergency_alert_supersedes_an_imminent_peril(net: Network) -> None:
    req(net, "a", 1.0, kind="imminent")
    net.unit_message("b", m.EmergencyAlert(tg="tg1", ref=1), 2.0)
    state = net.state_msg("tg1", 2.0)
    assert (state.imminent, state.emergency, state.kind) == (None, True, "imminent")
    # an imminent call in a group in emergency opens no imminent peril
    req(net, "boss", 3.0, kind="imminent")
    assert net.floors["tg1"].perils == set()


def test_an_imminent_peril_outlives_a_restart_and_a_forged_one_does_not() -> None:
    fleet = parse_fleet(FLEET)
    net = Network(fleet, wall_offset=1000.0)
    net.unit_message("a", m.Affiliate(groups=["tg1", "closed"]), 0.0)
    req(net, "a", 1.0, kind="imminent")
    records = {k: unpack(pack(net.record(k))) for k in net.changed}
    assert records["group/tg1"]["perils"] == ["a"]
    records["group/closed"] = {**records["group/tg1"], "holder": None, "perils": ["b", "a"]}
    again = Network(fleet, wall_offset=1000.0)
    problems = again.load(records, 2.0)
    assert again.state_msg("tg1", 2.0).imminent is True
    assert again.floors["closed"].perils == {"a"}
    assert problems == ["group/closed: imminent peril not kept: b is not a member"]


# --- on the wire ----------------------------------------------------------------------


async def test_imminent_peril_is_shown_raised_and_cancelled_over_the_wire(
    server: Server, handset: HandsetFactory
) -> None:
    talker = await handset("u1", "tg-1")
    listener = await handset("u2", "tg-1")
    peril = listener.expect(lambda i: isinstance(i.msg, m.State) and i.msg.imminent is True)
    granted = await talker.press("tg-1", kind="imminent")
    assert isinstance(granted, m.Granted) and granted.kind == "imminent"
    assert (await peril).msg.talker == "u1"  # type: ignore[attr-defined]
    over = listener.expect(
        lambda i: isinstance(i.msg, m.State) and not i.msg.imminent and i.msg.talker == "u1"
    )
    told = listener.expect(lambda i: isinstance(i.msg, m.ImminentCancel))
    lowered = talker.expect(lambda i: isinstance(i.msg, m.Granted) and i.msg.kind == "normal")
    ok = await talker.ask(m.ImminentCancel(tg="tg-1", ref=talker.next_ref()))
    assert isinstance(ok, m.Ok) and ok.op == "imminent_cancel"
    assert (await lowered).msg.call == granted.call  # type: ignore[attr-defined]
    assert (await over).msg.kind == "normal"  # type: ignore[attr-defined]
    assert (await told).msg.unit == "u1"  # type: ignore[attr-defined]


async def test_the_console_shows_imminent_peril_and_a_dispatcher_ends_it(
    server: Server, broker: BrokerConfig, prefix: str, mqtt_client: str, handset: HandsetFactory
) -> None:
    talker = await handset("u1", "tg-1")
    app = ConsoleApp(broker, "disp", prefix=prefix, mqtt_client=mqtt_client)
    pilot: Any
    async with app.run_test(size=(180, 50)) as pilot:
        await eventually(lambda: app.model.server_state == "online")
        lowered = talker.expect(lambda i: isinstance(i.msg, m.Granted) and i.msg.kind == "normal")
        assert isinstance(await talker.press("tg-1", kind="imminent"), m.Granted)
        await eventually(lambda: "PERIL" in cell(app, "groups", "tg-1", "Emergency"))
        await select(app, pilot, "groups", "tg-1")
        await pilot.press("i")
        await lowered
        await eventually(lambda: "PERIL" not in cell(app, "groups", "tg-1", "Emergency"))
        assert any("imminent peril cancelled by disp" in e.text for e in app.model.events)
        assert any("imminent peril ended" in e.text for e in app.model.events)
