"""Load-test scenario files (TOML): who connects, how they talk, what must hold.

`load_scenario` returns a validated `Scenario` or raises `ScenarioError` naming the bad
key, so a typo costs a one-line message, not a wasted run. The traffic model defaults to
the call-log figures NIST's MCPTT model uses: mean talk burst 4.69 s, mean session 8.58 s,
exponential gaps.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any

from esn.kpi import END_TO_END_ACCESS, FLOOR_ACCESS, LATE_ENTRY, MOUTH_TO_EAR
from esn.tomlfile import find_file, read_toml


class ScenarioError(ValueError):
    """The scenario file is invalid; the message is one line naming the key."""


@dataclass(frozen=True)
class Run:
    name: str = "scenario"
    duration_s: float = 60.0
    ramp_per_s: float = 200.0  # new connections per second, over all workers
    workers: int = 0  # 0: one per core
    mqtt_client: str = "gmqtt"
    seed: int = 1
    broker: str = ""  # empty: start an embedded Mosquitto
    server: bool = True  # start our own server (with the fleet below)
    # a 3-node NATS cluster on loopback with one server instance per node, the handsets
    # spread over the nodes (docs/scaling.md)
    cluster: bool = False
    # besides access.csv, write messages.csv and floor.csv: every control and floor message
    # of every handset, and each floor state change (docs/traces.md); large at scale
    full_trace: bool = False
    # write a profile of each worker (profile-N.pstats and its summary, profile-N.txt):
    # cProfile, which slows the workers, so the run's figures are not the ones to quote
    profile: bool = False


@dataclass(frozen=True)
class FleetShape:
    handsets: int = 200
    dispatchers: int = 1
    talkgroups: int = 10
    multi_group_fraction: float = 0.1  # of handsets, also affiliated to a second group
    # of handsets, scanning 2-4 groups by priority, hearing one call at a time (the rest)
    scan_fraction: float = 0.0
    fleet_file: str = ""  # a fleet file for the server; empty: generated from this shape


@dataclass(frozen=True)
class Traffic:
    mean_talk_s: float = 4.69
    mean_session_s: float = 8.58
    activity: float = 0.3  # share of the time a group is in a session
    second_speaker: float = 0.2  # chance a burst has a competing press (queuing)
    location_interval_s: float = 10.0
    emergencies_per_min: float = 0.5
    preemptions_per_min: float = 0.5
    imminent_per_min: float = 0.5  # imminent-peril calls, each cancelled half-way through
    listen_ins_per_min: float = 0.5  # a dispatcher listening in on a handset for 3 s
    remote_talks_per_min: float = 0.5  # a dispatcher making a handset talk for 2 s
    statuses_per_min: float = 10.0  # pre-coded status messages, over the whole fleet
    private_calls_per_min: float = 1.0  # a handset calling another alone, 2 s each way
    late_joiners: int = 5
    media_interval_s: float = 0.06


@dataclass(frozen=True)
class Thresholds:
    """By default the TS 22.179 targets (esn/kpi.py)."""

    floor_access_p95_ms: float = FLOOR_ACCESS.target_ms  # KPI 1
    private_setup_p95_ms: float = END_TO_END_ACCESS.target_ms  # KPI 2
    mouth_to_ear_p95_ms: float = MOUTH_TO_EAR.target_ms  # KPI 3
    late_entry_p95_ms: float = LATE_ENTRY.target_ms  # KPI 4
    connect_failures: int = 0


@dataclass(frozen=True)
class Scenario:
    run: Run = field(default_factory=Run)
    fleet: FleetShape = field(default_factory=FleetShape)
    traffic: Traffic = field(default_factory=Traffic)
    thresholds: Thresholds = field(default_factory=Thresholds)
    path: str = ""
    overrides: tuple[str, ...] = ()  # the --set of this run, as given

    @property
    def workers(self) -> int:
        return self.run.workers or os.cpu_count() or 1


_SECTIONS = {"run": Run, "fleet": FleetShape, "traffic": Traffic, "thresholds": Thresholds}


def _section(name: str, cls: type, table: object) -> Any:
    if not isinstance(table, dict):
        raise ScenarioError(f"[{name}] must be a table")
    known = {f.name: f for f in fields(cls)}
    values: dict[str, Any] = {}
    value: Any
    for key, value in table.items():
        f = known.get(key)
        if f is None:
            raise ScenarioError(f"[{name}] unknown key {key!r} (known: {', '.join(known)})")
        want: Any = type(f.default)
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, want) or (want is not bool and isinstance(value, bool)):
            raise ScenarioError(f"[{name}] {key} must be {want.__name__}, got {value!r}")
        if want in (int, float) and value < 0:
            raise ScenarioError(f"[{name}] {key} must not be negative, got {value}")
        values[key] = value
    return cls(**values)


def parse_scenario(doc: dict[str, Any], path: str = "") -> Scenario:
    unknown = set(doc) - set(_SECTIONS)
    if unknown:
        raise ScenarioError(
            f"unknown section [{sorted(unknown)[0]}] (known: {', '.join(_SECTIONS)})"
        )
    parts = {name: _section(name, cls, doc.get(name, {})) for name, cls in _SECTIONS.items()}
    s = Scenario(path=path, **parts)
    checks = [
        (s.run.duration_s > 0, "[run] duration_s must be above 0"),
        (s.run.ramp_per_s > 0, "[run] ramp_per_s must be above 0"),
        (s.run.mqtt_client in ("gmqtt", "paho"), "[run] mqtt_client must be gmqtt or paho"),
        (s.fleet.talkgroups >= 1, "[fleet] talkgroups must be at least 1"),
        (
            s.fleet.handsets >= 2 * s.fleet.talkgroups,
            "[fleet] handsets must be at least two per talkgroup",
        ),
        (s.fleet.multi_group_fraction <= 1, "[fleet] multi_group_fraction must be within 0..1"),
        (
            s.fleet.multi_group_fraction + s.fleet.scan_fraction <= 1,
            "[fleet] multi_group_fraction and scan_fraction must add up to at most 1",
        ),
        (0 < s.traffic.activity < 1, "[traffic] activity must be between 0 and 1"),
        (
            s.traffic.mean_talk_s > 0 and s.traffic.mean_session_s >= s.traffic.mean_talk_s,
            "[traffic] mean_session_s must be at least mean_talk_s, both above 0",
        ),
        (s.traffic.media_interval_s > 0, "[traffic] media_interval_s must be above 0"),
        (s.traffic.location_interval_s > 0, "[traffic] location_interval_s must be above 0"),
        (s.traffic.second_speaker <= 1, "[traffic] second_speaker must be within 0..1"),
        (
            s.traffic.late_joiners < s.fleet.handsets,
            "[traffic] late_joiners must be fewer than the handsets",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ScenarioError(message)
    if s.run.cluster and (s.run.broker or not s.run.server):
        raise ScenarioError("[run] cluster starts its own brokers and servers: no broker, server")
    if s.fleet.fleet_file and not s.run.server:
        raise ScenarioError("[fleet] fleet_file is for our own server; set [run] server = true")
    return s


SHIPPED = Path(str(resources.files("esn.loadtest").joinpath("scenarios")))


def find_scenario(name: str | Path) -> Path:
    """A scenario file by path, or one the package ships by name (`city`, `ci-small`)."""
    return find_file(name, SHIPPED)


def load_scenario(path: str | Path, overrides: Sequence[str] = ()) -> Scenario:
    """Read a scenario; `overrides` like "fleet.handsets=5000" change it for one run."""
    path = find_scenario(path)
    doc = read_toml(path, "scenario", ScenarioError)
    for item in overrides:
        key, eq, raw = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not (eq and dot and section and name):
            raise ScenarioError(f"override {item!r} must look like section.key=value")
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()  # a bare word is a string
        doc.setdefault(section, {})[name] = value
    return replace(parse_scenario(doc, str(path)), overrides=tuple(overrides))
