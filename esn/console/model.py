"""What the dispatcher's screen knows: groups, units, positions and the event log.

Fed with decoded protocol messages and the topic they came on; no I/O, no widgets, so the
console's logic is tested without a terminal. Every update is idempotent: a retained
message seen again, or a duplicate delivery, changes nothing.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from esn.protocol import messages as m
from esn.protocol.ids import is_id
from esn.server.hotspots import REPEAT_S, WINDOW_S


@dataclass
class GroupRow:
    tg: str
    floor: str = "idle"
    talker: str | None = None
    kind: str | None = None
    prio: int | None = None
    queue: int = 0
    call: str | None = None
    since: float | None = None  # wall clock of the current grant, for the call timer
    emergency: bool = False
    emergency_unit: str | None = None  # the last unit to raise one
    sos_units: set[str] = field(default_factory=set)  # units shown in emergency here
    acked: dict[str, str] = field(default_factory=dict)  # unit -> who acknowledged its SOS
    imminent: bool = False  # in imminent peril (docs/protocol.md, 11.12)
    monitored: bool = False
    temporary: bool = False
    seq: int = -1
    logged: int = -1  # the last grant logged (its `taken` may come after the state)


@dataclass
class UnitRow:
    unit: str
    presence: str = "?"
    groups: set[str] = field(default_factory=set)  # where it was seen talking or regrouped
    lat: float | None = None
    lon: float | None = None
    spd: float | None = None
    located_at: float | None = None  # wall clock of the last position
    emergency: set[str] = field(default_factory=set)  # groups it raised an emergency in
    status: str | None = None  # its last pre-coded status, in the fleet's words
    status_code: int | None = None
    status_at: float | None = None  # wall clock the server took it at


@dataclass(frozen=True)
class Incident:
    """An emergency or imminent-peril call raised, where its unit was: for the hotspots."""

    at: float
    unit: str
    kind: str
    lat: float
    lon: float


@dataclass(frozen=True)
class Event:
    at: float
    tg: str | None
    text: str
    alarm: bool = False


CAUSES = {
    "busy": "the floor is busy and the group does not queue",
    "queue_full": "the queue is full",
    "receive_only": "the group is receive-only",
    "not_affiliated": "not affiliated to the group",
    "unknown_group": "no such group",
    "rate_limited": "too many requests, slow down",
    "not_queued": "not in the queue",
    "forbidden": "not allowed for this unit",
    "invalid_field": "the server refused a field",
    "malformed": "the server could not read the message",
    "unknown_type": "the server does not know this message",
    "too_large": "the message is too large",
    "preempted": "pre-empted by a higher priority",
    "max_talk_time": "talk time is up",
    "no_media": "no voice for too long",
    "dispatcher": "released by a dispatcher",
}


# how a private call ended (docs/protocol.md, 11.14)
CALL_ENDS = {
    "busy": "the unit is in another call",
    "no_answer": "no answer",
    "offline": "the unit is offline",
    "rejected": "the call was refused",
    "hung_up": "hung up",
    "inactive": "nothing said for too long",
    "preempted": "an emergency call took its place",
}


MAX_SEQ = 2**40  # a group's event count beyond this is a forgery (as the server reads it)


def say(cause: str) -> str:
    return CAUSES.get(cause, cause)


class ConsoleModel:
    def __init__(
        self, prefix: str = "esn", max_events: int = 2000, names: dict[str, str] | None = None
    ) -> None:
        self.prefix = prefix
        self.names = names or {}  # talkgroup id -> its name in the fleet file
        self.groups: dict[str, GroupRow] = {}
        self.units: dict[str, UnitRow] = {}
        self.events: deque[Event] = deque(maxlen=max_events)
        self.incidents: deque[Incident] = deque(maxlen=max_events)
        self._raised: dict[tuple[str, str], float] = {}  # (unit, kind) -> last seen
        self.server_state = "unknown"
        self.server_started: int | None = None
        self.version = 0  # bumped on every change, so the screen redraws only when needed

    def group(self, tg: str) -> GroupRow:
        return self.groups.setdefault(tg, GroupRow(tg))

    def name(self, tg: str) -> str:
        """A talkgroup as the dispatcher knows it: its fleet name, else its id."""
        return self.names.get(tg, tg)

    def unit(self, unit: str) -> UnitRow:
        return self.units.setdefault(unit, UnitRow(unit))

    def log(self, tg: str | None, text: str, alarm: bool = False, at: float | None = None) -> None:
        self.events.append(Event(at if at is not None else time.time(), tg, text, alarm))
        self.version += 1

    def hotspots(self, now: float | None = None) -> list[Incident]:
        """The incidents of the last WINDOW_S seconds (the server's window)."""
        since = (time.time() if now is None else now) - WINDOW_S
        return [i for i in self.incidents if i.at >= since]

    def _incident(self, unit: str, kind: str, lat: float | None, lon: float | None) -> None:
        u = self.unit(unit)
        if lat is None or lon is None:
            lat, lon = u.lat, u.lon
        now, key = time.time(), (unit, kind)
        last = self._raised.get(key)  # (as the server counts: one per unit and kind a minute)
        if (last is not None and now - last < REPEAT_S) or lat is None or lon is None:
            return
        if len(self._raised) >= 10_000:
            self._raised = {k: t for k, t in self._raised.items() if now - t < REPEAT_S}
        self._raised[key] = now
        self.incidents.append(Incident(now, unit, kind, lat, lon))

    def apply(self, topic: str, msg: m.Message, history: bool = False) -> None:
        """`history`: a retained message handed over on subscribing, not news."""
        match msg:
            case m.State():
                self._on_state(topic, msg, history)
            case m.Taken():
                self._on_taken(topic, msg)
            case m.Idle():
                self._on_idle(topic, msg)
            case m.Emergency():
                self._on_emergency(topic, msg)
            case m.EmergencyCancel():
                self._on_emergency_cancel(topic, msg)
            case m.EmergencyState():
                self._on_emergency_state(topic, msg)
            case m.ImminentCancel():
                self.log(msg.tg, f"imminent peril cancelled by {msg.unit}")
            case m.Presence():
                self._on_presence(topic, msg)
            case m.Location():
                self._on_location(topic, msg)
            case m.Sds():
                self._on_sds(topic, msg)
            case m.Regrouped():
                self._on_regrouped(topic, msg)
            case m.Ungrouped():
                self._on_ungrouped(topic, msg)
            case m.Status():
                self._on_status(topic, msg)
            case m.UnitStatus():
                self._on_unit_status(topic, msg, history)
            case _:
                return
        self.version += 1

    # --- per message type -------------------------------------------------------------

    def _on_state(self, topic: str, msg: m.State, history: bool = False) -> None:
        if msg.seq > MAX_SEQ:
            return
        g = self.group(msg.tg)
        news = msg.seq > g.seq and not history  # (a grant its `taken` did not tell first)
        g.floor, g.talker, g.kind, g.prio, g.queue = (
            msg.floor,
            msg.talker,
            msg.kind,
            msg.prio,
            msg.queue,
        )
        g.call, g.emergency, g.seq = msg.call, msg.emergency, max(g.seq, msg.seq)
        g.imminent = bool(msg.imminent)
        g.since = msg.since_ts / 1e9 if msg.floor == "taken" else None
        if not msg.emergency:  # (ended: cancelled, or force-released by a dispatcher)
            self._emergency_over(g)
        if msg.talker:
            self.unit(msg.talker).groups.add(msg.tg)
            if news and msg.kind in ("emergency", "imminent"):  # (it may overtake the taken)
                self._incident(msg.talker, msg.kind, None, None)

    def _on_taken(self, topic: str, msg: m.Taken) -> None:
        g = self.group(msg.tg)
        if msg.seq <= g.logged or msg.seq > MAX_SEQ:
            return  # a duplicate (or a forgery: no group counts that far)
        g.logged = msg.seq
        if msg.seq > g.seq:  # (else the group's state told it first: only the log is due)
            g.seq, g.floor, g.talker, g.kind, g.prio, g.call = (
                msg.seq,
                "taken",
                msg.talker,
                msg.kind,
                msg.prio,
                msg.call,
            )
            g.since = time.time()
            self.unit(msg.talker).groups.add(msg.tg)
            if msg.kind != "normal":
                self._incident(msg.talker, msg.kind, None, None)
        label = "" if msg.kind == "normal" else f" ({msg.kind})"
        cut = f", pre-empting {msg.preempted}" if msg.preempted else ""
        self.log(
            msg.tg,
            f"{msg.talker} talks{label}, prio {msg.prio}{cut}",
            alarm=msg.kind == "emergency",
        )

    def _on_idle(self, topic: str, msg: m.Idle) -> None:
        g = self.group(msg.tg)
        if msg.seq <= g.seq or msg.seq > MAX_SEQ:
            return
        g.seq, g.floor, g.talker, g.since = msg.seq, "idle", None, None
        self.log(msg.tg, "floor idle")

    def _on_emergency(self, topic: str, msg: m.Emergency) -> None:
        g = self.group(msg.tg)
        if g.emergency_unit == msg.unit and g.emergency:
            return
        g.emergency, g.emergency_unit = True, msg.unit
        g.sos_units.add(msg.unit)
        u = self.unit(msg.unit)
        u.emergency.add(msg.tg)
        if msg.lat is not None and msg.lon is not None:
            u.lat, u.lon, u.located_at = msg.lat, msg.lon, time.time()
        self._incident(msg.unit, "emergency", msg.lat, msg.lon)
        self.log(msg.tg, f"EMERGENCY raised by {msg.unit}", alarm=True)

    def _on_emergency_cancel(self, topic: str, msg: m.EmergencyCancel) -> None:
        g = self.group(msg.tg)
        if msg.unit:
            self.unit(msg.unit).emergency.discard(msg.tg)
            g.sos_units.discard(msg.unit)
            g.acked.pop(msg.unit, None)
        if g.emergency_unit == msg.unit:
            g.emergency_unit = next(iter(g.sos_units), None)
        self.log(msg.tg, f"emergency cancelled by {msg.unit}")

    def _emergency_over(self, g: GroupRow) -> None:
        """The group is out of emergency: none of its units is shown in one there now."""
        for unit in g.sos_units:
            if unit in self.units:
                self.units[unit].emergency.discard(g.tg)
        g.sos_units.clear()
        g.acked.clear()
        g.emergency_unit = None

    def acked_by(self, g: GroupRow, unit: str | None) -> str | None:
        return g.acked.get(unit) if unit else None

    def _on_emergency_state(self, topic: str, msg: m.EmergencyState) -> None:
        if msg.state != "acknowledged" or "/down/event" not in topic or not msg.by:
            return
        g = self.group(msg.tg)
        unit = msg.unit or g.emergency_unit  # (a server of before 11.3's `unit`: the last one)
        if unit is None or unit not in g.sos_units or g.acked.get(unit) == msg.by:
            return  # (no emergency of that unit here, or told already)
        g.acked[unit] = msg.by
        self.log(msg.tg, f"emergency of {unit} acknowledged by {msg.by}")

    def _on_presence(self, topic: str, msg: m.Presence) -> None:
        unit = topic.split("/")[-2]
        if not is_id(unit) or msg.state not in ("online", "offline"):
            return  # (not a presence the protocol has: the server ignores it too)
        u = self.unit(unit)
        if u.presence != msg.state:
            if u.presence != "?":
                self.log(None, f"{unit} {msg.state}")
            u.presence = msg.state

    def _on_location(self, topic: str, msg: m.Location) -> None:
        u = self.unit(msg.unit or topic.rsplit("/", 1)[-1])
        u.lat, u.lon, u.spd = msg.lat, msg.lon, msg.spd
        u.located_at = msg.ts / 1e9 if msg.ts else time.time()

    def _on_unit_status(self, topic: str, msg: m.UnitStatus, history: bool) -> None:
        if msg.unit is None or not topic.endswith(f"/unit/{msg.unit}/status"):
            return  # (only the server's copy, on the unit's own status topic, counts)
        u = self.unit(msg.unit)
        at = msg.ts / 1e9 if msg.ts else time.time()
        if u.status_at is not None and at <= u.status_at:
            return  # seen already, or older than the one shown
        if not history:
            self.log(None, f"{msg.unit} status {msg.code}: {msg.text}", at=at)
        u.status, u.status_code, u.status_at = msg.text or str(msg.code), msg.code, at

    def cleared(self, topic: str) -> None:
        """A retained message was removed: a unit's status the server no longer keeps."""
        parts = topic.split("/")
        u = self.units.get(parts[-2]) if len(parts) > 2 and parts[-1] == "status" else None
        if u is not None and parts[-3] == "unit" and u.status is not None:
            u.status = u.status_code = u.status_at = None
            self.version += 1

    def _on_sds(self, topic: str, msg: m.Sds) -> None:
        tg = msg.to.partition(":")[2] if msg.to.startswith("tg:") else None
        self.log(tg, f"SDS {msg.sender} → {msg.to}: {msg.text}")

    def _on_regrouped(self, topic: str, msg: m.Regrouped) -> None:
        g = self.group(msg.tg)
        if not g.temporary:
            g.temporary = True
            self.log(msg.tg, f"temporary group {msg.name or msg.tg} formed")

    def _on_ungrouped(self, topic: str, msg: m.Ungrouped) -> None:
        if msg.tg in self.groups:
            del self.groups[msg.tg]
            for u in self.units.values():
                u.groups.discard(msg.tg)
            self.log(msg.tg, "temporary group dissolved")

    def _on_status(self, topic: str, msg: m.Status) -> None:
        if (msg.state, msg.started_ts) != (self.server_state, self.server_started):
            self.server_state, self.server_started = msg.state, msg.started_ts
            self.log(None, f"server {msg.state}", alarm=msg.state != "online")
