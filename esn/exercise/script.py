"""Reading an exercise file: every key checked, every mistake told in one line that names
the table and the key, before anything starts (docs/exercises.md has the format)."""

from __future__ import annotations

import functools
import math
import unicodedata
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from esn.core.fleet import Fleet, FleetError, parse_fleet
from esn.protocol.ids import is_id
from esn.tomlfile import find_file, read_toml

# each kind of event, and the keys it takes besides `at`, `do` and `note`
KEYS: dict[str, set[str]] = {
    "sos": {"unit", "group", "call_s", "repeat_s", "within_s"},
    "talk": {"unit", "group", "seconds", "answer", "repeat_s", "within_s"},
    "sds": {"unit", "to", "text", "answer", "repeat_s", "within_s"},
    "status": {"unit", "code", "answer", "repeat_s", "within_s"},
    "move": {"unit", "units", "to", "speed_mps"},
    "busy": {"group", "seconds"},
    "offline": {"unit"},
    "regroup_request": {"unit", "units", "text", "repeat_s", "within_s"},
}
KINDS = tuple(KEYS)
MAX_UNITS = 500  # field units an exercise may have (one process simulates them all)
MAX_EVENTS = 1000


class ExerciseError(ValueError):
    """The exercise file is invalid; the message is one line naming the place."""


@dataclass(frozen=True)
class Crew:
    group: str
    units: tuple[str, ...]
    near: tuple[float, float]
    spread_m: float


@dataclass(frozen=True)
class Event:
    n: int  # its number in the file, from 1
    at: float
    do: str
    unit: str | None = None
    units: tuple[str, ...] = ()
    group: str | None = None
    seconds: float = 4.0
    call_s: float = 0.0
    text: str = ""
    to: str = ""
    code: int = 0
    target: tuple[float, float] | None = None
    speed_mps: float = 15.0
    answer: bool = False  # whether it waits on the dispatcher
    repeat_s: float = 60.0  # asked again after this long without an answer
    within_s: float = 60.0  # answered later than this is late
    note: str = ""

    def label(self) -> str:
        """What happens, in a few words, for the timeline and the debrief."""
        who = self.unit or ", ".join(self.units)
        return {
            "sos": f"{who} raises an SOS in {self.group}"
            + (f" and calls for {self.call_s:g} s" if self.call_s else ""),
            "talk": f"{who} talks in {self.group} for {self.seconds:g} s",
            "sds": f"{who} sends an SDS to {self.to}: {self.text!r}",
            "status": f"{who} reports status {self.code} ({self.text})",
            "move": f"{who} heading for {_place(self.target)}",
            "busy": f"{self.group} gets busy for {self.seconds:g} s",
            "offline": f"{who} goes silent (offline)",
            "regroup_request": f"{who} asks for {', '.join(self.units)} in one group",
        }[self.do] + (f" — {self.note}" if self.note else "")

    def asks(self) -> str:
        """What the dispatcher is expected to do about it."""
        if self.do == "sos":
            return f"acknowledge {self.unit}'s SOS in {self.group}"
        if self.do == "regroup_request":
            return f"regroup {', '.join(self.units)}"
        return f"answer {self.unit} ({self.do})"


@dataclass(frozen=True)
class Exercise:
    name: str
    brief: str
    trainee: str
    duration_s: float
    fleet_doc: dict[str, Any]
    fleet: Fleet
    crews: tuple[Crew, ...]
    events: tuple[Event, ...]
    talk_mean_s: float = 4.0
    gap_mean_s: float = 20.0
    traffic_groups: tuple[str, ...] = ()
    location_interval_s: float = 10.0
    seed: int = 1

    @functools.cached_property
    def home(self) -> dict[str, str]:
        """Each field unit's crew's group."""
        return _homes(self.crews)


SHIPPED = Path(str(resources.files("esn.exercise").joinpath("shipped")))


def shipped_names() -> list[str]:
    return sorted(p.stem for p in SHIPPED.glob("*.toml"))


def find_exercise(name: str | Path) -> Path:
    """An exercise file by path, or one the package ships by name (`flood`, ...)."""
    return find_file(name, SHIPPED)


def load_exercise(name: str | Path) -> Exercise:
    path = find_exercise(name)
    doc = read_toml(path, "exercise", ExerciseError)
    return parse_exercise(doc, path.parent)


def parse_exercise(doc: dict[str, Any], folder: Path = Path(".")) -> Exercise:
    _only(doc, {"exercise", "fleet", "crew", "traffic", "event"}, "the file")
    head = _table(doc, "exercise")
    _only(head, {"name", "brief", "trainee", "duration_s", "answer_within_s", "seed"}, "[exercise]")
    name = _text(head, "name", "[exercise]", required=True)
    trainee = _text(head, "trainee", "[exercise]") or "disp-1"
    duration = _number(head, "duration_s", "[exercise]", 600.0, 1, 86_400)
    within = _number(head, "answer_within_s", "[exercise]", 60.0, 1, 86_400)
    seed = head.get("seed", 1)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ExerciseError(f"[exercise] seed: want a whole number, got {seed!r}")

    fleet_doc = _fleet_doc(doc.get("fleet"), folder)
    units = fleet_doc.setdefault("unit", [])
    if not isinstance(units, list):
        raise ExerciseError("[fleet] unit: want an array of tables")
    if not any(isinstance(u, dict) and u.get("id") == trainee for u in units):
        units.append({"id": trainee, "role": "dispatcher", "priority": 250})
    try:
        fleet = parse_fleet(fleet_doc)
    except FleetError as exc:
        raise ExerciseError(f"[fleet]: {exc}") from None
    if trainee not in fleet.units or fleet.units[trainee].role != "dispatcher":
        raise ExerciseError(f"[exercise] trainee {trainee!r}: not a dispatcher in the fleet")

    crews = _crews(doc.get("crew"), fleet)
    home = _homes(crews)
    if len(home) != sum(len(c.units) for c in crews):
        raise ExerciseError("[[crew]]: a unit is in two crews")
    if trainee in home or any(
        u in fleet.units and fleet.units[u].role == "dispatcher" for u in home
    ):
        raise ExerciseError("[[crew]]: a field unit is a dispatcher in the fleet")
    if len(home) > MAX_UNITS:
        raise ExerciseError(f"[[crew]]: {len(home)} field units, at most {MAX_UNITS}")
    if not fleet.open_registration:
        missing = sorted(u for u in home if u not in fleet.units)
        if missing:
            raise ExerciseError(f"[[crew]]: {missing[0]} is not in the fleet (registration closed)")

    traffic = _table(doc, "traffic")
    _only(traffic, {"groups", "talk_mean_s", "gap_mean_s", "location_interval_s"}, "[traffic]")
    groups = traffic.get("groups", sorted({c.group for c in crews}))
    known = isinstance(groups, list) and all(isinstance(g, str) for g in groups)
    if not known or not all(g in fleet.groups for g in groups):
        raise ExerciseError(f"[traffic] groups: want talkgroups of the fleet, got {groups!r}")
    events = tuple(
        _event(i, e, fleet, home, trainee, within, duration)
        for i, e in enumerate(_tables(doc, "event"), 1)
    )
    if len(events) > MAX_EVENTS:
        raise ExerciseError(f"[[event]]: {len(events)} events, at most {MAX_EVENTS}")
    return Exercise(
        name=name,
        brief=_text(head, "brief", "[exercise]"),
        trainee=trainee,
        duration_s=duration,
        fleet_doc=fleet_doc,
        fleet=fleet,
        crews=crews,
        events=tuple(sorted(events, key=lambda e: (e.at, e.n))),
        talk_mean_s=_number(traffic, "talk_mean_s", "[traffic]", 4.0, 0.5, 60),
        gap_mean_s=_number(traffic, "gap_mean_s", "[traffic]", 20.0, 0.5, 3600),
        traffic_groups=tuple(groups),
        location_interval_s=_number(traffic, "location_interval_s", "[traffic]", 10.0, 1, 3600),
        seed=seed,
    )


def _homes(crews: tuple[Crew, ...]) -> dict[str, str]:
    return {u: c.group for c in crews for u in c.units}


def _fleet_doc(value: object, folder: Path) -> dict[str, Any]:
    if isinstance(value, str):  # a fleet file, beside the exercise
        doc = read_toml(folder / value, "fleet file", ExerciseError)
        return dict(doc)
    if isinstance(value, dict):
        return {k: list(v) if isinstance(v, list) else v for k, v in value.items()}
    raise ExerciseError("[fleet]: want a table (a fleet, as in a fleet file) or a file name")


def _crews(tables: object, fleet: Fleet) -> tuple[Crew, ...]:
    if not isinstance(tables, list) or not tables:
        raise ExerciseError("[[crew]]: want at least one crew of field units")
    crews = []
    for i, t in enumerate(tables, 1):
        where = f"crew {i}"
        if not isinstance(t, dict):
            raise ExerciseError(f"{where}: want a table")
        _only(t, {"group", "ids", "count", "prefix", "near", "spread_m"}, where)
        group = _text(t, "group", where, required=True)
        if group not in fleet.groups:
            raise ExerciseError(f"{where} group: {group!r} is not a talkgroup of the fleet")
        if "ids" in t:
            ids = t["ids"]
            if not isinstance(ids, list) or not ids or not all(is_id(u) for u in ids):
                raise ExerciseError(f"{where} ids: want a list of unit ids, got {ids!r}")
        else:
            count, prefix = t.get("count"), _text(t, "prefix", where) or group
            if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= MAX_UNITS:
                raise ExerciseError(f"{where}: want ids = [...] or count = 1..{MAX_UNITS}")
            ids = [f"{prefix}-{k:02d}" for k in range(1, count + 1)]
            if not all(is_id(u) for u in ids):
                raise ExerciseError(f"{where} prefix: {prefix!r} makes no valid unit id")
        near = _point(t.get("near", [51.5072, -0.1276]), f"{where} near")
        spread = _number(t, "spread_m", where, 1500.0, 0, 100_000)
        crews.append(Crew(group, tuple(ids), near, spread))
    return tuple(crews)


def _event(
    n: int,
    t: dict[str, Any],
    fleet: Fleet,
    home: dict[str, str],
    trainee: str,
    within: float,
    duration: float,
) -> Event:
    do = t.get("do")
    where = f"event {n}"
    if do not in KINDS:
        raise ExerciseError(f"{where} do: want one of {', '.join(KINDS)}, got {do!r}")
    where = f"event {n} ({do})"
    _only(t, KEYS[do] | {"at", "do", "note"}, where)
    if "at" not in t:
        raise ExerciseError(f"{where}: want `at`, the seconds from the start")
    at = _number(t, "at", where, 0.0, 0, duration)
    if at >= duration:
        raise ExerciseError(f"{where} at: {at:g} s is not before the end ({duration:g} s)")
    kw: dict[str, Any] = {"n": n, "at": at, "do": do, "note": _text(t, "note", where)}
    unit = t.get("unit")
    if unit is not None and (not isinstance(unit, str) or unit not in home):
        raise ExerciseError(f"{where} unit: {unit!r} is not a field unit of a crew")
    units = t.get("units")
    if units is not None:
        known = isinstance(units, list) and all(isinstance(u, str) and u in home for u in units)
        if not known or not units:
            raise ExerciseError(f"{where} units: want field units of the crews, got {units!r}")
        kw["units"] = tuple(units)
    if do != "busy" and unit is None and not (do == "move" and units):
        raise ExerciseError(f"{where}: want `unit`, the field unit it happens to")
    kw["unit"] = unit
    group = t.get("group", home.get(unit or ""))
    known_group = isinstance(group, str) and group in fleet.groups
    if not known_group and (do in ("sos", "talk", "busy") or "group" in t):
        raise ExerciseError(f"{where} group: want a talkgroup of the fleet, got {group!r}")
    members = fleet.groups[str(group)].members if known_group else frozenset()
    if members and unit and unit not in members:  # (the server would refuse it, every time)
        raise ExerciseError(f"{where} group: {unit} is not a member of {group}")
    kw["group"] = group
    kw["seconds"] = _number(t, "seconds", where, 60.0 if do == "busy" else 4.0, 0.5, 3600)
    kw["call_s"] = _number(t, "call_s", where, 0.0, 0, 60)
    kw["speed_mps"] = _number(t, "speed_mps", where, 15.0, 0.5, 100)
    kw["repeat_s"] = _number(t, "repeat_s", where, 20.0 if do == "sos" else 60.0, 1, 3600)
    kw["within_s"] = _number(t, "within_s", where, within, 1, 86_400)
    answer = t.get("answer", do in ("sos", "sds", "regroup_request"))
    if not isinstance(answer, bool):
        raise ExerciseError(f"{where} answer: want true or false, got {answer!r}")
    kw["answer"] = answer or do in ("sos", "regroup_request")
    if do == "sds":
        kw["text"] = _text(t, "text", where, required=True)
        to = t.get("to", f"unit:{trainee}")
        kind, _, target = str(to).partition(":")
        if not (kind == "unit" and is_id(target)) and not (kind == "tg" and target in fleet.groups):
            raise ExerciseError(f'{where} to: want "unit:ID" or "tg:GROUP", got {to!r}')
        kw["to"] = to
    if do == "status":
        code = t.get("code")
        if not isinstance(code, int) or isinstance(code, bool) or code not in fleet.statuses:
            raise ExerciseError(f"{where} code: want a status code of the fleet, got {code!r}")
        kw["code"], kw["text"] = code, fleet.statuses[code]
    if do == "move":
        if "to" not in t:
            raise ExerciseError(f"{where}: want `to`, the [lat, lon] to head for")
        kw["target"] = _point(t["to"], f"{where} to")
        kw["units"] = tuple(units or [unit])
    if do == "regroup_request":
        if not units or len(set(units)) < 2:
            raise ExerciseError(f"{where} units: want two or more field units to regroup")
        kw["text"] = _text(t, "text", where) or f"request: {', '.join(units)} in one group"
    if len(kw.get("text", "").encode()) > 900:
        raise ExerciseError(f"{where} text: at most 900 bytes (an SDS carries 1,000)")
    return Event(**kw)


def _only(table: dict[str, Any], allowed: set[str], where: str) -> None:
    for key in table:
        if key not in allowed:
            raise ExerciseError(f"{where}: unknown key {key!r}")


def _table(doc: dict[str, Any], key: str) -> dict[str, Any]:
    value = doc.get(key, {})
    if not isinstance(value, dict):
        raise ExerciseError(f"[{key}]: want a table")
    return value


def _tables(doc: dict[str, Any], key: str) -> list[dict[str, Any]]:
    value = doc.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ExerciseError(f"[[{key}]]: want an array of tables")
    return value


def _text(t: dict[str, Any], key: str, where: str, required: bool = False) -> str:
    value = t.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or not value.strip():
        raise ExerciseError(f"{where} {key}: want some text, got {value!r}")
    if any(unicodedata.category(c) == "Cc" and c not in "\n\t" for c in value):
        raise ExerciseError(f"{where} {key}: control characters are not allowed")
    return value.strip()


def _number(t: dict[str, Any], key: str, where: str, default: float, lo: float, hi: float) -> float:
    value = t.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ExerciseError(f"{where} {key}: want a number, got {value!r}")
    if not lo <= value <= hi:
        raise ExerciseError(f"{where} {key}: want {lo:g} to {hi:g}, got {value!r}")
    return float(value)


def _point(value: object, where: str) -> tuple[float, float]:
    if isinstance(value, list) and len(value) == 2:
        lat, lon = value
        numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
        if numbers and -90 <= lat <= 90 and -180 <= lon <= 180:
            return (float(lat), float(lon))
    raise ExerciseError(f"{where}: want [lat, lon] in degrees, got {value!r}")


def _place(p: tuple[float, float] | None) -> str:
    return "?" if p is None else f"{p[0]:.4f},{p[1]:.4f}"
