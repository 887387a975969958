"""Private calls (TS 24.379 §11): one unit calls another, without I/O.

A call rings the callee (manual answer) or connects at once (automatic answer), with
floor control (half-duplex: one talker at a time, each turn at most the fleet's talk
time) or without (both talk at will). It ends on either side's hang-up, the callee's
refusal, a ring not answered within RING_S, INACTIVE_S without voice or PTT, or a party
going offline; each end is told to both in words (docs/protocol.md, 11.14). A unit is in
one call at a time: a call to a unit in one is answered `busy`, unless it is an
emergency call and the one it is in is not, which it ends (`preempted`).

A call belongs to its callee: its id starts with the callee's id (`CALLEE~token`), so a
cluster keeps every call to a unit with the instance serving that unit, which therefore
knows whether it is busy.
"""

from __future__ import annotations

import heapq
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, get_args

from esn.core.actions import Action, ToUnit
from esn.core.limits import Rate, RateLimiter, Verdict
from esn.protocol import messages as m
from esn.protocol.ids import call_owner

RING_S = 20.0  # a call not answered in this time ends: no_answer
INACTIVE_S = 30.0  # a connected call with no voice and no talk request for this long ends
MAX_CALL_ID = 96  # (a unit id, "~", a token)
# how often one unit may be rung (by anyone): more is answered busy, so many callers
# cannot keep a unit ringing (nor make it spend its own allowance refusing)
RINGS = Rate(per_s=0.5, burst=5.0)
UNKEPT_TOLD = 1000  # calls read back but not kept whose parties are told so, at most

End = Literal["busy", "no_answer", "offline", "rejected", "hung_up", "inactive", "preempted"]
CallState = Literal["ringing", "connected"]


@dataclass(slots=True)
class Call:
    call: str
    caller: str
    callee: str
    kind: m.Kind
    floor: bool  # half-duplex, one talker at a time
    state: CallState
    deadline: float  # ringing: its end; connected: of inactivity, from `active`
    active: float  # last voice or talk request
    talker: str | None = None
    turn_until: float = float("inf")  # the talker's turn ends

    def parties(self) -> tuple[str, str]:
        return self.caller, self.callee

    def peer(self, unit: str) -> str:
        return self.callee if unit == self.caller else self.caller

    def msg(self, to: str, ref: int | None = None, cause: str | None = None) -> m.Private:
        state = "ended" if cause in END_CAUSES else self.state
        return m.Private(
            call=self.call,
            unit=self.peer(to),
            state=state,
            kind=self.kind,
            floor=self.floor,
            talker=self.talker if state == "connected" else None,
            caller=self.caller,
            cause=cause,
            ref=ref,
        )


END_CAUSES: tuple[str, ...] = get_args(End)


class NotYours(ValueError):
    """A unit asked about a call it is not in (or not in that state): why, in words."""


class PrivateCalls:
    """Every private call of the units this server acts for; `talk_s` is a turn's most."""

    def __init__(self, talk_s: float, max_calls: int) -> None:
        self.talk_s = talk_s
        self.max_calls = max_calls  # (read back: as many as could be real)
        self.calls: dict[str, Call] = {}
        self.of: dict[str, str] = {}  # unit -> the call it is in
        self._timers: list[tuple[float, str]] = []  # (deadline, call) min-heap
        self._armed: dict[str, float] = {}  # call -> its live deadline in the heap
        self.outcomes: dict[str, int] = {}  # connected, and each end's cause: counted
        self.connected: list[Call] = []  # calls connected since the caller last looked
        self.changed: set[str] = set()  # callees whose record (the call kept) changed
        self._rings = RateLimiter({"ring": RINGS})
        self._loaded: list[str] = []  # calls read back, for `settle`
        self._unkept: list[Call] = []  # and those read back but not kept (a conflict)

    # --- what units ask --------------------------------------------------------------

    def setup(
        self,
        caller: str,
        msg: m.PrivateCall,
        now: float,
        online: Callable[[str], bool],
    ) -> list[Action]:
        """A call from `caller` to `msg.unit`, which the network checked the caller may
        make: rung, connected, or ended at once (offline or busy). A call ringing at the
        caller is refused by this one (busy); a normal call of the caller's is ended by an
        emergency one (preempted); any other is to be ended first."""
        kind: m.Kind = "emergency" if msg.kind == "emergency" else "normal"
        callee, out = msg.unit, []
        mine = self.of_unit(caller)
        rung_here = mine is not None and mine.callee == caller and mine.state == "ringing"
        if mine is not None and not rung_here and (kind != "emergency" or mine.kind == kind):
            raise NotYours(f"{caller} is in call {mine.call}: end it first")
        call_id = f"{callee}~{secrets.token_hex(6)}"
        call = Call(call_id, caller, callee, kind, msg.floor is not False, "ringing", 0.0, now)
        busy = self.of_unit(callee)
        busy = None if busy is mine else busy  # (a call between the two: ended below)
        if not online(callee):
            return self._refused(call, "offline", msg.ref)
        if busy is not None and (kind != "emergency" or busy.kind == "emergency"):
            return self._refused(call, "busy", msg.ref)
        if kind != "emergency" and self._rings.check(callee, "ring", now) is not Verdict.ALLOW:
            return self._refused(call, "busy", msg.ref)  # (rung too often: by anyone)
        if mine is not None:  # (only now: a call refused leaves the caller's be)
            out += self._end(mine, "busy" if rung_here else "preempted", None, None)
        if busy is not None:
            out += self._end(busy, "preempted", None, None)
        self.calls[call_id] = call
        self.of[caller] = self.of[callee] = call_id
        self.changed.add(callee)
        if msg.answer == "auto":  # (its press set the call up: the first turn is the caller's)
            return out + self._connect(call, now, msg.ref, turn=True)
        call.deadline = now + RING_S
        self._arm(call)
        return [*out, ToUnit(caller, call.msg(caller, msg.ref)), ToUnit(callee, call.msg(callee))]

    def answer(self, unit: str, msg: m.PrivateAnswer, now: float) -> list[Action]:
        call = self._of(unit, msg.call)
        if call.callee != unit or call.state != "ringing":
            raise NotYours(f"call {msg.call} does not ring at {unit}")
        if not msg.accept:
            cause: End = "busy" if msg.cause == "busy" else "rejected"
            return self._end(call, cause, unit, msg.ref)
        return self._connect(call, now, msg.ref, turn=False, answered_by=unit)

    def hang_up(self, unit: str, msg: m.PrivateEnd) -> list[Action]:
        return self._end(self._of(unit, msg.call), "hung_up", unit, msg.ref)

    def talk(self, unit: str, msg: m.PrivateTalk, now: float) -> list[Action]:
        """PTT in a call with floor control: the turn is the unit's if nobody else has it;
        PTT up gives it back. Both parties are told who talks (the asker with its ref)."""
        call = self._of(unit, msg.call)
        if call.state != "connected":
            raise NotYours(f"call {msg.call} is not connected yet")
        call.active = now
        if not call.floor:  # (both talk at will: nothing to decide)
            return [ToUnit(unit, call.msg(unit, msg.ref))]
        if msg.on and call.talker in (None, unit):
            if call.talker is None:
                call.turn_until = now + self.talk_s
                self._arm(call)
            call.talker = unit  # (asked again: told again)
            return self._tell_both(call, unit, msg.ref)
        if not msg.on and call.talker == unit:
            call.talker, call.turn_until = None, float("inf")
            return self._tell_both(call, unit, msg.ref)
        return [ToUnit(unit, call.msg(unit, msg.ref))]  # (someone else talks: it is told who)

    def voice_to(self, unit: str, call_id: str, now: float) -> str | None:
        """The hot path: the party a voice packet of `unit` in `call_id` goes to, or None
        (no such call of the unit's, not connected, or the other party's turn)."""
        call = self.calls.get(call_id)
        if call is None or not self.may_talk(unit, call):
            return None
        call.active = now
        return call.peer(unit)

    @staticmethod
    def may_talk(unit: str, call: Call) -> bool:
        if call.state != "connected" or unit not in (call.caller, call.callee):
            return False
        return not call.floor or call.talker == unit

    # --- what happens to units --------------------------------------------------------

    def offline(self, unit: str) -> list[Action]:
        call = self.of_unit(unit)
        return [] if call is None else self._end(call, "offline", None, None, gone=unit)

    def of_unit(self, unit: str) -> Call | None:
        return self.calls.get(self.of.get(unit, ""))

    # --- timers -----------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        return self._timers[0][0] if self._timers else None

    def on_timer(self, now: float) -> list[Action]:
        out: list[Action] = []
        while self._timers and self._timers[0][0] <= now:
            at, call_id = heapq.heappop(self._timers)
            if self._armed.get(call_id) != at:
                continue  # superseded by an earlier wake-up for the same call
            del self._armed[call_id]
            call = self.calls[call_id]
            if call.state == "ringing" and call.deadline <= now:
                out += self._end(call, "no_answer", None, None)
                continue
            if call.talker is not None and call.turn_until <= now:
                call.talker, call.turn_until = None, float("inf")
                out += self._tell_both(call, None, None, "max_talk_time")
            if call.state == "connected":
                call.deadline = call.active + INACTIVE_S
                if call.deadline <= now:
                    out += self._end(call, "inactive", None, None)
                    continue
            self._arm(call)
        return out

    # --- durable state ----------------------------------------------------------------

    def record(self, callee: str) -> list[Any] | None:
        """The call to the unit, as its durable record keeps it, if any (who talks is not
        kept: after a restart nobody has the turn)."""
        call = self.of_unit(callee)
        if call is None or call.callee != callee:
            return None
        return [call.call, call.caller, call.kind, call.floor, call.state]

    def load(self, callee: str, rec: object, now: float, is_unit: Callable[[str], bool]) -> None:
        """Adopt a call read back (raising ValueError with why not): its timers start
        afresh; `settle` then tells both parties how it stands."""
        if not isinstance(rec, list) or len(rec) != 5:
            raise ValueError("not a call record")
        call_id, caller, kind, floor, state = rec
        if not isinstance(call_id, str) or len(call_id) > MAX_CALL_ID:
            raise ValueError("not a call id")
        if call_owner(call_id) != callee:
            raise ValueError(f"{call_id!r} is not a call to {callee}")
        if not isinstance(caller, str) or caller == callee or not is_unit(caller):
            raise ValueError(f"{caller!r} is not another unit of the fleet")
        if kind not in ("normal", "emergency") or type(floor) is not bool:
            raise ValueError("not a kind of private call")
        if state not in ("ringing", "connected"):
            raise ValueError(f"{state!r} is not a call state")
        deadline = now + (RING_S if state == "ringing" else INACTIVE_S)
        call = Call(call_id, caller, callee, kind, floor, state, deadline, now)
        if caller in self.of or callee in self.of or len(self.calls) >= self.max_calls:
            if len(self._unkept) < UNKEPT_TOLD:  # (its parties are told it ended, at settle)
                self._unkept.append(call)
            raise ValueError("a party is in another call, or more calls than are tracked")
        self.calls[call_id] = call
        self.of[caller] = self.of[callee] = call_id
        self._loaded.append(call_id)
        self._arm(call)

    def settle(self, online: Callable[[str], bool]) -> list[Action]:
        """After calls were read back: each told again to both parties (who may have
        missed its last news), or ended if one of them went offline meanwhile."""
        out: list[Action] = []
        for call in self._unkept:
            out += [ToUnit(u, call.msg(u, None, "busy")) for u in call.parties() if online(u)]
        self._unkept.clear()
        loaded, self._loaded = self._loaded, []
        for call in [self.calls[c] for c in loaded if c in self.calls]:
            gone = next((u for u in (call.caller, call.callee) if not online(u)), None)
            if gone is not None:
                out += self._end(call, "offline", None, None, gone=gone)
            else:
                out += self._tell_both(call, None, None)
                if call.state == "connected":
                    self.connected.append(call)  # (an emergency call: its rule holds again)
        return out

    def forget(self, theirs: Callable[[str], bool]) -> None:
        """Another instance serves these callees now."""
        for call in [c for c in self.calls.values() if theirs(c.callee)]:
            self._drop(call, keep=False)

    # --- internals --------------------------------------------------------------------

    def _connect(
        self, call: Call, now: float, ref: int | None, turn: bool, answered_by: str | None = None
    ) -> list[Action]:
        call.state, call.active = "connected", now
        self.outcomes["connected"] = self.outcomes.get("connected", 0) + 1
        self.connected.append(call)
        self.changed.add(call.callee)
        call.deadline = now + INACTIVE_S
        if call.floor and turn:
            call.talker, call.turn_until = call.caller, now + self.talk_s
        self._arm(call)
        return self._tell_both(call, answered_by or call.caller, ref)

    def _tell_both(
        self, call: Call, asker: str | None, ref: int | None, cause: str | None = None
    ) -> list[Action]:
        return [
            ToUnit(u, call.msg(u, ref if u == asker else None, cause))
            for u in (call.caller, call.callee)
        ]

    def _end(
        self, call: Call, cause: End, asker: str | None, ref: int | None, gone: str | None = None
    ) -> list[Action]:
        self._drop(call)
        self.outcomes[cause] = self.outcomes.get(cause, 0) + 1
        return [
            ToUnit(u, call.msg(u, ref if u == asker else None, cause))
            for u in (call.caller, call.callee)
            if u != gone
        ]

    def _of(self, unit: str, call_id: str) -> Call:
        call = self.calls.get(call_id)
        if call is None or unit not in (call.caller, call.callee):
            raise NotYours(f"{unit} is in no call {call_id}")
        return call

    def _refused(self, call: Call, cause: End, ref: int | None) -> list[Action]:
        self.outcomes[cause] = self.outcomes.get(cause, 0) + 1
        return [ToUnit(call.caller, call.msg(call.caller, ref, cause))]

    def _drop(self, call: Call, keep: bool = True) -> None:
        del self.calls[call.call]
        if keep:  # (its record deleted)
            self.changed.add(call.callee)
        self._armed.pop(call.call, None)  # (its heap entries are skipped from now on)
        for u in (call.caller, call.callee):
            if self.of.get(u) == call.call:
                del self.of[u]

    def _arm(self, call: Call) -> None:
        """Make sure the call is woken by its next deadline: one live heap entry per call
        (voice and presses move its deadlines later: the wake-up finds that and re-arms)."""
        at = min(call.deadline, call.turn_until)
        armed = self._armed.get(call.call)
        if armed is not None and armed <= at:
            return
        self._armed[call.call] = at
        heapq.heappush(self._timers, (at, call.call))
