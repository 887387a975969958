"""Recovery trusts nothing it reads back (issue 11, finding 5): what is retained at the broker
when a server starts is checked against the fleet and the protocol before it is adopted."""

from __future__ import annotations

import asyncio
import time

import pytest

from esn.core.fleet import parse_fleet
from esn.protocol import codec
from esn.protocol import messages as m
from esn.server.shell import Config, Server
from esn.transport import BrokerConfig, Transport, make_transport
from tests.conftest import FLEET, eventually

pytestmark = pytest.mark.fault


async def publisher(broker: BrokerConfig, mqtt_client: str, name: str = "old") -> Transport:
    t = make_transport(mqtt_client, broker, client_id=name)
    await t.start()
    return t


async def start(
    broker: BrokerConfig, prefix: str, mqtt_client: str, fleet: dict[str, object]
) -> Server:
    srv = Server(
        Config(broker=broker, prefix=prefix, server_id=f"srv-{prefix}", mqtt_client=mqtt_client),
        parse_fleet(fleet),
    )
    await srv.start()
    return srv


async def test_retained_uplinks_are_not_replayed_and_are_cleared(
    broker: BrokerConfig, prefix: str, mqtt_client: str
) -> None:
    """Tried: a retained affiliate and floor request of u1, and a retained SDS, left at the
    broker before the server starts. Expect: none acted on (they used to take the floor
    and deliver the SDS again at every start), counted, and cleared at the broker."""
    old = await publisher(broker, mqtt_client)
    up, floor = f"{prefix}/unit/u1/up", f"{prefix}/tg/tg-1/up/u1/floor"
    old.publish(up, codec.encode(m.Affiliate(groups=["tg-1"], ref=1)), qos=1, retain=True)
    old.publish(floor, codec.encode(m.Request(ref=2)), qos=1, retain=True)
    old.publish(f"{prefix}/unit/u2/up", codec.encode(m.Sds(to="unit:u1", text="again")), 1, True)
    await old.stop()
    srv = await start(broker, prefix, mqtt_client, FLEET)
    try:
        await eventually(lambda: srv.metrics.rejected.get("retained", 0) == 3)
        assert srv.network.state_msg("tg-1").floor == "idle"
        assert srv.network.affiliations.get("u1", set()) == set()
        assert srv.network.outcomes().get("granted", 0) == 0
        watcher = await publisher(broker, mqtt_client, "watcher")
        got: list[str] = []
        watcher.on_message = lambda topic, payload: got.append(topic) if payload else None
        await watcher.subscribe(f"{prefix}/unit/+/up", f"{prefix}/tg/+/up/+/+")
        await asyncio.sleep(0)  # retained messages come with the SUBACK: none are left
        await watcher.stop()
        assert got == []
    finally:
        await srv.stop()


def state(
    tg: str, talker: str | None, prio: int = 100, seq: int = 3, kind: m.Kind = "normal"
) -> bytes:
    taken = talker is not None
    return codec.encode(
        m.State(
            tg=tg,
            floor="taken" if taken else "idle",
            emergency=False,
            queue=0,
            seq=seq,
            since_ts=time.time_ns(),
            talker=talker,
            call="c7" if taken else None,
            kind=kind if taken else None,
            prio=prio if taken else None,
        )
    )


RECOVERY_FLEET = {
    "talkgroup": [
        {"id": "ok"},
        {"id": "closed", "members": ["u1"]},
        {"id": "bc", "broadcast": True},
        {"id": "capped"},
        {"id": "huge"},
    ],
    "unit": [{"id": "disp", "role": "dispatcher", "priority": 250}],
}


async def test_a_retained_state_is_adopted_only_when_it_could_be_true(
    broker: BrokerConfig, prefix: str, mqtt_client: str
) -> None:
    """Tried: retained states naming a non-member, a handset in a receive-only group, a
    priority above the unit's, and a seq near 2^63 (the next `taken` would overflow the
    codec for that group for ever). Expect: only the plausible call goes on; the others
    are rewritten idle, seq sane."""
    old = await publisher(broker, mqtt_client)
    for tg, payload in {
        "ok": state("ok", "disp", prio=250),
        "closed": state("closed", "u2"),
        "bc": state("bc", "u1"),
        "capped": state("capped", "u1", prio=250),
        "huge": state("huge", None, seq=2**63 - 2),
    }.items():
        old.publish(f"{prefix}/tg/{tg}/state", payload, qos=1, retain=True)
    await old.stop()
    srv = await start(broker, prefix, mqtt_client, RECOVERY_FLEET)
    try:
        floors = srv.network.floors
        assert floors["ok"].holder is not None and floors["ok"].holder.unit == "disp"
        for tg in ("closed", "bc", "capped", "huge"):
            assert tg not in floors or floors[tg].holder is None, tg
        assert srv.network.state_msg("huge").seq < 2**40
    finally:
        await srv.stop()


async def test_foreign_states_cannot_hide_a_real_call(
    broker: BrokerConfig, prefix: str, mqtt_client: str
) -> None:
    """Tried: 20,000 retained states of groups that are not in the fleet, and one real
    call. Expect: the call goes on (recovery used to miss it behind ~100,000 foreign
    states), and the foreign ones are never even read."""
    old = await publisher(broker, mqtt_client)
    old.publish(f"{prefix}/tg/tg-1/state", state("tg-1", "boss", prio=220), qos=1, retain=True)
    for i in range(20_000):
        old.publish(f"{prefix}/tg/junk-{i}/state", state(f"junk-{i}", "u1"), qos=0, retain=True)
    await eventually(lambda: old._inflight() == 0, timeout=30)
    await old.stop()
    srv = await start(broker, prefix, mqtt_client, FLEET)
    try:
        holder = srv.network.floors["tg-1"].holder
        assert holder is not None and holder.unit == "boss"
        assert srv.received < 1000  # the junk never came our way
    finally:
        await srv.stop()


async def test_a_forged_or_stale_status_does_not_stop_a_server(
    broker: BrokerConfig, prefix: str, mqtt_client: str
) -> None:
    """Tried: a retained `online` under the server's id from an older start, as a broker
    restored from disk keeps, or anyone may publish in the local profile. Expect: the
    server starts and serves (a status alone is no evidence of a rival)."""
    old = await publisher(broker, mqtt_client)
    forged = codec.encode(m.Status(state="online", started_ts=1))
    old.publish(f"{prefix}/server/srv-{prefix}/status", forged, qos=1, retain=True)
    await old.stop()
    srv = await start(broker, prefix, mqtt_client, FLEET)
    try:
        assert srv.rival is None and not srv.gave_way.is_set()
        u1 = make_transport(mqtt_client, broker, client_id="u1")
        got: list[bytes] = []
        u1.on_message = lambda topic, payload: got.append(payload)
        await u1.start()
        await u1.subscribe(f"{prefix}/unit/u1/down")
        u1.publish(f"{prefix}/unit/u1/up", codec.encode(m.Affiliate(groups=["tg-1"], ref=1)), 1)
        await eventually(lambda: any(codec.decode(p).T == "affiliation" for p in got))
        await u1.stop()
        assert srv.rival is None
    finally:
        await srv.stop()
