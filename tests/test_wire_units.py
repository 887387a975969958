"""Unit control over the wire: affiliation, location, emergencies, SDS, regrouping."""

from __future__ import annotations

import asyncio

import msgpack

from esn.protocol import messages as m
from esn.server.shell import Server
from esn.transport import BrokerConfig, make_transport
from tests.conftest import HandsetFactory


async def test_affiliation_reply_lists_accepted_and_rejected(
    server: Server, handset: HandsetFactory
) -> None:
    u = await handset("u2")
    reply = await u.affiliate("tg-1", "tg-closed", "tg-nope")
    assert reply.groups == ["tg-1"]
    assert reply.rejected == [
        {"tg": "tg-closed", "cause": "not_member"},
        {"tg": "tg-nope", "cause": "unknown_group"},
    ]
    reply2 = await u.ask(m.Deaffiliate(groups=["tg-1"], ref=u.next_ref()))
    assert isinstance(reply2, m.Affiliation) and reply2.groups == []


async def test_location_is_republished_retained_for_consoles(
    server: Server, handset: HandsetFactory, broker: BrokerConfig, prefix: str, mqtt_client: str
) -> None:
    u = await handset("u1")
    u.send(m.Location(lat=51.5, lon=-0.12, acc=4.0, hdg=90.0, spd=3.5))
    # a console connecting afterwards still sees the last position (retained)
    console = make_transport(mqtt_client, broker, client_id="console-x")
    got: list[dict[str, object]] = []
    seen = asyncio.Event()

    def on_message(topic: str, payload: bytes) -> None:
        got.append(msgpack.unpackb(payload))
        seen.set()

    console.on_message = on_message
    await console.start()
    try:
        await u.ask(m.Affiliate(groups=[], ref=u.next_ref()))  # the location is processed
        await console.subscribe(f"{prefix}/loc/+")
        await asyncio.wait_for(seen.wait(), 5)
    finally:
        await console.stop()
    loc = got[0]
    assert (loc["t"], loc["unit"], loc["lat"], loc["lon"], loc["spd"]) == (
        "location",
        "u1",
        51.5,
        -0.12,
        3.5,
    )
    assert isinstance(loc["ts"], int)


async def test_emergency_alert_is_broadcast_and_acknowledged(
    server: Server, handset: HandsetFactory
) -> None:
    unit = await handset("u1", "tg-1")
    member = await handset("u2", "tg-1")
    disp = await handset("disp", "tg-1")
    alert = member.expect(lambda i: isinstance(i.msg, m.Emergency))
    raised = await unit.ask(m.EmergencyAlert(tg="tg-1", lat=51.0, lon=-1.0, ref=unit.next_ref()))
    assert isinstance(raised, m.EmergencyState) and raised.state == "raised"
    ev = (await alert).msg
    assert isinstance(ev, m.Emergency) and (ev.unit, ev.lat, ev.lon) == ("u1", 51.0, -1.0)
    acked = unit.expect(
        lambda i: isinstance(i.msg, m.EmergencyState) and i.msg.state == "acknowledged"
    )
    ok = await disp.ask(m.EmergencyAck(unit="u1", tg="tg-1", ref=disp.next_ref()))
    assert isinstance(ok, m.Ok)
    assert (await acked).msg.by == "disp"  # type: ignore[attr-defined]
    forbidden = await member.ask(m.EmergencyAck(unit="u1", tg="tg-1", ref=member.next_ref()))
    assert isinstance(forbidden, m.Error) and forbidden.cause == "forbidden"


async def test_sds_to_unit_and_group(server: Server, handset: HandsetFactory) -> None:
    a = await handset("u1", "tg-1")
    b = await handset("u2", "tg-1")
    inbox = b.expect(lambda i: isinstance(i.msg, m.Sds) and i.topic.endswith("/down"))
    status = await a.ask(m.Sds(to="unit:u2", text="meet at the gate", ref=a.next_ref()))
    assert isinstance(status, m.SdsStatus) and status.state == "delivered"
    sds = (await inbox).msg
    assert isinstance(sds, m.Sds) and (sds.sender, sds.text) == ("u1", "meet at the gate")
    group_msg = b.expect(lambda i: isinstance(i.msg, m.Sds) and i.msg.to == "tg:tg-1")
    status = await a.ask(m.Sds(to="tg:tg-1", text="all units: stand by", ref=a.next_ref()))
    assert isinstance(status, m.SdsStatus) and status.state == "delivered"
    assert (await group_msg).msg.sender == "u1"  # type: ignore[attr-defined]


async def test_regroup_creates_a_talkable_group_and_ungroup_dissolves_it(
    server: Server, handset: HandsetFactory
) -> None:
    a = await handset("u1", "tg-1")
    b = await handset("u2", "tg-1")
    disp = await handset("disp")
    regrouped = b.expect(lambda i: isinstance(i.msg, m.Regrouped))
    ok = await disp.ask(
        m.Regroup(tg="inc-42", units=["u1", "u2"], name="Incident 42", ref=disp.next_ref())
    )
    assert isinstance(ok, m.Ok)
    assert (await regrouped).msg == m.Regrouped(tg="inc-42", name="Incident 42")
    await b.expect(lambda i: isinstance(i.msg, m.State) and i.msg.tg == "inc-42")
    heard = b.expect(lambda i: isinstance(i.msg, m.Taken) and i.msg.tg == "inc-42")
    assert isinstance(await a.press("inc-42"), m.Granted)
    await heard
    ungrouped = b.expect(lambda i: isinstance(i.msg, m.Ungrouped))
    revoked = a.expect(lambda i: isinstance(i.msg, m.Revoke))
    assert isinstance(await disp.ask(m.Ungroup(tg="inc-42", ref=disp.next_ref())), m.Ok)
    await ungrouped
    assert (await revoked).msg.cause == "dispatcher"  # type: ignore[attr-defined]
    deny = await b.press("inc-42")
    assert isinstance(deny, m.Deny) and deny.cause == "unknown_group"


async def test_force_release_by_dispatcher(server: Server, handset: HandsetFactory) -> None:
    a = await handset("u1", "tg-1")
    disp = await handset("disp", "tg-1")
    await a.press("tg-1")
    revoked = a.expect(lambda i: isinstance(i.msg, m.Revoke))
    idle = disp.expect(lambda i: isinstance(i.msg, m.Idle))
    assert isinstance(await disp.ask(m.ForceRelease(tg="tg-1", ref=disp.next_ref())), m.Ok)
    assert (await revoked).msg.cause == "dispatcher"  # type: ignore[attr-defined]
    await idle
