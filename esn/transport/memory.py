"""An MQTT broker inside this process, and the transport that talks to it.

For the fast test tier and for simulations that need no network: the server, handsets and
the console run end to end in one event loop, in milliseconds. It keeps what the rest of
the code relies on from a real broker: topic filters with `+` and `#` (which do not match
`$` topics at the first level), retained messages (an empty payload clears one, a new
subscriber gets the matching ones first), wills published when a link dies (not on a clean
disconnect), one session per client id (a second connect takes the first over),
persistent sessions (what matches a QoS 1 subscription of an absent client is queued, up
to `max_queued`, and handed over when it returns), and one copy of a message per
subscriber, delivered in order. Deliveries are scheduled on the event loop, never made
inside `publish`, so no callback runs re-entrantly. Nothing is lost while a link is up.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque

from esn.transport.base import BrokerConfig, Transport, TransportError

_brokers: dict[int, MemoryBroker] = {}
_ports = itertools.count(1)


def topic_matches(pattern: str, topic: str) -> bool:
    """MQTT 3.1.1 topic filter matching (section 4.7)."""
    if topic.startswith("$") and pattern[:1] in ("+", "#"):
        return False
    want, have = pattern.split("/"), topic.split("/")
    for i, level in enumerate(want):
        if level == "#":
            return True
        if i >= len(have) or (level != "+" and level != have[i]):
            return False
    return len(want) == len(have)


class MemoryBroker:
    """A broker reached through `config` by transports made with `mqtt_client="memory"`."""

    def __init__(self) -> None:
        self.port = next(_ports)
        self.running = True
        self.retained: dict[str, bytes] = {}
        self.sessions: dict[str, MemoryTransport] = {}
        # absent clients' persistent sessions: their filters (-> QoS) and what is queued
        self.parked: dict[str, tuple[dict[str, int], deque[tuple[str, bytes]]]] = {}
        self.max_queued = 1000  # per absent client, as Mosquitto's default
        self.published = 0
        _brokers[self.port] = self

    @property
    def config(self) -> BrokerConfig:
        return BrokerConfig(host="memory", port=self.port)

    def close(self) -> None:
        """Shut down for good: every link is lost (wills fire), nothing reconnects here."""
        self.stop()
        _brokers.pop(self.port, None)

    def stop(self) -> None:
        """Like a broker process ending: every client's will fires, retained state is gone."""
        self.running = False
        for session in list(self.sessions.values()):
            self.drop(session)
        self.retained.clear()
        self.parked.clear()

    def start(self) -> None:
        self.running = True

    def drop(self, session: MemoryTransport) -> None:
        """The client's link dies without a DISCONNECT: its will is published."""
        if self.sessions.get(session.client_id) is session:
            del self.sessions[session.client_id]
            self._park(session)
            if session.will is not None:
                w = session.will
                self.publish(w.topic, w.payload, w.retain, w.qos)
            session.link_died()

    # --- what a transport asks of the broker -----------------------------------------

    def connect(self, session: MemoryTransport) -> None:
        if not self.running:
            raise TransportError(f"cannot reach broker {session.broker.url()}: broker stopped")
        old = self.sessions.get(session.client_id)
        if old is not None:
            self.drop(old)  # a second connection under one client id takes the first over
        self.sessions[session.client_id] = session
        parked = self.parked.pop(session.client_id, None)
        if parked is not None and session.persistent:
            for topic, payload in parked[1]:
                session.deliver_soon(topic, payload)

    def disconnect(self, session: MemoryTransport) -> None:
        if self.sessions.get(session.client_id) is session:
            del self.sessions[session.client_id]
            self._park(session)

    def _park(self, session: MemoryTransport) -> None:
        if session.persistent:
            filters = {t: q for t, q in session.qos_filters.items() if q > 0}
            self.parked[session.client_id] = (filters, deque())

    def subscribe(self, session: MemoryTransport, patterns: list[str]) -> None:
        for topic, payload in list(self.retained.items()):
            if any(topic_matches(p, topic) for p in patterns):
                session.deliver_soon(topic, payload, retained=True)

    def publish(self, topic: str, payload: bytes, retain: bool, qos: int = 1) -> None:
        self.published += 1
        if qos > 0:
            for filters, queued in self.parked.values():
                # a full queue drops what comes (as Mosquitto does), not what it holds
                if len(queued) < self.max_queued and any(topic_matches(p, topic) for p in filters):
                    queued.append((topic, payload))
        if retain:
            if payload:
                self.retained[topic] = payload
            else:
                self.retained.pop(topic, None)
        for session in list(self.sessions.values()):
            if any(topic_matches(p, topic) for p in session.filters):
                session.deliver_soon(topic, payload)


class MemoryTransport(Transport):
    """A `Transport` on a `MemoryBroker`, with the base class's reconnect policy."""

    _session_broker: MemoryBroker | None = None

    @property
    def filters(self) -> list[str]:
        return list(self._subscriptions)

    @property
    def qos_filters(self) -> dict[str, int]:
        return dict(self._subscriptions)

    def deliver_soon(self, topic: str, payload: bytes, retained: bool = False) -> None:
        loop = asyncio.get_running_loop()
        loop.call_soon(self._deliver, self._session_broker, topic, payload, retained)

    def _deliver(
        self, via: MemoryBroker | None, topic: str, payload: bytes, retained: bool
    ) -> None:
        if self.connected and via is self._session_broker:  # not after the link went
            self._receive(topic, payload, retained)

    def link_died(self) -> None:
        self._session_broker = None
        self._link_lost()

    async def _connect(self) -> None:
        broker = _brokers.get(self.broker.port)
        if broker is None:
            raise TransportError(f"cannot reach broker {self.broker.url()}: no such broker")
        self._session_broker = broker  # (what a persistent session kept is on its way)
        try:
            broker.connect(self)
        except TransportError:
            self._session_broker = None
            raise

    async def _disconnect(self) -> None:
        if self._session_broker is not None:
            self._session_broker.disconnect(self)
            self._session_broker = None

    async def _subscribe(self, subs: list[tuple[str, int]]) -> None:
        if self._session_broker is not None:  # the filters are kept by the base class
            self._session_broker.subscribe(self, [t for t, _ in subs])

    async def _unsubscribe(self, topics: list[str]) -> None:
        return None  # the base class has dropped them from the filters already

    def _publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        if self._session_broker is not None:
            self._session_broker.publish(topic, payload, retain, qos)
