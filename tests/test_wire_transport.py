"""The MQTT link itself, on a real broker: what is published arrives whole, in order and
with its flags, whatever the stack does to be fast (gmqtt's publishes at QoS 0 are built by
the transport and written together, once per turn of the event loop)."""

from __future__ import annotations

import asyncio
from typing import Any

import uvloop

from esn.transport import BrokerConfig, make_transport
from tests.conftest import eventually

# remaining lengths on both sides of each boundary of MQTT's length field (1, 2, 3 bytes)
REMAINING = (127, 128, 16_383, 16_384, 60_000)


async def test_what_is_published_in_one_turn_arrives_whole_and_in_order(
    broker: BrokerConfig, prefix: str, mqtt_client: str
) -> None:
    sender = make_transport(mqtt_client, broker, client_id=f"{prefix}-tx")
    receiver = make_transport(mqtt_client, broker, client_id=f"{prefix}-rx")
    got: list[tuple[str, bytes]] = []
    receiver.on_message = lambda topic, payload: got.append((topic, payload))
    await sender.start()
    await receiver.start()
    try:
        await receiver.subscribe(f"{prefix}/#", qos=1)
        topic = f"{prefix}/mixed"
        sizes = [n - 2 - len(topic.encode()) for n in REMAINING * 2]  # (QoS 0: no packet id)
        sent = [(topic, bytes([i]) * size) for i, size in enumerate(sizes)]
        for i, (topic, payload) in enumerate(sent):  # (all in one turn of the loop)
            sender.publish(topic, payload, qos=0 if i % 3 else 1)
        await eventually(lambda: len(got) >= len(sent))
        # (a QoS 1 message does not overtake the QoS 0 ones before it: Mosquitto keeps a
        # client's order on a topic across QoS levels, which MQTT promises within one)
        assert got == sent
    finally:
        await sender.stop()
        await receiver.stop()


async def test_a_retained_message_at_qos_0_is_told_as_retained(
    broker: BrokerConfig, prefix: str, mqtt_client: str
) -> None:
    sender = make_transport(mqtt_client, broker, client_id=f"{prefix}-tx")
    later = make_transport(mqtt_client, broker, client_id=f"{prefix}-tx2")
    receiver = make_transport(mqtt_client, broker, client_id=f"{prefix}-rx")
    retained: list[bytes] = []
    live: list[bytes] = []
    receiver.on_retained = lambda topic, payload: retained.append(payload)
    receiver.on_message = lambda topic, payload: live.append(payload)
    for t in (sender, later, receiver):
        await t.start()
    topic = f"{prefix}/state"
    try:
        sender.publish(topic, b"kept", qos=0, retain=True)
        await sender.stop()  # (what it published is written before it goes)
        await receiver.subscribe(topic, qos=0)
        await eventually(lambda: bool(retained or live), timeout=10)
        assert (retained, live) == ([b"kept"], [])
        later.publish(topic, b"new", qos=0)
        await eventually(lambda: bool(live), timeout=10)
        assert (retained, live) == ([b"kept"], [b"new"])
    finally:
        later.publish(topic, b"", qos=1, retain=True)  # (the broker forgets it)
        for t in (sender, later, receiver):
            await t.stop()


def test_a_publish_queued_as_the_link_dies_is_dropped_without_an_error(
    mosquitto: Any, prefix: str
) -> None:
    """QoS 0 on a dead link is lost, as QoS 0 says; the turn's write must not raise on
    the closed socket (uvloop raises where plain asyncio only counts, so this runs on it:
    a NATS node killed under the cluster demo did this)."""
    errors: list[dict[str, Any]] = []

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _, ctx: errors.append(ctx))
        sender = make_transport(
            "gmqtt", BrokerConfig.from_url(mosquitto.url), client_id=f"{prefix}-tx"
        )
        await sender.start()
        try:
            link = sender._client._connection  # type: ignore[attr-defined]
            link._transport.abort()  # (the socket closes at the next turn of the loop)
            await asyncio.sleep(0)
            # the socket is closed; gmqtt has not told the transport yet
            assert link.is_closing() and sender.connected
            sender.publish(f"{prefix}/x", b"lost", qos=0)
            for _ in range(3):  # (its write was queued for the next turn)
                await asyncio.sleep(0)
        finally:
            await sender.stop()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())
    assert [str(e.get("exception") or e["message"]) for e in errors] == []
