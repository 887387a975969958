"""The floor participant of one talkgroup on the handset side, without I/O.

Everything that decides what a handset does about a group's floor lives in this file; the
handset (`esn.client.handset`) only performs the actions. It follows the on-network floor
participant of 3GPP TS 24.380 (section 6.2.4), mapped onto this project's messages.

Theory of operation:

* States: NO_PERMISSION (idle or listening), PENDING_REQUEST (a request is out), QUEUED
  (the server holds our place), HAS_PERMISSION (voice flows), PENDING_RELEASE (we let go
  and wait for the group to show that the floor left us).
* PTT down (`press`) sends a request. T101: an unanswered request is sent again with the
  same `ref` (the server treats a repeat as the same request) every `t101` seconds, at
  most C101 times; when `give_up_s` has passed with no answer the press ends `no_answer`.
* `granted` starts voice, `queued` waits (no timer: the server tells us when we move),
  `deny` ends the press. A `revoke` stops voice at once and sends `release` once; the
  server takes a revoked floor back by itself, so there is nothing to wait for.
* PTT up (`release`) stops voice and sends `release`. T100: until the group's floor
  events or state show someone else (or nobody) holding it, the release is sent again
  every `t100` seconds, at most C100 times, then the participant stops waiting.
* When the server comes back (`server_online`) while we talk, the request is sent again so
  the call goes on; voice keeps flowing meanwhile and the answer is no access sample.
* A `granted` nobody asked for (it crossed our release, or came after we gave up) is
  handed back with a `release`.

Inputs are method calls with `now` (seconds, any monotonic clock); outputs are lists of
actions. `next_deadline()` and `on_timer(now)` drive T100 and T101. Nothing here reads a
clock, does I/O or knows MQTT.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from esn.protocol import messages as m


class FloorState(StrEnum):
    NO_PERMISSION = "no_permission"
    PENDING_REQUEST = "pending_request"
    QUEUED = "queued"
    HAS_PERMISSION = "has_permission"
    PENDING_RELEASE = "pending_release"


@dataclass(frozen=True, slots=True)
class Timers:
    t101: float = 0.5  # re-send an unanswered request
    c101: int = 3  # re-sends at most
    give_up_s: float = 5.0  # press -> no answer at all: the press has failed
    t100: float = 0.5  # re-send an unconfirmed release
    c100: int = 3


# --- actions -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendRequest:
    kind: m.Kind
    prio: int | None
    ref: int


@dataclass(frozen=True, slots=True)
class SendRelease:
    pass


@dataclass(frozen=True, slots=True)
class StartMedia:
    call: str


@dataclass(frozen=True, slots=True)
class StopMedia:
    pass


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of a press, for the user (and whoever waits on it).

    `what`: granted, queued, denied, no_answer or revoked. `waited_s` is the access time of
    a grant that answered a press (None for a reclaimed call); `via_queue` says it came
    after `queued`.
    """

    what: str
    cause: str | None = None
    waited_s: float | None = None
    via_queue: bool = False
    msg: m.Message | None = None


Action = SendRequest | SendRelease | StartMedia | StopMedia | Outcome


class FloorParticipant:
    def __init__(self, unit: str, timers: Timers | None = None) -> None:
        self.unit = unit
        self.timers = timers or Timers()
        self.state = FloorState.NO_PERMISSION
        # told each change of state (from, to): the floor state trace (docs/traces.md)
        self.on_state: Callable[[FloorState, FloorState], None] | None = None
        self.kind: m.Kind = "normal"  # of our own request or grant
        self.prio: int | None = None
        self.ref: int | None = None
        self.pressed_at: float | None = None  # None for a reclaim: no access sample
        self.media = False  # voice flowing (also while a reclaim awaits its answer)
        self.call: str | None = None  # the group's call, as last heard
        self.talker: str | None = None
        self.emergency = False
        self.queue_pos: int | None = None
        self._deadline: float | None = None
        self._since = 0.0  # when the request now out was first sent
        self._give_up_s = self.timers.give_up_s
        self._tries = 0

    # --- inputs ------------------------------------------------------------------------

    def press(
        self, kind: m.Kind, prio: int | None, ref: int, now: float, give_up_s: float | None = None
    ) -> list[Action]:
        """PTT down (or pressed again, say upgraded to emergency): request the floor."""
        self.pressed_at = now
        self.kind, self.prio = kind, prio
        return self._request(ref, now, give_up_s)

    def release(self, now: float) -> list[Action]:
        """PTT up: stop voice and give the floor up, or leave the queue."""
        state = self.state
        if state is FloorState.HAS_PERMISSION:
            out = self._stop_media()
            self._to(FloorState.PENDING_RELEASE, now + self.timers.t100)
            return [*out, SendRelease()]
        if state in (FloorState.PENDING_REQUEST, FloorState.QUEUED):
            out = self._stop_media()
            self._to(FloorState.NO_PERMISSION)
            return [*out, SendRelease()]
        return []

    def server_online(self, ref: int, now: float) -> list[Action]:
        """The server (re)announced itself: a call we were in, or a queue place we held,
        is asked for again. It may have lost them (our will fired when the broker went
        down, say); if it kept them, the same request is a repeat: the call goes on, the
        place is kept."""
        if self.state is FloorState.HAS_PERMISSION:
            self.pressed_at = None  # a reclaim: no access time to measure
        elif self.state is not FloorState.QUEUED:
            return []
        return self._request(ref, now, None)

    def received(self, msg: m.Message, now: float) -> list[Action]:
        """A message about this group: an answer to us, or the group's floor news."""
        match msg:
            case m.Granted():
                return self._granted(msg, now)
            case m.Queued():
                return self._queued(msg)
            case m.Deny() if self.state in (FloorState.PENDING_REQUEST, FloorState.QUEUED):
                out = self._stop_media()
                self._to(FloorState.NO_PERMISSION)
                return [*out, Outcome("denied", msg.cause, msg=msg)]
            case m.Revoke() if self.media:  # else nothing of ours is left to revoke
                # the server takes a revoked floor back by itself: nothing to confirm
                out = self._stop_media()
                self._to(FloorState.NO_PERMISSION)
                return [*out, SendRelease(), Outcome("revoked", msg.cause, msg=msg)]
            case m.Taken():
                self.talker, self.call = msg.talker, msg.call
            case m.Idle():
                self.talker = None
            case m.State():
                self.talker, self.call, self.emergency = msg.talker, msg.call, msg.emergency
            case _:
                return []
        if self.state is FloorState.PENDING_RELEASE and self.talker != self.unit:
            self._to(FloorState.NO_PERMISSION)  # the group shows the floor has left us
        return []

    # --- timers ------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        return self._deadline

    def on_timer(self, now: float) -> list[Action]:
        if self._deadline is None or now < self._deadline:
            return []
        t = self.timers
        if self.state is FloorState.PENDING_REQUEST:
            assert self.ref is not None
            give_up = self._since + self._give_up_s
            if now >= give_up:
                out = self._stop_media()
                self._to(FloorState.NO_PERMISSION)
                return [*out, Outcome("no_answer")]
            if self._tries < t.c101:  # T101
                self._tries += 1
                self._deadline = min(now + t.t101, give_up)
                return [SendRequest(self.kind, self.prio, self.ref)]
            self._deadline = give_up
            return []
        if self.state is FloorState.PENDING_RELEASE:
            if self._tries < t.c100:  # T100
                self._tries += 1
                self._deadline = now + t.t100
                return [SendRelease()]
            self._to(FloorState.NO_PERMISSION)
        return []

    # --- internals ---------------------------------------------------------------------

    def _request(self, ref: int, now: float, give_up_s: float | None) -> list[Action]:
        self.ref = ref
        self._since = now
        self._give_up_s = self.timers.give_up_s if give_up_s is None else give_up_s
        self._to(FloorState.PENDING_REQUEST, now + min(self.timers.t101, self._give_up_s))
        return [SendRequest(self.kind, self.prio, ref)]

    def _granted(self, msg: m.Granted, now: float) -> list[Action]:
        state = self.state
        if state is FloorState.HAS_PERMISSION:
            if msg.call == self.call:  # a repeated grant, or our call raised or lowered:
                self.kind = msg.kind  # a reclaim asks for it at the kind it has now
            return []
        if state not in (FloorState.PENDING_REQUEST, FloorState.QUEUED):
            return [SendRelease()]  # nobody here wants it any more: hand it back
        waited = None if self.pressed_at is None else now - self.pressed_at
        reclaimed = self.media and self.call == msg.call  # the call goes on: same voice
        self.call, self.kind = msg.call, msg.kind
        self._to(FloorState.HAS_PERMISSION)
        out: list[Action] = [
            Outcome("granted", waited_s=waited, via_queue=state is FloorState.QUEUED, msg=msg)
        ]
        if not reclaimed:
            out = [*self._stop_media(), StartMedia(msg.call), *out]
            self.media = True
        return out

    def _queued(self, msg: m.Queued) -> list[Action]:
        state = self.state
        if state not in (FloorState.PENDING_REQUEST, FloorState.QUEUED):
            return []
        out = self._stop_media()  # a reclaim that found the floor taken
        self.queue_pos = msg.pos
        self._to(FloorState.QUEUED)
        if state is FloorState.QUEUED:
            return out  # a new position: the state says it
        return [*out, Outcome("queued", msg=msg)]

    def _stop_media(self) -> list[Action]:
        if not self.media:
            return []
        self.media = False
        return [StopMedia()]

    def _to(self, state: FloorState, deadline: float | None = None) -> None:
        if state is not FloorState.QUEUED:
            self.queue_pos = None
        if self.on_state is not None and state is not self.state:
            self.on_state(self.state, state)
        self.state = state
        self._deadline = deadline
        self._tries = 0
