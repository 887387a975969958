"""What the users of simulated handsets notice, exported for Grafana's end-to-end KPIs."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram

from esn.exporter import BUCKETS


class HandsetMetrics:
    """What the users of simulated handsets notice, for Grafana's end-to-end KPIs."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.late_entry_s = Histogram(
            "esn_late_entry_seconds",
            "Affiliation during a call to its first media received",
            buckets=BUCKETS,
            registry=r,
        )
        self.access_by_kind = Histogram(
            "esn_handset_access_seconds",
            "PTT press to granted, measured by the handset",
            ["kind"],
            buckets=BUCKETS,
            registry=r,
        )
        self.scan_entry_s = Histogram(
            "esn_scan_entry_seconds",
            "A scanning handset switching to another group's call, to its first media heard",
            buckets=BUCKETS,
            registry=r,
        )
        self.mouth_to_ear_s = Histogram(
            "esn_mouth_to_ear_seconds",
            "Talker timestamp to media received by a listener",
            buckets=BUCKETS,
            registry=r,
        )

    # the handset's Observer interface
    def access(self, seconds: float, kind: str) -> None:
        self.access_by_kind.labels(kind).observe(seconds)

    def mouth_to_ear(self, seconds: float) -> None:
        self.mouth_to_ear_s.observe(seconds)

    def late_entry(self, seconds: float) -> None:
        self.late_entry_s.observe(seconds)

    def scan_entry(self, seconds: float) -> None:
        self.scan_entry_s.observe(seconds)
