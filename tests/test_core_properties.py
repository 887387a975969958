"""Property-based tests of the floor invariants, as the units themselves would see them.

A stateful model drives the core with random requests, releases, media, presence changes,
dispatcher force-releases and the passing of time, and tracks what every unit was told.
"""

from __future__ import annotations

import itertools

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from esn.core.actions import Action, ToGroup, ToUnit
from esn.core.fleet import parse_fleet
from esn.core.floor import KIND_RANK
from esn.core.network import Network
from esn.protocol import messages as m
from esn.store import pack, unpack

UNITS = ["u1", "u2", "u3", "u4", "disp"]
GROUPS = ["g1", "g2"]
FLEET = parse_fleet(
    {
        "defaults": {
            "max_talk_ms": 3000,
            "revoke_grace_ms": 500,
            "end_of_media_ms": 1500,
            "hang_ms": 1000,
            "queue_depth": 3,
            "preempt_threshold": 150,
        },
        "talkgroup": [{"id": "g1"}, {"id": "g2", "queue": False}],
        "unit": [
            {"id": "u1", "priority": 50},
            {"id": "u2", "priority": 160},
            {"id": "u3", "priority": 255},
            {"id": "disp", "role": "dispatcher", "priority": 250},
        ],
        # rate limits have their own tests; here every request must be decided
        "limits": {
            k: {"per_s": 1e6, "burst": 1e6} for k in ("floor", "control", "command", "emergency")
        },
    }
)

units = st.sampled_from(UNITS)
groups = st.sampled_from(GROUPS)
kinds = st.sampled_from(["normal", "normal", "imminent", "emergency"])


class FloorMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.net = Network(FLEET)
        self.now = 0.0
        self.affiliated: dict[str, set[str]] = {u: set() for u in UNITS}
        self.offline: set[str] = set()
        # what each unit believes: it holds the floor of tg / its told queue position
        self.believes_holding: dict[str, set[str]] = {g: set() for g in GROUPS}
        self.told_pos: dict[tuple[str, str], int] = {}
        self.refs = itertools.count(1)
        self.saved: dict[str, bytes] = {}  # the store: records by key

    def apply(self, actions: list[Action]) -> None:
        for a in actions:
            if isinstance(a, ToUnit):
                msg = a.msg
                if isinstance(msg, m.Granted):
                    assert a.unit not in self.offline, "granted to an offline unit"
                    assert msg.tg in self.affiliated[a.unit], "granted to an unaffiliated unit"
                    self.believes_holding[msg.tg].add(a.unit)
                    self.told_pos.pop((a.unit, msg.tg), None)
                elif isinstance(msg, m.Revoke):
                    self.believes_holding[msg.tg].discard(a.unit)
                elif isinstance(msg, m.Queued):
                    self.told_pos[(a.unit, msg.tg)] = msg.pos
            elif isinstance(a, ToGroup) and isinstance(a.msg, m.Idle):
                self.believes_holding[a.tg].clear()
            elif isinstance(a, ToGroup) and isinstance(a.msg, m.Taken):
                self.believes_holding[a.tg] &= {a.msg.talker}

    @rule(unit=units, tgs=st.sets(groups, min_size=1))
    def affiliate(self, unit: str, tgs: set[str]) -> None:
        self.offline.discard(unit)
        self.apply(self.net.presence(unit, m.Presence(state="online"), self.now))
        self.apply(self.net.unit_message(unit, m.Affiliate(groups=sorted(tgs)), self.now))
        self.affiliated[unit] |= tgs

    @rule(unit=units, tg=groups, kind=kinds, prio=st.integers(0, 255) | st.none())
    def request(self, unit: str, tg: str, kind: m.Kind, prio: int | None) -> None:
        floor = self.net.floors.get(tg)
        holder = floor.holder if floor else None
        out = self.net.floor_message(unit, tg, m.Request(kind=kind, prio=prio), self.now)
        self.apply(out)
        if (
            kind == "emergency"
            and holder is not None
            and holder.kind == "normal"
            and tg in self.affiliated[unit]
        ):
            assert self.net.floors[tg].holder.unit == unit, "emergency lost to a normal holder"  # type: ignore[union-attr]

    @rule(unit=units, tg=groups)
    def release(self, unit: str, tg: str) -> None:
        self.believes_holding[tg].discard(unit)
        self.told_pos.pop((unit, tg), None)
        self.apply(self.net.floor_message(unit, tg, m.Release(), self.now))

    @rule(unit=units)
    def go_offline(self, unit: str) -> None:
        self.offline.add(unit)
        self.affiliated[unit] = set()
        for g in GROUPS:
            self.believes_holding[g].discard(unit)
            self.told_pos.pop((unit, g), None)
        self.apply(self.net.presence(unit, m.Presence(state="offline"), self.now))

    @rule(unit=units, tg=groups)
    def media(self, unit: str, tg: str) -> None:
        relayed = self.net.media_drop_reason(unit, tg, self.now) is None
        floor = self.net.floors.get(tg)
        if relayed:
            assert floor is not None and floor.holder is not None and floor.holder.unit == unit
            assert floor.holder.revoked_at is None

    @rule(tg=groups)
    def force_release(self, tg: str) -> None:
        self.apply(self.net.unit_message("disp", m.ForceRelease(tg=tg), self.now))

    @rule(unit=units, tg=groups, ack=st.booleans())
    def emergency(self, unit: str, tg: str, ack: bool) -> None:
        self.apply(self.net.unit_message(unit, m.EmergencyAlert(tg=tg, ref=next(self.refs)), 0))
        if ack:
            ack_msg = m.EmergencyAck(tg=tg, unit=unit, ref=next(self.refs))
            self.apply(self.net.unit_message("disp", ack_msg, self.now))

    @rule(unit=units, tg=groups, imminent=st.booleans())
    def cancel(self, unit: str, tg: str, imminent: bool) -> None:
        """A unit (or the dispatcher) cancels an emergency or an imminent peril: a talker
        whose own imminent peril was cancelled talks on at normal, in the same call, and
        one whose talk time is up is not told it may talk."""
        floor = self.net.floors.get(tg)
        h = floor.holder if floor else None
        held = (h.unit, h.kind, h.revoked_at, floor.call) if h and floor else None
        msg: m.Message = (m.ImminentCancel if imminent else m.EmergencyCancel)(
            tg=tg, ref=next(self.refs)
        )
        out = self.net.unit_message(unit, msg, self.now)
        self.apply(out)
        accepted = any(isinstance(a, ToUnit) and isinstance(a.msg, m.Ok) for a in out)
        if held and not imminent:  # v1: an emergency's cancel leaves the call's kind be
            after = self.net.floors[tg].holder
            assert after is not None and after.kind == held[1]
        if held and accepted and held[1] == "imminent" and unit in (held[0], "disp"):
            after = self.net.floors[tg].holder
            assert after is not None and (after.unit, after.kind) == (held[0], "normal")
            assert self.net.floors[tg].call == held[3]
            granted = [a for a in out if isinstance(a, ToUnit) and isinstance(a.msg, m.Granted)]
            assert len(granted) == (held[2] is None), "granted after its talk time was up"

    @rule()
    def restart(self) -> None:
        """The server restarts: a new instance takes up the records the old one saved,
        as the store encodes them, and goes on exactly where the old one was."""
        old = self.net
        for key in old.changed:  # what the shell writes after each step, in one go
            record = old.record(key)
            if record is None:
                self.saved.pop(key, None)
            else:
                self.saved[key] = pack(record)
        old.changed.clear()
        self.net = Network(FLEET)
        problems = self.net.load({k: unpack(v) for k, v in self.saved.items()}, self.now)
        assert problems == [] and self.net.settle(self.now) == []
        for key in self.saved:
            assert self.net.record(key) == old.record(key)
        for unit in sorted(old.online):  # the retained presence, read again
            self.net.presence(unit, m.Presence(state="online"), self.now)

    @rule(dt=st.floats(0.01, 4.0))
    def time_passes(self, dt: float) -> None:
        self.now += dt
        self.apply(self.net.on_timer(self.now))

    @invariant()
    def at_most_one_holder_and_everyone_agrees(self) -> None:
        for tg in GROUPS:
            believers = self.believes_holding[tg]
            assert len(believers) <= 1, f"{tg}: {believers} all think they hold the floor"
            floor = self.net.floors.get(tg)
            holder = floor.holder if floor else None
            if holder is not None and holder.revoked_at is None:
                assert believers == {holder.unit}
            elif holder is None:
                assert not believers

    @invariant()
    def queue_in_priority_order_and_positions_told(self) -> None:
        for tg, floor in self.net.floors.items():
            keys = [(-KIND_RANK[w.kind], -w.prio, w.arrival) for w in floor.queue]
            assert keys == sorted(keys)
            assert len(floor.queue) <= floor.group.policy.queue_depth
            for pos, w in enumerate(floor.queue, 1):
                assert self.told_pos.get((w.unit, tg)) == pos
                assert w.unit not in self.offline

    @invariant()
    def never_in_emergency_and_imminent_peril_at_once(self) -> None:
        for tg, floor in self.net.floors.items():
            assert not (floor.emergencies and floor.perils), f"{tg}: both"
            state = floor.state_msg(0.0)
            assert state.emergency == bool(floor.emergencies)
            assert bool(state.imminent) == bool(floor.perils)

    @invariant()
    def no_floor_deadline_is_missed(self) -> None:
        for floor in self.net.floors.values():
            deadline = floor.next_deadline()
            if deadline is not None:
                wake = self.net.next_deadline()
                assert wake is not None and wake <= deadline


FloorMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=60, deadline=None)
TestFloorInvariants = FloorMachine.TestCase
