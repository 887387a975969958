"""The alternative transport, on aiomqtt (paho-mqtt underneath): the stack first specified.

paho leaves Nagle's algorithm on; with Mosquitto's delayed ACKs that costs ~40 ms per
QoS 1 round trip, so TCP_NODELAY is set on its socket here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import Any

import aiomqtt

from esn.transport.base import Transport, TransportError

_NODELAY = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
# aiomqtt warns once per publish beyond ten in flight; under load that is every packet
_log = logging.getLogger("esn.transport.aiomqtt")
_log.setLevel(logging.ERROR)


class PahoTransport(Transport):
    _client: aiomqtt.Client | None = None
    _reader: asyncio.Task[None] | None = None

    async def _connect(self) -> None:
        will = None
        if self.will is not None:
            w = self.will
            will = aiomqtt.Will(w.topic, w.payload, qos=w.qos, retain=w.retain)
        client = aiomqtt.Client(
            self.broker.host,
            self.broker.port,
            identifier=self.client_id,
            username=self.broker.username,
            password=self.broker.password,
            will=will,
            protocol=aiomqtt.ProtocolVersion.V311,
            clean_session=not self.persistent,
            keepalive=self.keepalive,
            tls_context=self.broker.ssl_context(),
            socket_options=[_NODELAY],
            timeout=self.connect_timeout,
            logger=_log,
        )
        try:
            await client.__aenter__()
        except aiomqtt.MqttError as exc:
            raise TransportError(f"cannot connect to broker {self.broker.url()}: {exc}") from None
        self._client = client
        self._pending: set[asyncio.Task[Any]] = set()
        self._reader = asyncio.create_task(self._read(client))

    async def _read(self, client: aiomqtt.Client) -> None:
        try:
            async for msg in client.messages:
                payload = msg.payload if isinstance(msg.payload, bytes) else b""
                try:
                    self._receive(msg.topic.value, payload, bool(msg.retain))
                except Exception:  # a handler's bug costs its message, not the link's reader
                    _log.exception("a message on %s was not handled", msg.topic.value)
        except aiomqtt.MqttError:
            if client is self._client:
                self._link_lost()

    async def _disconnect(self) -> None:
        client, self._client = self._client, None
        if self._reader is not None:
            self._reader.cancel()
        if client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.__aexit__(None, None, None), 2)

    async def _subscribe(self, subs: list[tuple[str, int]]) -> None:
        assert self._client is not None
        try:
            await self._client.subscribe(subs)
        except aiomqtt.MqttError as exc:  # (no SUBACK within its timeout, or the link went)
            raise TransportError(f"broker {self.broker.url()}: subscribing: {exc}") from None

    async def _unsubscribe(self, topics: list[str]) -> None:
        assert self._client is not None
        try:
            await self._client.unsubscribe(topics)
        except aiomqtt.MqttError as exc:
            raise TransportError(f"broker {self.broker.url()}: unsubscribing: {exc}") from None

    def _publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        assert self._client is not None
        # aiomqtt's publish is a coroutine that waits for the PUBACK; we only hand it over
        task = asyncio.ensure_future(self._client.publish(topic, payload, qos=qos, retain=retain))
        self._pending.add(task)
        task.add_done_callback(self._published)

    def _inflight(self) -> int:
        return len(self._pending)  # each publish task waits for its PUBACK

    async def _drain(self) -> None:
        if self._pending:
            await asyncio.wait(set(self._pending))

    def _published(self, task: asyncio.Task[Any]) -> None:
        self._pending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.dropped += 1
