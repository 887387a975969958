"""The small MQTT interface the server, handsets and console use, and its shared policy.

An implementation owns one MQTT 3.1.1 connection: it connects (once, reporting failure),
then keeps the link up by itself — jittered exponential back-off, every subscription made
again, and in a persistent session what the broker queued meanwhile — and tells its owner
through `on_connect`/`on_disconnect` so the owner can republish retained state. Messages
published while the link is down are dropped and counted (`dropped`): the protocol's
retained state and retries recover them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

log = logging.getLogger("esn.transport")

# QoS 1 messages awaiting the broker's ack, at most: MQTT has 65535 packet ids, and a
# stack that runs out of them fails every publish until acks come back. Past this, a
# publish is dropped and counted: retained state and retries recover what matters.
MAX_INFLIGHT = 20_000


class TransportError(Exception):
    """The broker could not be reached or refused us; the message is one line."""


@dataclass(frozen=True, slots=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class BrokerConfig:
    host: str = "127.0.0.1"
    port: int = 1883
    tls: bool = False
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        username: str | None = None,
        password: str | None = None,
        ca_file: str | None = None,
    ) -> BrokerConfig:
        """`mqtt://HOST:PORT` or `mqtts://HOST:PORT`; credentials in the URL are allowed."""
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ValueError(f"broker URL must be mqtt://HOST:PORT or mqtts://..., got {url!r}")
        tls = parts.scheme == "mqtts"
        try:
            port = parts.port or (8883 if tls else 1883)
        except ValueError:
            raise ValueError(f"bad port in broker URL {url!r}") from None
        return cls(
            host=parts.hostname,
            port=port,
            tls=tls,
            username=username or (unquote(parts.username) if parts.username else None),
            password=password or (unquote(parts.password) if parts.password else None),
            ca_file=ca_file,
        )

    def ssl_context(self) -> ssl.SSLContext | None:
        return ssl.create_default_context(cafile=self.ca_file) if self.tls else None

    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def backoff(attempt: int, base: float = 0.1, cap: float = 5.0) -> float:
    """Full-jitter exponential back-off, so thousands of handsets do not reconnect at once."""
    return random.uniform(0, min(cap, base * 2**attempt))


def _ignore_message(topic: str, payload: bytes) -> None:
    return None


def _ignore() -> None:
    return None


class Transport(ABC):
    """One MQTT connection with its own reconnect policy. Callbacks run on the event loop."""

    def __init__(
        self,
        broker: BrokerConfig,
        *,
        client_id: str,
        will: Will | None = None,
        keepalive: int = 30,
        connect_timeout: float = 5.0,
        persistent: bool = False,
        others: tuple[BrokerConfig, ...] = (),
    ) -> None:
        self.broker = broker
        # the nodes of a clustered broker: after a loss, each attempt tries the next one
        self._brokers, self._at = (broker, *others), 0
        self.client_id = client_id
        # a persistent session (clean session off): while we are away the broker keeps our
        # subscriptions and queues what they match at QoS 1, and hands it over when we return
        self.persistent = persistent
        self.will = will
        self.keepalive = keepalive
        self.connect_timeout = connect_timeout
        self.on_message: Callable[[str, bytes], None] = _ignore_message
        # a retained message (delivered because we subscribed) goes here when set
        self.on_retained: Callable[[str, bytes], None] | None = None
        self.on_connect: Callable[[], None] = _ignore
        self.on_disconnect: Callable[[], None] = _ignore
        self.connected = False
        self.reconnects = 0
        self.dropped = 0  # publishes not sent: the link was down, or too many awaited acks
        self.max_inflight = MAX_INFLIGHT
        self._subscriptions: dict[str, int] = {}
        self._early: list[tuple[str, bytes, bool]] = []  # received while connecting
        self._closing = False
        self._lost = asyncio.Event()
        self._session = 0  # links made so far: a late failure of an earlier one is no news
        self._supervisor: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Connect once (to the first of the brokers given that answers, else raising
        TransportError), then keep the link up in the background."""
        brokers = self._brokers
        for at, broker in enumerate(brokers):
            self._at, self.broker = at, broker
            try:
                await self._connect_reporting()
                break
            except (TransportError, OSError) as exc:
                if at == len(brokers) - 1:
                    raise
                log.warning("%s: %s; trying the next broker", self.client_id, exc)
        self._supervisor = asyncio.create_task(self._supervise(), name=f"mqtt:{self.client_id}")

    async def stop(self) -> None:
        """Disconnect cleanly (the broker discards the will) and stop reconnecting. What
        was published before is acknowledged first (for at most 2 s): a unit's last word
        is its `offline`, and with the will discarded it must not be lost."""
        self._closing = True
        if self._supervisor is not None:
            self._supervisor.cancel()
        if self.connected:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drain(), 2)
            self.connected = False
            await self._disconnect()

    async def subscribe(self, *topics: str, qos: int = 1) -> None:
        """Subscribe and wait for the broker's SUBACK; kept across reconnects. A link
        whose broker does not answer within `connect_timeout` is dropped (it is not to be
        trusted; the reconnect subscribes again); one lost meanwhile is left to the
        reconnect (gmqtt returns at once, aiomqtt once its own timeout is up)."""
        for t in topics:
            self._subscriptions[t] = qos
        if self.connected:
            await self._unanswered(self._subscribe([(t, qos) for t in topics]))

    async def writable(self, timeout: float = 5.0) -> None:
        """Return once at most half of `max_inflight` publishes await acks (waiting at most
        `timeout`), after one turn of the event loop in any case: for a producer of many
        publishes at once, so none is dropped for want of packet ids."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        await asyncio.sleep(0)
        while self.connected and self._inflight() > self.max_inflight // 2:
            if loop.time() > deadline:
                return
            await asyncio.sleep(0.005)

    async def unsubscribe(self, *topics: str) -> None:
        for t in topics:
            self._subscriptions.pop(t, None)
        if self.connected:
            await self._unanswered(self._unsubscribe(list(topics)))

    async def _unanswered(self, request: Awaitable[None]) -> None:
        session = self._session
        try:
            await request
        except TransportError as exc:
            if session != self._session or not self.connected:
                return  # (that link is gone already: the one after subscribes again)
            log.warning("%s: %s; reconnecting", self.client_id, exc)
            self.connected = False
            await self._disconnect()
            self._link_lost()

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        """Hand a message to the link, or count it as dropped: this never raises, so no
        caller (a handler in the middle of a message) is cut short by the link's state."""
        if not self.connected or (qos > 0 and self._inflight() >= self.max_inflight):
            self.dropped += 1
            return
        try:
            self._publish(topic, payload, qos, retain)
        except Exception as exc:  # the stack refused it (a closing link, say)
            self.dropped += 1
            log.warning("%s: a publish on %s failed: %s", self.client_id, topic, exc)

    # --- for implementations ----------------------------------------------------------

    def _receive(self, topic: str, payload: bytes, retained: bool) -> None:
        if not self.connected:
            # what a persistent session queued can come with the CONNACK, before the link
            # is ours to answer on: handed over once it is (bounded: the broker's queue is)
            if not self._closing and len(self._early) < MAX_INFLIGHT:
                self._early.append((topic, payload, retained))
            return
        if retained and self.on_retained is not None:
            self.on_retained(topic, payload)
        else:
            self.on_message(topic, payload)

    def _link_lost(self) -> None:
        self._lost.set()

    async def _connect_reporting(self, timeout: float | None = None) -> None:
        """Connect, waiting `timeout` (else `connect_timeout`) for the broker's answer,
        then subscribe again, waiting `connect_timeout` for that."""
        timeout = timeout or self.connect_timeout
        try:  # (in this task: what a session kept arrives once `connected` is set)
            async with asyncio.timeout(timeout) as limit:
                await self._connect()
                timeout = self.connect_timeout
                limit.reschedule(asyncio.get_running_loop().time() + timeout)
                await self._resubscribe()
        except TimeoutError:
            self.connected = False
            await self._disconnect()
            raise TransportError(
                f"broker {self.broker.url()} did not answer within {timeout:g} s"
            ) from None
        except TransportError:  # (a subscription not acknowledged)
            self.connected = False
            await self._disconnect()
            raise
        self.on_connect()

    async def _resubscribe(self) -> None:
        self._session += 1
        self._lost.clear()
        # up from here: retained messages arriving with the SUBACKs may prompt publishes
        self.connected = True
        early, self._early = self._early, []
        for message in early:
            self._receive(*message)
        if self._subscriptions:
            await self._subscribe(list(self._subscriptions.items()))

    async def _supervise(self) -> None:
        while not self._closing:
            await self._lost.wait()
            self._lost.clear()
            if self._closing:
                return
            self.connected = False
            log.warning(
                "%s: link to broker %s lost; reconnecting", self.client_id, self.broker.url()
            )
            self.on_disconnect()
            attempt = 0
            several = len(self._brokers) > 1  # (a server among few: its tries pace it)
            while not self._closing:
                await asyncio.sleep(backoff(attempt, cap=0.5 if several else 5.0))
                attempt += 1
                self._at = (self._at + 1) % len(self._brokers)
                self.broker = self._brokers[self._at]
                # (a node of a cluster that does not answer soon is passed for the next:
                # a NATS node answers once JetStream has elected the leaders it needs)
                timeout = min(self.connect_timeout, 2.0) if several else None
                try:
                    await self._connect_reporting(timeout)
                except (TransportError, OSError) as exc:
                    log.info("%s: reconnect attempt %d failed: %s", self.client_id, attempt, exc)
                    continue
                self.reconnects += 1
                log.warning(
                    "%s: reconnected to %s after %d attempt(s)",
                    self.client_id,
                    self.broker.url(),
                    attempt,
                )
                break

    @abstractmethod
    async def _connect(self) -> None:
        """Open a new session, raising TransportError with a one-line reason."""

    @abstractmethod
    async def _disconnect(self) -> None: ...

    @abstractmethod
    async def _subscribe(self, subs: list[tuple[str, int]]) -> None: ...

    @abstractmethod
    async def _unsubscribe(self, topics: list[str]) -> None: ...

    @abstractmethod
    def _publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> None: ...

    def _inflight(self) -> int:
        """QoS 1 messages sent and not yet acknowledged by the broker."""
        return 0

    async def _drain(self) -> None:
        """Return once every QoS 1 message sent is acknowledged by the broker."""
        return
