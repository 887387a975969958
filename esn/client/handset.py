"""A simulated handset (or any protocol client): the unit side of PROTOCOL.md.

One MQTT connection per unit. It announces presence (with an `offline` will), affiliates
to groups, runs the client floor states of TS 24.380 per group (no permission, pending
request with retries, has permission, queued, pending release), sends voice packets while
it holds the floor and stops them at once on a revoke, reports its position, and measures
what its user would notice: floor access time (press -> granted) and mouth-to-ear latency
(talker's `ts` -> packet received). Tests, the demo, the load generator and the console
all drive the network through this class.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import msgpack

from esn.protocol import codec
from esn.protocol import messages as m
from esn.protocol.topics import Topics
from esn.transport import BrokerConfig, Transport, Will, make_transport

NO_PERMISSION = "no_permission"
PENDING_REQUEST = "pending_request"
HAS_PERMISSION = "has_permission"
QUEUED = "queued"

REQUEST_RETRY_S = 0.5  # T101-like: re-send an unanswered request (same ref: idempotent)
REQUEST_TRIES = 4
AMR_WB_FRAME_BYTES = 33  # 12.65 kbit/s mode, 20 ms


@dataclass
class GroupView:
    """What this handset knows of one group: its own floor state and the group's."""

    floor: str = NO_PERMISSION
    kind: str = "normal"  # of our own request or grant
    talker: str | None = None
    call: str | None = None
    emergency: bool = False
    queue_pos: int | None = None
    pressed_at: float | None = None
    joined_at: float | None = None  # for late-entry: affiliation -> first media
    media_task: asyncio.Task[None] | None = None


class Observer(Protocol):
    """Told each measurement as it happens (Prometheus histograms, HdrHistograms, ...)."""

    def access(self, seconds: float, kind: str) -> None: ...

    def mouth_to_ear(self, seconds: float) -> None: ...

    def late_entry(self, seconds: float) -> None: ...


@dataclass
class Stats:
    access_s: list[float] = field(default_factory=list)  # press -> granted, not queued
    queued_access_s: list[float] = field(default_factory=list)  # press -> granted via queue
    mouth_to_ear_s: list[float] = field(default_factory=list)
    late_entry_s: list[float] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    def count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1


@dataclass(frozen=True)
class Inbound:
    topic: str
    msg: m.Message


class Handset:
    def __init__(
        self,
        unit: str,
        broker: BrokerConfig,
        *,
        prefix: str = "esn",
        mqtt_client: str = "gmqtt",
        keepalive: int = 30,
        media_interval: float = 0.06,
        frames_per_packet: int = 3,
        home: tuple[float, float] = (51.5072, -0.1276),
        keep_inbox: bool = True,
        metrics: Observer | None = None,
        keep_stats: bool = True,
    ) -> None:
        self.unit = unit
        self.topics = Topics(prefix)
        self.media_interval = media_interval
        self.payload_bytes = AMR_WB_FRAME_BYTES * frames_per_packet
        self.groups: dict[str, GroupView] = {}
        self.stats = Stats()
        self.inbox: list[Inbound] = []
        self.keep_inbox = keep_inbox
        self.on_inbound: Callable[[Inbound], None] | None = None
        self.position = home
        self.metrics = metrics
        self.keep_stats = keep_stats  # off for load tests: the observer keeps the figures
        self._refs = itertools.count(1)
        self._waiters: list[tuple[Callable[[Inbound], bool], asyncio.Future[Inbound]]] = []
        self._location_task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Future[None]] = set()
        offline = codec.encode(m.Presence(state="offline"))
        self.transport: Transport = make_transport(
            mqtt_client,
            broker,
            client_id=unit,
            keepalive=keepalive,
            will=Will(self.topics.presence(unit), offline),
        )
        self.transport.on_message = self._on_message
        self.transport.on_connect = self._on_connect
        self.transport.on_disconnect = lambda: self.on_link(False) if self.on_link else None
        self.on_link: Callable[[bool], None] | None = None  # told when the link goes down/up

    # --- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        t = self.topics
        await self.transport.subscribe(t.unit_down(self.unit), t.status("+"))
        await self.transport.start()

    async def stop(self) -> None:
        """Leave gracefully: release floors, publish `offline`, disconnect."""
        for tg, view in self.groups.items():
            if view.floor in (HAS_PERMISSION, QUEUED, PENDING_REQUEST):
                self.release(tg)
        if self._location_task is not None:
            self._location_task.cancel()
        self._publish(self.topics.presence(self.unit), m.Presence(state="offline"), retain=True)
        await self.transport.stop()

    def _on_connect(self) -> None:
        self._publish(self.topics.presence(self.unit), m.Presence(state="online"), retain=True)
        if self.on_link is not None:
            self.on_link(True)

    # --- unit control -------------------------------------------------------------------

    async def affiliate(self, *groups: str, timeout: float = 5.0) -> m.Affiliation:
        now = time.perf_counter()
        for tg in groups:  # before subscribing: the retained state says if a call is on
            self.groups.setdefault(tg, GroupView()).joined_at = now
        await self.transport.subscribe(*[x for tg in groups for x in self.group_topics(tg)])
        reply = await self.ask(m.Affiliate(groups=list(groups), ref=next(self._refs)), timeout)
        assert isinstance(reply, m.Affiliation)
        for tg in groups:
            if tg not in reply.groups:
                self.groups.pop(tg, None)
                await self.transport.unsubscribe(*self.group_topics(tg))
        return reply

    async def deaffiliate(self, *groups: str, timeout: float = 5.0) -> m.Affiliation:
        reply = await self.ask(m.Deaffiliate(groups=list(groups), ref=next(self._refs)), timeout)
        assert isinstance(reply, m.Affiliation)
        for tg in groups:
            self._stop_media(self.groups.pop(tg, GroupView()))
        await self.transport.unsubscribe(*[x for tg in groups for x in self.group_topics(tg)])
        return reply

    def group_topics(self, tg: str) -> tuple[str, ...]:
        """What a member listens to: the group's down topics and its retained state."""
        return (self.topics.group_down_all(tg), self.topics.state(tg))

    async def ask(self, msg: m.Message, timeout: float = 5.0) -> m.Message:
        """Send a unit-control message and wait for the reply carrying its `ref`."""
        waiter = self.expect(lambda i: i.msg.ref == msg.ref and i.topic.endswith("/down"), timeout)
        self._send_up(msg)
        return (await waiter).msg

    def send(self, msg: m.Message) -> None:
        """Send a unit-control message without waiting (location, emergency, SDS, ...)."""
        self._send_up(msg)

    def next_ref(self) -> int:
        return next(self._refs)

    def start_location_reports(self, interval: float) -> None:
        self._location_task = asyncio.create_task(self._report_location(interval))

    # --- floor control (PTT) ----------------------------------------------------------

    async def press(
        self, tg: str, kind: str = "normal", prio: int | None = None, timeout: float = 5.0
    ) -> m.Message:
        """PTT down: request the floor, re-sending unanswered requests with the same ref.

        Returns the server's first answer: `granted`, `queued` or `deny`.
        """
        view = self.groups.setdefault(tg, GroupView())
        view.floor, view.pressed_at, view.kind = PENDING_REQUEST, time.perf_counter(), kind
        ref = next(self._refs)
        answer = self.expect(
            lambda i: (
                i.msg.ref == ref
                and isinstance(i.msg, m.Granted | m.Queued | m.Deny)
                and getattr(i.msg, "tg", None) == tg
            ),
            timeout,
        )
        topic = self.topics.floor_up(tg, self.unit)
        for _ in range(REQUEST_TRIES):
            self._publish(topic, m.Request(kind=kind, prio=prio, ref=ref, ts=time.time_ns()))
            done, _ = await asyncio.wait({answer}, timeout=REQUEST_RETRY_S)
            if done:
                break
        return (await answer).msg

    def release(self, tg: str) -> None:
        """PTT up: stop media and give up the floor (or leave the queue)."""
        view = self.groups.setdefault(tg, GroupView())
        self._stop_media(view)
        view.floor, view.queue_pos = NO_PERMISSION, None
        self._publish(self.topics.floor_up(tg, self.unit), m.Release(ts=time.time_ns()))

    async def talk(self, tg: str, seconds: float, kind: str = "normal") -> bool:
        """Press, talk for `seconds` if granted (waiting in the queue if need be), release."""
        first = await self.press(tg, kind)
        view = self.groups[tg]
        if isinstance(first, m.Queued):
            with contextlib.suppress(TimeoutError):
                await self.expect(
                    lambda i: (
                        isinstance(i.msg, m.Granted | m.Revoke | m.Deny)
                        and getattr(i.msg, "tg", None) == tg
                    ),
                    seconds * 3,
                )
        if view.floor != HAS_PERMISSION:
            if view.floor == QUEUED:
                self.release(tg)
            return False
        with contextlib.suppress(TimeoutError):
            # a revoke ends the talk early
            await self.expect(lambda i: isinstance(i.msg, m.Revoke) and i.msg.tg == tg, seconds)
        if view.floor == HAS_PERMISSION:
            self.release(tg)
        return True

    def floor_state(self, tg: str) -> str:
        return self.groups[tg].floor if tg in self.groups else NO_PERMISSION

    # --- waiting on what arrives ------------------------------------------------------

    def expect(
        self, predicate: Callable[[Inbound], bool], timeout: float = 5.0
    ) -> asyncio.Future[Inbound]:
        """A future for the next inbound message matching `predicate`, failing after `timeout`."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Inbound] = loop.create_future()
        entry = (predicate, fut)
        self._waiters.append(entry)

        def expire() -> None:
            if not fut.done():
                fut.set_exception(TimeoutError(f"{self.unit}: nothing matching within {timeout} s"))
            with contextlib.suppress(ValueError):
                self._waiters.remove(entry)

        handle = loop.call_later(timeout, expire)
        fut.add_done_callback(lambda _: handle.cancel())
        return fut

    # --- inbound ----------------------------------------------------------------------

    def _on_message(self, topic: str, payload: bytes) -> None:
        if topic.endswith("/down/media"):
            self._on_media(topic, payload)
            return
        if not payload:
            return  # a cleared retained message
        try:
            msg = codec.decode(payload)
        except codec.ProtocolError:
            self.stats.count("bad_downlink")
            return
        self.stats.count(msg.T)
        self._apply(msg)
        self._deliver(Inbound(topic, msg))

    def _deliver(self, inbound: Inbound) -> None:
        if self.keep_inbox:
            self.inbox.append(inbound)
        if self.on_inbound is not None:
            self.on_inbound(inbound)
        if self._waiters:
            for entry in list(self._waiters):
                predicate, fut = entry
                if not fut.done() and predicate(inbound):
                    fut.set_result(inbound)
                    self._waiters.remove(entry)

    def _apply(self, msg: m.Message) -> None:
        """The client floor state machine."""
        if isinstance(msg, m.Status):
            # The server says online after it (or we) reconnected: it may have lost our
            # affiliations (a restart, our will firing), so state them again; it is idempotent.
            if msg.state == "online" and self.groups:
                self._send_up(m.Affiliate(groups=sorted(self.groups), ref=next(self._refs)))
                self._reclaim_floors()
            return
        tg = getattr(msg, "tg", None)
        if (isinstance(msg, m.Regrouped) and tg not in self.groups) or (
            isinstance(msg, m.Ungrouped) and tg in self.groups
        ):
            self._follow_regroup(msg)
            return
        view = self.groups.get(tg) if isinstance(tg, str) else None
        if view is None:
            return
        now = time.perf_counter()
        if isinstance(msg, m.Granted):
            if view.floor == HAS_PERMISSION:
                return  # a repeated grant
            if view.pressed_at is not None:
                waited = now - view.pressed_at
                if view.floor == QUEUED:
                    if self.keep_stats:
                        self.stats.queued_access_s.append(waited)
                else:
                    if self.keep_stats:
                        self.stats.access_s.append(waited)
                    if self.metrics is not None:
                        self.metrics.access(waited, msg.kind)
            reclaimed = view.media_task is not None and view.call == msg.call
            view.floor, view.queue_pos, view.call, view.kind = (
                HAS_PERMISSION,
                None,
                msg.call,
                msg.kind,
            )
            if not reclaimed:  # a reclaimed call keeps its packet sequence going
                self._start_media(msg.tg, view)
        elif isinstance(msg, m.Queued):
            if view.floor in (PENDING_REQUEST, QUEUED):
                self._stop_media(view)  # a reclaim that found the floor taken
                view.floor, view.queue_pos = QUEUED, msg.pos
        elif isinstance(msg, m.Deny):
            if view.floor in (PENDING_REQUEST, QUEUED):
                self._stop_media(view)
                view.floor, view.queue_pos = NO_PERMISSION, None
        elif isinstance(msg, m.Revoke):
            self.release(msg.tg)  # stop media at once and hand the floor back
        elif isinstance(msg, m.Taken):
            view.talker, view.call = msg.talker, msg.call
        elif isinstance(msg, m.Idle):
            view.talker = None
        elif isinstance(msg, m.State):
            view.talker, view.call, view.emergency = msg.talker, msg.call, msg.emergency
            if msg.floor == "idle":
                view.joined_at = None  # no call to enter late

    def _reclaim_floors(self) -> None:
        """Still talking when the server (or our link) came back: ask for the floor again,
        so the call goes on. The server answers `granted` if it kept or restored our grant."""
        for tg, view in self.groups.items():
            if view.floor == HAS_PERMISSION:
                # media goes on while the answer is awaited; a reclaim is no access sample
                view.floor, view.pressed_at = PENDING_REQUEST, None
                self._publish(
                    self.topics.floor_up(tg, self.unit),
                    m.Request(kind=view.kind, ref=next(self._refs), ts=time.time_ns()),
                )

    def _follow_regroup(self, msg: m.Regrouped | m.Ungrouped) -> None:
        """A dispatcher put us in (or took us out of) a temporary group: listen to it."""
        subs = self.group_topics(msg.tg)
        if isinstance(msg, m.Regrouped):
            self.groups[msg.tg] = GroupView()
            task = asyncio.ensure_future(self.transport.subscribe(*subs))
        else:
            self._stop_media(self.groups.pop(msg.tg, GroupView()))
            task = asyncio.ensure_future(self.transport.unsubscribe(*subs))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _on_media(self, topic: str, payload: bytes) -> None:
        try:
            obj = msgpack.unpackb(payload)
            tg, talker, ts = obj["tg"], obj["talker"], obj.get("ts")
        except Exception:  # any bytes from the wire: count, never crash
            self.stats.count("bad_media")
            return
        if talker == self.unit:
            return
        self.stats.count("media_rx")
        now_ns = time.time_ns()
        if isinstance(ts, int):
            m2e = (now_ns - ts) / 1e9
            if self.keep_stats:
                self.stats.mouth_to_ear_s.append(m2e)
            if self.metrics is not None:
                self.metrics.mouth_to_ear(m2e)
        view = self.groups.get(tg)
        if view is not None and view.joined_at is not None:
            late = time.perf_counter() - view.joined_at
            view.joined_at = None
            if self.keep_stats:
                self.stats.late_entry_s.append(late)
            if self.metrics is not None:
                self.metrics.late_entry(late)
        if self._waiters:
            self._deliver(
                Inbound(
                    topic,
                    m.Media(
                        call=str(obj.get("call")),
                        seq=int(obj.get("seq", 0)),
                        data=b"",
                        tg=tg,
                        talker=talker,
                        ts=ts,
                    ),
                )
            )

    # --- media and location -----------------------------------------------------------

    def _start_media(self, tg: str, view: GroupView) -> None:
        self._stop_media(view)
        if self.media_interval > 0:
            view.media_task = asyncio.create_task(self._send_media(tg, view.call or ""))

    @staticmethod
    def _stop_media(view: GroupView) -> None:
        if view.media_task is not None:
            view.media_task.cancel()
            view.media_task = None

    async def _send_media(self, tg: str, call: str) -> None:
        topic = self.topics.media_up(tg, self.unit)
        frame = os.urandom(self.payload_bytes)
        loop = asyncio.get_running_loop()
        start = loop.time()
        for seq in itertools.count():
            packet = {"t": "media", "call": call, "seq": seq, "data": frame, "ts": time.time_ns()}
            self.transport.publish(topic, msgpack.packb(packet), qos=0)
            self.stats.count("media_tx")
            # paced on a fixed schedule, so a slow loop does not stretch the talk burst
            await asyncio.sleep(max(0.0, start + (seq + 1) * self.media_interval - loop.time()))

    async def _report_location(self, interval: float) -> None:
        lat, lon = self.position
        heading = random.uniform(0, 360)
        while True:
            speed = random.uniform(0, 15)
            heading = (heading + random.uniform(-30, 30)) % 360
            step = speed * interval / 111_000
            lat = max(-89.9, min(89.9, lat + step * math.cos(math.radians(heading))))
            lon = max(-179.9, min(179.9, lon + step * math.sin(math.radians(heading))))
            self.position = (lat, lon)
            self._send_up(
                m.Location(
                    lat=lat,
                    lon=lon,
                    acc=5.0,
                    hdg=round(heading, 1),
                    spd=round(speed, 1),
                    ts=time.time_ns(),
                )
            )
            await asyncio.sleep(interval * random.uniform(0.8, 1.2))

    # --- outbound ---------------------------------------------------------------------

    def _send_up(self, msg: m.Message) -> None:
        self._publish(self.topics.unit_up(self.unit), msg)

    def _publish(self, topic: str, msg: m.Message, retain: bool = False) -> None:
        self.transport.publish(topic, codec.encode(msg), qos=1, retain=retain)
