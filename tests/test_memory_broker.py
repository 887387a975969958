"""The in-process broker keeps the MQTT behaviour the fast tier relies on."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from esn.transport import Transport, TransportError, Will, make_transport
from esn.transport.memory import MemoryBroker, topic_matches
from tests.conftest import eventually


@pytest.mark.parametrize(
    ("pattern", "topic", "matches"),
    [
        ("a/b", "a/b", True),
        ("a/+", "a/b", True),
        ("a/+", "a/b/c", False),
        ("a/#", "a", True),  # '#' also matches the parent level (MQTT 3.1.1, 4.7.1.2)
        ("a/#", "a/b/c", True),
        ("+/+/state", "esn/tg/state", True),
        ("+", "/", False),
        ("#", "$SYS/broker/clients/connected", False),  # no wildcard matches a $ topic first
        ("$SYS/broker/#", "$SYS/broker/clients/connected", True),
        ("esn/tg/+/up/+/+", "esn/tg/tg-1/up/u1/media", True),
        ("esn/tg/+/up/+/+", "esn/tg/tg-1/up/u1", False),
    ],
)
def test_topic_filters(pattern: str, topic: str, matches: bool) -> None:
    assert topic_matches(pattern, topic) is matches


@pytest.fixture
async def memory() -> AsyncIterator[MemoryBroker]:
    broker = MemoryBroker()
    yield broker
    broker.close()


async def client(
    broker: MemoryBroker, client_id: str, will: Will | None = None
) -> tuple[Transport, list[tuple[str, bytes]]]:
    t = make_transport("memory", broker.config, client_id=client_id, will=will)
    got: list[tuple[str, bytes]] = []
    t.on_message = lambda topic, payload: got.append((topic, payload))
    await t.start()
    return t, got


async def test_retained_messages_reach_late_subscribers_and_empty_payload_clears(
    memory: MemoryBroker,
) -> None:
    pub, _ = await client(memory, "pub")
    pub.publish("s/1", b"one", retain=True)
    pub.publish("s/2", b"two", retain=True)
    pub.publish("s/2", b"", retain=True)  # cleared
    pub.publish("s/3", b"not kept")
    sub, got = await client(memory, "sub")
    await sub.subscribe("s/+")
    await eventually(lambda: got == [("s/1", b"one")])
    pub.publish("s/1", b"again")
    await eventually(lambda: got[-1] == ("s/1", b"again"))
    await asyncio.sleep(0)
    assert len(got) == 2


async def test_a_dead_link_publishes_the_will_a_clean_stop_does_not(memory: MemoryBroker) -> None:
    watcher, got = await client(memory, "watcher")
    await watcher.subscribe("p/#")
    dying, _ = await client(memory, "dying", Will("p/dying", b"offline"))
    leaving, _ = await client(memory, "leaving", Will("p/leaving", b"offline"))
    await leaving.stop()
    memory.drop(memory.sessions["dying"])
    await eventually(lambda: ("p/dying", b"offline") in got)
    assert ("p/leaving", b"offline") not in got
    assert memory.retained["p/dying"] == b"offline"  # wills are retained, like presence
    await eventually(lambda: dying.connected)  # and the transport reconnects by itself
    await dying.stop()


async def test_one_session_per_client_id(memory: MemoryBroker) -> None:
    first, got_first = await client(memory, "u1")
    await first.subscribe("x")
    second, got_second = await client(memory, "u1")  # takes the first over
    await second.subscribe("x")
    assert memory.sessions["u1"] is second
    memory.publish("x", b"1", retain=False)
    await eventually(lambda: got_second == [("x", b"1")])
    assert got_first == []  # the session taken over hears nothing more
    await first.stop()
    await second.stop()


async def test_a_stopped_broker_refuses_and_a_restarted_one_is_found_again(
    memory: MemoryBroker,
) -> None:
    t, got = await client(memory, "u1")
    await t.subscribe("x")
    memory.stop()
    await eventually(lambda: not t.connected)
    with pytest.raises(TransportError, match="cannot reach broker"):
        await make_transport("memory", memory.config, client_id="u2").start()
    memory.start()
    await eventually(lambda: t.connected, timeout=10)
    memory.publish("x", b"after", retain=False)  # subscriptions were made again
    await eventually(lambda: got == [("x", b"after")])
    await t.stop()


async def test_deliveries_keep_their_order_and_never_run_inside_publish(
    memory: MemoryBroker,
) -> None:
    pub, _ = await client(memory, "pub")
    sub, got = await client(memory, "sub")
    await sub.subscribe("n")
    for i in range(100):
        pub.publish("n", str(i).encode())
        assert len(got) == 0 or int(got[-1][1]) < i  # not delivered re-entrantly
    await eventually(lambda: len(got) == 100)
    assert [int(p) for _, p in got] == list(range(100))


async def test_a_link_lost_is_made_again_on_the_next_node_given(memory: MemoryBroker) -> None:
    """A server given several nodes of a clustered broker (`others`): when its node goes
    for good, its link is made again on the next one, with its subscriptions."""
    other = MemoryBroker()
    link = make_transport("memory", memory.config, client_id="srv", others=(other.config,))
    sender = make_transport("memory", other.config, client_id="unit")
    heard: asyncio.Queue[str] = asyncio.Queue()
    link.on_message = lambda topic, payload: heard.put_nowait(topic)
    try:
        await link.start()
        await link.subscribe("a/#")
        memory.close()
        await eventually(lambda: link.connected and link.broker == other.config)
        await sender.start()
        sender.publish("a/1", b"x")
        assert await asyncio.wait_for(heard.get(), 5) == "a/1"
    finally:
        await asyncio.gather(link.stop(), sender.stop())
        other.close()
