"""Listening in and remote talk (docs/protocol.md, 11.13): an authorised unit opens another
unit's microphone unknown to its user, or makes it talk in its group. The core with
explicit time, then the wire on a real broker."""

from __future__ import annotations

import functools
from typing import Any

import msgpack
import pytest

from esn.console.app import ConsoleApp
from esn.core.actions import Audit
from esn.core.fleet import FleetError, parse_fleet
from esn.core.network import MAX_LISTENED, Network
from esn.protocol import codec
from esn.protocol import messages as m
from esn.server.shell import Server
from esn.store import pack, unpack
from tests.conftest import HandsetFactory, eventually, online_network, told
from tests.test_console import console as console  # (the fixture, used here)
from tests.test_console import row, select, status_line

FLEET = parse_fleet(
    {
        "talkgroup": [{"id": "tg1"}],
        "unit": [
            {"id": "disp", "role": "dispatcher", "priority": 250, "may": ["ambient_listening"]},
            {"id": "sup", "may": ["remote_talk", "ambient_listening"]},
            {"id": "disp2", "role": "dispatcher"},  # not authorised
        ],
    }
)


online = functools.partial(online_network, FLEET)


def test_a_fleet_grants_these_by_name_only() -> None:
    assert FLEET.units["sup"].may == {"remote_talk", "ambient_listening"}
    with pytest.raises(FleetError, match="may lists only ambient_listening, remote_talk"):
        parse_fleet({"unit": [{"id": "x", "may": ["everything"]}]})


def test_listening_in_opens_the_microphone_unknown_to_the_user_and_is_audited() -> None:
    net = online("disp", "u1")
    out = net.unit_message("disp", m.AmbientListen(unit="u1", ref=4), 1.0)
    [opened] = told(out, "u1")
    assert isinstance(opened, m.MicOpen)  # all the target is sent: its handset shows nothing
    assert told(out, "disp") == [m.Ambient(unit="u1", call=opened.call, state="listening", ref=4)]
    assert [a.what for a in out if isinstance(a, Audit)] == ["ambient_listen"]
    assert net.ambient_listener("u1") == ("disp", opened.call)
    again = net.unit_message("disp", m.AmbientListen(unit="u1", ref=5), 2.0)  # (told again)
    assert told(again, "u1") == [] and told(again, "disp")[0].state == "listening"  # type: ignore[attr-defined]
    out = net.unit_message("disp", m.AmbientEnd(unit="u1", ref=6), 3.0)
    assert told(out, "u1") == [m.MicClose(call=opened.call)]
    assert told(out, "disp") == [m.Ambient(unit="u1", call=opened.call, state="ended", ref=6)]
    assert net.ambient_listener("u1") is None


@pytest.mark.parametrize(
    ("who", "target", "why"),
    [
        ("disp2", "u1", "forbidden"),  # a dispatcher the fleet does not authorise
        ("u2", "u1", "forbidden"),
        ("disp", "u9", "invalid_field"),  # offline
        ("disp", "disp", "invalid_field"),  # itself
        ("sup", "u1", "invalid_field"),  # another listens already
    ],
)
def test_only_the_authorised_listen_and_only_to_a_unit_online_and_free(
    who: str, target: str, why: str
) -> None:
    net = online("disp", "disp2", "sup", "u1", "u2")
    if who == "sup":
        net.unit_message("disp", m.AmbientListen(unit="u1", ref=1), 1.0)
    [refused] = told(net.unit_message(who, m.AmbientListen(unit=target, ref=2), 1.0), who)
    assert isinstance(refused, m.Error) and refused.cause == why
    assert [by for by, _ in net.ambient.values()] == (["disp"] if who == "sup" else [])


def test_going_offline_ends_it_on_either_side() -> None:
    net = online("disp", "sup", "u1", "u2")
    net.unit_message("disp", m.AmbientListen(unit="u1", ref=1), 1.0)
    net.unit_message("sup", m.AmbientListen(unit="u2", ref=1), 1.0)
    out = net.presence("u1", m.Presence(state="offline"), 2.0)
    [ended] = told(out, "disp")
    assert isinstance(ended, m.Ambient) and (ended.state, ended.cause) == ("ended", "offline")
    out = net.presence("sup", m.Presence(state="offline"), 3.0)
    assert isinstance(told(out, "u2")[0], m.MicClose)  # its listener left: the mic closes
    assert net.ambient == {}


def test_one_listener_listens_to_a_bounded_number_of_units() -> None:
    units = [f"u{i}" for i in range(MAX_LISTENED + 1)]
    net = online("disp", *units)
    answers = [
        told(net.unit_message("disp", m.AmbientListen(unit=u), 1.0), "disp")[0] for u in units
    ]
    assert all(isinstance(a, m.Ambient) for a in answers[:-1])
    assert isinstance(answers[-1], m.Error) and answers[-1].cause == "forbidden"


def test_listening_in_outlives_a_restart_unless_the_listener_lost_the_right() -> None:
    net = online("disp", "u1", "u2")
    net.unit_message("disp", m.AmbientListen(unit="u1", ref=1), 1.0)
    records = {k: unpack(pack(net.record(k))) for k in net.changed}
    records["unit/u2"] = {"groups": [], "answers": [], "ambient": ["disp2", "c9"]}
    again = Network(FLEET)
    problems = again.load(records, 2.0)
    assert again.ambient == net.ambient
    assert problems == ["unit/u2: listening in not kept: 'disp2' may not listen in"]


def test_remote_talk_tells_the_unit_to_press_within_its_groups_talk_time() -> None:
    net = online("sup", "u1", "u3")
    out = net.unit_message("sup", m.RemoteTalk(unit="u1", tg="tg1", seconds=600, ref=3), 1.0)
    assert told(out, "u1") == [m.RemoteTalk(tg="tg1", seconds=30, by="sup")]  # (T2: 30 s)
    assert told(out, "sup") == [m.Ok(op="remote_talk", ref=3)]
    assert [a.what for a in out if isinstance(a, Audit)] == ["remote_talk"]
    [refused] = told(net.unit_message("u3", m.RemoteTalk(unit="u1", tg="tg1"), 1.0), "u3")
    assert isinstance(refused, m.Error) and refused.cause == "forbidden"
    [absent] = told(net.unit_message("sup", m.RemoteTalk(unit="u9", tg="tg1"), 1.0), "sup")
    assert isinstance(absent, m.Error) and absent.detail == "u9 is not online"


# --- on the wire ----------------------------------------------------------------------


async def test_a_dispatcher_hears_a_unit_whose_user_is_shown_nothing(
    server: Server, handset: HandsetFactory
) -> None:
    """Tried: the fleet's dispatcher listens in on u1, then stops. Expect: u1's handset
    sends its microphone on its unit media topic, relayed to the dispatcher only; u1's
    user (its inbox and hooks) is shown nothing; after the end nothing more is relayed."""
    target = await handset("u1", "tg-1")
    listener = await handset("disp", "tg-1")
    other = await handset("u2", "tg-1")
    heard = listener.expect(lambda i: isinstance(i.msg, m.Media) and i.msg.talker == "u1")
    shown = len(target.inbox)
    answer = await listener.ask(m.AmbientListen(unit="u1", ref=listener.next_ref()))
    assert isinstance(answer, m.Ambient) and answer.state == "listening"
    await heard
    assert target.inbox[shown:] == [] and target.stats.counts.get("mic_open") == 1
    ended = await listener.ask(m.AmbientEnd(unit="u1", ref=listener.next_ref()))
    assert isinstance(ended, m.Ambient) and ended.state == "ended"
    await eventually(lambda: target._mic is None)
    assert other.stats.counts.get("ambient_rx", 0) == 0  # nobody else heard it
    assert target.inbox[shown:] == []


async def test_remote_talk_makes_a_unit_talk_in_its_group(
    server: Server, handset: HandsetFactory
) -> None:
    """Tried: a handset the fleet does not authorise, then the dispatcher, make u1 talk in
    tg-1 for a second. Expect: the first refused; then u1 presses PTT, is granted, and
    its group hears it, for about the second asked."""
    target = await handset("u1", "tg-1")
    member = await handset("u2", "tg-1")
    asker = await handset("boss", "tg-1")
    refused = await asker.ask(m.RemoteTalk(unit="u1", tg="tg-1", ref=asker.next_ref()))
    assert isinstance(refused, m.Error) and refused.cause == "forbidden"
    disp = await handset("disp", "tg-1")
    heard = member.expect(lambda i: isinstance(i.msg, m.Media) and i.msg.talker == "u1")
    idle = member.expect(lambda i: isinstance(i.msg, m.Idle), timeout=10)
    asked = m.RemoteTalk(unit="u1", tg="tg-1", seconds=1, ref=disp.next_ref())
    assert await disp.ask(asked) == m.Ok(op="remote_talk", ref=asked.ref)
    await heard
    await idle  # released after the second asked
    assert target.stats.counts.get("remote_talk") == 1


async def test_the_console_listens_in_and_makes_a_unit_talk(
    console: tuple[ConsoleApp, Any], handset: HandsetFactory
) -> None:
    app, pilot = console
    u1 = await handset("u1", "tg-1")
    u1.send(m.Location(lat=51.5, lon=-0.1))  # (so it shows in the units panel)
    await select(app, pilot, "units", "u1")
    await pilot.press("l")

    await eventually(lambda: app.listening.get("u1", 0) > 3 and "LISTENING IN" in status_line(app))
    await pilot.press("l")
    await eventually(lambda: "LISTENING IN" not in status_line(app) and u1._mic is None)
    await select(app, pilot, "groups", "tg-1")
    await select(app, pilot, "units", "u1")
    await pilot.press("t")
    await eventually(lambda: row(app, "groups", "tg-1")[2] == "u1")
    assert any("made to talk in tg-1" in e.text for e in app.model.events)


def test_a_dispatcher_is_never_listened_to_nor_made_to_talk_nor_a_user_cut_off() -> None:
    net = online("disp", "sup", "disp2", "u1")
    refused = told(net.unit_message("sup", m.AmbientListen(unit="disp2", ref=1), 1.0), "sup")
    assert isinstance(refused[0], m.Error) and "is a dispatcher" in refused[0].detail
    net.floor_message("u1", "tg1", m.Request(ref=1), 1.0)  # u1's user talks already
    [busy] = told(net.unit_message("sup", m.RemoteTalk(unit="u1", tg="tg1", ref=2), 1.0), "sup")
    assert isinstance(busy, m.Error) and "talks or waits in tg1" in busy.detail
    net.unit_message("sup", m.AmbientListen(unit="u1", ref=3), 1.0)
    assert net.ambient["u1"][1].startswith("a") and len(net.ambient["u1"][1]) == 17  # random


def test_read_back_a_session_opens_the_microphone_again_or_ends_if_a_side_left() -> None:
    net = online("disp", "sup", "u1", "u2")
    net.unit_message("disp", m.AmbientListen(unit="u1", ref=1), 1.0)
    net.unit_message("sup", m.AmbientListen(unit="u2", ref=1), 1.0)
    records = {k: unpack(pack(net.record(k))) for k in net.changed}
    records["unit/disp"] = {"groups": [], "answers": [], "ambient": ["disp", "c1"]}  # itself
    again = Network(FLEET)
    problems = again.load(records, 2.0)
    assert problems == ["unit/disp: listening in not kept: disp may not listen to disp now"]
    for unit in ("disp", "u1", "u2"):  # (sup is offline now)
        again.presence(unit, m.Presence(state="online"), 2.0)
    out = again.settle(2.0)
    assert told(out, "u1") == [m.MicOpen(call=net.ambient["u1"][1])]  # (it may have restarted)
    assert told(out, "u2") == [m.MicClose(call=net.ambient["u2"][1])]
    assert set(again.ambient) == {"u1"}


async def test_a_microphone_nobody_listens_to_is_closed(
    server: Server, handset: HandsetFactory
) -> None:
    """Tried: a unit sends on its unit media topic with no session (its server restarted
    without it, say); and, in the open profile, a retained `mic_open` of someone's making
    waits on another unit's down topic when that unit connects. Expect: the first is told
    `mic_close` for that call; the second is ignored: that unit sends nothing."""
    u1 = await handset("u1")
    packet = {"t": "media", "call": "stale", "seq": 1, "data": b"x"}
    u1._mic_call = "stale"  # (as if its session had been lost at the server)
    u1.transport.publish(u1.topics.unit_media_up("u1"), msgpack.packb(packet), qos=0)
    await eventually(lambda: u1.stats.counts.get("mic_close", 0) == 1)
    assert u1._mic_call is None
    lie = codec.encode(m.MicOpen(call="forged"))
    u1.transport.publish(u1.topics.unit_down("u7"), lie, qos=1, retain=True)
    await u1.ask(m.Affiliate(groups=[], ref=u1.next_ref()))  # (the broker has it by now)
    u7 = await handset("u7")
    await eventually(lambda: u7.stats.counts.get("retained_ignored", 0) == 1)
    assert u7._mic is None and "mic_open" not in u7.stats.counts
    u1.transport.publish(u1.topics.unit_down("u7"), b"", qos=1, retain=True)  # (cleared)
