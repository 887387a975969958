"""The server's Prometheus metrics (docs/protocol.md, "Metrics").

Latency histograms and message counters are updated on the critical path; gauges and
floor outcomes are read from the core's live state when Prometheus scrapes. The endpoint
is served from the event loop itself, so a scrape never races the core. Beyond the
protocol's list the server exports per-talkgroup floor gauges and the broker's own
figures (from Mosquitto's `$SYS` topics).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Collection, Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from esn import __version__
from esn.core.network import Network
from esn.core.partitions import PARTITIONS
from esn.core.private import END_CAUSES
from esn.exporter import BUCKETS
from esn.server.hotspots import Hotspots

# Mosquitto's $SYS topics (cumulative counters and a gauge) -> our metric names
BROKER_SYS = {
    "$SYS/broker/clients/connected": "esn_broker_clients_connected",
    "$SYS/broker/messages/received": "esn_broker_messages_received_total",
    "$SYS/broker/messages/sent": "esn_broker_messages_sent_total",
    "$SYS/broker/publish/messages/dropped": "esn_broker_messages_dropped_total",
}

# reasons exported from the start (at 0), so rate() and alerts work before the first one
REJECT_REASONS = (
    "retained",
    "too_many_units",
    "malformed",
    "unknown_type",
    "invalid_field",
    "forbidden",
    "rate_limited",
    "too_large",
    "bad_topic",
    "spoofed",
    "invalid_presence",
)
AUDITED = ("ambient_listen", "ambient_end", "remote_talk", "private_emergency")
PRIVATE_OUTCOMES = ("connected", *END_CAUSES)
DROP_REASONS = (
    "rate_limited",
    "not_holder",
    "revoked",
    "unknown_group",
    "malformed",
    "invalid_field",
    "too_large",
    "unknown_type",
    "spoofed",
)


class ServerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.floor_access = Histogram(
            "esn_floor_access_seconds",
            "Floor request received to granted published",
            ["kind"],
            buckets=BUCKETS,
            registry=r,
        )
        self.media_relay = Histogram(
            "esn_media_relay_seconds",
            "Media packet received to relayed",
            buckets=BUCKETS,
            registry=r,
        )
        self.state_write = Histogram(
            "esn_state_write_seconds",
            "Durable state written (one batch, before the answers go out)",
            buckets=BUCKETS,
            registry=r,
        )
        self.state_failures = 0  # batches the store refused (disk full, ...)
        self.publish_dropped: Callable[[], int] = lambda: 0  # the link's count (Transport)
        self.messages: dict[tuple[str, str], int] = {}  # (kind, direction) -> count
        self.broker: dict[str, float] = {}  # $SYS figure -> value, as Mosquitto reports it
        self.media_dropped: dict[str, int] = {}
        self.rejected: dict[str, int] = {}
        self.server_id = ""
        # the partitions served now (a single server: all), and how many were taken up
        self.served: Callable[[], Collection[int]] = lambda: range(PARTITIONS)
        self.partitions_taken = 0
        self.foreign = 0  # uplinks heard for a partition another instance serves
        self.hotspots = Hotspots()  # incidents by map cell
        self.audited: dict[str, int] = {}  # uses of an authority the fleet grants, by kind

    def count_message(self, kind: str, direction: str) -> None:
        key = (kind, direction)
        self.messages[key] = self.messages.get(key, 0) + 1

    def count_rejected(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def count_audited(self, what: str) -> None:
        self.audited[what] = self.audited.get(what, 0) + 1

    def count_media_dropped(self, reason: str) -> None:
        self.media_dropped[reason] = self.media_dropped.get(reason, 0) + 1

    def broker_figure(self, topic: str, payload: bytes) -> None:
        name = BROKER_SYS.get(topic)
        if name is not None:
            with contextlib.suppress(ValueError, IndexError):  # not a figure: nothing to export
                self.broker[name] = float(payload.split()[0])
            # Mosquitto publishes a $SYS figure only when it changes, and its drop counter
            # starts at zero: while we can read $SYS and have heard nothing, it is still 0
            self.broker.setdefault("esn_broker_messages_dropped_total", 0.0)

    def watch(self, network: Network) -> None:
        self.registry.register(_LiveState(network, self))


class _LiveState(Collector):
    def __init__(self, network: Network, metrics: ServerMetrics) -> None:
        self.network = network
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        net = self.network
        yield from self._identity()
        outcomes = CounterMetricFamily(
            "esn_floor_outcomes", "Floor control outcomes", labels=["outcome"]
        )
        found = net.outcomes()
        for name in ("granted", "queued", "denied", "preempted", "revoked", "released"):
            outcomes.add_metric([name], found.get(name, 0))
        yield outcomes
        yield _counter(
            "esn_private_calls",
            "Private calls connected, and ended by cause",
            "outcome",
            _sum(dict.fromkeys(PRIVATE_OUTCOMES, 0), net.private.outcomes),
        )
        messages = CounterMetricFamily(
            "esn_messages", "Protocol messages by type and direction", labels=["kind", "direction"]
        )
        for (kind, direction), n in sorted(self.metrics.messages.items()):
            messages.add_metric([kind, direction], n)
        yield messages
        yield _counter(
            "esn_rejected",
            "Rejected peer input by reason",
            "reason",
            _sum(dict.fromkeys(REJECT_REASONS, 0), self.metrics.rejected, net.rejected),
        )
        yield _counter(
            "esn_media_dropped",
            "Media packets not relayed, by reason",
            "reason",
            _sum(dict.fromkeys(DROP_REASONS, 0), self.metrics.media_dropped),
        )
        yield CounterMetricFamily(
            "esn_publishes_dropped",
            "Messages the server could not hand to the broker (link down, or acks awaited)",
            value=self.metrics.publish_dropped(),
        )
        yield CounterMetricFamily(
            "esn_state_write_failures",
            "Durable state batches the store failed to write",
            value=self.metrics.state_failures,
        )
        floors = list(net.floors.values())
        yield GaugeMetricFamily(
            "esn_units_online", "Units whose presence is online", value=len(net.online)
        )
        yield GaugeMetricFamily(
            "esn_calls_active",
            "Group calls in progress (incl. hang time)",
            value=sum(f.call is not None for f in floors),
        )
        yield GaugeMetricFamily(
            "esn_groups_in_emergency",
            "Talkgroups in emergency state",
            value=sum(f.emergency for f in floors),
        )
        yield GaugeMetricFamily(
            "esn_floor_queue_length",
            "Requests waiting in floor queues",
            value=sum(len(f.queue) for f in floors),
        )
        taken = GaugeMetricFamily(
            "esn_group_floor_taken", "1 while the group's floor is held", labels=["tg"]
        )
        queued = GaugeMetricFamily(
            "esn_group_queue_length", "Requests waiting, per group", labels=["tg"]
        )
        emergency = GaugeMetricFamily(
            "esn_group_emergency", "1 while the group is in emergency", labels=["tg"]
        )
        imminent = GaugeMetricFamily(
            "esn_group_imminent", "1 while the group is in imminent peril", labels=["tg"]
        )
        for f in floors:
            taken.add_metric([f.tg], f.holder is not None)
            queued.add_metric([f.tg], len(f.queue))
            emergency.add_metric([f.tg], f.emergency)
            imminent.add_metric([f.tg], bool(f.perils))
        yield from (taken, queued, emergency, imminent)
        yield GaugeMetricFamily(
            "esn_groups_in_imminent_peril",
            "Talkgroups in imminent peril",
            value=sum(bool(f.perils) for f in floors),
        )
        yield _counter(
            "esn_audited",
            "Uses of an authority the fleet grants (listening in, remote talk), each logged",
            "action",
            _sum(dict.fromkeys(AUDITED, 0), self.metrics.audited),
        )
        hotspots = self.metrics.hotspots
        yield _counter(
            "esn_incidents",
            "Emergencies and imminent-peril calls raised (one per unit and kind a minute)",
            "kind",
            _sum({"emergency": 0, "imminent": 0}, hotspots.totals),
        )
        recent = GaugeMetricFamily(
            "esn_incidents_recent",
            "Emergencies and imminent-peril calls of the last 15 minutes, by map cell (5 km)",
            labels=["cell", "kind"],
        )
        for (cell, kind), n in sorted(hotspots.recent(time.monotonic()).items()):
            recent.add_metric([cell, kind], n)
        yield recent
        for name, value in sorted(self.metrics.broker.items()):
            doc = "Mosquitto $SYS figure, as the broker reports it"
            if name.endswith("_total"):
                yield CounterMetricFamily(name.removesuffix("_total"), doc, value=value)
            else:
                yield GaugeMetricFamily(name, doc, value=value)

    def _identity(self) -> Iterator[Metric]:
        """Which server this is and what it serves (a single server: every partition):
        summed over a cluster's instances, the partitions served must come to
        `esn_cluster_partitions`."""
        me = self.metrics.server_id
        info = GaugeMetricFamily("esn_server_info", "This server", labels=["server", "version"])
        info.add_metric([me, __version__], 1)
        yield info
        yield GaugeMetricFamily(
            "esn_cluster_partitions", "Partitions the groups and units are split into", PARTITIONS
        )
        served = GaugeMetricFamily(
            "esn_cluster_partitions_served", "Partitions this instance serves", labels=["server"]
        )
        served.add_metric([me], len(self.metrics.served()))
        yield served
        taken = CounterMetricFamily(
            "esn_cluster_partitions_taken",
            "Partitions taken up (at start, from an instance gone, or handed over)",
            labels=["server"],
        )
        taken.add_metric([me], self.metrics.partitions_taken)
        yield taken
        foreign = CounterMetricFamily(
            "esn_cluster_foreign",
            "Uplinks and floor requests heard for partitions another instance serves "
            "(none in steady running once the cluster moves them by partition)",
            labels=["server"],
        )
        foreign.add_metric([me], self.metrics.foreign)
        yield foreign


def _sum(*counts: dict[str, int]) -> dict[str, int]:
    total: dict[str, int] = {}
    for c in counts:
        for k, v in c.items():
            total[k] = total.get(k, 0) + v
    return total


def _counter(name: str, doc: str, label: str, values: dict[str, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=[label])
    for key, value in sorted(values.items()):
        family.add_metric([key], value)
    return family
