"""Every floor rule over the wire: real Mosquitto, real server, handsets on both transports."""

from __future__ import annotations

from collections.abc import Callable

from esn.client.handset import HAS_PERMISSION, NO_PERMISSION, QUEUED, Inbound
from esn.protocol import messages as m
from esn.server.shell import Server
from tests.conftest import HandsetFactory, eventually


def on_floor(msg_type: type[m.Message], tg: str) -> Callable[[Inbound], bool]:
    return lambda i: isinstance(i.msg, msg_type) and getattr(i.msg, "tg", None) == tg


async def test_grant_is_announced_to_the_group_and_media_reaches_listeners(
    server: Server, handset: HandsetFactory
) -> None:
    talker = await handset("u1", "tg-1")
    listener = await handset("u2", "tg-1")
    taken = listener.expect(on_floor(m.Taken, "tg-1"))
    media = listener.expect(lambda i: isinstance(i.msg, m.Media))
    granted = await talker.press("tg-1")
    assert isinstance(granted, m.Granted)
    assert (granted.kind, granted.prio, granted.max_ms) == ("normal", 100, 30000)
    assert talker.floor_state("tg-1") == HAS_PERMISSION
    t = (await taken).msg
    assert isinstance(t, m.Taken) and t.talker == "u1" and t.call == granted.call
    relayed = (await media).msg
    assert isinstance(relayed, m.Media)
    assert (relayed.talker, relayed.tg, relayed.call) == ("u1", "tg-1", granted.call)
    idle = listener.expect(on_floor(m.Idle, "tg-1"))
    talker.release("tg-1")
    assert (await idle).msg.call == granted.call  # type: ignore[attr-defined]
    assert listener.stats.mouth_to_ear_s and max(listener.stats.mouth_to_ear_s) < 5


async def test_queue_positions_and_grant_on_release(
    server: Server, handset: HandsetFactory
) -> None:
    a = await handset("u1", "tg-1")
    b = await handset("u2", "tg-1")
    c = await handset("boss", "tg-1")  # priority 220
    d = await handset("u4", "tg-1")
    assert isinstance(await a.press("tg-1"), m.Granted)
    qb = await b.press("tg-1")
    assert isinstance(qb, m.Queued) and qb.pos == 1
    qd = await d.press("tg-1")
    assert isinstance(qd, m.Queued) and qd.pos == 2
    # boss (220 >= threshold 200) pre-empts a normal holder at prio 100
    revoked = a.expect(on_floor(m.Revoke, "tg-1"))
    assert isinstance(await c.press("tg-1"), m.Granted)
    assert (await revoked).msg.cause == "preempted"  # type: ignore[attr-defined]
    await eventually(lambda: a.floor_state("tg-1") == NO_PERMISSION)
    # release: the head of the queue is granted and the next one moves up
    b_granted = b.expect(on_floor(m.Granted, "tg-1"))
    d_moved = d.expect(on_floor(m.Queued, "tg-1"))
    c.release("tg-1")
    assert (await b_granted).msg.ref == qb.ref
    assert (await d_moved).msg.pos == 1  # type: ignore[attr-defined]
    assert d.floor_state("tg-1") == QUEUED


async def test_queue_status_and_leaving_the_queue(server: Server, handset: HandsetFactory) -> None:
    a = await handset("u1", "tg-1")
    b = await handset("u2", "tg-1")
    await a.press("tg-1")
    await b.press("tg-1")
    topic = b.topics.floor_up("tg-1", "u2")
    answer = b.expect(lambda i: isinstance(i.msg, m.Queued) and i.msg.ref == 99)
    b.transport.publish(topic, encode(m.QueueStatus(ref=99)), qos=1)
    assert (await answer).msg.pos == 1  # type: ignore[attr-defined]
    b.release("tg-1")
    deny = b.expect(lambda i: isinstance(i.msg, m.Deny) and i.msg.ref == 100)
    b.transport.publish(topic, encode(m.QueueStatus(ref=100)), qos=1)
    assert (await deny).msg.cause == "not_queued"  # type: ignore[attr-defined]


async def test_emergency_preempts_and_puts_the_group_in_emergency(
    server: Server, handset: HandsetFactory
) -> None:
    a = await handset("u1", "tg-1")
    b = await handset("u2", "tg-1")
    watcher = await handset("u3", "tg-1")
    await a.press("tg-1")
    revoked = a.expect(on_floor(m.Revoke, "tg-1"))
    emergency_state = watcher.expect(
        lambda i: isinstance(i.msg, m.State) and i.msg.emergency and i.msg.talker == "u2"
    )
    granted = await b.press("tg-1", kind="emergency")
    assert isinstance(granted, m.Granted) and granted.kind == "emergency"
    assert (await revoked).msg.cause == "preempted"  # type: ignore[attr-defined]
    await emergency_state
    # the group stays in emergency until the originator cancels
    b.release("tg-1")
    cleared = watcher.expect(lambda i: isinstance(i.msg, m.State) and not i.msg.emergency)
    reply = await b.ask(m.EmergencyCancel(tg="tg-1", ref=b.next_ref()))
    assert reply == m.EmergencyState(tg="tg-1", state="cancelled", ref=reply.ref)
    await cleared


async def test_max_talk_time_revokes_then_takes_the_floor_back(
    server: Server, handset: HandsetFactory
) -> None:
    a = await handset("u1", "tg-2")  # max_talk_ms 400
    b = await handset("u2", "tg-2")
    revoked = a.expect(on_floor(m.Revoke, "tg-2"), timeout=3)
    await a.press("tg-2")
    await b.press("tg-2")
    granted_b = b.expect(on_floor(m.Granted, "tg-2"), timeout=3)
    assert (await revoked).msg.cause == "max_talk_time"  # type: ignore[attr-defined]
    await granted_b  # the handset released on the revoke; b is next
    assert a.floor_state("tg-2") == NO_PERMISSION


async def test_late_entry_state_names_the_talker(server: Server, handset: HandsetFactory) -> None:
    talker = await handset("u1", "tg-1")
    granted = await talker.press("tg-1")
    late = await handset("u9")
    state = late.expect(lambda i: isinstance(i.msg, m.State) and i.msg.floor == "taken")
    media = late.expect(lambda i: isinstance(i.msg, m.Media))
    await late.affiliate("tg-1")
    s = (await state).msg
    assert isinstance(s, m.State) and isinstance(granted, m.Granted)
    assert (s.talker, s.call, s.kind, s.prio) == ("u1", granted.call, "normal", 100)
    await media
    assert late.stats.late_entry_s


async def test_deny_causes_over_the_wire(server: Server, handset: HandsetFactory) -> None:
    u = await handset("u1", "tg-bc")
    deny = await u.press("tg-bc")
    assert isinstance(deny, m.Deny) and deny.cause == "receive_only"
    deny = await u.press("tg-nope")
    assert isinstance(deny, m.Deny) and deny.cause == "unknown_group"
    deny = await u.press("tg-1")
    assert isinstance(deny, m.Deny) and deny.cause == "not_affiliated"
    disp = await handset("disp", "tg-bc")
    assert isinstance(await disp.press("tg-bc"), m.Granted)


async def test_media_from_a_non_holder_is_dropped(server: Server, handset: HandsetFactory) -> None:
    holder = await handset("u1", "tg-1", media_interval=0)
    intruder = await handset("u2", "tg-1")
    listener = await handset("u3", "tg-1")
    await holder.press("tg-1")
    heard = listener.expect(lambda i: isinstance(i.msg, m.Media))
    intruder.transport.publish(
        intruder.topics.media_up("tg-1", "u2"), encode(m.Media(call="x", seq=1, data=b"\0" * 99))
    )
    await eventually(lambda: server.metrics.media_dropped.get("not_holder") == 1)
    holder.transport.publish(
        holder.topics.media_up("tg-1", "u1"), encode(m.Media(call="x", seq=7, data=b"\1" * 99))
    )
    got = (await heard).msg
    assert isinstance(got, m.Media) and (got.talker, got.seq) == ("u1", 7)


def encode(msg: m.Message) -> bytes:
    from esn.protocol.codec import encode as enc

    return enc(msg)


async def test_floor_access_is_measured_by_the_server(
    server: Server, handset: HandsetFactory
) -> None:
    a = await handset("u1", "tg-1")
    await a.press("tg-1")
    reg = server.metrics.registry
    count = reg.get_sample_value("esn_floor_access_seconds_count", {"kind": "normal"})
    assert count == 1
    assert reg.get_sample_value("esn_floor_outcomes_total", {"outcome": "granted"}) == 1
    await eventually(lambda: (reg.get_sample_value("esn_media_relay_seconds_count") or 0) >= 1)
