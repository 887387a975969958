"""Private calls (docs/protocol.md, 11.14): one unit calls another, rung or connected at
once, with floor control or both talking at will. The core with explicit time (and
hypothesis for the one-talker rule), then the wire on a real broker."""

from __future__ import annotations

import asyncio
import functools
import itertools
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from esn.client.handset import Inbound, Refused
from esn.console.app import ConsoleApp
from esn.core.actions import Action, Audit
from esn.core.fleet import parse_fleet
from esn.core.network import Network
from esn.core.private import INACTIVE_S, RING_S
from esn.protocol import messages as m
from esn.protocol.ids import call_owner
from esn.server.shell import Server
from esn.store import pack, unpack
from tests.conftest import HandsetFactory, eventually, online_network, told
from tests.test_console import console as console  # (the fixture, used here)
from tests.test_console import select, status_line
from tests.test_durable import Restartable
from tests.test_durable import restartable as restartable  # (the fixture, used here)
from tests.test_wire_failures import own_broker, restart

FLEET = parse_fleet(
    {
        "defaults": {"max_talk_ms": 10_000},
        "talkgroup": [{"id": "tg1"}],
        "unit": [
            {"id": "disp", "role": "dispatcher", "priority": 250},
            {"id": "sup", "may": ["emergency_private_call"]},
        ],
    }
)


def private(actions: list[Action], unit: str) -> m.Private:
    [msg] = [x for x in told(actions, unit) if isinstance(x, m.Private)]
    return msg


online = functools.partial(online_network, FLEET)


REFS = itertools.count(1000)


def call(net: Network, caller: str, callee: str, now: float = 1.0, **kw: object) -> str:
    msg = m.PrivateCall(unit=callee, ref=next(REFS), **kw)  # type: ignore[arg-type]
    out = net.unit_message(caller, msg, now)
    return private(out, caller).call


def test_a_call_rings_is_answered_and_then_either_may_talk() -> None:
    net = online("u1", "u2")
    out = net.unit_message("u1", m.PrivateCall(unit="u2", ref=7), 1.0)
    rung, ringing = private(out, "u1"), private(out, "u2")
    assert (rung.state, rung.unit, rung.ref) == ("ringing", "u2", 7)
    assert (ringing.state, ringing.unit, ringing.caller, ringing.floor) == (
        "ringing",
        "u1",
        "u1",
        True,
    )
    assert call_owner(rung.call) == "u2" and ringing.call == rung.call  # (kept by the callee)
    assert net.private_voice_to("u1", rung.call, 1.5) is None  # (not connected yet)
    out = net.unit_message("u2", m.PrivateAnswer(call=rung.call, accept=True, ref=3), 2.0)
    assert private(out, "u2").ref == 3
    for u in ("u1", "u2"):
        assert (private(out, u).state, private(out, u).talker) == ("connected", None)
    assert net.private_voice_to("u1", rung.call, 2.1) is None  # (nobody has the turn)
    out = net.unit_message("u1", m.PrivateTalk(call=rung.call, on=True, ref=4), 2.2)
    assert private(out, "u2").talker == "u1"
    assert net.private_voice_to("u1", rung.call, 2.3) == "u2"
    assert net.private_voice_to("u2", rung.call, 2.3) is None  # (not its turn)


def test_with_automatic_answer_the_caller_talks_first() -> None:
    net = online("u1", "u2")
    out = net.unit_message("u1", m.PrivateCall(unit="u2", answer="auto", ref=1), 1.0)
    assert private(out, "u1").state == private(out, "u2").state == "connected"
    assert private(out, "u2").talker == "u1"


def test_outcomes_in_words_offline_busy_rejected_no_answer() -> None:
    net = online("u1", "u2", "u3")
    out = net.unit_message("u1", m.PrivateCall(unit="u9", ref=1), 1.0)
    assert (private(out, "u1").state, private(out, "u1").cause) == ("ended", "offline")
    first = call(net, "u1", "u2")
    out = net.unit_message("u3", m.PrivateCall(unit="u2", ref=1), 1.0)
    assert private(out, "u3").cause == "busy" and told(out, "u2") == []
    out = net.unit_message("u2", m.PrivateAnswer(call=first, accept=False, ref=2), 2.0)
    assert private(out, "u1").cause == "rejected" and private(out, "u2").state == "ended"
    call(net, "u1", "u2", now=3.0)
    assert net.on_timer(3.0 + RING_S - 0.1) == []
    out = net.on_timer(3.0 + RING_S)
    assert private(out, "u1").cause == private(out, "u2").cause == "no_answer"
    assert net.private.calls == {}
    assert net.private.outcomes == {"offline": 1, "busy": 1, "rejected": 1, "no_answer": 1}


def test_the_callees_handset_may_say_it_is_busy() -> None:
    net = online("u1", "u2")
    ringing = call(net, "u1", "u2")
    out = net.unit_message("u2", m.PrivateAnswer(call=ringing, accept=False, cause="busy"), 2.0)
    assert private(out, "u1").cause == "busy"


def test_a_unit_being_rung_may_call_out_and_is_rung_a_bounded_number_of_times() -> None:
    net = online("u1", "u2", "disp", *(f"x{i}" for i in range(10)))
    ringing = call(net, "u1", "u2")
    out = net.unit_message("u2", m.PrivateCall(unit="disp", ref=5), 2.0)  # (it calls out)
    assert private(out, "u1").call == ringing and private(out, "u1").cause == "busy"
    ended, calling = told(out, "u2")
    assert ended.state == "ended" and (calling.unit, calling.state) == ("disp", "ringing")  # type: ignore[attr-defined]
    causes = []
    for i in range(10):  # ten callers ring one unit within a second: it is rung five times
        out = net.unit_message(f"x{i}", m.PrivateCall(unit="u1", ref=1), 3.0 + i / 10)
        causes.append(private(out, f"x{i}").cause)
        net.unit_message("u1", m.PrivateAnswer(call=private(out, f"x{i}").call, accept=False), 3)
    assert causes.count(None) == 5 and causes.count("busy") == 5


def test_half_duplex_turns_follow_the_floor_rules() -> None:
    net = online("u1", "u2")
    c = call(net, "u1", "u2", answer="auto")
    out = net.unit_message("u2", m.PrivateTalk(call=c, on=True, ref=5), 2.0)
    assert told(out, "u1") == [] and private(out, "u2").talker == "u1"  # denied: told who
    out = net.unit_message("u1", m.PrivateTalk(call=c, on=False), 3.0)
    assert private(out, "u2").talker is None
    out = net.unit_message("u2", m.PrivateTalk(call=c, on=True, ref=6), 4.0)
    assert private(out, "u1").talker == private(out, "u2").talker == "u2"
    assert net.private_voice_to("u2", c, 5.0) == "u1" and net.private_voice_to("u1", c, 5.0) is None
    out = net.on_timer(4.0 + 10.0)  # the fleet's talk time: the turn is taken back
    assert private(out, "u1").talker is None and private(out, "u2").cause == "max_talk_time"
    assert private(out, "u2").state == "connected"


def test_without_floor_control_both_talk_at_will() -> None:
    net = online("u1", "u2")
    c = call(net, "u1", "u2", answer="auto", floor=False)
    assert net.private_voice_to("u1", c, 2.0) == "u2"
    assert net.private_voice_to("u2", c, 2.0) == "u1"
    assert net.private_voice_to("u3", c, 2.0) is None  # (not a party: nothing to anyone)


def test_a_call_ends_on_hang_up_inactivity_and_a_party_going_offline() -> None:
    net = online("u1", "u2", "u3", "u4")
    c = call(net, "u1", "u2", answer="auto", floor=False)
    out = net.unit_message("u2", m.PrivateEnd(call=c, ref=9), 2.0)
    assert private(out, "u2").ref == 9 and private(out, "u1").cause == "hung_up"
    c = call(net, "u3", "u4", now=10.0, answer="auto", floor=False)
    net.private_voice_to("u3", c, 20.0)  # (voice keeps it up)
    assert told(net.on_timer(10.0 + INACTIVE_S), "u3") == []
    out = net.on_timer(20.0 + INACTIVE_S)
    assert private(out, "u4").cause == "inactive"
    c = call(net, "u1", "u2", now=100.0, answer="auto")
    out = net.presence("u2", m.Presence(state="offline"), 101.0)
    assert private(out, "u1").cause == "offline" and told(out, "u2") == []
    assert net.private.of == {}


def test_only_the_parties_act_on_a_call() -> None:
    net = online("u1", "u2", "u3")
    c = call(net, "u1", "u2")
    for msg in (
        m.PrivateAnswer(call=c, accept=True, ref=1),
        m.PrivateEnd(call=c, ref=1),
        m.PrivateTalk(call=c, on=True, ref=1),
    ):
        [error] = told(net.unit_message("u3", msg, 2.0), "u3")
        assert isinstance(error, m.Error) and error.cause == "invalid_field"
    [error] = told(net.unit_message("u1", m.PrivateAnswer(call=c, accept=True, ref=2), 2), "u1")
    assert isinstance(error, m.Error)  # (the caller does not answer its own call)
    [error] = told(net.unit_message("u1", m.PrivateCall(unit="u3", ref=3), 2.0), "u1")
    assert isinstance(error, m.Error) and "end it first" in error.detail
    [error] = told(net.unit_message("u3", m.PrivateCall(unit="u3", ref=3), 2.0), "u3")
    assert isinstance(error, m.Error)
    [error] = told(net.unit_message("u4", m.PrivateCall(unit="u3", ref=3), 2.0), "u4")
    assert isinstance(error, m.Error) and "not online" in error.detail


def test_emergency_calls_are_for_dispatchers_and_the_units_the_fleet_names() -> None:
    net = online("u1", "u2", "sup", "disp")
    for caller, callee, allowed in (
        ("u1", "u2", False),
        ("u1", "disp", True),  # (a unit in danger calls its dispatcher)
        ("disp", "u2", True),
        ("sup", "u1", True),  # (may = ["emergency_private_call"])
    ):
        out = net.unit_message(caller, m.PrivateCall(unit=callee, kind="emergency", ref=1), 1)
        reply = told(out, caller)[0]
        assert isinstance(reply, m.Private) == allowed, (caller, callee)
        assert allowed or reply == m.Error(cause="forbidden", detail=reply.detail, ref=1)  # type: ignore[attr-defined]
        assert any(isinstance(a, Audit) for a in out) == allowed
        if allowed:
            net.unit_message(caller, m.PrivateEnd(call=reply.call), 1.0)  # type: ignore[attr-defined]


def test_an_emergency_call_preempts_the_callees_lower_activity() -> None:
    net = online("u1", "u2", "u3", "disp")
    assert isinstance(
        told(net.floor_message("u2", "tg1", m.Request(ref=1), 1.0), "u2")[0], m.Granted
    )
    normal = call(net, "u3", "u2", answer="auto")
    out = net.unit_message("disp", m.PrivateCall(unit="u2", kind="emergency", answer="auto"), 2)
    assert private(out, "u3").cause == "preempted"  # the normal call it was in ends
    assert next(x.call for x in told(out, "u2") if isinstance(x, m.Private)) == normal
    assert told(out, "u2")[0] == m.Revoke(tg="tg1", cause="preempted", ref=1)  # (first)
    assert net.floors["tg1"].holder is None
    net.floor_message("u2", "tg1", m.Request(ref=2), 3.0)  # (it takes the floor again)
    net.presence("sup", m.Presence(state="online"), 3.0)
    out = net.unit_message("sup", m.PrivateCall(unit="u2", kind="emergency", answer="auto"), 3)
    assert private(out, "sup").cause == "busy"  # (an emergency call is not pre-empted)
    assert net.floors["tg1"].holder is not None  # (and a refused call revokes nothing)


def test_an_emergency_call_replaces_the_callers_own_normal_call() -> None:
    net = online("sup", "u2")
    normal = call(net, "sup", "u2", answer="auto")
    out = net.unit_message("sup", m.PrivateCall(unit="u2", kind="emergency", ref=2), 2.0)
    ended, rung = told(out, "u2")
    assert (ended.call, ended.cause) == (normal, "preempted")  # type: ignore[attr-defined]
    assert rung.state == "ringing" and rung.kind == "emergency"  # type: ignore[attr-defined]


def test_refused_calls_cost_no_ring_and_emergency_calls_are_never_rate_limited() -> None:
    net = online("u1", "u2", "disp", *(f"x{i}" for i in range(8)))
    busy = call(net, "u1", "u2", answer="auto")
    for i in range(8):  # (refused busy: the unit is not rung)
        assert (
            private(net.unit_message(f"x{i}", m.PrivateCall(unit="u2"), 2.0), f"x{i}").cause
            == "busy"
        )
    net.unit_message("u1", m.PrivateEnd(call=busy), 2.0)
    for i in range(4):  # (four more calls, refused by the unit itself: five in all)
        out = net.unit_message(f"x{i}", m.PrivateCall(unit="u2"), 2.0)
        assert private(out, f"x{i}").state == "ringing"
        net.unit_message("u2", m.PrivateAnswer(call=private(out, "u2").call, accept=False), 2)
    assert private(net.unit_message("x4", m.PrivateCall(unit="u2"), 2.0), "x4").cause == "busy"
    out = net.unit_message("disp", m.PrivateCall(unit="u2", kind="emergency", answer="auto"), 2)
    assert private(out, "disp").state == "connected"


def test_an_emergency_call_to_a_dispatcher_leaves_its_group_talk_be() -> None:
    net = online("u1", "disp")
    net.floor_message("disp", "tg1", m.Request(ref=1), 1.0)
    out = net.unit_message("u1", m.PrivateCall(unit="disp", kind="emergency", answer="auto"), 2)
    assert not any(isinstance(x, m.Revoke) for x in told(out, "disp"))
    assert net.floors["tg1"].holder is not None


def test_a_call_survives_a_restart_and_is_told_again() -> None:
    net = online("u1", "u2")
    c = call(net, "u1", "u2", answer="auto")
    records = {k: unpack(pack(net.record(k))) for k in net.record_keys() if net.record(k)}
    assert set(records) == {"unit/u1", "unit/u2"} and "private" in records["unit/u2"]
    again = Network(FLEET)
    assert again.load(records, 50.0) == []
    for u in ("u1", "u2"):
        again.presence(u, m.Presence(state="online"), 50.0)
    out = again.settle(50.0)
    assert private(out, "u1").call == c and private(out, "u2").state == "connected"
    assert private(out, "u1").talker is None  # (nobody has the turn after a restart)
    out = again.unit_message("u1", m.PrivateTalk(call=c, on=True), 51.0)
    assert again.private_voice_to("u1", c, 51.0) == "u2"
    assert again.settle(52.0) == []  # (told once: only what was read back)
    gone = Network(FLEET)  # (and read back with the caller gone meanwhile: ended)
    gone.load(records, 50.0)
    gone.presence("u2", m.Presence(state="online"), 50.0)
    assert private(gone.settle(50.0), "u2").cause == "offline"
    assert gone.private.calls == {}


def test_a_forged_call_record_is_not_adopted() -> None:
    net = Network(FLEET)
    base: dict[str, list[str]] = {"groups": [], "answers": []}
    forged = {
        "unit/u1": {**base, "private": ["u9~x", "u2", "normal", True, "connected"]},
        "unit/u3": {**base, "private": ["u3~x", "u3", "normal", True, "connected"]},
        "unit/u4": {**base, "private": ["u4~x", "u5", "imminent", True, "connected"]},
        "unit/u6": {**base, "private": "u6~x"},
        "unit/u7": {**base, "private": ["u7~" + "x" * 100, "u5", "normal", True, "ringing"]},
        "unit/u8": {**base, "private": ["u8~x", "u2", "normal", True, "ringing"]},
        "unit/u9": {**base, "private": ["u9~y", "u2", "normal", True, "ringing"]},  # (u2 again)
    }
    problems = net.load(forged, 1.0)
    assert len(problems) == 6 and list(net.private.calls) == ["u8~x"]
    for u in ("u2", "u8", "u9"):  # (u9's call was not kept, u2 being in u8's: both told)
        net.presence(u, m.Presence(state="online"), 1.0)
    out = net.settle(1.0)
    assert (private(out, "u9").call, private(out, "u9").cause) == ("u9~y", "busy")
    assert [(x.call, x.state) for x in told(out, "u2")] == [  # type: ignore[attr-defined]
        ("u9~y", "ended"),
        ("u8~x", "ringing"),
    ]
    small = Network(FLEET, max_units=1)  # (as many calls as could be real, no more)
    second = {**base, "private": ["u5~z", "u6", "normal", True, "ringing"]}
    assert len(small.load({"unit/u8": forged["unit/u8"], "unit/u5": second}, 1.0)) == 1


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(
                ["call", "auto", "full", "sos", "answer", "reject", "on", "off", "end", "gone"]
            ),
            st.sampled_from(["u1", "u2", "sup"]),
            st.sampled_from(["u1", "u2", "sup"]),
            st.floats(0, 40),
        ),
        max_size=40,
    )
)
def test_never_two_talkers_under_floor_control_nor_voice_outside_a_call(
    steps: list[tuple[str, str, str, float]],
) -> None:
    net = online("u1", "u2", "sup")
    now = 0.0
    for op, unit, other, dt in steps:
        now += dt
        c = net.private.of_unit(unit)
        cid = c.call if c else f"{other}~x"
        match op:
            case "call" | "auto" | "full" | "sos":
                kw = {
                    "auto": {"answer": "auto"},
                    "full": {"floor": False, "answer": "auto"},
                    "sos": {"kind": "emergency", "answer": "auto"},
                }
                net.unit_message(unit, m.PrivateCall(unit=other, **kw.get(op, {})), now)  # type: ignore[arg-type]
            case "answer" | "reject":
                net.unit_message(unit, m.PrivateAnswer(call=cid, accept=op == "answer"), now)
            case "on" | "off":
                net.unit_message(unit, m.PrivateTalk(call=cid, on=op == "on"), now)
            case "end":
                net.unit_message(unit, m.PrivateEnd(call=cid), now)
            case "gone":
                net.presence(unit, m.Presence(state="offline"), now)
                net.presence(unit, m.Presence(state="online"), now)
        net.on_timer(now)
        for c in net.private.calls.values():
            both = [u for u in (c.caller, c.callee) if net.private.may_talk(u, c)]
            if c.floor:
                assert both in ([], [c.talker])  # one talker at most, the one with the turn
            if c.state != "connected":
                assert both == []
            assert c.caller in net.online and c.callee in net.online
            assert net.private.of[c.caller] == net.private.of[c.callee] == c.call
            assert c.active + INACTIVE_S > now or c.state == "ringing"  # (ended when idle)
        assert len(net.private.of) == 2 * len(net.private.calls)  # one call per unit
        assert net.private.connected == [] and not net.private.changed  # (all taken up)


# --- on the wire ------------------------------------------------------------------------


def is_private(state: str, cause: str | None = None) -> Callable[[Inbound], bool]:
    return lambda i: isinstance(i.msg, m.Private) and (i.msg.state, i.msg.cause) == (state, cause)


async def test_a_private_call_rings_is_answered_and_both_talk_in_turn(
    server: Server, handset: HandsetFactory
) -> None:
    """Tried: u1 calls u2 (whose user answers after half a second), each talks in turn,
    u1 hangs up; u3, in their group, forges a packet with the call's id. Expect: ringing,
    then connected with nobody's turn; each hears the other's voice and u3 nothing; the
    forged packet dropped and heard by nobody; both told `hung_up`."""
    caller, callee, other = [await handset(u, "tg-1") for u in ("u1", "u2", "u3")]
    heard_from: list[str | None] = []
    for h in (caller, callee):
        h.on_private_media = heard_from.append
    connected = caller.expect(is_private("connected"))
    rung = await caller.private_call("u2")
    assert rung.state == "ringing"
    assert (await connected).msg.talker is None  # type: ignore[attr-defined]
    assert callee.private is not None and callee.private.call == rung.call
    heard = callee.expect(lambda i: isinstance(i.msg, m.Media) and i.msg.talker == "u1")
    assert await caller.talk_private(0.3)
    await heard
    dropped = server.metrics.media_dropped.get("not_holder", 0)
    forged = {"t": "media", "call": rung.call, "seq": 1, "data": b"x"}
    other.transport.publish(other.topics.unit_media_up("u3"), msgpack.packb(forged))
    await eventually(lambda: server.metrics.media_dropped.get("not_holder", 0) > dropped)
    heard = caller.expect(lambda i: isinstance(i.msg, m.Media) and i.msg.talker == "u2")
    assert await callee.talk_private(0.3)
    await heard
    ended = callee.expect(is_private("ended", "hung_up"))
    hung = await caller.hang_up()
    assert hung is not None and (hung.call, hung.state, hung.cause) == (
        rung.call,
        "ended",
        "hung_up",
    )
    await ended
    assert caller.private is None and callee.private is None
    assert set(heard_from) == {"u1", "u2"}  # (the forged packet reached neither)


async def test_busy_rejected_and_offline_are_told_in_words(
    server: Server, handset: HandsetFactory
) -> None:
    """Tried: u2 lets a call from u1 ring; u3 calls u2 meanwhile; u2 refuses u1's call;
    u1 calls a unit that is offline. Expect: busy, rejected, offline."""
    caller, callee, third = [await handset(u, "tg-1") for u in ("u1", "u2", "u3")]
    callee.answer_after = None
    rung = await caller.private_call("u2")
    await eventually(lambda: callee.private is not None and callee.private.state == "ringing")
    assert (await third.private_call("u2")).cause == "busy"
    told = caller.expect(is_private("ended", "rejected"))
    assert (await callee.answer_private(accept=False)).cause == "rejected"
    assert (await told).msg.call == rung.call  # type: ignore[attr-defined]
    assert (await caller.private_call("u9")).cause == "offline"


async def test_an_emergency_private_call_takes_the_callee_off_its_group_talk(
    server: Server, handset: HandsetFactory
) -> None:
    """Tried: u2 talks in tg-1; the dispatcher makes an emergency call to u2 with
    automatic answer. Expect: u2's talk is revoked (`preempted`), the call is connected at
    once, and u2 hears the dispatcher, not the group."""
    disp, callee, listener = [await handset(u, "tg-1") for u in ("disp", "u2", "u3")]
    revoked = callee.expect(lambda i: isinstance(i.msg, m.Revoke))
    talking = asyncio.ensure_future(callee.talk_burst("tg-1", 5.0))
    await listener.expect(lambda i: isinstance(i.msg, m.Media))
    answer = await disp.private_call("u2", kind="emergency", answer="auto")
    assert (answer.state, answer.talker) == ("connected", "disp")
    assert (await revoked).msg == m.Revoke(
        tg="tg-1", cause="preempted", ref=(await revoked).msg.ref
    )
    assert (await talking).outcome == "revoked"
    heard = callee.expect(lambda i: isinstance(i.msg, m.Media) and i.msg.talker == "disp")
    assert await disp.talk_private(0.3)
    await heard
    assert callee.private is not None and callee.private.kind == "emergency"


async def test_a_private_call_goes_on_after_a_server_restart(
    restartable: Restartable, handset: HandsetFactory
) -> None:
    """Tried: a connected call, the server stopped and started again on its state file.
    Expect: both parties told the call again (same id, the turn as it was), and voice
    relayed again."""
    await restartable.start()
    caller, callee = await handset("u1", "tg-1"), await handset("u2", "tg-1")
    answer = await caller.private_call("u2", answer="auto", floor=False)
    assert answer.state == "connected"
    await restartable.stop()
    told_again = callee.expect(lambda i: isinstance(i.msg, m.Private) and i.msg.ref is None)
    await restartable.start()
    assert (await told_again).msg == replace(answer, unit="u1", ref=None)
    heard = callee.expect(lambda i: isinstance(i.msg, m.Media) and i.msg.talker == "u1")
    assert await caller.talk_private(0.3)
    await heard


async def test_the_console_calls_a_unit_talks_and_hangs_up(
    console: tuple[ConsoleApp, Any], handset: HandsetFactory
) -> None:
    """Tried, as a dispatcher: `d` on a unit, `k` to talk and `k` again, `d` to hang up.
    Expect: the unit's user answers, the status line shows the call and who talks, the
    unit hears the dispatcher, and the end is logged in words."""
    app, pilot = console
    u1 = await handset("u1", "tg-1")
    u1.send(m.Location(lat=51.5, lon=-0.1))  # (so it shows in the units panel)
    await select(app, pilot, "units", "u1")

    await pilot.press("d")
    await eventually(lambda: "PRIVATE CALL with u1 (connected)" in status_line(app))
    await pilot.press("k")
    await eventually(lambda: "PRIVATE CALL with u1 (connected, disp talks)" in status_line(app))
    await eventually(lambda: u1.stats.counts.get("private_rx", 0) > 3)
    await pilot.press("k")
    await eventually(lambda: "PRIVATE CALL with u1 (connected)" in status_line(app))
    await pilot.press("d")
    await eventually(lambda: "PRIVATE CALL" not in status_line(app) and u1.private is None)
    assert any("private call with u1 ended: hung up" in e.text for e in app.model.events)


async def test_a_handset_whose_call_the_server_forgot_leaves_it_when_told(
    restartable: Restartable, handset: HandsetFactory
) -> None:
    """Tried: a connected call, the server restarted without its state file. Expect: the
    hang-up is refused (no such call), the handset takes the call as over, and it can be
    called again (not `busy` for good)."""
    await restartable.start()
    caller, callee = await handset("u1", "tg-1"), await handset("u2", "tg-1")
    assert (await caller.private_call("u2", answer="auto")).state == "connected"
    await restartable.stop()
    await asyncio.to_thread(Path(restartable.config.state or "").unlink)
    await restartable.start()
    with pytest.raises(Refused):
        await caller.hang_up()
    assert caller.private is None
    assert (await callee.private_call("u1", answer="auto")).state == "connected"
    await eventually(lambda: caller.private is not None and caller.private.state == "connected")


async def test_after_a_broker_restart_the_call_is_hung_up_not_left_behind(
    prefix: str, mqtt_client: str
) -> None:
    """Tried: a connected call; the broker restarted (no will fires: the links just
    drop). Expect: once back, the handsets hang the call up, so the server keeps no call
    they are not in, and they can call each other again."""
    if mqtt_client == "memory":
        pytest.skip("a broker restart needs a real broker")
    async with own_broker(prefix, mqtt_client, "u1", "u2") as (own, srv, (a, b)):
        assert (await a.private_call("u2", answer="auto")).state == "connected"
        await restart(own, srv, [a, b])
        # (a hang-up sent before the server was back is sent again, 1 to 6 s apart)
        await eventually(lambda: not srv.network.private.calls, timeout=20)
        assert (await b.private_call("u1", answer="auto")).state == "connected"
