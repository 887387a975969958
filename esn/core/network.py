"""The whole push-to-talk network as the server sees it, without I/O.

Owns the fleet (static and temporary groups), presence, affiliation, one `Floor` per
group, unit emergencies, short data store-and-forward and location validation. Every
input is a decoded message plus the unit its topic names plus `now`; every output is a
list of actions. A peer that breaks the protocol gets an `error` or `deny` action and a
count in `rejected`; it can never make this raise.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict, deque
from collections.abc import Sized
from dataclasses import replace
from typing import Literal

from esn.core.actions import (
    Action,
    LocationAccepted,
    StateChanged,
    StateCleared,
    ToGroup,
    ToUnit,
)
from esn.core.fleet import Fleet, Talkgroup, UnitProfile
from esn.core.floor import Floor
from esn.core.limits import RateLimiter, Verdict
from esn.protocol import messages as m

SDS_STORE = 50  # short messages kept per offline unit
SDS_REFS = 64  # recent SDS refs remembered per sender, for duplicates
SDS_STORED_IN_ALL = 10_000  # short messages kept for offline units, in all
MAX_UNITS = 100_000  # units tracked at once (online or affiliated) beyond the fleet's own
MAX_RESTORED_SEQ = 2**40  # a group's event count read back; more is a forgery (or a bug)

# why the core refused input without (or besides) an error reply; counted in `rejected`
RejectReason = m.ErrorCause | Literal["spoofed", "invalid_presence", "too_many_units"]


class Network:
    def __init__(
        self,
        fleet: Fleet,
        *,
        call_prefix: str = "c",
        wall_offset: float = 0.0,
        max_units: int = MAX_UNITS,
    ) -> None:
        self.fleet = fleet
        self.max_units = max_units  # units tracked at once: made-up ids cannot grow memory
        self.groups: dict[str, Talkgroup] = dict(fleet.groups)
        self.floors: dict[str, Floor] = {}
        self.affiliations: dict[str, set[str]] = {}  # unit -> groups
        self.online: set[str] = set()
        self.offline: set[str] = set()
        self.rejected: dict[str, int] = {}
        self.wall_offset = wall_offset
        self.limiter = RateLimiter(fleet.limits)
        self._sds_store: dict[str, deque[m.Sds]] = {}
        self._stored_sds = 0  # messages in all the stores
        # per sender, recent refs -> ((to, text), the status it was told)
        self._sds_seen: dict[str, OrderedDict[int, tuple[tuple[str, str], str]]] = {}
        self._timers: list[tuple[float, str]] = []  # (deadline, tg) min-heap
        self._armed: dict[str, float] = {}  # tg -> its live deadline in the heap
        self._call_prefix = call_prefix
        self._calls = 0
        self._denied = 0  # denials decided here, before any floor is involved

    # --- unit control ---------------------------------------------------------------

    def unit_message(self, unit: str, msg: m.Message, now: float) -> list[Action]:
        kind = _LIMITED.get(type(msg), "control")
        verdict = self.limiter.check(unit, kind, now)
        if verdict is Verdict.REFUSE_AND_TELL:
            return self._error(unit, msg.ref, "rate_limited", f"too many {kind} messages")
        if verdict is Verdict.REFUSE_QUIETLY:
            return self._reject("rate_limited")
        profile = self.fleet.profile(unit)
        if profile is None:
            return self._error(unit, msg.ref, "forbidden", f"unit {unit} is not registered")
        if type(msg) in _DISPATCHER_ONLY and not profile.is_dispatcher:
            return self._error(unit, msg.ref, "forbidden", f"{msg.T} is for dispatchers only")
        match msg:
            case m.Affiliate():
                return self._affiliate(profile, msg, now)
            case m.Deaffiliate():
                return self._deaffiliate(profile, msg, now)
            case m.Location():
                return self._location(profile, msg, now)
            case m.EmergencyAlert():
                return self._emergency_alert(profile, msg, now)
            case m.EmergencyCancel():
                return self._emergency_cancel(profile, msg, now)
            case m.Sds():
                return self._sds(profile, msg, now)
            case m.EmergencyAck():
                return self._emergency_ack(profile, msg, now)
            case m.ForceRelease():
                return self._force_release(profile, msg, now)
            case m.Regroup():
                return self._regroup(profile, msg, now)
            case m.Ungroup():
                return self._ungroup(profile, msg, now)
        return self._error(unit, msg.ref, "unknown_type", f"{msg.T} is not a unit message")

    def _affiliate(self, p: UnitProfile, msg: m.Affiliate, now: float) -> list[Action]:
        if p.id not in self.affiliations and not self._room_for(p.id, self.affiliations):
            return self._error(p.id, msg.ref, "forbidden", "the network is full: try later")
        mine = self.affiliations.setdefault(p.id, set())
        rejected = []
        for tg in dict.fromkeys(msg.groups):
            group = self.groups.get(tg)
            if group is None:
                rejected.append({"tg": tg, "cause": "unknown_group"})
            elif not group.admits(p.id):
                rejected.append({"tg": tg, "cause": "not_member"})
            else:
                mine.add(tg)
        return [ToUnit(p.id, m.Affiliation(groups=sorted(mine), rejected=rejected, ref=msg.ref))]

    def _deaffiliate(self, p: UnitProfile, msg: m.Deaffiliate, now: float) -> list[Action]:
        out: list[Action] = []
        mine = self.affiliations.get(p.id, set())
        for tg in msg.groups:
            if tg in mine:
                mine.discard(tg)
                out += self._leave_floor(p.id, tg, now)
        out.append(ToUnit(p.id, m.Affiliation(groups=sorted(mine), ref=msg.ref)))
        return out

    def _location(self, p: UnitProfile, msg: m.Location, now: float) -> list[Action]:
        if msg.unit is not None and msg.unit != p.id:
            return self._reject("spoofed")
        ts = int((now + self.wall_offset) * 1e9)
        return [LocationAccepted(p.id, replace(msg, unit=p.id, ts=ts, ref=None))]

    def _emergency_alert(self, p: UnitProfile, msg: m.EmergencyAlert, now: float) -> list[Action]:
        refused = self._not_for(p, msg.tg, msg.ref)
        if refused:
            return refused
        ts = int((now + self.wall_offset) * 1e9)
        event = m.Emergency(unit=p.id, tg=msg.tg, lat=msg.lat, lon=msg.lon, ts=ts)
        return [
            ToGroup(msg.tg, "event", event),
            ToUnit(p.id, m.EmergencyState(tg=msg.tg, state="raised", ref=msg.ref)),
            *self._floor(msg.tg, now).raise_emergency(p.id),
        ]

    def _emergency_cancel(self, p: UnitProfile, msg: m.EmergencyCancel, now: float) -> list[Action]:
        floor = self.floors.get(msg.tg)
        if floor is None or p.id not in floor.emergencies:
            return self._error(p.id, msg.ref, "invalid_field", f"no emergency of yours in {msg.tg}")
        out: list[Action] = [
            ToGroup(msg.tg, "event", m.EmergencyCancel(tg=msg.tg, unit=p.id)),
            ToUnit(p.id, m.EmergencyState(tg=msg.tg, state="cancelled", ref=msg.ref)),
        ]
        return out + floor.cancel_emergency(p.id)

    def _sds(self, p: UnitProfile, msg: m.Sds, now: float) -> list[Action]:
        """Short data, answered with its status. A duplicate (QoS 1 delivers twice, a unit
        retries) is the same ref with the same content: it is told again what it was told
        the first time, and nothing is delivered twice. The same ref with other content
        is a new message (a unit whose refs started again after a restart)."""
        if p.id not in self._sds_seen and len(self._sds_seen) >= self.max_units:
            del self._sds_seen[next(iter(self._sds_seen))]  # the sender heard from longest ago
        seen = self._sds_seen.setdefault(p.id, OrderedDict())
        if msg.ref is not None:
            first = seen.get(msg.ref)
            if first is not None and first[0] == (msg.to, msg.text):
                return [ToUnit(p.id, m.SdsStatus(state=first[1], ref=msg.ref))]
        out = self._sds_send(p, msg)
        told = next((a.msg for a in out if isinstance(a, ToUnit) and a.unit == p.id), None)
        if msg.ref is not None and isinstance(told, m.SdsStatus):
            seen[msg.ref] = ((msg.to, msg.text), told.state)
            seen.move_to_end(msg.ref)
            if len(seen) > SDS_REFS:
                seen.popitem(last=False)
        return out

    def _sds_send(self, p: UnitProfile, msg: m.Sds) -> list[Action]:
        scope, _, target = msg.to.partition(":")
        sds = m.Sds(to=msg.to, text=msg.text, sender=p.id, ref=msg.ref)
        if scope == "tg":
            if target not in self.groups:
                return [ToUnit(p.id, m.SdsStatus(state="failed", ref=msg.ref))]
            refused = self._not_for(p, target, msg.ref)
            if refused:
                return refused
            return [
                ToGroup(target, "event", sds),
                ToUnit(p.id, m.SdsStatus(state="delivered", ref=msg.ref)),
            ]
        if self.fleet.profile(target) is None:
            return [ToUnit(p.id, m.SdsStatus(state="failed", ref=msg.ref))]
        if target in self.online:
            return [ToUnit(target, sds), ToUnit(p.id, m.SdsStatus(state="delivered", ref=msg.ref))]
        known = target in self.fleet.units or target in self.offline
        if not known or self._stored_sds >= SDS_STORED_IN_ALL:
            # kept only for a unit we know, and within bounds: made-up ids cannot fill memory
            return [ToUnit(p.id, m.SdsStatus(state="failed", ref=msg.ref))]
        store = self._sds_store.setdefault(target, deque(maxlen=SDS_STORE))
        self._stored_sds += len(store) < SDS_STORE  # a full deque drops its oldest
        store.append(sds)
        return [ToUnit(p.id, m.SdsStatus(state="queued", ref=msg.ref))]

    def _emergency_ack(self, p: UnitProfile, msg: m.EmergencyAck, now: float) -> list[Action]:
        floor = self.floors.get(msg.tg)
        if floor is None or msg.unit not in floor.emergencies:
            return self._error(
                p.id, msg.ref, "invalid_field", f"{msg.unit} has no emergency in {msg.tg}"
            )
        acked = m.EmergencyState(tg=msg.tg, state="acknowledged", by=p.id)
        return [
            ToUnit(msg.unit, acked),
            ToGroup(msg.tg, "event", acked),
            ToUnit(p.id, m.Ok(op=msg.T, ref=msg.ref)),
        ]

    def _force_release(self, p: UnitProfile, msg: m.ForceRelease, now: float) -> list[Action]:
        if msg.tg not in self.groups:
            return self._error(p.id, msg.ref, "invalid_field", f"unknown group {msg.tg}")
        floor = self._floor(msg.tg, now)
        out = floor.force_release(now)
        self._arm(floor)
        return [*out, ToUnit(p.id, m.Ok(op=msg.T, ref=msg.ref))]

    def _regroup(self, p: UnitProfile, msg: m.Regroup, now: float) -> list[Action]:
        group = self.groups.get(msg.tg)
        if group is not None and not group.temporary:
            return self._error(p.id, msg.ref, "invalid_field", f"{msg.tg} is a static group")
        unknown = [u for u in msg.units if self.fleet.profile(u) is None]
        if unknown:
            return self._error(p.id, msg.ref, "invalid_field", f"unknown unit {unknown[0]}")
        name = msg.name or (group.name if group else msg.tg)
        members = frozenset(msg.units) | {p.id} | (group.members if group else frozenset())
        self.groups[msg.tg] = Talkgroup(
            msg.tg, name, members, False, self.fleet.defaults, temporary=True
        )
        out: list[Action] = []
        for unit in (*dict.fromkeys(msg.units), p.id):
            self.affiliations.setdefault(unit, set()).add(msg.tg)
            out.append(ToUnit(unit, m.Regrouped(tg=msg.tg, name=name)))
        out.append(ToGroup(msg.tg, "event", m.Regrouped(tg=msg.tg, name=name)))
        out.append(StateChanged(msg.tg))
        return [*out, ToUnit(p.id, m.Ok(op=msg.T, ref=msg.ref))]

    def _ungroup(self, p: UnitProfile, msg: m.Ungroup, now: float) -> list[Action]:
        group = self.groups.get(msg.tg)
        if group is None or not group.temporary:
            return self._error(p.id, msg.ref, "invalid_field", f"{msg.tg} is no temporary group")
        out = self._floor(msg.tg, now).force_release(now)
        out.append(ToGroup(msg.tg, "event", m.Ungrouped(tg=msg.tg)))
        for unit, groups in self.affiliations.items():
            if msg.tg in groups:
                groups.discard(msg.tg)
                out.append(ToUnit(unit, m.Ungrouped(tg=msg.tg)))
        del self.groups[msg.tg]
        self.floors.pop(msg.tg, None)
        out = [a for a in out if not isinstance(a, StateChanged)]
        return [*out, StateCleared(msg.tg), ToUnit(p.id, m.Ok(op=msg.T, ref=msg.ref))]

    # --- floor control ----------------------------------------------------------------

    def floor_message(self, unit: str, tg: str, msg: m.Message, now: float) -> list[Action]:
        profile = self.fleet.profile(unit)
        ref = msg.ref
        verdict = self.limiter.check(
            unit, "floor" if isinstance(msg, m.Request) else "control", now
        )
        if verdict is Verdict.REFUSE_AND_TELL:
            self._reject("rate_limited")
            return self._deny(unit, tg, "rate_limited", ref)
        if verdict is Verdict.REFUSE_QUIETLY:
            return self._reject("rate_limited")
        if not isinstance(msg, m.Request | m.Release | m.QueueStatus):
            return self._error(unit, ref, "unknown_type", f"{msg.T} is not a floor message")
        if tg not in self.groups:
            return self._deny(unit, tg, "unknown_group", ref)
        if profile is None or tg not in self.affiliations.get(unit, ()):
            return self._deny(unit, tg, "not_affiliated", ref)
        floor = self._floor(tg, now)
        match msg:
            case m.Release():
                out = floor.release(unit, now)
            case m.QueueStatus():
                return floor.queue_status(unit, ref)
            case m.Request() if self.groups[tg].broadcast and not profile.is_dispatcher:
                return self._deny(unit, tg, "receive_only", ref)
            case m.Request():
                prio = profile.priority if msg.prio is None else min(msg.prio, profile.priority)
                out = floor.request(unit, msg.kind, prio, ref, now)
        self._arm(floor)
        return out

    def media_sender(self, unit: str, tg: str) -> str | None:
        """Why `unit` may not send voice in `tg` at all (it does not hold the floor), or
        None; no side effect, so the server asks it before decoding a packet."""
        floor = self.floors.get(tg)
        if floor is None or floor.holder is None or floor.holder.unit != unit:
            return "not_holder" if tg in self.groups else "unknown_group"
        return None

    def media_drop_reason(self, unit: str, tg: str, now: float) -> str | None:
        """The hot path: None when media from `unit` in `tg` is to be relayed."""
        return self.media_sender(unit, tg) or self.floors[tg].media_drop_reason(unit, now)

    # --- presence ---------------------------------------------------------------------

    def presence(self, unit: str, msg: m.Presence, now: float) -> list[Action]:
        if msg.state not in ("online", "offline"):
            return self._reject("invalid_presence")
        if self.fleet.profile(unit) is None:
            return self._reject("forbidden")  # closed registration: not a unit of ours
        if msg.state == "online":
            if unit not in self.online and not self._room_for(unit, self.online):
                return self._reject("too_many_units")
            self.offline.discard(unit)
            self.online.add(unit)
            stored = self._sds_store.pop(unit, ())
            self._stored_sds -= len(stored)
            return [ToUnit(unit, sds) for sds in stored]
        self.online.discard(unit)
        if unit not in self.offline and len(self.offline) >= self.max_units:
            self.offline.pop()  # bounded: made-up ids going offline cannot grow it
        self.offline.add(unit)  # (a retained offline tells recovery a talker is gone)
        out: list[Action] = []
        for tg in sorted(self.affiliations.pop(unit, set())):
            out += self._leave_floor(unit, tg, now)
        return out

    # --- recovery after a restart ------------------------------------------------------

    def restore(self, state: m.State, now: float) -> str | None:
        """Adopt a group's retained state from before a restart, or say why not.

        Nothing read back is trusted: the group must still exist, a talker must still be
        allowed to hold its floor (a member, not a handset in a receive-only group, with no
        more than its priority) and be online, the grant younger than the group's talk
        time, and `seq` of a sane size. The caller republishes every group's state
        afterwards, so a state not adopted is overwritten then.
        """
        group = self.groups.get(state.tg)
        if group is None:
            return "no such group in the fleet"
        if state.seq > MAX_RESTORED_SEQ:
            return f"seq {state.seq} is beyond any real count"
        floor = self._floor(state.tg, now)
        if floor.holder is not None:
            return "the floor is held already"
        why = self._restorable_talker(group, state, now) if state.floor == "taken" else None
        if why is not None:
            floor.seq = max(floor.seq, state.seq)  # its events are not replayed: count on
            return why
        floor.restore(state, now + self.wall_offset - state.since_ts / 1e9, now)
        if floor.holder is not None:
            self.affiliations.setdefault(floor.holder.unit, set()).add(state.tg)
        self._arm(floor)
        return None

    def _restorable_talker(self, group: Talkgroup, state: m.State, now: float) -> str | None:
        talker = state.talker
        profile = self.fleet.profile(talker) if talker else None
        age_s = now + self.wall_offset - state.since_ts / 1e9
        if talker is None or profile is None:
            return f"talker {talker} is not a unit of the fleet"
        if not group.admits(talker):
            return f"{talker} is not a member of {group.id}"
        if group.broadcast and not profile.is_dispatcher:
            return f"{talker} may not talk in receive-only {group.id}"
        if (state.prio or 0) > profile.priority:
            return f"priority {state.prio} is above {talker}'s {profile.priority}"
        if talker in self.offline:
            return f"{talker} has gone offline"
        if not 0 <= age_s < group.policy.max_talk_ms / 1000:
            return "the grant is older than the talk time"
        return None

    # --- timers -----------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        return self._timers[0][0] if self._timers else None

    def on_timer(self, now: float) -> list[Action]:
        out: list[Action] = []
        while self._timers and self._timers[0][0] <= now:
            at, tg = heapq.heappop(self._timers)
            if self._armed.get(tg) != at:
                continue  # superseded by an earlier wake-up for the same group
            del self._armed[tg]
            floor = self.floors.get(tg)
            if floor is not None:
                out += floor.on_timer(now)
                self._arm(floor)
        return out

    # --- views ------------------------------------------------------------------------

    def state_msg(self, tg: str, now: float = 0.0) -> m.State:
        return self._floor(tg, now).state_msg(self.wall_offset)

    def outcomes(self) -> dict[str, int]:
        total = {"denied": self._denied}
        for floor in self.floors.values():
            for k, v in floor.outcomes.items():
                total[k] = total.get(k, 0) + v
        return total

    # --- internals --------------------------------------------------------------------

    def _floor(self, tg: str, now: float) -> Floor:
        floor = self.floors.get(tg)
        if floor is None:
            floor = self.floors[tg] = Floor(self.groups[tg], self._new_call_id, now)
        return floor

    def _new_call_id(self) -> str:
        self._calls += 1
        return f"{self._call_prefix}{self._calls}"

    def _arm(self, floor: Floor) -> None:
        """Make sure the floor is woken by its next deadline: one live heap entry per group."""
        deadline = floor.next_deadline()
        armed = self._armed.get(floor.tg)
        if deadline is None or (armed is not None and armed <= deadline):
            return  # an earlier wake-up will re-arm it
        self._armed[floor.tg] = deadline
        heapq.heappush(self._timers, (deadline, floor.tg))

    def _leave_floor(self, unit: str, tg: str, now: float) -> list[Action]:
        floor = self.floors.get(tg)
        if floor is None:
            return []
        out = floor.unit_gone(unit, now)
        self._arm(floor)
        return out

    def _room_for(self, unit: str, tracked: Sized) -> bool:
        """Whether one more unit may join `tracked`: the fleet's own always may."""
        return unit in self.fleet.units or len(tracked) < self.max_units

    def _not_for(self, p: UnitProfile, tg: str, ref: int | None) -> list[Action]:
        """The error to send when the unit may not address group `tg`, else nothing: the
        group must exist, and a members-only group takes only members (and dispatchers)."""
        group = self.groups.get(tg)
        if group is None:
            return self._error(p.id, ref, "invalid_field", f"unknown group {tg}")
        if not group.admits(p.id) and not p.is_dispatcher:
            return self._error(p.id, ref, "forbidden", f"{p.id} is not a member of {tg}")
        return []

    def _reject(self, reason: RejectReason) -> list[Action]:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        return []

    def _error(self, unit: str, ref: int | None, cause: m.ErrorCause, detail: str) -> list[Action]:
        self._reject(cause)
        return [ToUnit(unit, m.Error(cause=cause, detail=detail, ref=ref))]

    def _deny(self, unit: str, tg: str, cause: m.DenyCause, ref: int | None) -> list[Action]:
        self._denied += 1
        return [ToUnit(unit, m.Deny(tg=tg, cause=cause, ref=ref))]


# message type -> the per-unit rate limit it counts against (any other: "control")
_LIMITED: dict[type[m.Message], str] = {
    m.Location: "location",
    m.Sds: "sds",
    m.EmergencyAlert: "emergency",
    m.EmergencyCancel: "emergency",
    m.EmergencyAck: "command",
    m.ForceRelease: "command",
    m.Regroup: "command",
    m.Ungroup: "command",
}

# commands only a unit of role dispatcher may give
_DISPATCHER_ONLY = frozenset({m.EmergencyAck, m.ForceRelease, m.Regroup, m.Ungroup})
