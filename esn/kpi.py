"""The targets every part of the project judges latency by: the four KPIs of 3GPP TS 22.179
for mission-critical push to talk, each met when 95 % of samples are under it.

The demo, the load test (its default thresholds and report), the Grafana dashboards and
the Prometheus alert rules all take them from here; a test holds the alert rules to them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Kpi:
    number: int
    key: str  # its name in the load test's result.json and thresholds (`KEY_p95_ms`)
    name: str
    measured: str  # from what to what, as this project measures it
    target_ms: float
    quantile: float = 0.95

    @property
    def target_s(self) -> float:
        return self.target_ms / 1000

    def label(self) -> str:
        return f"KPI {self.number} {self.name}"


FLOOR_ACCESS = Kpi(1, "floor_access", "floor access", "PTT press to granted", 300)
END_TO_END_ACCESS = Kpi(
    2,
    "private_setup",
    "end-to-end access",
    "private call placed to connected, automatic answer (the call set up included)",
    1000,
)
MOUTH_TO_EAR = Kpi(3, "mouth_to_ear", "mouth-to-ear", "talker's timestamp to a listener", 300)
LATE_ENTRY = Kpi(4, "late_entry", "late entry", "affiliating mid-call to its first voice", 150)
KPIS = (FLOOR_ACCESS, END_TO_END_ACCESS, MOUTH_TO_EAR, LATE_ENTRY)
BY_KEY = {k.key: k for k in KPIS}
