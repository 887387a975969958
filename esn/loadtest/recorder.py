"""Latency recording for an open-loop generator, in HdrHistograms (microseconds).

Every action has a planned time. Its latency is recorded twice: from the planned time
(what a user who pressed PTT at that moment experienced, including any time the generator
itself was late — the correction for coordinated omission) and from the moment it was
actually sent (what the system under test took). When the two differ much, the generator
was the bottleneck, and the report says so.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field

from hdrh.histogram import HdrHistogram

LOWEST_US, HIGHEST_US, DIGITS = 1, 600_000_000, 3  # 1 µs .. 10 min, 3 significant digits
LATE_S = 0.010  # an action started later than this behind plan is a schedule overrun

KPIS = (
    "floor_access",
    "floor_access_sent",
    "mouth_to_ear",
    "late_entry",
    "scan_entry",
    "private_setup",
    "connect",
    "loop_lag",
    "gc_pause",
)


def new_histogram() -> HdrHistogram:
    return HdrHistogram(LOWEST_US, HIGHEST_US, DIGITS)


def record_s(h: HdrHistogram, seconds: float) -> None:
    h.record_value(min(HIGHEST_US, max(LOWEST_US, round(seconds * 1e6))))


@dataclass
class Recorder:
    hist: dict[str, HdrHistogram] = field(
        default_factory=lambda: {k: new_histogram() for k in KPIS}
    )
    counts: dict[str, int] = field(default_factory=dict)
    actions: int = 0
    overruns: int = 0

    def count(self, what: str, n: int = 1) -> None:
        self.counts[what] = self.counts.get(what, 0) + n

    def started(self, planned: float, sent: float) -> None:
        """An open-loop action left at `sent`; it was due at `planned`."""
        self.actions += 1
        if sent - planned > LATE_S:
            self.overruns += 1

    def completed(self, kpi: str, planned: float, sent: float, done: float) -> None:
        """Record one action's latency from its plan (corrected) and from its send."""
        record_s(self.hist[kpi], done - planned)
        record_s(self.hist[f"{kpi}_sent"], done - sent)

    def observe(self, kpi: str, seconds: float) -> None:
        record_s(self.hist[kpi], seconds)

    # the handset's Observer interface (access is measured by the generator itself)
    def access(self, seconds: float, kind: str) -> None:
        pass

    def mouth_to_ear(self, seconds: float) -> None:
        record_s(self.hist["mouth_to_ear"], seconds)

    def late_entry(self, seconds: float) -> None:
        record_s(self.hist["late_entry"], seconds)

    def scan_entry(self, seconds: float) -> None:
        record_s(self.hist["scan_entry"], seconds)

    def encode(self) -> dict[str, str]:
        return {k: base64.b64encode(h.encode()).decode() for k, h in self.hist.items()}


def decode(encoded: str) -> HdrHistogram:
    return HdrHistogram.decode(base64.b64decode(encoded))


def merge(parts: list[dict[str, str]]) -> dict[str, HdrHistogram]:
    """Per-worker encoded histograms -> one histogram per KPI."""
    out = {k: new_histogram() for k in KPIS}
    for part in parts:
        for k, enc in part.items():
            out[k].add(decode(enc))
    return out


def summary_ms(h: HdrHistogram) -> dict[str, float]:
    n = h.get_total_count()
    if n == 0:
        return {"n": 0}
    at = {f"p{q:g}": h.get_value_at_percentile(q) / 1000 for q in (50, 90, 95, 99, 99.9)}
    return {"n": n, **at, "max": h.get_max_value() / 1000, "mean": h.get_mean_value() / 1000}


SPECTRUM = (0, 10, 25, 50, 75, 90, 95, 97.5, 99, 99.5, 99.9, 99.95, 99.99, 99.999, 100)


def spectrum_ms(h: HdrHistogram) -> list[tuple[float, float]]:
    """(percentile, ms) points for a percentile-spectrum plot."""
    if h.get_total_count() == 0:
        return []
    return [(q, h.get_value_at_percentile(q) / 1000) for q in SPECTRUM]
