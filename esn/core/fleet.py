"""The fleet file (TOML): talkgroups, units, roles, priorities, floor timers and the
pre-coded status messages units may send.

`parse_fleet` turns the parsed TOML document into frozen value objects or raises `FleetError`
with a one-line reason naming the offending key, so `esn server` can refuse a bad file
before it touches the broker.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from esn.core.limits import Rate
from esn.protocol.ids import is_id

# per-unit rate limits by message class; the [limits] table overrides them
# Every message a unit sends falls in one class, so none can make the server answer it more
# than (rate + one refusal) times a second.
DEFAULT_LIMITS = {
    "floor": Rate(per_s=5.0, burst=20.0),  # floor requests (PTT presses and their retries)
    "control": Rate(per_s=10.0, burst=40.0),  # affiliation, release, queue_status, the rest
    "emergency": Rate(per_s=1.0, burst=5.0),  # alerts and cancels (an alert fans out)
    "command": Rate(per_s=10.0, burst=40.0),  # dispatcher commands
    "location": Rate(per_s=2.0, burst=5.0),
    "sds": Rate(per_s=1.0, burst=5.0),
    "status": Rate(per_s=1.0, burst=5.0),  # pre-coded status messages
    "call": Rate(per_s=1.0, burst=5.0),  # private calls set up (each may ring a unit)
}

# the pre-coded statuses of a fleet file without [[status]] tables (TETRA-style numbers)
DEFAULT_STATUSES = {
    1: "available",
    2: "en route",
    3: "at scene",
    4: "busy",
    5: "returning",
    6: "request to talk",
    7: "off duty",
}
MAX_STATUSES = 256
MAX_STATUS_CODE = 65535  # a TETRA status number is 16 bits


class FleetError(ValueError):
    """The fleet file is invalid; the message is one line a person can act on."""


@dataclass(frozen=True, slots=True)
class Policy:
    """Per-group floor timers (ms) and queueing; the fleet file's [defaults]."""

    max_talk_ms: int = 30000  # T2
    revoke_grace_ms: int = 1000  # T3
    end_of_media_ms: int = 4000  # T1
    hang_ms: int = 4000
    queue: bool = True
    queue_depth: int = 8
    preempt_threshold: int = 200


@dataclass(frozen=True, slots=True)
class Talkgroup:
    id: str
    name: str = ""
    members: frozenset[str] = frozenset()  # empty: any unit may affiliate
    broadcast: bool = False
    policy: Policy = Policy()
    temporary: bool = False

    def admits(self, unit: str) -> bool:
        return not self.members or unit in self.members


# what a unit may do beyond talking, only where the fleet file says so (`may = [...]`)
MAY = ("ambient_listening", "remote_talk", "emergency_private_call")


@dataclass(frozen=True, slots=True)
class UnitProfile:
    id: str
    role: str = "handset"
    priority: int = 100
    may: frozenset[str] = frozenset()  # of MAY

    @property
    def is_dispatcher(self) -> bool:
        return self.role == "dispatcher"


@dataclass(frozen=True, slots=True)
class Fleet:
    groups: dict[str, Talkgroup] = field(default_factory=dict)
    units: dict[str, UnitProfile] = field(default_factory=dict)
    defaults: Policy = Policy()
    unit_priority: int = 100
    open_registration: bool = True
    limits: dict[str, Rate] = field(default_factory=lambda: dict(DEFAULT_LIMITS))
    statuses: dict[int, str] = field(default_factory=lambda: dict(DEFAULT_STATUSES))

    def profile(self, unit: str) -> UnitProfile | None:
        """The unit's profile, or None when it is not registered and registration is closed."""
        found = self.units.get(unit)
        if found is None and self.open_registration:
            return UnitProfile(unit, "handset", self.unit_priority)
        return found


_POLICY_TYPES: dict[str, type] = {
    "max_talk_ms": int,
    "revoke_grace_ms": int,
    "end_of_media_ms": int,
    "hang_ms": int,
    "queue": bool,
    "queue_depth": int,
    "preempt_threshold": int,
}
_DEFAULT_KEYS = {**_POLICY_TYPES, "unit_priority": int, "open_registration": bool}
_GROUP_KEYS = {"id": str, "name": str, "members": list, "broadcast": bool, **_POLICY_TYPES}
_UNIT_KEYS = {"id": str, "role": str, "priority": int, "may": list}
_STATUS_KEYS = {"code": int, "text": str}


def _checked(where: str, table: object, allowed: dict[str, type]) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise FleetError(f"{where}: must be a table")
    for key, value in table.items():
        want = allowed.get(key)
        if want is None:
            raise FleetError(f"{where}: unknown key {key!r}")
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise FleetError(f"{where}.{key}: must be {want.__name__}, got {value!r}")
        if want is int:
            _check_range(f"{where}.{key}", key, value)
    return table


# the least value of a policy key; a timer must also fit the wire's max_ms (2^31 - 1 ms)
_LEAST = {"queue_depth": 1, "max_talk_ms": 1, "end_of_media_ms": 1}
_MOST_MS = 2**31 - 1


def _check_range(where: str, key: str, value: Any) -> None:
    if key in ("priority", "unit_priority", "preempt_threshold") and not 0 <= value <= 255:
        raise FleetError(f"{where}: must be within 0..255, got {value}")
    least = _LEAST.get(key, 0)
    if key in _POLICY_TYPES and value < least:
        raise FleetError(f"{where}: must be at least {least}, got {value}")
    if key.endswith("_ms") and value > _MOST_MS:
        raise FleetError(f"{where}: must be at most {_MOST_MS} (about 24 days), got {value}")


def _policy(base: Policy, table: dict[str, Any]) -> Policy:
    return replace(base, **{k: v for k, v in table.items() if k in _POLICY_TYPES})


def parse_fleet(doc: dict[str, Any]) -> Fleet:
    unknown = set(doc) - {"defaults", "talkgroup", "unit", "limits", "status"}
    if unknown:
        raise FleetError(f"unknown top-level key {sorted(unknown)[0]!r}")
    defaults = _checked("defaults", doc.get("defaults", {}), _DEFAULT_KEYS)
    policy = _policy(Policy(), defaults)
    groups: dict[str, Talkgroup] = {}
    for i, raw in enumerate(doc.get("talkgroup", [])):
        g = _checked(f"talkgroup[{i}]", raw, _GROUP_KEYS)
        gid = g.get("id", "")
        if not is_id(gid):
            raise FleetError(f"talkgroup[{i}].id: must be an id [A-Za-z0-9_.-]{{1,64}}")
        if gid in groups:
            raise FleetError(f"talkgroup[{i}].id: {gid!r} is defined twice")
        members = g.get("members", [])
        if not all(is_id(x) for x in members):
            raise FleetError(f"talkgroup {gid!r}: members must be unit ids")
        groups[gid] = Talkgroup(
            gid,
            g.get("name", gid),
            frozenset(members),
            g.get("broadcast", False),
            _policy(policy, g),
        )
    units: dict[str, UnitProfile] = {}
    prio = defaults.get("unit_priority", 100)
    for i, raw in enumerate(doc.get("unit", [])):
        u = _checked(f"unit[{i}]", raw, _UNIT_KEYS)
        uid = u.get("id", "")
        if not is_id(uid):
            raise FleetError(f"unit[{i}].id: must be an id [A-Za-z0-9_.-]{{1,64}}")
        if uid in units:
            raise FleetError(f"unit[{i}].id: {uid!r} is defined twice")
        role = u.get("role", "handset")
        if role not in ("handset", "dispatcher"):
            raise FleetError(f"unit {uid!r}: role must be 'handset' or 'dispatcher'")
        may = u.get("may", [])
        if not all(isinstance(x, str) and x in MAY for x in may):
            raise FleetError(f"unit {uid!r}: may lists only {', '.join(MAY)}")
        units[uid] = UnitProfile(uid, role, u.get("priority", prio), frozenset(may))
    limits = _limits(doc.get("limits", {}))
    statuses = _statuses(doc.get("status"))
    registration = defaults.get("open_registration", True)
    return Fleet(groups, units, policy, prio, registration, limits, statuses)


def _statuses(tables: object) -> dict[int, str]:
    """The `[[status]]` tables: `code` (0..65535) and `text` (1..64 characters), each code
    once; none at all: the defaults."""
    if tables is None:
        return dict(DEFAULT_STATUSES)
    if not isinstance(tables, list) or len(tables) > MAX_STATUSES:
        raise FleetError(f"status: must be [[status]] tables, at most {MAX_STATUSES}")
    statuses: dict[int, str] = {}
    for i, raw in enumerate(tables):
        s = _checked(f"status[{i}]", raw, _STATUS_KEYS)
        if set(s) != {"code", "text"}:
            raise FleetError(f"status[{i}]: needs both code and text")
        code, text = s["code"], s["text"].strip()
        if not 0 <= code <= MAX_STATUS_CODE:
            raise FleetError(f"status[{i}].code: must be within 0..{MAX_STATUS_CODE}, got {code}")
        if not 0 < len(text) <= 64 or not text.isprintable():
            raise FleetError(f"status[{i}].text: must be 1-64 printable characters")
        if code in statuses:
            raise FleetError(f"status[{i}].code: {code} is defined twice")
        statuses[code] = text
    return statuses


def _limits(table: object) -> dict[str, Rate]:
    if not isinstance(table, dict):
        raise FleetError("limits: must be a table")
    limits = dict(DEFAULT_LIMITS)
    for kind, spec in table.items():
        if kind not in DEFAULT_LIMITS:
            raise FleetError(f"limits: unknown kind {kind!r} (one of {', '.join(DEFAULT_LIMITS)})")
        if not isinstance(spec, dict) or set(spec) - {"per_s", "burst"}:
            raise FleetError(f"limits.{kind}: must be {{ per_s = N, burst = N }}")
        rate = replace(limits[kind], **spec)
        for name in ("per_s", "burst"):
            value = getattr(rate, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise FleetError(f"limits.{kind}.{name}: must be a number above 0")
        limits[kind] = Rate(float(rate.per_s), max(1.0, float(rate.burst)))
    return limits
