"""Grafana dashboards as code (grafana-foundation-sdk): the overview and the talkgroup drill-down.

    python grafana/dashboards.py      # rewrites grafana/provisioning/dashboards/*.json

The JSON files are committed so a stock Grafana needs nothing but the provisioning folder;
the test suite checks that they are exactly what this file builds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders.bargauge import Panel as BarGauge
from grafana_foundation_sdk.builders.common import (
    GraphThresholdsStyleConfig,
    ReduceDataOptions,
    VizLegendOptions,
    VizTooltipOptions,
)
from grafana_foundation_sdk.builders.dashboard import (
    Dashboard,
    QueryVariable,
    Row,
    ThresholdsConfig,
)
from grafana_foundation_sdk.builders.prometheus import Dataquery
from grafana_foundation_sdk.builders.stat import Panel as Stat
from grafana_foundation_sdk.builders.timeseries import Panel as Timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import (
    BarGaugeDisplayMode,
    BigValueGraphMode,
    GraphTresholdsStyleMode,
    LegendDisplayMode,
    LegendPlacement,
    SortOrder,
    TooltipDisplayMode,
    VizOrientation,
)
from grafana_foundation_sdk.models.dashboard import (
    DataSourceRef,
    Threshold,
    ThresholdsMode,
    VariableRefresh,
)

from esn.kpi import FLOOR_ACCESS, LATE_ENTRY, MOUTH_TO_EAR, Kpi

OUT = Path(__file__).resolve().parent / "provisioning" / "dashboards"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="esn-prometheus")


def query(expr: str, legend: str, ref: str = "A") -> Dataquery:
    return Dataquery().expr(expr).legend_format(legend).datasource(DATASOURCE).ref_id(ref)


def rate(metric: str, by: str) -> str:
    return f"sum by ({by}) (rate({metric}[$__rate_interval]))"


def thresholds(*steps: tuple[float | None, str]) -> ThresholdsConfig:
    return (
        ThresholdsConfig()
        .mode(ThresholdsMode.ABSOLUTE)
        .steps([Threshold(value=v, color=c) for v, c in steps])
    )


def timeseries(title: str, unit: str) -> Timeseries:
    legend = (
        VizLegendOptions()
        .display_mode(LegendDisplayMode.LIST)
        .placement(LegendPlacement.BOTTOM)
        .show_legend(True)
    )
    tooltip = VizTooltipOptions().mode(TooltipDisplayMode.MULTI).sort(SortOrder.DESCENDING)
    return (
        Timeseries()
        .title(title)
        .unit(unit)
        .min(0)
        .datasource(DATASOURCE)
        .height(8)
        .span(12)
        .legend(legend)
        .tooltip(tooltip)
    )


def latency(title: str, histogram: str, description: str, kpi: Kpi | None) -> Timeseries:
    """p50/p95/p99 of a latency histogram, with its TS 22.179 target (esn/kpi.py), if it
    measures a KPI, drawn as a red line."""
    panel = timeseries(title, "s").description(description)
    if kpi is not None:
        panel = panel.thresholds(thresholds((None, "green"), (kpi.target_s, "red")))
        panel = panel.thresholds_style(
            GraphThresholdsStyleConfig().mode(GraphTresholdsStyleMode.LINE)
        )
    for ref, q in zip("ABC", ("0.5", "0.95", "0.99"), strict=True):
        expr = f"histogram_quantile({q}, sum by (le) (rate({histogram}_bucket[$__rate_interval])))"
        panel = panel.with_target(query(expr, f"p{round(float(q) * 100)}", ref))
    return panel


def stat(title: str, expr: str, *steps: tuple[float | None, str]) -> Stat:
    return (
        Stat()
        .title(title)
        .datasource(DATASOURCE)
        .height(4)
        .span(6)
        .with_target(query(expr, title))
        .graph_mode(BigValueGraphMode.AREA)
        .reduce_options(ReduceDataOptions().values(False).calcs(["lastNotNull"]))
        .thresholds(thresholds(*(steps or ((None, "blue"),))))
    )


def rates(title: str, expr: str, legend: str, unit: str = "ops") -> Timeseries:
    return timeseries(title, unit).with_target(query(expr, legend))


def hotspots() -> BarGauge:
    """Where emergencies and imminent-peril calls concentrated: the busiest map cells."""
    return (
        BarGauge()
        .title("Incident hotspots, last 15 minutes")
        .description(
            "Emergencies and imminent-peril calls raised in the last 15 minutes, by map cell "
            "(about 5 km, named by its south-west corner, lat,lon), as the server counts "
            "them now; `unknown`: raised by a unit whose position the server has not heard."
        )
        .datasource(DATASOURCE)
        .height(8)
        .span(18)
        .with_target(query("topk(10, sum by (cell) (esn_incidents_recent))", "{{cell}}").instant())
        .unit("short")
        .decimals(0)
        .min(0)
        .orientation(VizOrientation.HORIZONTAL)
        .display_mode(BarGaugeDisplayMode.GRADIENT)
        .reduce_options(ReduceDataOptions().values(False).calcs(["lastNotNull"]))
        .thresholds(thresholds((None, "yellow"), (3, "orange"), (10, "red")))
    )


def overview() -> Dashboard:
    return (
        Dashboard("ESN push-to-talk — overview")
        .uid("esn-overview")
        .tags(["esn", "mcptt"])
        .refresh("5s")
        .time("now-15m", "now")
        .with_row(Row("KPIs against 3GPP TS 22.179 (red line: the KPI's target, at p95)"))
        .with_panel(
            latency(
                "Floor access time — server",
                "esn_floor_access_seconds",
                "Floor request received to granted published (KPI 1).",
                FLOOR_ACCESS,
            )
        )
        .with_panel(
            latency(
                "Floor access time — handsets",
                "esn_handset_access_seconds",
                "PTT press to granted, as the simulated handsets measure it.",
                FLOOR_ACCESS,
            )
        )
        .with_panel(
            latency(
                "Mouth-to-ear — handsets",
                "esn_mouth_to_ear_seconds",
                "Talker's timestamp to the packet at each listener (KPI 3).",
                MOUTH_TO_EAR,
            )
        )
        .with_panel(
            latency(
                "Late entry — handsets",
                "esn_late_entry_seconds",
                "Affiliating to a group mid-call, to its first voice packet heard (KPI 4).",
                LATE_ENTRY,
            )
        )
        .with_panel(
            latency(
                "Media relay — server",
                "esn_media_relay_seconds",
                "Voice packet received to relayed: the server's own share.",
                None,
            )
        )
        .with_row(Row("Activity"))
        .with_panel(stat("Units online", "sum(esn_units_online)"))
        .with_panel(stat("Calls active", "sum(esn_calls_active)"))
        .with_panel(
            stat("Groups in emergency", "sum(esn_groups_in_emergency)", (None, "green"), (1, "red"))
        )
        .with_panel(
            stat(
                "Floor queue length", "sum(esn_floor_queue_length)", (None, "green"), (5, "orange")
            )
        )
        .with_panel(
            stat(
                "Groups in imminent peril",
                "sum(esn_groups_in_imminent_peril)",
                (None, "green"),
                (1, "orange"),
            )
        )
        .with_panel(hotspots())
        .with_panel(
            rates(
                "Messages by type",
                rate("esn_messages_total", "kind, direction"),
                "{{kind}} {{direction}}",
            )
        )
        .with_panel(
            rates("Floor outcomes", rate("esn_floor_outcomes_total", "outcome"), "{{outcome}}")
        )
        .with_panel(
            rates(
                "Private calls", rate("esn_private_calls_total", "outcome"), "{{outcome}}"
            ).description(
                "Calls connected, and calls ended by cause: busy, no_answer, offline, rejected, "
                "hung_up, inactive, preempted (docs/protocol.md, 11.14)."
            )
        )
        .with_row(Row("Problems"))
        .with_panel(
            rates("Rejected input by reason", rate("esn_rejected_total", "reason"), "{{reason}}")
        )
        .with_panel(
            rates(
                "Media dropped by reason", rate("esn_media_dropped_total", "reason"), "{{reason}}"
            )
        )
        .with_row(Row("Cluster (several server instances: docs/scaling.md)"))
        .with_panel(
            rates(
                "Partitions served per instance",
                "sum by (server) (esn_cluster_partitions_served)",
                "{{server}}",
                unit="short",
            ).description(
                "Summed, they make up every partition; a dip is an instance gone, not yet replaced."
            )
        )
        .with_panel(
            rates(
                "Partitions taken over",
                "sum by (server) (increase(esn_cluster_partitions_taken_total[$__rate_interval]))",
                "{{server}}",
                unit="short",
            ).description("Partitions an instance took up: at its start, and on each failover.")
        )
        .with_panel(
            rates(
                "Uplinks heard for others' partitions",
                "sum by (server) (rate(esn_cluster_foreign_total[$__rate_interval]))",
                "{{server}}",
            ).description(
                "None when the cluster routes uplinks by partition (its subject mapping); "
                "a steady rate means every instance hears the whole fleet's (docs/scaling.md)."
            )
        )
        .with_row(Row("Broker (Mosquitto $SYS)"))
        .with_panel(
            rates("Connected clients", "sum(esn_broker_clients_connected)", "clients", unit="short")
        )
        .with_panel(
            rates(
                "Broker messages",
                (
                    "label_replace(rate(esn_broker_messages_received_total[$__rate_interval]), "
                    '"direction", "received", "", "") or label_replace(rate('
                    "esn_broker_messages_sent_total[$__rate_interval]), "
                    '"direction", "sent", "", "") '
                    "or label_replace(rate(esn_broker_messages_dropped_total[$__rate_interval]), "
                    '"direction", "dropped", "", "")'
                ),
                "{{direction}}",
            )
        )
    )


def talkgroups() -> Dashboard:
    tg = '{tg=~"$tg"}'
    return (
        Dashboard("ESN push-to-talk — talkgroups")
        .uid("esn-talkgroups")
        .tags(["esn", "mcptt"])
        .refresh("5s")
        .time("now-15m", "now")
        .with_variable(
            QueryVariable("tg")
            .label("Talkgroup")
            .datasource(DATASOURCE)
            .query("label_values(esn_group_floor_taken, tg)")
            .multi(True)
            .include_all(True)
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
        )
        .with_panel(
            rates(
                "Floor held",
                f"max by (tg) (esn_group_floor_taken{tg})",
                "{{tg}}",
                unit="bool_on_off",
            )
        )
        .with_panel(
            rates(
                "Share of time the floor is held",
                f"avg by (tg) (avg_over_time(esn_group_floor_taken{tg}[$__rate_interval]))",
                "{{tg}}",
                unit="percentunit",
            )
        )
        .with_panel(
            rates(
                "Queue length", f"max by (tg) (esn_group_queue_length{tg})", "{{tg}}", unit="short"
            )
        )
        .with_panel(
            rates(
                "Emergency", f"max by (tg) (esn_group_emergency{tg})", "{{tg}}", unit="bool_yes_no"
            )
        )
        .with_panel(
            rates(
                "Imminent peril",
                f"max by (tg) (esn_group_imminent{tg})",
                "{{tg}}",
                unit="bool_yes_no",
            )
        )
    )


def build() -> dict[str, dict[str, Any]]:
    """file name -> dashboard JSON, as written to the provisioning folder."""
    out = {}
    for board in (overview(), talkgroups()):
        model = board.build()
        out[f"{model.uid}.json"] = json.loads(JSONEncoder(sort_keys=True, indent=2).encode(model))
    return out


def render(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    for name, doc in build().items():
        (OUT / name).write_text(render(doc))
        print(f"wrote {OUT / name}")
