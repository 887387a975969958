"""One unit floods one message class as fast as it can (issue 11, finding 1). Expect: it
gets a bounded number of answers (every class is rate limited, refusals are told at most
once a second), its group is not flooded on its behalf, and a unit in another group is
served throughout. Runs on the in-process broker (fast tier) and on Mosquitto."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import msgpack
import pytest

from esn.client.handset import Handset
from esn.protocol import codec
from esn.protocol import messages as m
from esn.protocol.topics import Topics
from esn.server.shell import Server
from esn.transport import BrokerConfig, make_transport
from tests.conftest import HandsetFactory, eventually

pytestmark = pytest.mark.fault

FLOOD = 3000
MOST_ANSWERS = 100  # a burst and a few seconds of any class's rate, and one notice a second


def up(t: Topics) -> str:
    return t.unit_up("u9")


def floor(t: Topics) -> str:
    return t.floor_up("tg-1", "u9")


MEDIA = msgpack.packb({"t": "media", "call": "c", "seq": 1, "data": bytes(99)})
FLOODS: dict[str, tuple[Callable[[Topics], str], bytes]] = {
    "queue_status": (floor, codec.encode(m.QueueStatus(ref=1))),
    "release": (floor, codec.encode(m.Release(ref=1))),
    "request": (floor, codec.encode(m.Request(ref=1))),
    "a downlink type on the floor topic": (floor, codec.encode(m.Idle(tg="tg-1", call="c", seq=1))),
    "affiliate": (up, codec.encode(m.Affiliate(groups=["tg-1"], ref=1))),
    "deaffiliate": (up, codec.encode(m.Deaffiliate(groups=["tg-2"], ref=1))),
    "emergency_alert": (up, codec.encode(m.EmergencyAlert(tg="tg-1", ref=1))),
    "emergency_cancel": (up, codec.encode(m.EmergencyCancel(tg="tg-1", ref=1))),
    "a dispatcher command from a handset": (up, codec.encode(m.ForceRelease(tg="tg-1", ref=1))),
    "a downlink type on the unit topic": (up, codec.encode(m.Ok(op="x", ref=1))),
    "sds": (up, codec.encode(m.Sds(to="tg:tg-1", text="spam", ref=1))),
    "location": (up, codec.encode(m.Location(lat=51.5, lon=0.1))),
    "unit_status": (up, codec.encode(m.UnitStatus(code=3))),  # (no ref: none is a repeat)
    "garbage": (up, b"\xc1\xff not msgpack"),
    "media from a non-holder": (lambda t: t.media_up("tg-1", "u9"), MEDIA),
    "garbage presence": (lambda t: t.presence("u9"), b"\xc1"),
}


@pytest.mark.parametrize("kind", FLOODS)
async def test_one_unit_flooding_gets_bounded_answers_and_others_are_served(
    server: Server, handset: HandsetFactory, kind: str
) -> None:
    flooder = await handset("u9", "tg-1")
    listener = await handset("u1", "tg-1")  # hears whatever the flood makes the group hear
    worker = await handset("u2", "tg-2")
    answers = len(flooder.inbox)
    heard = len(listener.inbox)
    topic, payload = FLOODS[kind]
    before = server.received
    for _ in range(FLOOD):
        flooder.transport.publish(topic(flooder.topics), payload, qos=0)
    for _ in range(5):  # meanwhile, another group's talk goes on
        assert isinstance(await worker.press("tg-2"), m.Granted)
        worker.release("tg-2")
    await eventually(lambda: server.received >= before + FLOOD + 10, timeout=30)
    await asyncio.sleep(0.2)  # the last answers, on their way
    told = [i.msg.T for i in flooder.inbox[answers:] if i.topic.endswith("/down")]
    assert len(told) <= MOST_ANSWERS, f"{kind}: {len(told)} answers, {set(told)}"
    fanned = [i.msg.T for i in listener.inbox[heard:] if i.topic.endswith("/event")]
    assert len(fanned) <= MOST_ANSWERS, f"{kind}: the group heard {len(fanned)} events"
    assert server.transport.dropped == 0


@pytest.mark.parametrize("mqtt_client", ["gmqtt", "paho"])
async def test_a_stack_that_cannot_keep_up_drops_and_counts_never_raises(
    broker: BrokerConfig, prefix: str, mqtt_client: str
) -> None:
    """70,000 QoS 1 publishes without a pause, more than MQTT has packet ids: the link
    keeps working (gmqtt used to raise OverflowError on every publish)."""
    t = make_transport(mqtt_client, broker, client_id=f"burst-{mqtt_client}")
    await t.start()
    try:
        for i in range(70_000):
            t.publish(f"{prefix}/burst", str(i).encode(), qos=1)
        assert t.dropped > 0
        await eventually(lambda: t._inflight() == 0, timeout=60)  # the acks come back
        listener = Handset("u1", broker, prefix=prefix, mqtt_client=mqtt_client)
        await listener.start()  # and the link is as good as before
        got = listener.expect(lambda i: i.topic == f"{prefix}/unit/u1/down", timeout=20)
        t.publish(f"{prefix}/unit/u1/down", codec.encode(m.Ok(op="after")), qos=1)
        await got
        await listener.stop()
    finally:
        await t.stop()
