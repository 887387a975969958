"""Bad input never hurts the service: a third-party client sending garbage gets clear errors
(or is dropped and counted), and everyone else keeps being served."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import msgpack
import pytest

from esn.protocol import messages as m
from esn.server.shell import Server
from esn.transport import BrokerConfig, make_transport
from esn.transport.base import Transport
from tests.conftest import HandsetFactory, eventually

pytestmark = pytest.mark.fault


class RawClient:
    """A third-party client that only knows docs/protocol.md: plain MQTT and msgpack maps."""

    def __init__(self, transport: Transport, prefix: str, unit: str) -> None:
        self.transport = transport
        self.prefix = prefix
        self.unit = unit
        self.down: asyncio.Queue[dict[str, object]] = asyncio.Queue()
        transport.on_message = lambda topic, payload: self.down.put_nowait(
            {"topic": topic, **msgpack.unpackb(payload)}
        )

    def send(self, topic: str, payload: bytes | dict[str, object]) -> None:
        raw = payload if isinstance(payload, bytes) else msgpack.packb(payload)
        self.transport.publish(f"{self.prefix}/{topic}", raw, qos=1)

    async def next(self, **match: object) -> dict[str, object]:
        while True:
            msg = await asyncio.wait_for(self.down.get(), 5)
            if all(msg.get(k) == v for k, v in match.items()):
                return msg


@pytest.fixture
async def raw(broker: BrokerConfig, prefix: str, mqtt_client: str) -> AsyncIterator[RawClient]:
    t = make_transport(mqtt_client, broker, client_id="ext-1")
    client = RawClient(t, prefix, "ext-1")
    await t.start()
    await t.subscribe(f"{prefix}/unit/ext-1/down")
    yield client
    await t.stop()


async def test_third_party_client_gets_floor_with_plain_msgpack(
    server: Server, raw: RawClient, handset: HandsetFactory
) -> None:
    raw.send("unit/ext-1/up", {"t": "affiliate", "groups": ["tg-1"], "ref": 1})
    assert (await raw.next(t="affiliation"))["groups"] == ["tg-1"]
    raw.send("tg/tg-1/up/ext-1/floor", {"t": "request", "ref": 2})
    granted = await raw.next(t="granted")
    assert granted["ref"] == 2 and granted["tg"] == "tg-1" and granted["max_ms"] == 30000
    other = await handset("u2", "tg-1")
    queued = await other.press("tg-1")
    assert isinstance(queued, m.Queued)
    raw.send("tg/tg-1/up/ext-1/floor", {"t": "release"})
    await other.expect(lambda i: isinstance(i.msg, m.Granted))


@pytest.mark.parametrize(
    ("payload", "cause"),
    [
        (b"\xc1\xc1\xc1", "malformed"),
        (b"", "malformed"),
        (msgpack.packb([1, 2, 3]), "malformed"),
        (msgpack.packb({1: "x"}), "malformed"),
        (msgpack.packb({"groups": []}), "malformed"),
        (msgpack.packb({"t": "launch_missiles"}), "unknown_type"),
        (msgpack.packb({"t": "affiliate", "groups": "tg-1"}), "invalid_field"),
        (msgpack.packb({"t": "affiliate", "groups": ["bad id!"]}), "invalid_field"),
        (msgpack.packb({"t": "location", "lat": 91.0, "lon": 0}), "invalid_field"),
        (msgpack.packb({"t": "location", "lat": "north", "lon": 0}), "invalid_field"),
        (msgpack.packb({"t": "location", "lat": True, "lon": 0}), "invalid_field"),
        (msgpack.packb({"t": "sds", "to": "unit:u2", "text": "x" * 1001}), "too_large"),
        (msgpack.packb({"t": "sds", "to": "everyone", "text": "x"}), "invalid_field"),
        (msgpack.packb({"t": "affiliate", "groups": [], "pad": b"\0" * 70000}), "too_large"),
        (msgpack.packb({"t": "force_release", "tg": "tg-1"}), "forbidden"),
        (
            msgpack.packb(
                {
                    "t": "granted",
                    "tg": "tg-1",
                    "call": "c",
                    "prio": 1,
                    "kind": "normal",
                    "max_ms": 1,
                }
            ),
            "unknown_type",
        ),
    ],
)
async def test_bad_unit_input_gets_an_error_and_others_are_still_served(
    server: Server, raw: RawClient, handset: HandsetFactory, payload: bytes, cause: str
) -> None:
    raw.send("unit/ext-1/up", payload)
    error = await raw.next(t="error")
    assert error["cause"] == cause and error["detail"]
    good = await handset("u1", "tg-1")
    assert isinstance(await good.press("tg-1"), m.Granted)


async def test_error_echoes_the_ref(server: Server, raw: RawClient) -> None:
    raw.send("unit/ext-1/up", {"t": "location", "lat": 0, "lon": 500, "ref": 41})
    error = await raw.next(t="error")
    assert (error["ref"], error["cause"]) == (41, "invalid_field")
    assert "lon" in str(error["detail"])


async def test_bad_floor_and_media_input(
    server: Server, raw: RawClient, handset: HandsetFactory
) -> None:
    raw.send("unit/ext-1/up", {"t": "affiliate", "groups": ["tg-1"]})
    await raw.next(t="affiliation")
    raw.send("tg/tg-1/up/ext-1/floor", {"t": "request", "kind": "urgent", "ref": 5})
    assert (await raw.next(t="error"))["cause"] == "invalid_field"
    raw.send("tg/tg-1/up/ext-1/floor", {"t": "request", "prio": 256})
    assert (await raw.next(t="error"))["cause"] == "invalid_field"
    raw.send("tg/tg-1/up/ext-1/floor", {"t": "affiliate", "groups": []})
    assert (await raw.next(t="error"))["cause"] == "unknown_type"
    # a non-holder's voice is dropped unread; the holder's garbage is dropped silently and
    # counted by what is wrong with it: no reply to a voice stream either way
    raw.send("tg/tg-1/up/ext-1/media", b"\xff" * 10)
    await eventually(lambda: server.metrics.media_dropped.get("not_holder") == 1)
    raw.send("tg/tg-1/up/ext-1/floor", {"t": "request", "ref": 6})
    await raw.next(t="granted")
    raw.send("tg/tg-1/up/ext-1/media", b"\xff" * 10)
    raw.send("tg/tg-1/up/ext-1/media", {"t": "media", "call": "c", "seq": -1, "data": b""})
    await eventually(
        lambda: (
            server.metrics.media_dropped.get("malformed") == 1
            and server.metrics.media_dropped.get("invalid_field") == 1
        )
    )
    raw.send("tg/tg-1/up/ext-1/floor", {"t": "release"})
    good = await handset("u1", "tg-1")
    assert isinstance(await good.press("tg-1"), m.Granted)


async def test_spoofed_identity_is_ignored(
    server: Server, raw: RawClient, handset: HandsetFactory
) -> None:
    await handset("u1", "tg-1", media_interval=0)
    listener = await handset("u2", "tg-1")
    raw.send("unit/ext-1/up", {"t": "affiliate", "groups": ["tg-1"]})
    await raw.next(t="affiliation")
    raw.send("tg/tg-1/up/ext-1/floor", {"t": "request", "ref": 1})
    await raw.next(t="granted")
    # the topic says ext-1 (the holder), the content claims to be u1: not relayed
    raw.send(
        "tg/tg-1/up/ext-1/media",
        {"t": "media", "call": "c", "seq": 1, "data": b"x", "talker": "u1"},
    )
    await eventually(lambda: server.metrics.media_dropped.get("spoofed") == 1)
    raw.send("unit/ext-1/up", {"t": "location", "lat": 1.0, "lon": 2.0, "unit": "u1"})
    await eventually(lambda: server.network.rejected.get("spoofed") == 1)
    assert not listener.stats.mouth_to_ear_s


async def test_garbage_presence_is_counted_not_fatal(
    server: Server, raw: RawClient, handset: HandsetFactory
) -> None:
    raw.transport.publish(f"{raw.prefix}/unit/ext-1/presence", b"\x00garbage", qos=1)
    raw.transport.publish(
        f"{raw.prefix}/unit/ext-1/presence",
        msgpack.packb({"t": "presence", "state": "sleepy"}),
        qos=1,
    )
    await eventually(
        lambda: (
            server.metrics.rejected.get("malformed") == 1
            and server.network.rejected.get("invalid_presence") == 1
        )
    )
    good = await handset("u1", "tg-1")
    assert isinstance(await good.press("tg-1"), m.Granted)


async def test_a_flood_of_garbage_does_not_stop_grants(
    server: Server, raw: RawClient, handset: HandsetFactory
) -> None:
    for i in range(2000):
        raw.send("unit/ext-1/up", bytes([i % 256]) * (i % 50))
    good = await handset("u1", "tg-1")
    assert isinstance(await good.press("tg-1"), m.Granted)
    await eventually(lambda: sum(server.metrics.rejected.values()) >= 2000, timeout=20)
