"""The whole push-to-talk network as the server sees it, without I/O.

Owns the fleet (static and temporary groups), presence, affiliation, one `Floor` per
group, unit emergencies, short data store-and-forward, units' pre-coded statuses,
listening in (who listens to whom), private calls (`esn.core.private`) and location
validation. Every input is a decoded
message plus the unit its topic names plus `now`; every output is a list of actions. A
peer that breaks the protocol gets an `error` or `deny` action and a count in `rejected`;
it can never make this raise.
"""

from __future__ import annotations

import hashlib
import heapq
import secrets
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sized
from dataclasses import replace
from typing import Any, Literal

from esn.core.actions import (
    Action,
    Audit,
    LocationAccepted,
    StateChanged,
    StateCleared,
    StatusChanged,
    ToGroup,
    ToUnit,
)
from esn.core.fleet import Fleet, Talkgroup, UnitProfile
from esn.core.floor import KIND_RANK, Floor, Saved
from esn.core.limits import Rate, RateLimiter, Verdict
from esn.core.private import NotYours, PrivateCalls
from esn.protocol import messages as m
from esn.protocol.ids import is_id

SDS_STORE = 50  # short messages kept per offline unit
ANSWERS_KEPT = 16  # recent answers remembered per unit, for its retries
# repeats answered per unit: a handset's retries need far less; a flood of one message
# must not make the server answer it at the intake's rate
REPEATS = Rate(per_s=2.0, burst=16.0)
SDS_STORED_IN_ALL = 10_000  # short messages kept for offline units, in all
MAX_UNITS = 100_000  # units tracked at once (online or affiliated) beyond the fleet's own
MAX_GROUPS_TOLD = 256  # groups of a unit another instance tells us of; more is a forgery
MAX_RESTORED_SEQ = 2**40  # a group's event count read back; more is a forgery (or a bug)
MAX_LISTENED = 8  # units one listener may listen in on at once

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
        self._repeats = RateLimiter({"repeat": REPEATS})
        self._sds_store: dict[str, deque[m.Sds]] = {}
        self.statuses: dict[str, tuple[int, float]] = {}  # unit -> (code, wall time in s)
        # units not of the fleet with a status, least recently reported first
        self._guest_statuses: OrderedDict[str, None] = OrderedDict()
        self._unstated: set[str] = set()  # statuses read back but not kept: to be cleared
        self.ambient: dict[str, tuple[str, str]] = {}  # unit listened in on -> (by, call)
        self.private = PrivateCalls(fleet.defaults.max_talk_ms / 1000, max_units)
        self._stored_sds = 0  # messages in all the stores
        # per unit, its recent refs -> (digest of the message, the answer it was given)
        self._answers: dict[str, OrderedDict[int, tuple[bytes, m.Message]]] = {}
        self._guests: OrderedDict[str, None] = OrderedDict()  # answered units not in the fleet
        # keys of the durable records changed since the shell last saved them (`record`)
        self.changed: set[str] = set()
        self.stored: set[str] = set()  # groups whose floor came from the store at start
        self._timers: list[tuple[float, str]] = []  # (deadline, tg) min-heap
        self._armed: dict[str, float] = {}  # tg -> its live deadline in the heap
        self._call_prefix = call_prefix
        self._calls = 0
        self._denied = 0  # denials decided here, before any floor is involved

    # --- unit control ---------------------------------------------------------------

    def unit_message(self, unit: str, msg: m.Message, now: float) -> list[Action]:
        # A unit retries what was not answered (the answer or the server lost on the way),
        # with the same ref: the same ref and content is told its first answer again, and
        # acted on once; the same ref with other content is a new message. A repeat spends
        # none of the unit's allowance (the server's intake limit still bounds how often
        # it may ask). `ts` is left out: a retry may be stamped anew.
        digest = None
        if msg.ref is not None and not isinstance(msg, m.Location):
            content = repr(replace(msg, ref=None, ts=None)).encode()
            digest = hashlib.blake2b(content, digest_size=8).digest()
            answers = self._answers.get(unit)
            first = answers.get(msg.ref) if answers is not None else None
            if first is not None and first[0] == digest:
                if self._repeats.check(unit, "repeat", now) is not Verdict.ALLOW:
                    return self._reject("rate_limited")  # (it will ask again)
                return [ToUnit(unit, first[1])]
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
        out = self._act(profile, msg, now)
        if digest is None or msg.ref is None:
            return out
        answer = next(
            (
                a.msg
                for a in out
                if isinstance(a, ToUnit)
                and a.unit == unit
                and a.msg.ref == msg.ref
                and not isinstance(a.msg, m.Sds)  # (an SDS to oneself carries its ref)
            ),
            None,
        )
        if answer is not None:
            self._remember(unit, msg.ref, digest, answer)
        return out

    def _remember(self, unit: str, ref: int, digest: bytes, answer: m.Message) -> None:
        if unit not in self.fleet.units:  # open registration: made-up ids are bounded,
            if unit not in self._guests and len(self._guests) >= self.max_units:
                gone, _ = self._guests.popitem(last=False)  # heard from longest ago
                self._answers.pop(gone, None)
                self._touch("unit", gone)
            self._guests[unit] = None  # and cannot push the fleet's own answers out
            self._guests.move_to_end(unit)
        answers = self._answers.setdefault(unit, OrderedDict())
        answers[ref] = (digest, answer)
        answers.move_to_end(ref)
        if len(answers) > ANSWERS_KEPT:
            answers.popitem(last=False)
        self._touch("unit", unit)

    def _act(self, profile: UnitProfile, msg: m.Message, now: float) -> list[Action]:
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
            case m.ImminentCancel():
                return self._imminent_cancel(profile, msg, now)
            case m.Sds():
                return self._sds(profile, msg)
            case m.UnitStatus():
                return self._unit_status(profile, msg, now)
            case m.AmbientListen():
                return self._ambient_listen(profile, msg)
            case m.AmbientEnd():
                return self._ambient_end(profile, msg)
            case m.RemoteTalk():
                return self._remote_talk(profile, msg)
            case m.PrivateCall() | m.PrivateAnswer() | m.PrivateTalk() | m.PrivateEnd():
                return self._private(profile, msg, now)
            case m.EmergencyAck():
                return self._emergency_ack(profile, msg, now)
            case m.ForceRelease():
                return self._force_release(profile, msg, now)
            case m.Regroup():
                return self._regroup(profile, msg, now)
            case m.Ungroup():
                return self._ungroup(profile, msg, now)
        return self._error(profile.id, msg.ref, "unknown_type", f"{msg.T} is not a unit message")

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
        self._touch("unit", p.id)
        return [ToUnit(p.id, m.Affiliation(groups=sorted(mine), rejected=rejected, ref=msg.ref))]

    def _deaffiliate(self, p: UnitProfile, msg: m.Deaffiliate, now: float) -> list[Action]:
        out: list[Action] = []
        mine = self.affiliations.get(p.id, set())
        for tg in msg.groups:
            if tg in mine:
                mine.discard(tg)
                out += self._leave_floor(p.id, tg, now)
        self._touch("unit", p.id)
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
        self._touch("group", msg.tg)
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
        self._touch("group", msg.tg)
        return out + floor.cancel_emergency(p.id)

    def _imminent_cancel(self, p: UnitProfile, msg: m.ImminentCancel, now: float) -> list[Action]:
        """A unit ends its own imminent peril; a dispatcher ends every one in the group."""
        floor = self.floors.get(msg.tg)
        theirs = floor is not None and (p.id in floor.perils or (p.is_dispatcher and floor.perils))
        if floor is None or not theirs:
            whose = "" if p.is_dispatcher else " of yours"
            return self._error(
                p.id, msg.ref, "invalid_field", f"no imminent peril{whose} in {msg.tg}"
            )
        self._touch("group", msg.tg)
        return [
            ToGroup(msg.tg, "event", m.ImminentCancel(tg=msg.tg, unit=p.id)),
            ToUnit(p.id, m.Ok(op=msg.T, ref=msg.ref)),
            *floor.cancel_imminent(None if p.is_dispatcher else p.id, now),
        ]

    def _sds(self, p: UnitProfile, msg: m.Sds) -> list[Action]:
        """Short data, answered with its status: delivered, queued (kept for an offline
        unit, delivered when it comes online), or failed."""
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
        self._touch("sds", target)
        return [ToUnit(p.id, m.SdsStatus(state="queued", ref=msg.ref))]

    def _unit_status(self, p: UnitProfile, msg: m.UnitStatus, now: float) -> list[Action]:
        """A pre-coded status of the fleet's: kept as the unit's last, published retained
        for dispatchers, and confirmed with `ok`. A `text` sent with it is not the unit's
        to choose: the fleet's words for the code are published."""
        if msg.unit is not None and msg.unit != p.id:
            return self._reject("spoofed")
        if msg.code not in self.fleet.statuses:
            return self._error(p.id, msg.ref, "invalid_field", f"no status {msg.code} in the fleet")
        self.statuses[p.id] = (msg.code, now + self.wall_offset)
        self._touch("unit", p.id)
        out: list[Action] = [StatusChanged(p.id), ToUnit(p.id, m.Ok(op=msg.T, ref=msg.ref))]
        if p.id not in self.fleet.units:  # open registration: made-up ids are bounded,
            self._guest_statuses[p.id] = None  # the one heard from longest ago goes
            self._guest_statuses.move_to_end(p.id)
            if len(self._guest_statuses) > self.max_units:
                gone, _ = self._guest_statuses.popitem(last=False)
                del self.statuses[gone]
                self._touch("unit", gone)
                out.append(StatusChanged(gone))
        return out

    # --- listening in, talking remotely (docs/protocol.md, 11.13) ----------------------

    def _ambient_listen(self, p: UnitProfile, msg: m.AmbientListen) -> list[Action]:
        """Open a unit's microphone to an authorised listener, unknown to its user."""
        if "ambient_listening" not in p.may:
            return self._error(p.id, msg.ref, "forbidden", f"{p.id} may not listen in")
        target, held = msg.unit, self.ambient.get(msg.unit)
        if held is not None and held[0] == p.id:  # (already: told so again)
            return [
                ToUnit(p.id, m.Ambient(unit=target, call=held[1], state="listening", ref=msg.ref))
            ]
        refused = self._not_a_target(p, target)
        if refused:
            return self._error(p.id, msg.ref, "invalid_field", refused)
        if held is not None:
            return self._error(p.id, msg.ref, "invalid_field", f"{held[0]} listens to {target}")
        if sum(by == p.id for by, _ in self.ambient.values()) >= MAX_LISTENED:
            return self._error(p.id, msg.ref, "forbidden", f"at most {MAX_LISTENED} at once")
        call = f"a{secrets.token_hex(8)}"  # (not guessable from the group calls' ids)
        self.ambient[target] = (p.id, call)
        self._touch("unit", target)
        return [
            ToUnit(target, m.MicOpen(call=call)),
            ToUnit(p.id, m.Ambient(unit=target, call=call, state="listening", ref=msg.ref)),
            Audit(msg.T, f"{p.id} listens in on {target} (call {call})"),
        ]

    def _not_a_target(self, p: UnitProfile, target: str) -> str:
        """Why `target` cannot be listened in on or made to talk by `p`, or ""."""
        profile = self.fleet.profile(target)
        if target == p.id:
            return "not yourself"
        if profile is None or target not in self.online:
            return f"{target} is not online"
        if profile.is_dispatcher:
            return f"{target} is a dispatcher"
        return ""

    def _ambient_end(self, p: UnitProfile, msg: m.AmbientEnd) -> list[Action]:
        held = self.ambient.get(msg.unit)
        if held is None or held[0] != p.id:
            return self._error(p.id, msg.ref, "invalid_field", f"not listening to {msg.unit}")
        return self._stop_listening(msg.unit, None, msg.ref)

    def _stop_listening(self, target: str, cause: str | None, ref: int | None) -> list[Action]:
        by, call = self.ambient.pop(target)
        self._touch("unit", target)
        why = cause or "asked"
        out: list[Action] = [
            ToUnit(by, m.Ambient(unit=target, call=call, state="ended", cause=cause, ref=ref)),
            Audit("ambient_end", f"{by} no longer listens in on {target} (call {call}, {why})"),
        ]
        if target in self.online:
            out.insert(0, ToUnit(target, m.MicClose(call=call)))
        return out

    def ambient_listener(self, unit: str) -> tuple[str, str] | None:
        """(listener, call) of the unit's voice sent outside any group, if it is wanted."""
        return self.ambient.get(unit)

    def _remote_talk(self, p: UnitProfile, msg: m.RemoteTalk) -> list[Action]:
        """Make a unit talk in its group: it presses PTT as if its user had (the floor's
        rules as ever), for the seconds asked, at most the group's talk time."""
        if "remote_talk" not in p.may:
            return self._error(p.id, msg.ref, "forbidden", f"{p.id} may not make units talk")
        target, group = msg.unit, self.groups.get(msg.tg)
        if target is None or group is None:
            return self._error(p.id, msg.ref, "invalid_field", "remote_talk needs unit and tg")
        refused = self._not_a_target(p, target)
        if not refused and msg.tg not in self.affiliations.get(target, ()):
            refused = f"{target} is not in {msg.tg}"
        floor = self.floors.get(msg.tg)
        if not refused and group.broadcast:
            refused = f"{msg.tg} is receive-only"
        if not refused and floor is not None and floor.involves(target):
            refused = f"{target} talks or waits in {msg.tg} already"
        if refused:
            return self._error(p.id, msg.ref, "invalid_field", refused)
        seconds = max(1, min(msg.seconds or 5, group.policy.max_talk_ms // 1000))
        return [
            ToUnit(target, m.RemoteTalk(tg=msg.tg, seconds=seconds, by=p.id)),
            ToUnit(p.id, m.Ok(op=msg.T, ref=msg.ref)),
            Audit(msg.T, f"{p.id} makes {target} talk in {msg.tg} for {seconds} s (ref {msg.ref})"),
        ]

    # --- private calls (docs/protocol.md, 11.14) ----------------------------------------

    def _private(
        self,
        p: UnitProfile,
        msg: m.PrivateCall | m.PrivateAnswer | m.PrivateTalk | m.PrivateEnd,
        now: float,
    ) -> list[Action]:
        calls = self.private
        try:
            match msg:
                case m.PrivateCall():
                    self._may_call(p, msg)
                    out = calls.setup(p.id, msg, now, self.online.__contains__)
                    made = calls.of_unit(p.id)
                    if made is not None and made.kind == "emergency":
                        what = f"{p.id} makes an emergency call to {msg.unit} (call {made.call})"
                        out.append(Audit("private_emergency", what))
                case m.PrivateAnswer():
                    out = calls.answer(p.id, msg, now)
                case m.PrivateTalk():
                    out = calls.talk(p.id, msg, now)
                case m.PrivateEnd():
                    out = calls.hang_up(p.id, msg)
        except NotYours as exc:
            cause: m.ErrorCause = "forbidden" if isinstance(exc, _Forbidden) else "invalid_field"
            return self._error(p.id, msg.ref, cause, str(exc))
        return self._private_done(out, now)

    def _may_call(self, p: UnitProfile, msg: m.PrivateCall) -> None:
        """Raise NotYours unless the unit may make this call: to another unit of the
        fleet, from a unit online; an emergency call from a dispatcher, to a dispatcher,
        or from a unit the fleet lets make them (`may`)."""
        callee = self.fleet.profile(msg.unit)
        if msg.unit == p.id or callee is None:
            raise NotYours(f"{msg.unit} is not another unit of the fleet")
        if p.id not in self.online:
            raise NotYours(f"{p.id} is not online: announce presence first")
        if msg.kind == "imminent":
            raise NotYours("a private call is normal or emergency")
        if msg.kind == "emergency" and not (
            p.is_dispatcher or callee.is_dispatcher or "emergency_private_call" in p.may
        ):
            raise _Forbidden(f"{p.id} may make emergency private calls to dispatchers only")

    def _private_done(self, out: list[Action], now: float) -> list[Action]:
        """After any private-call change: the records of the calls that changed marked,
        and an emergency call that just connected takes its callee off the group floors
        it holds at a lower priority (revoked before the call's news goes out)."""
        calls = self.private
        for callee in calls.changed:
            self._touch("unit", callee)
        calls.changed.clear()
        connected, calls.connected = calls.connected, []
        revoked: list[Action] = []
        for call in connected:
            if call.kind == "emergency" and calls.calls.get(call.call) is call:
                revoked += self._preempt_for(call.callee, now)
        return revoked + out

    def _preempt_for(self, callee: str, now: float) -> list[Action]:
        profile = self.fleet.profile(callee)
        if profile is None or profile.is_dispatcher:
            return []  # (a console answers the call beside its group talk)
        out: list[Action] = []
        for tg in sorted(self.affiliations.get(callee, ())):
            floor = self.floors.get(tg)
            if floor is not None:
                revoked = floor.preempt(callee, now)
                if revoked:
                    out += revoked
                    self._arm(floor)
                    self._touch("group", tg)
        return out

    def private_voice_to(self, unit: str, call: str, now: float) -> str | None:
        """The party a voice packet of `unit` in private call `call` goes to, if any."""
        return self.private.voice_to(unit, call, now)

    def status_msg(self, unit: str) -> m.UnitStatus | None:
        """The unit's last status as dispatchers are shown it, if it sent one."""
        if unit not in self.statuses:
            return None
        code, at = self.statuses[unit]
        text = self.fleet.statuses.get(code, str(code))
        return m.UnitStatus(code=code, unit=unit, text=text, ts=int(at * 1e9))

    def _emergency_ack(self, p: UnitProfile, msg: m.EmergencyAck, now: float) -> list[Action]:
        floor = self.floors.get(msg.tg)
        if floor is None or msg.unit not in floor.emergencies:
            return self._error(
                p.id, msg.ref, "invalid_field", f"{msg.unit} has no emergency in {msg.tg}"
            )
        floor.emergencies[msg.unit] = p.id
        self._touch("group", msg.tg)
        acked = m.EmergencyState(tg=msg.tg, state="acknowledged", by=p.id)
        return [
            ToUnit(msg.unit, acked),
            ToGroup(msg.tg, "event", replace(acked, unit=msg.unit)),  # (whose, for consoles)
            ToUnit(p.id, m.Ok(op=msg.T, ref=msg.ref)),
        ]

    def _force_release(self, p: UnitProfile, msg: m.ForceRelease, now: float) -> list[Action]:
        if msg.tg not in self.groups:
            return self._error(p.id, msg.ref, "invalid_field", f"unknown group {msg.tg}")
        floor = self._floor(msg.tg, now)
        out = floor.force_release(now)
        self._arm(floor)
        self._touch("group", msg.tg)
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
        floor = self._floor(msg.tg, now)
        floor.group = self.groups[msg.tg]  # (its members may have grown)
        out: list[Action] = []
        self._touch("group", msg.tg)
        for unit in (*dict.fromkeys(msg.units), p.id):
            self.affiliations.setdefault(unit, set()).add(msg.tg)
            self._touch("unit", unit)
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
                self._touch("unit", unit)
                out.append(ToUnit(unit, m.Ungrouped(tg=msg.tg)))
        del self.groups[msg.tg]
        self.floors.pop(msg.tg, None)
        self._touch("group", msg.tg)
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
        self._touch("group", tg)
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
            if stored:
                self._touch("sds", unit)
            return [ToUnit(unit, sds) for sds in stored]
        self.online.discard(unit)
        ended = [t for t, (by, _) in self.ambient.items() if unit in (t, by)]
        out: list[Action] = [a for t in ended for a in self._stop_listening(t, "offline", None)]
        out += self._private_done(self.private.offline(unit), now)
        if unit not in self.offline and len(self.offline) >= self.max_units:
            self.offline.pop()  # bounded: made-up ids going offline cannot grow it
        self.offline.add(unit)  # (a retained offline tells recovery a talker is gone)
        if unit in self.affiliations:
            self._touch("unit", unit)
        for tg in sorted(self.affiliations.pop(unit, set())):
            out += self._leave_floor(unit, tg, now)
        return out

    # --- sharing the work with other instances (a cluster) -----------------------------

    def adopt_affiliations(self, unit: str, groups: object, now: float) -> list[Action]:
        """Another instance (the unit's own) says which groups the unit is in: our view, for
        the floors we serve. Groups it may not join are left out; temporary groups are ours
        to say (a regroup here made them). A group it left lets go of the unit's floor."""
        if self.fleet.profile(unit) is None or not isinstance(groups, list):
            return self._reject("invalid_field")
        if unit not in self.affiliations and not self._room_for(unit, self.affiliations):
            return self._reject("too_many_units")  # (made-up ids cannot grow the view)
        had = self.affiliations.get(unit, set())
        mine = {tg for tg in had if tg in self.groups and self.groups[tg].temporary}
        told = {
            tg
            for tg in groups[:MAX_GROUPS_TOLD]
            if isinstance(tg, str) and tg in self.fleet.groups and self.groups[tg].admits(unit)
        }
        now_in = told | mine
        if now_in:
            self.affiliations[unit] = now_in
        else:
            self.affiliations.pop(unit, None)
        out: list[Action] = []
        for tg in sorted(had - now_in):
            out += self._leave_floor(unit, tg, now)
        return out

    def deliver_stored(self) -> list[Action]:
        """The short messages kept for units that are online (taken over from another
        instance, which kept them while the unit was away)."""
        out: list[Action] = []
        for unit in [u for u in self._sds_store if u in self.online]:
            stored = self._sds_store.pop(unit)
            self._stored_sds -= len(stored)
            self._touch("sds", unit)
            out += [ToUnit(unit, sds) for sds in stored]
        return out

    def forget(self, theirs: Callable[[str], bool]) -> None:
        """Another instance serves these now: drop the floors (and temporary groups) of the
        groups, and the kept answers and short messages of the units, for which `theirs`
        holds. What units are in which groups stays: it is a view of everyone's."""
        for tg in [tg for tg in self.floors if theirs(tg)]:
            del self.floors[tg]
            self._armed.pop(tg, None)  # (its heap entries are skipped from now on)
        for tg in [tg for tg, g in self.groups.items() if g.temporary and theirs(tg)]:
            del self.groups[tg]
        for unit in [u for u in self._answers if theirs(u)]:
            del self._answers[unit]
            self._guests.pop(unit, None)
        for unit in [u for u in self._sds_store if theirs(u)]:
            self._stored_sds -= len(self._sds_store.pop(unit))
        for unit in [u for u in self.statuses if theirs(u)]:
            del self.statuses[unit]
            self._guest_statuses.pop(unit, None)
        for unit in [u for u in self.ambient if theirs(u)]:
            del self.ambient[unit]
        self.private.forget(theirs)
        self.stored = {tg for tg in self.stored if not theirs(tg)}
        self.changed = {k for k in self.changed if not theirs(k.partition("/")[2])}

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
            self._touch("group", state.tg)
            return why
        floor.restore(state, now + self.wall_offset - state.since_ts / 1e9, now)
        if floor.holder is not None:
            self.affiliations.setdefault(floor.holder.unit, set()).add(state.tg)
            self._touch("unit", floor.holder.unit)
        self._arm(floor)
        self._touch("group", state.tg)
        return None

    def _restorable_talker(self, group: Talkgroup, state: m.State, now: float) -> str | None:
        try:  # (the same rank rules as a talker read back from the state file)
            self._check_rank(group, state.talker, state.prio or 0, state.kind or "normal")
        except ValueError as exc:
            return str(exc)
        if state.talker in self.offline:
            return f"{state.talker} has gone offline"
        age_s = now + self.wall_offset - state.since_ts / 1e9
        if not 0 <= age_s < group.policy.max_talk_ms / 1000:
            return "the grant is older than the talk time"
        return None

    # --- durable state ----------------------------------------------------------------

    def record_keys(self) -> set[str]:
        """The keys of every durable record there may be something under now."""
        return (
            {f"group/{tg}" for tg in self.floors}
            | {
                f"unit/{u}"
                for u in self.affiliations.keys()
                | self._answers.keys()
                | self.statuses.keys()
                | self.ambient.keys()
                | self.private.of.keys()
            }
            | {f"sds/{u}" for u in self._sds_store}
        )

    def record(self, key: str) -> object | None:
        """The durable record under `key` (one of `changed`) as it is now; None when there
        is nothing to keep. `group/TG`: the floor (and a temporary group's definition);
        `unit/ID`: affiliations, recent answers and last status; `sds/ID`: short data kept
        for it."""
        kind, _, ident = key.partition("/")
        if kind == "group":
            group = self.groups.get(ident)
            floor = self.floors.get(ident)
            if group is None or floor is None:
                return None
            saved = floor.record(self.wall_offset)
            if group.temporary:
                saved["temporary"] = [group.name, sorted(group.members)]
            return saved
        if kind == "unit":
            groups = sorted(self.affiliations.get(ident, ()))
            answers = self._answers.get(ident) or OrderedDict()
            status = self.statuses.get(ident)
            ambient = self.ambient.get(ident)
            private = self.private.record(ident)
            if not (groups or answers or status or ambient or private):
                return None
            kept: dict[str, Any] = {
                "groups": groups,
                "answers": [[r, d, a] for r, (d, a) in answers.items()],
            }
            if status is not None:
                kept["status"] = list(status)
            if ambient is not None:
                kept["ambient"] = list(ambient)
            if private is not None:
                kept["private"] = private
            return kept
        if kind == "sds":
            return list(self._sds_store.get(ident, ())) or None
        return None  # a kind this version does not keep (a newer one's?): deleted

    def load(self, records: Mapping[str, Any], now: float) -> list[str]:
        """Adopt the records a previous instance saved (`record`), checking each against
        the fleet and the protocol's ranges as if a stranger had written it, and return
        what was not adopted and why. A record not adopted (or in part) is marked changed,
        so the store is rewritten with what was. `settle` then does what fell due."""
        problems: list[str] = []
        order = {"group": 0, "unit": 1, "sds": 2}  # units and messages refer to groups
        for key in sorted(records, key=lambda k: (order.get(k.partition("/")[0], 3), k)):
            kind, _, ident = key.partition("/")
            try:
                if not is_id(ident):
                    raise ValueError(f"{ident!r} is not an id")
                if not isinstance(records[key], list if kind == "sds" else dict):
                    raise ValueError("not a record of its kind")
                if kind == "group":
                    self._load_group(ident, records[key], now)
                elif kind == "unit":
                    self._load_unit(ident, records[key], now)
                elif kind == "sds":
                    self._load_sds(ident, records[key])
                else:
                    raise ValueError("no such record kind")
            except (ValueError, TypeError, KeyError, IndexError) as exc:
                problems.append(f"{key}: {exc}")
                self.changed.add(key)
                record = records[key]
                shown = kind == "unit" and isinstance(record, dict) and "status" in record
                if shown and ident not in self.statuses and is_id(ident):
                    self._unstated.add(ident)  # (consoles may have been shown it: cleared)
        return problems

    def settle(self, now: float) -> list[Action]:
        """After loading and recovery: a floor whose talker was not kept (or went offline
        meanwhile) goes to the head of its queue, and a status not kept is cleared. Other
        due work is the timers' (at once)."""
        out: list[Action] = [StatusChanged(u) for u in sorted(self._unstated)]
        self._unstated.clear()
        for target, (by, call) in sorted(self.ambient.items()):  # (read back: still so?)
            if target in self.online and by in self.online:
                out.append(ToUnit(target, m.MicOpen(call=call)))  # (it may have restarted)
            else:
                out += self._stop_listening(target, "offline", None)
        out += self._private_done(self.private.settle(self.online.__contains__), now)
        for floor in self.floors.values():
            if floor.holder is None and floor.queue:
                out += floor.next_in_queue(now)
                self._arm(floor)
                self._touch("group", floor.tg)
        return out

    def _load_group(self, tg: str, rec: dict[str, Any], now: float) -> None:
        group = self._saved_group(tg, rec.get("temporary"))
        wall_now = now + self.wall_offset  # a time read back is never later than now
        policy = group.policy
        saved = Saved(
            seq=_int(rec["seq"], 0, MAX_RESTORED_SEQ),
            call=_opt_str(rec["call"]),
            call_until=min(_time(rec["call_until"]), wall_now + policy.hang_ms / 1000),
            since=min(_time(rec["since"]), wall_now),
            holder=None,
            queue=[],
            emergencies=[],
            perils=[],
        )
        why: list[str] = []
        if rec["holder"] is not None:
            try:
                unit, prio, kind, ref, granted, revoked = rec["holder"]
                self._check_rank(group, unit, prio, kind)
                # (a clock stepped back, or a forgery: no grant is later than now)
                at = min(_time(granted), wall_now)
                revoked_at = None if revoked is None else min(_time(revoked), wall_now)
                saved = replace(saved, holder=(unit, prio, kind, _ref(ref), at, revoked_at))
            except (ValueError, TypeError) as exc:
                why.append(f"talker not kept: {exc}")
        # (a forged record may list millions: only as many as could be real are read)
        for entry in _first(rec["queue"], policy.queue_depth + 1, why):
            try:
                unit, prio, kind, ref = entry
                self._check_rank(group, unit, prio, kind)
                if not (policy.queue and len(saved.queue) < policy.queue_depth):
                    raise ValueError("beyond the queue")
                if unit in {w[0] for w in saved.queue} or (saved.holder or ("",))[0] == unit:
                    raise ValueError(f"{unit} has the floor or a place already")
                saved.queue.append((unit, prio, kind, _ref(ref)))
            except (ValueError, TypeError) as exc:
                why.append(f"queue place not kept: {exc}")
        saved.queue.sort(key=lambda w: (-KIND_RANK[w[2]], -w[1]))  # (stable: arrival order)
        # (as many as could be real: the members and the fleet's dispatchers, or anyone)
        most = len(group.members) + len(self.fleet.units) if group.members else self.max_units
        for entry in _first(rec["emergencies"], most, why):
            try:
                unit, by = entry
                p = self.fleet.profile(unit) if isinstance(unit, str) else None
                acker = self.fleet.profile(by) if isinstance(by, str) else None
                if p is None or not (group.admits(p.id) or p.is_dispatcher):
                    raise ValueError(f"{unit} is not a member")
                if by is not None and (acker is None or not acker.is_dispatcher):
                    # (an emergency stays open: only who took charge of it is forgotten)
                    why.append(f"emergency of {unit} kept, unacknowledged: {by} is no dispatcher")
                    by = None
                saved.emergencies.append((unit, by))
            except (ValueError, TypeError) as exc:
                why.append(f"emergency not kept: {exc}")
        # (a record of a version before imminent peril has none)
        perils: dict[str, None] = {}  # (in order, once each)
        for unit in _first(rec.get("perils", []), most, why):
            p = self.fleet.profile(unit) if isinstance(unit, str) else None
            if p is None or not (group.admits(p.id) or p.is_dispatcher):
                why.append(f"imminent peril not kept: {unit} is not a member")
            elif group.broadcast and not p.is_dispatcher:
                why.append(f"imminent peril not kept: {unit} may not talk in {tg}")
            else:
                perils[p.id] = None
        saved.perils.extend(perils)
        self.groups[tg] = group
        floor = self.floors[tg] = Floor(group, self._new_call_id, now)
        floor.load(saved, self.wall_offset, now)
        self._arm(floor)
        self.stored.add(tg)
        if why:  # adopted in part: say what was not (the first few)
            more = f"; and {len(why) - 3} more" if len(why) > 3 else ""
            raise ValueError("; ".join(why[:3]) + more)

    def _saved_group(self, tg: str, temporary: Any) -> Talkgroup:
        """The group a record is of: one of the fleet's, or a temporary one it defines."""
        if temporary is None:
            group = self.groups.get(tg)
            if group is None or group.temporary:
                raise ValueError("no such group in the fleet")
            return group
        name, members = temporary
        if tg in self.fleet.groups:
            raise ValueError("a static group has this id")
        if not isinstance(name, str) or not 0 < len(name) <= 64:
            raise ValueError("a temporary group's name must be 1-64 characters")
        unknown = [u for u in members if not isinstance(u, str) or self.fleet.profile(u) is None]
        if unknown:
            raise ValueError(f"{unknown[0]} is not a unit of the fleet")
        return Talkgroup(tg, name, frozenset(members), False, self.fleet.defaults, temporary=True)

    def _check_rank(self, group: Talkgroup, unit: object, prio: object, kind: object) -> None:
        """Raise unless `unit` may hold (or wait for) the group's floor at this rank."""
        profile = self.fleet.profile(unit) if isinstance(unit, str) else None
        if profile is None:
            raise ValueError(f"{unit} is not a unit of the fleet")
        if not group.admits(profile.id):
            raise ValueError(f"{unit} is not a member of {group.id}")
        if group.broadcast and not profile.is_dispatcher:
            raise ValueError(f"{unit} may not talk in receive-only {group.id}")
        if kind not in KIND_RANK:
            raise ValueError(f"no such kind {kind!r}")
        if type(prio) is not int or not 0 <= prio <= profile.priority:
            raise ValueError(f"priority {prio!r} is not within {unit}'s 0-{profile.priority}")

    def _load_unit(self, unit: str, rec: dict[str, Any], now: float) -> None:
        if self.fleet.profile(unit) is None:
            raise ValueError("not a unit of the fleet")
        groups = {tg for tg in rec["groups"] if tg in self.groups and self.groups[tg].admits(unit)}
        if groups:
            self.affiliations.setdefault(unit, set()).update(groups)
        answers: OrderedDict[int, tuple[bytes, m.Message]] = OrderedDict()
        malformed = 0
        for entry in rec["answers"][-ANSWERS_KEPT:]:
            ref, digest, answer = entry
            if isinstance(digest, bytes) and isinstance(answer, m.Message) and ref is not None:
                answers[_ref(ref)] = (digest, answer)  # type: ignore[index]
            else:
                malformed += 1
        if answers and unit not in self.fleet.units:
            if len(self._guests) >= self.max_units:
                raise ValueError("more units not of the fleet than the server tracks")
            self._guests[unit] = None
        if answers:
            self._answers[unit] = answers
        why: list[str] = []
        if malformed or len(groups) != len(rec["groups"]):
            why.append("groups it may no longer join, or malformed answers, dropped")
        status = rec.get("status")
        if status is not None:
            try:
                self._load_status(unit, status, now)
            except (ValueError, TypeError) as exc:
                why.append(f"status not kept: {exc}")
        ambient = rec.get("ambient")
        if ambient is not None:
            by, call = ambient if isinstance(ambient, list) and len(ambient) == 2 else ("", None)
            listener = self.fleet.profile(by) if isinstance(by, str) else None
            target = self.fleet.profile(unit)
            held = sum(b == by for b, _ in self.ambient.values())
            if listener is None or "ambient_listening" not in listener.may:
                why.append(f"listening in not kept: {by!r} may not listen in")
            elif by == unit or target is None or target.is_dispatcher or held >= MAX_LISTENED:
                why.append(f"listening in not kept: {by} may not listen to {unit} now")
            elif not isinstance(call, str) or not 0 < len(call) <= 64:
                why.append(f"listening in not kept: {call!r} is not a call id")
            else:
                self.ambient[unit] = (by, call)
        if rec.get("private") is not None:
            try:
                self.private.load(unit, rec["private"], now, self._is_unit)
            except (ValueError, TypeError) as exc:
                why.append(f"private call not kept: {exc}")
        if why:
            raise ValueError("; ".join(why))

    def _load_status(self, unit: str, status: object, now: float) -> None:
        if not isinstance(status, list) or len(status) != 2:
            raise ValueError("not a [code, time] pair")
        code, at = status
        if type(code) is not int or code not in self.fleet.statuses:
            raise ValueError(f"{code!r} is not a status of the fleet (any more)")
        if unit not in self.fleet.units:
            if len(self._guest_statuses) >= self.max_units:
                raise ValueError("more units not of the fleet than the server tracks")
            self._guest_statuses[unit] = None
        # (a clock stepped back, or a forgery: no status was sent later than now)
        self.statuses[unit] = (code, min(_time(at), now + self.wall_offset))

    def _load_sds(self, unit: str, rec: list[Any]) -> None:
        if self.fleet.profile(unit) is None:
            raise ValueError("not a unit of the fleet")
        store = self._sds_store.setdefault(unit, deque(maxlen=SDS_STORE))
        why: list[str] = []
        for sds in rec[-SDS_STORE:]:  # each on its own: one bad message costs no other
            if not isinstance(sds, m.Sds) or sds.sender is None:
                why.append("not a short message")
            elif self.fleet.profile(sds.sender) is None:
                why.append(f"one sent by {sds.sender}, not a unit of the fleet")
            elif self._stored_sds >= SDS_STORED_IN_ALL:
                why.append("beyond the messages kept in all")
            else:
                store.append(sds)
                self._stored_sds += 1
        if not store:
            del self._sds_store[unit]
        if why:
            raise ValueError(f"{len(why)} not kept: {why[0]}")

    def _touch(self, kind: str, ident: str) -> None:
        self.changed.add(f"{kind}/{ident}")

    # --- timers -----------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        floors = self._timers[0][0] if self._timers else None
        calls = self.private.next_deadline()
        return calls if floors is None else floors if calls is None else min(floors, calls)

    def on_timer(self, now: float) -> list[Action]:
        out: list[Action] = self._private_done(self.private.on_timer(now), now)
        while self._timers and self._timers[0][0] <= now:
            at, tg = heapq.heappop(self._timers)
            if self._armed.get(tg) != at:
                continue  # superseded by an earlier wake-up for the same group
            del self._armed[tg]
            floor = self.floors.get(tg)
            if floor is not None:
                out += floor.on_timer(now)
                self._arm(floor)
                self._touch("group", tg)
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
        self._touch("group", tg)
        return out

    def _is_unit(self, unit: str) -> bool:
        return self.fleet.profile(unit) is not None

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


class _Forbidden(NotYours):
    """Refused for want of a right the fleet grants (`error forbidden`)."""


def _first(items: Any, n: int, why: list[str]) -> list[Any]:
    """The first `n` of a list read back, noting in `why` how many more were not read."""
    if not isinstance(items, list):
        raise TypeError("not a list")
    if len(items) > n:
        why.append(f"{len(items) - n} entries beyond any real count not read")
    return items[:n]


def _int(value: object, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:
        raise ValueError(f"{value!r} is not an integer in {low}..{high}")
    return value


def _ref(value: object) -> int | None:
    """A ref as the codec admits it (any 64-bit integer), or None."""
    return None if value is None else _int(value, -(2**63), 2**64 - 1)


def _time(value: object) -> float:
    """A Unix time in seconds, finite and not before 1970 nor after the year 5000."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ValueError(f"{value!r} is not a time")
    if not 0 <= value <= 1e11:  # (NaN and infinities fail too)
        raise ValueError(f"{value!r} is not a time")
    return float(value)


def _opt_str(value: object) -> str | None:
    if value is not None and (not isinstance(value, str) or len(value) > 64):
        raise ValueError(f"{value!r} is not a call id")
    return value


# message type -> the per-unit rate limit it counts against (any other: "control")
_LIMITED: dict[type[m.Message], str] = {
    m.Location: "location",
    m.Sds: "sds",
    m.UnitStatus: "status",
    m.EmergencyAlert: "emergency",
    m.EmergencyCancel: "emergency",
    m.ImminentCancel: "emergency",
    m.PrivateCall: "call",
    m.PrivateTalk: "floor",
    m.EmergencyAck: "command",
    m.ForceRelease: "command",
    m.Regroup: "command",
    m.Ungroup: "command",
}

# commands only a unit of role dispatcher may give
_DISPATCHER_ONLY = frozenset({m.EmergencyAck, m.ForceRelease, m.Regroup, m.Ungroup})
