"""A simulated handset (or any protocol client): the unit side of docs/protocol.md.

One MQTT connection per unit. It announces presence (with an `offline` will), affiliates
to groups, and is the I/O shell of one `FloorParticipant` per group (`esn.client.floor`,
the TS 24.380 floor states without I/O): it sends what the participant asks, keeps its
timers on the event loop, sends voice packets while it holds the floor and stops them at
once on a revoke. It reports its position and measures what its user would notice: floor
access time (press -> granted) and mouth-to-ear latency (talker's `ts` -> packet
received). Tests, the demo, the load generator and the console all drive the network
through this class; `talk_burst` is the one press-talk-release procedure they share.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import math
import os
import random
import secrets
import time
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import msgpack

from esn.client.floor import (
    Action,
    FloorParticipant,
    FloorState,
    Outcome,
    SendRelease,
    SendRequest,
    StartMedia,
    StopMedia,
    Timers,
)
from esn.client.scan import ScanList
from esn.client.trace import Access
from esn.protocol import codec
from esn.protocol import messages as m
from esn.protocol.ids import call_owner
from esn.protocol.topics import Topics
from esn.transport import BrokerConfig, Transport, Will, make_transport

log = logging.getLogger("esn.handset")

NO_PERMISSION = FloorState.NO_PERMISSION
PENDING_REQUEST = FloorState.PENDING_REQUEST
HAS_PERMISSION = FloorState.HAS_PERMISSION
QUEUED = FloorState.QUEUED
PENDING_RELEASE = FloorState.PENDING_RELEASE

AMR_WB_FRAME_BYTES = 33  # 12.65 kbit/s mode, 20 ms

# A control message not answered is sent again (same ref: the server answers a repeat
# without acting twice) after each of these delays, give or take half (so a fleet does not
# retry in step), so one lost on the way or sent while the server restarts still takes
# effect. At most MAX_UNANSWERED are followed at once: the server remembers as many.
RETRY_AFTER_S = (1.0, 2.0, 4.0, 8.0, 15.0)
MAX_UNANSWERED = 16


class ClientError(Exception):
    """The server's answer was not what the call asked for."""


class Refused(ClientError):
    """The server answered `error`: the message names its cause and detail."""

    def __init__(self, error: m.Error) -> None:
        super().__init__(f"{error.cause}: {error.detail}")
        self.cause = error.cause
        self.detail = error.detail


class UnexpectedReply(ClientError):
    """The server answered with a message of another type than the request expects."""

    def __init__(self, asked: m.Message, got: m.Message) -> None:
        super().__init__(f"{asked.T} was answered with {got.T}")
        self.reply = got


@dataclass
class GroupView:
    """This handset's side of one group: its floor participant and the I/O around it."""

    floor: FloorParticipant
    joined_at: float | None = None  # for late entry: affiliation -> first media
    media_task: asyncio.Task[None] | None = None
    timer: asyncio.TimerHandle | None = None
    timer_at: float | None = None  # the participant's deadline the timer is set for
    # what became of the current press, in order, until a burst reads it: several may
    # arrive in one socket read (queued then granted), and none may be lost between waits
    outcomes: deque[Outcome] = field(default_factory=lambda: deque(maxlen=16))
    news: asyncio.Event = field(default_factory=asyncio.Event)
    access: Access | None = None  # the current press, until its access is decided


@dataclass(frozen=True, slots=True)
class Burst:
    """How one talk burst went (`Handset.talk_burst`).

    `outcome`: talked (for the time asked), revoked (talked until a revoke), denied,
    no_answer, or queue_timeout (queued, and not granted in time). `access_s` is press ->
    granted for a burst that got the floor.
    """

    outcome: str
    cause: str | None = None
    queued: bool = False
    access_s: float | None = None

    @property
    def talked(self) -> bool:
        return self.outcome in ("talked", "revoked")


class Observer(Protocol):
    """Told each measurement as it happens (Prometheus histograms, HdrHistograms, ...)."""

    def access(self, seconds: float, kind: str) -> None: ...

    def mouth_to_ear(self, seconds: float) -> None: ...

    def late_entry(self, seconds: float) -> None: ...

    def scan_entry(self, seconds: float) -> None: ...


@dataclass
class Stats:
    access_s: list[float] = field(default_factory=list)  # press -> granted, not queued
    queued_access_s: list[float] = field(default_factory=list)  # press -> granted via queue
    mouth_to_ear_s: list[float] = field(default_factory=list)
    late_entry_s: list[float] = field(default_factory=list)
    scan_entry_s: list[float] = field(default_factory=list)  # scan switch -> first media
    counts: dict[str, int] = field(default_factory=dict)

    def count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1


@dataclass(frozen=True)
class Inbound:
    topic: str
    msg: m.Message


T = TypeVar("T")


class Waiters(Generic[T]):
    """Futures for the next item matching a predicate, each failing after its timeout."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._entries: list[tuple[Callable[[T], bool], asyncio.Future[T]]] = []

    def __bool__(self) -> bool:
        return bool(self._entries)

    def add(self, predicate: Callable[[T], bool], timeout: float) -> asyncio.Future[T]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        entry = (predicate, fut)
        self._entries.append(entry)

        def expire() -> None:
            if not fut.done():
                fut.set_exception(TimeoutError(f"{self.name}: nothing matching within {timeout} s"))
            with contextlib.suppress(ValueError):
                self._entries.remove(entry)

        handle = loop.call_later(timeout, expire)
        fut.add_done_callback(lambda _: handle.cancel())
        return fut

    def offer(self, item: T) -> None:
        for entry in list(self._entries):
            predicate, fut = entry
            if not fut.done() and predicate(item):
                fut.set_result(item)
                self._entries.remove(entry)


def _answers(inbound: Inbound, ref: int | None) -> bool:
    """Whether this is the server's answer to our message `ref` (on our down topic; a
    short message delivered to us carries its sender's ref, and answers nothing; an error
    `rate_limited` means "not now": the message is sent again, and answered then)."""
    msg = inbound.msg
    if msg.ref != ref or not inbound.topic.endswith("/down") or isinstance(msg, m.Sds):
        return False
    return not (isinstance(msg, m.Error) and msg.cause == "rate_limited")


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
        timers: Timers | None = None,
        qos: int = 1,
        scan: ScanList | None = None,
    ) -> None:
        self.unit = unit
        # which of its groups' calls the user hears (docs/scanning.md); None: all of them
        self.scan = scan
        self._entering: tuple[str, float] | None = None  # a scan switch: (group, when)
        self._mic: asyncio.Task[None] | None = None  # listened in on (11.13): sending
        self._mic_call: str | None = None
        self.on_ambient: Callable[[str], None] | None = None  # a packet of a unit listened to
        # the private call it is in (11.14), as last told; a ringing one is answered after
        # `answer_after` seconds (None: left to ring), one while in another refused busy
        self.private: m.Private | None = None
        self.answer_after: float | None = 0.5
        self.on_private_media: Callable[[str], None] | None = None  # (talker) per packet
        self._private_voice: asyncio.Task[None] | None = None
        self._calls_over: deque[str] = deque(maxlen=8)  # (news of them is stale)
        self._link_lost_in: str | None = None  # the call we were in when the link went
        # every control and floor message sent ("out") or received ("in"), voice left out,
        # and each change of a group's floor state: the full traces (docs/traces.md)
        self.on_wire: Callable[[str, str, m.Message], None] | None = None
        self.on_floor: Callable[[str, FloorState, FloorState], None] | None = None
        # the QoS it subscribes and sends at: 0 on a NATS cluster, which delivers QoS 1
        # through a JetStream consumer per subscription (slow to make, and stalled while
        # a node dies: docs/scaling.md)
        self.qos = qos
        self.topics = Topics(prefix)
        self.media_interval = media_interval
        self.payload_bytes = AMR_WB_FRAME_BYTES * frames_per_packet
        self.timers = timers or Timers()
        self.groups: dict[str, GroupView] = {}
        self.stats = Stats()
        self.inbox: list[Inbound] = []
        self.keep_inbox = keep_inbox
        self.on_inbound: Callable[[Inbound], None] | None = None
        self.on_media: Callable[[str, str], None] | None = None  # (group, talker) per packet
        # (group, what became of a press) once decided: granted, denied, unanswered, let go
        self.on_access: Callable[[str, Access], None] | None = None
        self.position = home
        self.metrics = metrics
        self.keep_stats = keep_stats  # off for load tests: the observer keeps the figures
        # refs that a restart does not reuse: the server takes a ref it has seen from us
        # (with the same content) for a duplicate
        self._refs = itertools.count(secrets.randbits(40))
        self._waiters: Waiters[Inbound] = Waiters(unit)
        self._unanswered: dict[int, asyncio.TimerHandle] = {}  # ref -> its next retry
        self._location_task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Future[Any]] = set()
        offline = codec.encode(m.Presence(state="offline"))
        self.transport: Transport = make_transport(
            mqtt_client,
            broker,
            client_id=unit,
            keepalive=keepalive,
            will=Will(self.topics.presence(unit), offline),
        )
        self.transport.on_message = self._on_message
        self.transport.on_retained = self._on_retained
        self.transport.on_connect = self._on_connect
        self.transport.on_disconnect = self._on_disconnect
        self.on_link: Callable[[bool], None] | None = None  # told when the link goes down/up

    # --- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        t = self.topics
        await self.transport.subscribe(t.unit_down(self.unit), t.status("+"), qos=self.qos)
        await self.transport.subscribe(t.unit_media_down(self.unit), qos=0)  # (listening in)
        await self.transport.start()

    async def stop(self) -> None:
        """Leave gracefully: release floors, publish `offline`, disconnect."""
        for tg in self.groups:
            self.release(tg)
        for tg, view in self.groups.items():
            self._idle(tg, view)
        if self._location_task is not None:
            self._location_task.cancel()
        self._close_mic()
        self._private_over()
        for retry in self._unanswered.values():
            retry.cancel()
        self._unanswered.clear()
        self._publish(self.topics.presence(self.unit), m.Presence(state="offline"), retain=True)
        await self.transport.stop()

    def _on_disconnect(self) -> None:
        self._close_mic()  # (the server ends listening in when our will fires)
        if self.private is not None:  # (and a private call; if the will did not fire,
            self._link_lost_in = self.private.call  # it is hung up once back)
        self._private_over()
        if self.on_link is not None:
            self.on_link(False)

    def _on_retained(self, topic: str, payload: bytes) -> None:
        """Nothing for this unit alone is ever retained by the server: a retained message
        on its own topics is someone's forgery (in the open profile), and ignored."""
        if topic in (self.topics.unit_down(self.unit), self.topics.unit_media_down(self.unit)):
            self.stats.count("retained_ignored")
            return
        self._on_message(topic, payload)

    def _on_connect(self) -> None:
        self._publish(self.topics.presence(self.unit), m.Presence(state="online"), retain=True)
        if self._link_lost_in is not None:  # (answered, or refused: either way it is over)
            self._send_up(m.PrivateEnd(call=self._link_lost_in, ref=self.next_ref()))
            self._link_lost_in = None
        if self.on_link is not None:
            self.on_link(True)

    # --- unit control -------------------------------------------------------------------

    async def affiliate(self, *groups: str, timeout: float = 5.0) -> m.Affiliation:
        """Join groups; raises `Refused` or `UnexpectedReply` when the server will not (and
        TimeoutError when it does not answer), having forgotten the groups it asked for."""
        groups = tuple(dict.fromkeys(groups))
        now = time.perf_counter()
        new = [tg for tg in groups if tg not in self.groups]
        for tg in groups:  # before subscribing: the retained state says if a call is on
            self._view(tg).joined_at = now
        await self.transport.subscribe(
            *[x for tg in groups for x in self.group_topics(tg)], qos=self.qos
        )
        keep: Collection[str] = [tg for tg in groups if tg not in new]
        try:
            reply = await self._ask_for(
                m.Affiliate(groups=list(groups), ref=self.next_ref()), m.Affiliation, timeout
            )
            keep = reply.groups
        finally:
            for tg in groups:
                if tg not in keep:
                    view = self.groups.pop(tg, None)  # an `ungrouped` may have taken it
                    if view is not None:
                        self._idle(tg, view)
                    await self.transport.unsubscribe(*self.group_topics(tg))
        return reply

    async def deaffiliate(self, *groups: str, timeout: float = 5.0) -> m.Affiliation:
        reply = await self._ask_for(
            m.Deaffiliate(groups=list(groups), ref=self.next_ref()), m.Affiliation, timeout
        )
        for tg in groups:
            view = self.groups.pop(tg, None)
            if view is not None:
                self._idle(tg, view)
        await self.transport.unsubscribe(*[x for tg in groups for x in self.group_topics(tg)])
        return reply

    def group_topics(self, tg: str) -> tuple[str, ...]:
        """What a member listens to: the group's down topics and its retained state."""
        return (self.topics.group_down_all(tg), self.topics.state(tg))

    async def ask(self, msg: m.Message, timeout: float = 5.0) -> m.Message:
        """Send a unit-control message and wait for the reply carrying its `ref`."""
        waiter = self.expect(lambda i: _answers(i, msg.ref), timeout)
        self._send_up(msg)
        return (await waiter).msg

    async def _ask_for(self, msg: m.Message, want: type[T], timeout: float) -> T:
        reply = await self.ask(msg, timeout)
        if isinstance(reply, want):
            return reply
        if isinstance(reply, m.Error):
            raise Refused(reply)
        raise UnexpectedReply(msg, reply)

    async def report_status(self, code: int, timeout: float = 5.0) -> m.Ok:
        """Send a pre-coded status (a code of the fleet's); raises `Refused` for a code the
        fleet does not have."""
        return await self._ask_for(m.UnitStatus(code=code, ref=self.next_ref()), m.Ok, timeout)

    # --- private calls (11.14) ---------------------------------------------------------

    async def private_call(
        self,
        unit: str,
        *,
        kind: m.Kind = "normal",
        floor: bool = True,
        answer: m.Answer = "manual",
        timeout: float = 5.0,
    ) -> m.Private:
        """Call `unit` alone; returns how the call stands once the server answered:
        `ringing`, `connected`, or `ended` with its cause (offline, busy)."""
        msg = m.PrivateCall(unit=unit, kind=kind, floor=floor, answer=answer, ref=self.next_ref())
        return await self._ask_for(msg, m.Private, timeout)

    async def answer_private(self, accept: bool = True, timeout: float = 5.0) -> m.Private:
        """Take (or refuse) the call ringing here."""
        call = self.private
        if call is None or call.state != "ringing" or call.caller == self.unit:
            raise ClientError(f"{self.unit}: no call rings here")
        msg = m.PrivateAnswer(call=call.call, accept=accept, ref=self.next_ref())
        return await self._about_call(msg, timeout)

    async def hang_up(self, timeout: float = 5.0) -> m.Private | None:
        """End the private call it is in, if any."""
        call = self.private
        if call is None:
            return None
        self._stop_private_voice()
        return await self._about_call(m.PrivateEnd(call=call.call, ref=self.next_ref()), timeout)

    async def talk_private(self, seconds: float, timeout: float = 5.0) -> bool:
        """Talk in the connected private call for `seconds` (`press_private`, then PTT
        up, waiting for the server to take the turn back); False when the turn was not
        had."""
        voice = await self.press_private(timeout)
        if voice is None:
            return False
        await asyncio.wait({voice}, timeout=seconds)  # (or stopped by the call's news)
        self._stop_private_voice()
        call = self.private
        if call is not None and call.floor and call.talker == self.unit:
            up = m.PrivateTalk(call=call.call, on=False, ref=self.next_ref())
            await self._about_call(up, timeout)
        return True

    async def press_private(self, timeout: float = 5.0) -> asyncio.Task[None] | None:
        """PTT down in the connected private call: with floor control the turn is asked
        for (None when the other party has it); the voice goes until `release_private`,
        the turn taken back or the call ending. Returns the voice's task."""
        call = self.private
        if call is None or call.state != "connected":
            return None
        if call.floor:
            await self._about_call(
                m.PrivateTalk(call=call.call, on=True, ref=self.next_ref()), timeout
            )
            now = self.private  # (what the answer, or news meanwhile, left)
            if now is None or now.call != call.call or now.talker != self.unit:
                return None
        self._stop_private_voice()
        topic = self.topics.unit_media_up(self.unit)
        voice = self._private_voice = asyncio.create_task(self._send_media(topic, call.call))
        return voice

    @property
    def private_talking(self) -> bool:
        return self._private_voice is not None and not self._private_voice.done()

    def release_private(self) -> None:
        """PTT up in the private call: the voice stops, and the turn is given back."""
        self._stop_private_voice()
        call = self.private
        if call is not None and call.floor and call.talker == self.unit:
            self._send_up(m.PrivateTalk(call=call.call, on=False, ref=self.next_ref()))

    async def _about_call(
        self, msg: m.PrivateAnswer | m.PrivateTalk | m.PrivateEnd, timeout: float
    ) -> m.Private:
        """Ask about our call; a refusal means the server knows no such call of ours (it
        ended unheard, or a restart did not keep it): the call is over here too."""
        try:
            return await self._ask_for(msg, m.Private, timeout)
        except Refused as exc:  # (not for "rate_limited": that is answered once it is not)
            mine = self.private
            if exc.cause == "invalid_field" and mine is not None and mine.call == msg.call:
                self._private_over()
            raise

    def _private_news(self, msg: m.Private) -> None:
        if msg.call in self._calls_over:
            return  # (a late or repeated answer about a call that ended)
        mine = self.private
        if mine is not None and mine.call != msg.call:
            self._another_call(mine, msg)
            return
        if msg.state == "ended":
            self._private_over()
            return
        if mine is not None and mine.state == "connected" and msg.state == "ringing":
            return  # (a repeated answer to our call: it is connected since)
        self.private = msg
        if msg.floor and msg.talker != self.unit:
            self._stop_private_voice()  # (the turn is not, or no longer, ours)
        if msg.state == "connected" and msg.kind == "emergency":
            for tg, view in self.groups.items():  # (its user leaves group talk for it; the
                if view.floor.state != NO_PERMISSION:  # server revokes it where it can)
                    self.release(tg)
        ringing = msg.state == "ringing" and msg.caller != self.unit
        if ringing and self.answer_after is not None and mine is None:  # (once per call)
            asyncio.get_running_loop().call_later(self.answer_after, self._pick_up, msg.call)

    def _another_call(self, mine: m.Private, msg: m.Private) -> None:
        """News of a call while in another (a cluster's instances each know only the
        calls they keep): one we placed, or an emergency call over a normal one, takes
        the place of ours; else we are busy, and say so."""
        if msg.state == "ended":
            return
        if msg.caller == self.unit or (msg.kind == "emergency" and mine.kind != "emergency"):
            self._leave(mine)
            self._private_over()
            self._private_news(msg)
        else:
            self._leave(msg)

    def _leave(self, call: m.Private) -> None:
        """Refuse (busy) a call ringing here, or hang up any other: we are in another."""
        ref = self.next_ref()
        if call.state == "ringing" and call.caller != self.unit:
            self._send_up(m.PrivateAnswer(call=call.call, accept=False, cause="busy", ref=ref))
        else:
            self._send_up(m.PrivateEnd(call=call.call, ref=ref))

    def _pick_up(self, call: str) -> None:
        now = self.private
        if now is not None and now.call == call and now.state == "ringing":
            self._send_up(m.PrivateAnswer(call=call, accept=True, ref=self.next_ref()))

    def _stop_private_voice(self) -> None:
        if self._private_voice is not None:
            self._private_voice.cancel()
            self._private_voice = None

    def _private_over(self) -> None:
        self._stop_private_voice()
        if self.private is not None:
            self._calls_over.append(self.private.call)
        self.private = None

    def send(self, msg: m.Message) -> None:
        """Send a unit-control message without waiting (location, emergency, SDS, ...)."""
        self._send_up(msg)

    def next_ref(self) -> int:
        return next(self._refs)

    def start_location_reports(self, interval: float, first_after: float = 0.0) -> None:
        """Report the position every `interval` s (give or take a fifth), the first
        time after `first_after` s."""
        self._location_task = asyncio.create_task(self._report_location(interval, first_after))

    # --- floor control (PTT) ----------------------------------------------------------

    async def press(
        self, tg: str, kind: m.Kind = "normal", prio: int | None = None, timeout: float = 5.0
    ) -> m.Message:
        """PTT down: request the floor (re-sent on T101 while unanswered).

        Returns the server's first answer: `granted`, `queued` or `deny`; raises
        TimeoutError when there was none within `timeout`.
        """
        outcome = await self._press(tg, kind, prio, timeout)
        if outcome.msg is None:
            raise TimeoutError(f"{self.unit}: no answer to a floor request in {tg}")
        return outcome.msg

    def release(self, tg: str) -> None:
        """PTT up: stop media and give up the floor (or leave the queue)."""
        view = self.groups.get(tg)
        if view is not None:
            self._perform(tg, view, view.floor.release(time.perf_counter()))
            if view.access is not None:  # let go before the floor came
                view.access.let_go = True
                self._accessed(tg, view)

    async def talk_burst(
        self,
        tg: str,
        seconds: float,
        kind: m.Kind = "normal",
        prio: int | None = None,
        queue_wait: float | None = None,
        on_outcome: Callable[[Outcome], None] | None = None,
    ) -> Burst:
        """Press, talk for `seconds` once granted (waiting in the queue up to `queue_wait`,
        by default twice the burst and a second), release. A revoke ends the talk early.
        `on_outcome` is told each outcome (queued, granted, ...) as the burst meets it."""
        tell = on_outcome or (lambda o: None)
        first = await self._press(tg, kind, prio, timeout=self.timers.give_up_s)
        tell(first)
        if first.what in ("denied", "no_answer"):
            return Burst(first.what, first.cause)
        queued, granted = first.what == "queued", first
        if queued:
            wait = 2 * seconds + 1 if queue_wait is None else queue_wait
            try:
                granted = await self._next_outcome(tg, ("granted", "denied", "no_answer"), wait)
            except TimeoutError:
                self.release(tg)  # leave the queue
                return Burst("queue_timeout", queued=True)
            tell(granted)
            if granted.what != "granted":
                return Burst(granted.what, granted.cause, queued=True)
        try:
            revoked = await self._next_outcome(tg, ("revoked",), seconds)
        except TimeoutError:
            self.release(tg)
            return Burst("talked", queued=queued, access_s=granted.waited_s)
        tell(revoked)
        return Burst("revoked", revoked.cause, queued, granted.waited_s)

    async def talk(self, tg: str, seconds: float, kind: m.Kind = "normal") -> bool:
        """`talk_burst`, saying only whether the floor was had."""
        return (await self.talk_burst(tg, seconds, kind)).talked

    def floor_state(self, tg: str) -> FloorState:
        view = self.groups.get(tg)
        return view.floor.state if view is not None else NO_PERMISSION

    async def _press(self, tg: str, kind: m.Kind, prio: int | None, timeout: float) -> Outcome:
        view = self._view(tg)
        view.outcomes.clear()  # what came of earlier presses answers nothing now
        now = time.perf_counter()
        self._accessed(tg, view)  # (an earlier press never decided: told as it stands)
        view.access = Access(now, now, kind) if self.on_access is not None else None
        self._perform(tg, view, view.floor.press(kind, prio, self.next_ref(), now, timeout))
        return await self._next_outcome(
            tg, ("granted", "queued", "denied", "no_answer"), timeout + 1
        )

    async def _next_outcome(self, tg: str, whats: Collection[str], timeout: float) -> Outcome:
        """The group's next outcome of one of these kinds (earlier other ones are passed)."""
        view = self._view(tg)
        async with asyncio.timeout(timeout):
            while True:
                while view.outcomes:
                    outcome = view.outcomes.popleft()
                    if outcome.what in whats:
                        return outcome
                view.news.clear()
                await view.news.wait()

    # --- waiting on what arrives ------------------------------------------------------

    def expect(
        self, predicate: Callable[[Inbound], bool], timeout: float = 5.0
    ) -> asyncio.Future[Inbound]:
        """A future for the next inbound message matching `predicate`, failing after `timeout`."""
        return self._waiters.add(predicate, timeout)

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
        if self.on_wire is not None:
            self.on_wire("in", topic, msg)
        inbound = Inbound(topic, msg)
        if msg.ref in self._unanswered and _answers(inbound, msg.ref):
            self._unanswered.pop(msg.ref).cancel()
        self._apply(msg)
        if not isinstance(msg, m.MicOpen | m.MicClose):  # (its user is shown nothing)
            self._deliver(inbound)

    def _deliver(self, inbound: Inbound) -> None:
        if self.keep_inbox:
            self.inbox.append(inbound)
        if self.on_inbound is not None:
            self.on_inbound(inbound)
        if self._waiters:
            self._waiters.offer(inbound)

    def _apply(self, msg: m.Message) -> None:
        """Hand the message to the floor participant of its group (or follow a regroup)."""
        now = time.perf_counter()
        if isinstance(msg, m.MicOpen | m.MicClose | m.RemoteTalk):
            self._remote_control(msg)
            return
        if isinstance(msg, m.Private):
            self._private_news(msg)
            return
        if isinstance(msg, m.Status):
            # The server says online after it (or we) reconnected: it may have lost our
            # affiliations (a restart, our will firing), so state them again; it is idempotent.
            # A call we were talking in is asked for again, so it goes on.
            if msg.state == "online" and self.groups:
                self._send_up(m.Affiliate(groups=sorted(self.groups), ref=self.next_ref()))
                for group, each in self.groups.items():
                    self._perform(group, each, each.floor.server_online(self.next_ref(), now))
            return
        tg = getattr(msg, "tg", None)
        if not isinstance(tg, str):
            return
        if (isinstance(msg, m.Regrouped) and tg not in self.groups) or (
            isinstance(msg, m.Ungrouped) and tg in self.groups
        ):
            self._follow_regroup(msg)
            return
        view = self.groups.get(tg)
        if view is None:
            return
        if isinstance(msg, m.State) and msg.floor == "idle":
            view.joined_at = None  # no call to enter late
        self._perform(tg, view, view.floor.received(msg, now))
        if self.scan is not None:
            self._scanned(self.scan, tg, msg, now)

    def _scanned(self, scan: ScanList, tg: str, msg: m.Message, now: float) -> None:
        """Tell the scan list a group's floor; a switch to another call is entered late."""
        kind: m.Kind | None
        if isinstance(msg, m.Taken):
            kind = msg.kind
        elif isinstance(msg, m.State):
            kind = (msg.kind or "normal") if msg.floor == "taken" else None
        elif isinstance(msg, m.Idle):
            kind = None
        else:
            return
        self._switched(scan.floor(tg, kind, msg.seq), now)

    def _switched(self, to: str | None, now: float) -> None:
        if to is not None:
            self.stats.count("scan_switches")
            self._entering = (to, now)

    def _remote_control(self, msg: m.MicOpen | m.MicClose | m.RemoteTalk) -> None:
        """What an authorised unit does to this handset (11.13): its microphone opened to
        a listener, with nothing shown; or its PTT pressed for it, in one of its groups."""
        if isinstance(msg, m.RemoteTalk):  # (counted as any message: remote_talk)
            view = self.groups.get(msg.tg)
            if view is not None and msg.seconds and view.floor.state == NO_PERMISSION:
                task = asyncio.ensure_future(self.talk(msg.tg, float(msg.seconds)))
                self._background.add(task)
                task.add_done_callback(self._background.discard)
            return  # (its user talking or waiting already: the user's own press goes on)
        if isinstance(msg, m.MicClose):
            if msg.call == self._mic_call:  # (an old one's close leaves a newer one be)
                self._close_mic()
            return
        self._close_mic()
        if self.media_interval > 0:
            self._mic_call = msg.call
            topic = self.topics.unit_media_up(self.unit)
            self._mic = asyncio.create_task(self._send_media(topic, msg.call))

    def _close_mic(self) -> None:
        if self._mic is not None:
            self._mic.cancel()
        self._mic = self._mic_call = None

    def _follow_regroup(self, msg: m.Regrouped | m.Ungrouped) -> None:
        """A dispatcher put us in (or took us out of) a temporary group: listen to it."""
        subs = self.group_topics(msg.tg)
        if isinstance(msg, m.Regrouped):
            self._view(msg.tg)
            task = asyncio.ensure_future(self.transport.subscribe(*subs, qos=self.qos))
        else:
            self._idle(msg.tg, self.groups.pop(msg.tg))
            task = asyncio.ensure_future(self.transport.unsubscribe(*subs))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _on_media(self, topic: str, payload: bytes) -> None:
        try:
            obj = msgpack.unpackb(payload)
            tg, talker, ts = obj.get("tg"), obj["talker"], obj.get("ts")
        except Exception:  # any bytes from the wire: count, never crash
            self.stats.count("bad_media")
            return
        if talker == self.unit:
            return
        if topic == self.topics.unit_media_down(self.unit):  # a private call, or listening in
            call, of = self.private, obj.get("call")
            if call is not None and of == call.call:
                self.stats.count("private_rx")
                self._mouth_to_ear(ts)
                if self.on_private_media is not None and isinstance(talker, str):
                    self.on_private_media(talker)
            elif isinstance(of, str) and call_owner(of) is not None:
                self.stats.count("private_unheard")  # (a call we are not in, or no longer)
                return
            else:
                self.stats.count("ambient_rx")
                if self.on_ambient is not None and isinstance(talker, str):
                    self.on_ambient(talker)
            if self._waiters:
                seq = obj.get("seq")
                seq = seq if isinstance(seq, int) else -1
                media = m.Media(call=str(obj.get("call")), seq=seq, data=b"", talker=str(talker))
                self._deliver(Inbound(topic, media))
            return
        if not isinstance(tg, str):
            self.stats.count("bad_media")
            return
        self.stats.count("media_rx")
        call = self.private
        if call is not None and call.kind == "emergency" and call.state == "connected":
            self.stats.count("media_unheard")  # (an emergency private call is heard instead)
            return
        if self.scan is not None and tg != self.scan.heard:
            self.stats.count("media_unheard")  # (received and read, not played)
            view = self.groups.get(tg)
            if view is not None:
                view.joined_at = None  # (entering its call later is a scan switch)
            return
        if self._entering is not None and self._entering[0] == tg:
            entered = time.perf_counter() - self._entering[1]
            self._entering = None
            if self.keep_stats:
                self.stats.scan_entry_s.append(entered)
            if self.metrics is not None:
                self.metrics.scan_entry(entered)
        self._mouth_to_ear(ts)
        view = self.groups.get(tg)
        if view is not None and view.joined_at is not None:
            late = time.perf_counter() - view.joined_at
            view.joined_at = None
            if self.keep_stats:
                self.stats.late_entry_s.append(late)
            if self.metrics is not None:
                self.metrics.late_entry(late)
        if self.on_media is not None:
            self.on_media(tg, talker)
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

    def _mouth_to_ear(self, ts: object) -> None:
        if isinstance(ts, int):
            m2e = (time.time_ns() - ts) / 1e9
            if self.keep_stats:
                self.stats.mouth_to_ear_s.append(m2e)
            if self.metrics is not None:
                self.metrics.mouth_to_ear(m2e)

    # --- the floor participant's actions ---------------------------------------------

    def _view(self, tg: str) -> GroupView:
        view = self.groups.get(tg)
        if view is None:
            view = self.groups[tg] = GroupView(FloorParticipant(self.unit, self.timers))
            if self.on_floor is not None:
                view.floor.on_state = functools.partial(self.on_floor, tg)
        return view

    def follow_floor(self, told: Callable[[str, FloorState, FloorState], None]) -> None:
        """Have each change of a group's floor state told (group, from, to), in the groups
        it is in and those it joins from now on."""
        self.on_floor = told
        for tg, view in self.groups.items():
            view.floor.on_state = functools.partial(told, tg)

    def _perform(self, tg: str, view: GroupView, actions: list[Action]) -> None:
        for a in actions:
            match a:
                case SendRequest():
                    request = m.Request(kind=a.kind, prio=a.prio, ref=a.ref, ts=time.time_ns())
                    self._publish(self.topics.floor_up(tg, self.unit), request)
                case SendRelease():
                    release = m.Release(ts=time.time_ns())
                    self._publish(self.topics.floor_up(tg, self.unit), release)
                case StartMedia():
                    self._stop_media(view)
                    if self.media_interval > 0:
                        topic = self.topics.media_up(tg, self.unit)
                        view.media_task = asyncio.create_task(self._send_media(topic, a.call))
                case StopMedia():
                    self._stop_media(view)
                case Outcome():
                    self._outcome(tg, view, a)
        self._arm(tg, view)

    def _outcome(self, tg: str, view: GroupView, o: Outcome) -> None:
        self.stats.count(f"floor_{o.what}")
        if o.what == "granted" and o.waited_s is not None:
            if o.via_queue:
                if self.keep_stats:
                    self.stats.queued_access_s.append(o.waited_s)
            else:
                if self.keep_stats:
                    self.stats.access_s.append(o.waited_s)
                if self.metrics is not None:
                    self.metrics.access(o.waited_s, view.floor.kind)
        view.outcomes.append(o)
        view.news.set()
        if view.access is not None:
            view.access.heard(o, time.perf_counter())
            if o.what in ("granted", "denied", "no_answer", "revoked"):
                self._accessed(tg, view)

    def _accessed(self, tg: str, view: GroupView) -> None:
        access, view.access = view.access, None
        if access is not None and self.on_access is not None:
            try:  # (whatever the listener does, the handset's own path goes on)
                self.on_access(tg, access)
            except Exception as exc:
                log.warning("%s: on_access failed: %s", self.unit, exc)

    def _arm(self, tg: str, view: GroupView) -> None:
        """Wake the participant at its next deadline (T100/T101), if it has one."""
        deadline = view.floor.next_deadline()
        if view.timer is not None:
            if deadline == view.timer_at:
                return
            view.timer.cancel()
            view.timer = None
        view.timer_at = deadline
        if deadline is not None:  # the participant's clock is perf_counter, not the loop's
            delay = max(0.0, deadline - time.perf_counter())
            loop = asyncio.get_running_loop()
            view.timer = loop.call_later(delay, self._fire, tg, view)

    def _fire(self, tg: str, view: GroupView) -> None:
        view.timer = None
        if self.groups.get(tg) is view:
            self._perform(tg, view, view.floor.on_timer(time.perf_counter()))

    def _idle(self, tg: str, view: GroupView) -> None:
        """The view is done with: no voice, no timer, and a press not yet decided let go
        (and, scanning, none of the group's calls is heard any more)."""
        if self.scan is not None:
            self._switched(self.scan.forget(tg), time.perf_counter())
        if view.access is not None:
            view.access.let_go = True
            self._accessed(tg, view)
        self._stop_media(view)
        if view.timer is not None:
            view.timer.cancel()
        view.timer = view.timer_at = None

    # --- media and location -----------------------------------------------------------

    @staticmethod
    def _stop_media(view: GroupView) -> None:
        if view.media_task is not None:
            view.media_task.cancel()
            view.media_task = None

    async def _send_media(self, topic: str, call: str) -> None:
        """Voice packets of `call` on `topic` (a group's, or our own while listened in on)."""
        frame = os.urandom(self.payload_bytes)
        loop = asyncio.get_running_loop()
        start = loop.time()
        for seq in itertools.count():
            packet = {"t": "media", "call": call, "seq": seq, "data": frame, "ts": time.time_ns()}
            self.transport.publish(topic, msgpack.packb(packet), qos=0)
            self.stats.count("media_tx")
            # paced on a fixed schedule, so a slow loop does not stretch the talk burst
            await asyncio.sleep(max(0.0, start + (seq + 1) * self.media_interval - loop.time()))

    async def _report_location(self, interval: float, first_after: float) -> None:
        if first_after > 0:
            await asyncio.sleep(first_after)
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

    def _send_up(self, msg: m.Message, attempt: int = 0) -> None:
        if isinstance(msg, m.Location):
            # QoS 0: the next report replaces it, and a broker keeping reports for an
            # absent server would crowd out the alerts and messages it keeps too
            self._publish(self.topics.unit_up(self.unit), msg, qos=0)
            return
        self._publish(self.topics.unit_up(self.unit), msg)
        ref = msg.ref
        if ref is None:
            return  # nothing answers it
        if attempt == 0 and len(self._unanswered) >= MAX_UNANSWERED:
            oldest = next(iter(self._unanswered))
            self._unanswered.pop(oldest).cancel()
        # an alert is a life at risk: it is sent again until answered, every 15 s at last
        if attempt < len(RETRY_AFTER_S) or (RETRY_AFTER_S and isinstance(msg, m.EmergencyAlert)):
            loop = asyncio.get_running_loop()
            after = RETRY_AFTER_S[min(attempt, len(RETRY_AFTER_S) - 1)]
            delay = after * random.uniform(0.5, 1.5)
            retry = loop.call_later(delay, self._retry, msg, attempt + 1)
            self._unanswered[ref] = retry
        else:
            self._unanswered.pop(ref, None)  # sent for the last time

    def _retry(self, msg: m.Message, attempt: int) -> None:
        assert msg.ref is not None
        if self._unanswered.pop(msg.ref, None) is not None:
            self.stats.count("retried")
            self._send_up(msg, attempt)

    def _publish(
        self, topic: str, msg: m.Message, retain: bool = False, qos: int | None = None
    ) -> None:
        qos = self.qos if qos is None else min(qos, self.qos)
        self.transport.publish(topic, codec.encode(msg), qos=qos, retain=retain)
        if self.on_wire is not None:
            self.on_wire("out", topic, msg)
