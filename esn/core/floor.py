"""Floor control for one talkgroup: the arbitrator of docs/protocol.md's floor rules.

Everything that decides who may talk in a group lives in this file. Theory of operation:

* A floor is idle or held by one `_Holder`. Requests that cannot take it wait in a queue
  ordered by (kind, prio) descending, first come first served within equal rank; every
  waiter whose 1-based position changes is told again.
* A request either takes an idle floor, pre-empts the holder (`preempts`), joins the
  queue, or is denied (`busy` with queueing off, `queue_full`).
* The holder loses the floor by `release`, by going offline, by a dispatcher, by T1 (no
  media for `end_of_media_ms`: revoke `no_media`, taken back at once), or by T2 (talk time
  `max_talk_ms`: revoke `max_talk_time`, then taken back T3 = `revoke_grace_ms` later
  unless it releases first). Pre-emption takes it back at once. Each time, the head of
  the queue is granted, or the floor goes idle.
* A call id spans consecutive grants; after `idle` it lives `hang_ms` so a grant within
  the hang time continues the same call.
* A granted emergency request (or an emergency alert) puts the group in emergency until
  its originator cancels or a dispatcher force-releases. A granted imminent-peril request
  puts a group not in emergency in imminent peril until its originator or a dispatcher
  cancels it, a dispatcher force-releases, or an emergency supersedes it. A talker whose
  own imminent peril is cancelled talks on in the same call at normal.

Time is passed in (seconds, any monotonic clock); nothing here reads a clock, does I/O
or knows MQTT. Inputs are method calls, outputs are lists of actions (`esn.core.actions`).
`next_deadline()` and `on_timer(now)` drive the timers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from esn.core.actions import Action, StateChanged, ToGroup, ToUnit
from esn.core.fleet import Talkgroup
from esn.protocol import messages as m

KIND_RANK: dict[m.Kind, int] = {"normal": 0, "imminent": 1, "emergency": 2}

# what became of floor requests and grants, counted per group (esn_floor_outcomes_total)
Outcome = Literal["granted", "queued", "denied", "preempted", "revoked", "released"]


def preempts(kind: m.Kind, prio: int, held_kind: m.Kind, held_prio: int, threshold: int) -> bool:
    """docs/protocol.md, rule 3 (after NIST's MCPTT model)."""
    if kind == "emergency":
        return held_kind != "emergency" or prio > held_prio
    if kind == "imminent":
        return held_kind == "normal" or (held_kind == "imminent" and prio > held_prio)
    return held_kind == "normal" and prio > held_prio and prio >= threshold


@dataclass(frozen=True, slots=True)
class Saved:
    """A floor's record (`Floor.record`) once validated: Unix times, checked entries."""

    seq: int
    call: str | None
    call_until: float
    since: float
    holder: tuple[str, int, m.Kind, int | None, float, float | None] | None
    queue: list[tuple[str, int, m.Kind, int | None]]
    emergencies: list[tuple[str, str | None]]
    perils: list[str]


@dataclass(slots=True)
class _Holder:
    unit: str
    prio: int
    kind: m.Kind
    ref: int | None
    granted_at: float
    last_media: float
    revoked_at: float | None = None


@dataclass(slots=True)
class _Waiter:
    unit: str
    prio: int
    kind: m.Kind
    ref: int | None
    arrival: int

    def key(self) -> tuple[int, int, int]:
        return (-KIND_RANK[self.kind], -self.prio, self.arrival)


class Floor:
    def __init__(self, group: Talkgroup, new_call_id: Callable[[], str], now: float) -> None:
        self.group = group
        self.tg = group.id
        self._new_call_id = new_call_id
        self.holder: _Holder | None = None
        self.queue: list[_Waiter] = []
        self.call: str | None = None
        self.call_until = 0.0  # hang-time end while idle
        self.seq = 0
        # units with an open emergency here (an alert, or a granted emergency request), in
        # the order raised, each with the dispatcher who acknowledged it (or None): the
        # group is in emergency while any is open
        self.emergencies: dict[str, str | None] = {}
        self.perils: set[str] = set()  # units with an open imminent peril here
        self.since = now
        self._arrivals = 0
        self.outcomes: dict[Outcome, int] = {}

    # --- inputs -----------------------------------------------------------------------

    def request(
        self, unit: str, kind: m.Kind, prio: int, ref: int | None, now: float
    ) -> list[Action]:
        h = self.holder
        if h is not None and h.unit == unit:
            if h.revoked_at is not None:  # talk time is up: the answer is still the revoke
                return [self._revoke(unit, "max_talk_time", ref)]
            if KIND_RANK[kind] > KIND_RANK[h.kind]:
                return self._upgrade(h, kind, prio, ref, now)
            return [ToUnit(unit, self._granted(h, now, ref))]  # repeated: idempotent
        before = self._positions()
        old = next((w for w in self.queue if w.unit == unit), None)
        if old is not None:
            if (ref is not None and old.ref == ref) or (old.kind, old.prio) == (kind, prio):
                return [ToUnit(unit, self._queued_msg(old, ref))]  # repeated: keeps its place
            self.queue.remove(old)  # a different request (say, now emergency) is re-decided
        out = self._decide(unit, kind, prio, ref, now)
        return out + self._queue_changed(before, skip=unit)

    def _decide(
        self, unit: str, kind: m.Kind, prio: int, ref: int | None, now: float
    ) -> list[Action]:
        h = self.holder
        if h is None:
            return self._grant(unit, prio, kind, ref, now)
        policy = self.group.policy
        if preempts(kind, prio, h.kind, h.prio, policy.preempt_threshold):
            self._count("preempted")
            self.holder = None
            granted = self._grant(unit, prio, kind, ref, now, preempted=h.unit)
            if h.revoked_at is not None:  # in its T3 grace: it was told to stop already
                return granted
            return [self._revoke(h.unit, "preempted", h.ref), *granted]
        if not policy.queue:
            self._count("denied")
            return [self._deny(unit, "busy", ref)]
        if len(self.queue) >= policy.queue_depth:
            self._count("denied")
            return [self._deny(unit, "queue_full", ref)]
        self._count("queued")
        self._arrivals += 1
        w = _Waiter(unit, prio, kind, ref, self._arrivals)
        self.queue.append(w)
        self.queue.sort(key=_Waiter.key)
        return [ToUnit(unit, self._queued_msg(w, ref))]

    def release(self, unit: str, now: float) -> list[Action]:
        if self.holder is not None and self.holder.unit == unit:
            self._count("released")
            return self._end_talk(now)
        return self._leave_queue(unit)

    def involves(self, unit: str) -> bool:
        """Whether the unit holds the floor or waits for it."""
        h = self.holder
        return (h is not None and h.unit == unit) or any(w.unit == unit for w in self.queue)

    def queue_status(self, unit: str, ref: int | None) -> list[Action]:
        for w in self.queue:
            if w.unit == unit:
                return [ToUnit(unit, self._queued_msg(w, ref))]
        return [self._deny(unit, "not_queued", ref)]

    def media_drop_reason(self, unit: str, now: float) -> str | None:
        """None if media from `unit` is to be relayed (and T1 restarts), else why not."""
        h = self.holder
        if h is None or h.unit != unit:
            return "not_holder"
        if h.revoked_at is not None:
            return "revoked"
        h.last_media = now
        return None

    def unit_gone(self, unit: str, now: float) -> list[Action]:
        """The unit went offline or left the group: off the floor and out of the queue."""
        if self.holder is not None and self.holder.unit == unit:
            self._count("released")
            return self._end_talk(now)
        return self._leave_queue(unit)

    def preempt(self, unit: str, now: float) -> list[Action]:
        """The unit's talk here ends, for an emergency private call of its (11.14), unless
        it is an emergency call itself."""
        h = self.holder
        if h is None or h.unit != unit or h.kind == "emergency":
            return []
        self._count("preempted")
        return [self._revoke(unit, "preempted", h.ref), *self._end_talk(now)]

    def force_release(self, now: float) -> list[Action]:
        out: list[Action] = []
        h = self.holder
        if h is not None:
            self._count("revoked")
            out.append(self._revoke(h.unit, "dispatcher", h.ref))
            self.emergencies.clear()
            self.perils.clear()
            return out + self._end_talk(now)
        if self.emergencies or self.perils:
            self.emergencies.clear()
            self.perils.clear()
            out.append(self._state())
        return out

    def raise_emergency(self, unit: str) -> list[Action]:
        """An emergency of the unit's opens; it supersedes any imminent peril."""
        if unit in self.emergencies:
            return []
        changed = len(self.emergencies) == 0 or bool(self.perils)
        self.emergencies[unit] = None
        self.perils.clear()
        return [self._state()] if changed else []

    def cancel_emergency(self, unit: str) -> list[Action]:
        """The unit's own emergency ends; the group's only when no other is open."""
        if unit not in self.emergencies:
            return []
        del self.emergencies[unit]
        return [] if self.emergencies else [self._state()]

    def cancel_imminent(self, unit: str | None, now: float) -> list[Action]:
        """The unit's own imminent peril ends (None: every one, a dispatcher's cancel)."""
        ended = set(self.perils) if unit is None else self.perils & {unit}
        if not ended:
            return []
        self.perils -= ended
        h = self.holder
        if h is not None and h.unit in ended and h.kind == "imminent":
            return self._lowered(h, now)
        return [self._state()]

    def restore(self, state: m.State, age_s: float, now: float) -> None:
        """Take over a floor a previous server instance granted (its retained state)."""
        self.seq = max(self.seq, state.seq)
        if state.floor != "taken" or state.talker is None:
            return
        self.call = state.call or self._new_call_id()
        self.holder = _Holder(
            state.talker,
            state.prio or 0,
            state.kind or "normal",
            None,
            granted_at=now - age_s,
            last_media=now,
        )
        if state.emergency:
            self.emergencies[state.talker] = None  # the best guess: the state names no originator
        elif state.imminent:
            self.perils.add(state.talker)
        self.since = now - age_s

    def record(self, wall_offset: float) -> dict[str, object]:
        """What a restarted server needs to go on as if nothing happened (`load`): the
        grant, the queue, the emergencies, the call; times as Unix time."""
        h = self.holder
        w = wall_offset
        return {
            "seq": self.seq,
            "call": self.call,
            "call_until": self.call_until + w,
            "since": self.since + w,
            "holder": None
            if h is None
            else [
                h.unit,
                h.prio,
                h.kind,
                h.ref,
                h.granted_at + w,
                None if h.revoked_at is None else h.revoked_at + w,
            ],
            "queue": [[x.unit, x.prio, x.kind, x.ref] for x in self.queue],
            "emergencies": [[unit, by] for unit, by in self.emergencies.items()],
            "perils": sorted(self.perils),
        }

    def load(self, saved: Saved, wall_offset: float, now: float) -> None:
        """Go on from a record the caller has validated. What became due while the server
        was down happens at once: the timers are due, and `next_in_queue` gives a floor
        whose holder was not kept to the head of its queue."""
        w = wall_offset
        self.seq, self.call = saved.seq, saved.call
        self.call_until, self.since = saved.call_until - w, saved.since - w
        self.holder = None
        if saved.holder is not None:
            unit, prio, kind, ref, granted, revoked = saved.holder
            self.holder = _Holder(
                unit, prio, kind, ref, granted - w, now, None if revoked is None else revoked - w
            )
        self.queue = []
        for unit, prio, kind, ref in saved.queue:
            self._arrivals += 1
            self.queue.append(_Waiter(unit, prio, kind, ref, self._arrivals))
        self.emergencies = dict(saved.emergencies)
        self.perils = set() if self.emergencies else set(saved.perils)

    def next_in_queue(self, now: float) -> list[Action]:
        """An idle floor with units waiting (only after `load`) goes to the first."""
        return self._end_talk(now) if self.holder is None and self.queue else []

    # --- timers -----------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        h = self.holder
        p = self.group.policy
        if h is not None:
            if h.revoked_at is not None:
                return h.revoked_at + p.revoke_grace_ms / 1000
            return min(h.granted_at + p.max_talk_ms / 1000, h.last_media + p.end_of_media_ms / 1000)
        if self.call is not None:
            return self.call_until
        return None

    def on_timer(self, now: float) -> list[Action]:
        h = self.holder
        p = self.group.policy
        if h is not None:
            if h.revoked_at is not None:
                if now >= h.revoked_at + p.revoke_grace_ms / 1000:  # T3: take it back
                    return self._end_talk(now)
                return []
            if now >= h.granted_at + p.max_talk_ms / 1000:  # T2
                self._count("revoked")
                h.revoked_at = now
                return [self._revoke(h.unit, "max_talk_time", h.ref)]
            if now >= h.last_media + p.end_of_media_ms / 1000:  # T1
                self._count("revoked")
                return [self._revoke(h.unit, "no_media", h.ref), *self._end_talk(now)]
            return []
        if self.call is not None and now >= self.call_until:  # hang time over: call ends
            self.call = None
            return [self._state()]
        return []

    # --- views ------------------------------------------------------------------------

    @property
    def emergency(self) -> bool:
        return bool(self.emergencies)

    def state_msg(self, wall_offset: float) -> m.State:
        """The retained state; `wall_offset` turns this clock into Unix time."""
        h = self.holder
        return m.State(
            tg=self.tg,
            floor="taken" if h else "idle",
            emergency=self.emergency,
            imminent=True if self.perils else None,
            queue=len(self.queue),
            seq=self.seq,
            since_ts=int((self.since + wall_offset) * 1e9),
            call=self.call,
            talker=h.unit if h else None,
            kind=h.kind if h else None,
            prio=h.prio if h else None,
        )

    # --- internals --------------------------------------------------------------------

    def _count(self, outcome: Outcome) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    def _upgrade(
        self, h: _Holder, kind: m.Kind, prio: int, ref: int | None, now: float
    ) -> list[Action]:
        """The holder raises its own call (normal -> imminent -> emergency): same grant, a
        higher kind; the group is told again, and an emergency call puts it in emergency."""
        h.kind, h.prio = kind, max(h.prio, prio)
        return self._announce(h, ref, now)

    def _lowered(self, h: _Holder, now: float) -> list[Action]:
        """The holder's imminent peril was cancelled while it talks at that kind: it talks
        on, in the same call and grant, at normal (told with the ref of the request that
        won the floor; not told at all once its talk time is up: it was told to stop)."""
        h.kind = "normal"
        out = self._announce(h, h.ref, now)
        if h.revoked_at is not None:
            out = [a for a in out if not isinstance(a, ToUnit)]
        return out

    def _revoke(self, unit: str, cause: m.RevokeCause, ref: int | None) -> ToUnit:
        return ToUnit(unit, m.Revoke(tg=self.tg, cause=cause, ref=ref))

    def _deny(self, unit: str, cause: m.DenyCause, ref: int | None) -> ToUnit:
        return ToUnit(unit, m.Deny(tg=self.tg, cause=cause, ref=ref))

    def _granted(self, h: _Holder, now: float, ref: int | None) -> m.Granted:
        left = h.granted_at + self.group.policy.max_talk_ms / 1000 - now
        return m.Granted(
            tg=self.tg,
            call=self.call or "",
            prio=h.prio,
            kind=h.kind,
            max_ms=max(0, round(left * 1000)),
            ref=ref,
        )

    def _grant(
        self,
        unit: str,
        prio: int,
        kind: m.Kind,
        ref: int | None,
        now: float,
        preempted: str | None = None,
    ) -> list[Action]:
        if self.call is None:
            self.call = self._new_call_id()
        self.since = now
        h = self.holder = _Holder(unit, prio, kind, ref, now, now)
        self._count("granted")
        return self._announce(h, ref, now, preempted)

    def _announce(
        self, h: _Holder, ref: int | None, now: float, preempted: str | None = None
    ) -> list[Action]:
        """The holder is told its grant and the group its talker (again, after an upgrade);
        an emergency call puts the group in emergency, an imminent-peril call one not in
        emergency in imminent peril."""
        if h.kind == "emergency":
            self.emergencies.setdefault(h.unit, None)
            self.perils.clear()  # (an emergency supersedes it)
        elif h.kind == "imminent" and not self.emergencies:
            self.perils.add(h.unit)
        self.seq += 1
        taken = m.Taken(
            tg=self.tg,
            talker=h.unit,
            call=self.call or "",
            prio=h.prio,
            kind=h.kind,
            seq=self.seq,
            preempted=preempted,
        )
        return [
            ToUnit(h.unit, self._granted(h, now, ref)),
            ToGroup(self.tg, "floor", taken),
            self._state(),
        ]

    def _end_talk(self, now: float) -> list[Action]:
        self.holder = None
        if self.queue:
            before = self._positions()
            w = self.queue.pop(0)
            return self._grant(w.unit, w.prio, w.kind, w.ref, now) + self._queue_changed(before)
        self.seq += 1
        self.since = now
        self.call_until = now + self.group.policy.hang_ms / 1000
        idle = m.Idle(tg=self.tg, call=self.call or "", seq=self.seq)
        return [ToGroup(self.tg, "floor", idle), self._state()]

    def _leave_queue(self, unit: str) -> list[Action]:
        for w in self.queue:
            if w.unit == unit:
                before = self._positions()
                self.queue.remove(w)
                return self._queue_changed(before)
        return []

    def _positions(self) -> dict[str, int]:
        return {w.unit: i for i, w in enumerate(self.queue, 1)}

    def _queued_msg(self, w: _Waiter, ref: int | None) -> m.Queued:
        return m.Queued(tg=self.tg, pos=self.queue.index(w) + 1, prio=w.prio, ref=ref)

    def _queue_changed(self, before: dict[str, int], skip: str | None = None) -> list[Action]:
        """Tell every waiter (but `skip`) whose position moved; the state shows the length."""
        out: list[Action] = [
            ToUnit(w.unit, m.Queued(tg=self.tg, pos=i, prio=w.prio, ref=w.ref))
            for i, w in enumerate(self.queue, 1)
            if before.get(w.unit) != i and w.unit != skip
        ]
        out.append(self._state())
        return out

    def _state(self) -> StateChanged:
        return StateChanged(self.tg)
