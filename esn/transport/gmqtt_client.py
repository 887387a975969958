"""The default transport, on gmqtt: an asyncio-native MQTT client fast enough to relay voice."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import gmqtt
from gmqtt.mqtt.constants import MQTTv311

from esn.transport.base import Transport, TransportError

# gmqtt logs every lost connection with a traceback and every late PUBACK after a clean
# close; the transport reports link state itself, once, in words.
logging.getLogger("gmqtt").setLevel(logging.ERROR)


class _Client(gmqtt.Client):  # type: ignore[misc]
    """gmqtt's own reconnect (fixed delay, no jitter) is handed to the transport's loop,
    and a message at QoS 0 (voice) goes straight to the transport."""

    def __init__(self, client_id: str, on_lost: Any, on_publish: Any, **kwargs: Any) -> None:
        self._on_lost = on_lost
        super().__init__(client_id, **kwargs)
        # The receive hot path: a PUBLISH at QoS 0 (MQTT 3.1.1, so no properties) goes to
        # `on_publish` past gmqtt's per-packet debug logging, handler lookup, properties
        # dict and check of whether the callback is a coroutine, which cost a handset
        # more than its own handling of the packet (docs/benchmarks.md)
        handler: Any = getattr(self, "_package_handler", self)  # (gmqtt 0.7 on; before, self)
        general = handler._handle_packet

        def handle(cmd: int, packet: bytes) -> None:
            if cmd & 0xF6 != 0x30:
                general(cmd, packet)
                return
            n = int.from_bytes(packet[:2])
            if not 0 < n <= len(packet) - 2:
                return  # (malformed: no topic, or a topic longer than the packet)
            try:
                topic = packet[2 : 2 + n].decode()
            except UnicodeDecodeError:
                return
            on_publish(topic, packet[2 + n :], cmd & 1 == 1)

        handler._handle_packet = handle

    async def reconnect(self, delay: bool = False) -> None:
        self._on_lost()


class GmqttTransport(Transport):
    _client: _Client | None = None
    _out: bytearray  # the QoS 0 publishes of this turn of the event loop, while _flushing
    _flushing = False

    async def _connect(self) -> None:
        will = None
        if self.will is not None:
            w = self.will
            will = gmqtt.Message(w.topic, w.payload, qos=w.qos, retain=w.retain)
        client: _Client = _Client(
            self.client_id,
            lambda: self._lost_from(client),
            self._receive,
            clean_session=not self.persistent,
            will_message=will,
        )
        client.on_message = self._on_message
        client.on_subscribe = self._on_suback
        client.on_unsubscribe = self._on_suback
        if self.broker.username is not None:
            client.set_auth_credentials(self.broker.username, self.broker.password)
        self._acks: dict[int, asyncio.Future[None]] = {}
        try:
            await client.connect(
                self.broker.host,
                self.broker.port,
                ssl=self.broker.ssl_context() or False,
                keepalive=self.keepalive,
                version=MQTTv311,
            )
        except OSError as exc:
            raise TransportError(
                f"cannot reach broker {self.broker.url()}: {exc.strerror or exc}"
            ) from None
        except gmqtt.mqtt.handler.MQTTConnectError as exc:
            await _quietly(client.disconnect())
            raise TransportError(f"broker {self.broker.url()} refused us: {exc}") from None
        except asyncio.CancelledError:
            await _quietly(client.disconnect())
            raise
        self._client = client

    def _lost_from(self, client: _Client) -> None:
        if client is self._client:  # a failed or retired session closing late is no news
            for fut in self._acks.values():  # (what they asked for is asked again)
                if not fut.done():
                    fut.set_result(None)
            self._link_lost()

    async def _disconnect(self) -> None:
        if self._client is not None:
            self._flush()
            await _quietly(self._client.disconnect())

    def _on_message(self, client: Any, topic: str, payload: bytes, qos: int, props: Any) -> int:
        self._receive(topic, payload, bool(props.get("retain")) if props else False)
        return 0

    def _on_suback(self, client: Any, mid: int, *args: Any) -> None:
        fut = self._acks.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def _await_ack(self, mid: int) -> None:
        fut = self._acks[mid] = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(fut, self.connect_timeout)
        except TimeoutError:
            raise TransportError(
                f"broker {self.broker.url()} did not acknowledge a subscription "
                f"within {self.connect_timeout:g} s"
            ) from None
        finally:
            self._acks.pop(mid, None)

    async def _subscribe(self, subs: list[tuple[str, int]]) -> None:
        assert self._client is not None
        self._flush()  # (what was published before goes first)
        mid = self._client.subscribe([gmqtt.Subscription(t, qos=q) for t, q in subs])
        await self._await_ack(mid)

    async def _unsubscribe(self, topics: list[str]) -> None:
        assert self._client is not None
        self._flush()
        await self._await_ack(self._client.unsubscribe(topics))

    def _publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        assert self._client is not None
        if qos == 0:
            self._queue(topic.encode(), payload, retain)
            return
        self._flush()  # (what was published before goes first)
        self._client.publish(topic, payload, qos=qos, retain=retain)

    def _queue(self, topic: bytes, payload: bytes, retain: bool) -> None:
        """The send hot path: a PUBLISH at QoS 0 is built here, and the ones of a turn of
        the event loop leave in one socket write (the server relays many per turn)."""
        n = 2 + len(topic) + len(payload)  # the remaining length, 7 bits a byte
        if n > 0xFFFFFFF or len(topic) > 0xFFFF:
            raise ValueError(f"a publish of {n} bytes is beyond what MQTT can carry")
        head = bytearray((0x30 | retain,))
        while n > 0x7F:
            head.append(n & 0x7F | 0x80)
            n >>= 7
        head.append(n)
        head += len(topic).to_bytes(2)
        packet = b"".join((head, topic, payload))  # (whole, or not at all)
        if not self._flushing:
            asyncio.get_running_loop().call_soon(self._flush)
            self._flushing, self._out = True, bytearray()
        self._out += packet

    def _flush(self) -> None:
        if self._flushing and self._client is not None:
            self._flushing = False
            link = self._client._connection
            if not link.is_closing():  # (on a link that died this turn, QoS 0 is lost)
                link.send_package(self._out)

    async def _drain(self) -> None:
        self._flush()
        storage = getattr(self._client, "_persistent_storage", None)
        if storage is not None:
            await storage.wait_empty()

    def _inflight(self) -> int:
        # gmqtt keeps each unacknowledged QoS 1 publish until its PUBACK
        storage = getattr(self._client, "_persistent_storage", None)
        return len(getattr(storage, "_messages", ()))


async def _quietly(coro: Any) -> None:
    with contextlib.suppress(Exception):  # closing a link that is already broken
        await asyncio.wait_for(coro, 2)
