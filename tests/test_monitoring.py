"""Monitoring as code, proven against a real Prometheus: every dashboard query returns data
from a live server under load, every metric a dashboard or rule names is exported, and
the alert rules pass their promtool unit tests."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from esn.client.metrics import HandsetMetrics
from esn.core.fleet import parse_fleet
from esn.exporter import serve_metrics
from esn.kpi import KPIS
from esn.protocol import messages as m
from esn.server.shell import Config, Server
from esn.tools.monitoring import Prometheus
from esn.tools.processes import free_port
from esn.transport import BrokerConfig
from tests.conftest import FLEET, HandsetFactory

pytestmark = pytest.mark.broker
GRAFANA = Path(__file__).resolve().parent.parent / "grafana"
CONFIG_DIR = GRAFANA / "prometheus"
BOARDS = sorted((GRAFANA / "provisioning" / "dashboards").glob("*.json"))
RULES = CONFIG_DIR / "rules" / "esn.rules.yml"


def panel_queries() -> list[tuple[str, str, str]]:
    """(dashboard, panel title, expr) with Grafana's variables filled in as Grafana would."""
    out = []
    for path in BOARDS:
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            for target in panel.get("targets") or []:
                expr = target["expr"].replace("$__rate_interval", "10s").replace('"$tg"', '".*"')
                out.append((board["uid"], panel["title"], expr))
    return out


def named_metrics() -> set[str]:
    text = " ".join(e for _, _, e in panel_queries()) + RULES.read_text()
    names = set(re.findall(r"\b(esn_[a-z0-9_]+)", text))
    return {re.sub(r"_(bucket|count|sum)$", "", n) for n in names}


def test_dashboards_are_what_the_code_builds() -> None:
    sys.path.insert(0, str(GRAFANA))
    try:
        import dashboards  # grafana/dashboards.py
    finally:
        sys.path.remove(str(GRAFANA))
    built = dashboards.build()
    assert sorted(built) == [p.name for p in BOARDS]
    for path in BOARDS:
        assert dashboards.render(built[path.name]) == path.read_text(), (
            f"{path.name} is stale: run python grafana/dashboards.py"
        )


def test_dashboards_round_trip_through_the_grafana_schema() -> None:
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models.dashboard import Dashboard

    for path in BOARDS:
        doc = json.loads(path.read_text())
        again = json.loads(JSONEncoder(sort_keys=True).encode(Dashboard.from_json(doc)))
        assert again == doc, path.name
        assert all(
            t["datasource"]["uid"] == "esn-prometheus"
            for p in doc["panels"]
            for t in p.get("targets") or []
        )


def test_prometheus_config_and_alert_rules_pass_promtool() -> None:
    for args in (
        ["check", "config", str(CONFIG_DIR / "prometheus.yml")],
        ["test", "rules", str(CONFIG_DIR / "tests" / "esn.rules.test.yml")],
    ):
        done = subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "SUCCESS" in done.stdout + done.stderr


@pytest.fixture
async def live(
    broker: BrokerConfig, prefix: str, handset: HandsetFactory
) -> AsyncIterator[tuple[Prometheus, list[str]]]:
    """A server and handsets under a small load, scraped every second by Prometheus."""
    port = free_port()
    server = Server(
        Config(broker=broker, prefix=prefix, server_id=f"srv-{prefix}", metrics_port=port),
        parse_fleet(FLEET),
    )
    await server.start()
    hm = HandsetMetrics()
    hport = free_port()
    exporter = await serve_metrics(hm.registry, hport)
    units = [await handset(u, "tg-1", metrics=hm) for u in ("u1", "u2", "u3")]
    await units[2].affiliate("tg-2")
    units[2].send(m.EmergencyAlert(tg="tg-2", lat=51.5, lon=-0.1))  # a group in emergency
    units[2].transport.publish(units[2].topics.unit_up("u3"), b"\xc1")  # a rejected input

    async def traffic() -> None:
        a, b, _ = units
        while True:  # talk bursts with a queued second speaker
            await a.press("tg-1")
            await b.press("tg-1")
            await asyncio.sleep(0.3)
            a.release("tg-1")
            await asyncio.sleep(0.3)
            b.release("tg-1")

    load = asyncio.create_task(traffic())
    prometheus = await asyncio.to_thread(
        Prometheus(
            {"server": [f"127.0.0.1:{port}"], "handsets": [f"127.0.0.1:{hport}"]},
            scrape_interval="1s",
        ).start
    )
    try:
        yield prometheus, [f"http://127.0.0.1:{p}/metrics" for p in (port, hport)]
    finally:
        load.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await load
        await asyncio.to_thread(prometheus.close)
        exporter.close()
        await server.stop()


@pytest.mark.parametrize("mqtt_client", ["gmqtt"])
async def test_every_panel_query_returns_data_from_a_live_server(
    live: tuple[Prometheus, list[str]],
) -> None:
    prometheus, _ = live
    pending = panel_queries()
    assert len(pending) >= 20
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 45
    while pending:  # each query parses at once, and has data as soon as enough is scraped
        results = [await asyncio.to_thread(prometheus.query, expr) for _, _, expr in pending]
        pending = [q for q, r in zip(pending, results, strict=True) if not r["result"]]
        if pending and loop.time() > deadline:
            raise AssertionError(f"no data for {[(b, t) for b, t, _ in pending]}")
        await asyncio.sleep(1)
    # the hotspots count the alert where it was raised: one, not a counter's increase
    spots = await asyncio.to_thread(prometheus.query, "sum by (cell) (esn_incidents_recent)")
    assert [(r["metric"]["cell"], r["value"][1]) for r in spots["result"]] == [("51.50,-0.10", "1")]
    kpi = await asyncio.to_thread(prometheus.query, "esn:mouth_to_ear_seconds:p95_5m")
    assert kpi["result"] and float(kpi["result"][0]["value"][1]) < 0.3


@pytest.mark.parametrize("mqtt_client", ["gmqtt"])
async def test_every_metric_named_by_dashboards_and_rules_is_exported(
    live: tuple[Prometheus, list[str]],
) -> None:
    import urllib.request

    _, endpoints = live

    def fetch(url: str) -> str:
        with urllib.request.urlopen(url) as r:
            return str(r.read().decode())

    async def exported() -> set[str]:
        names: set[str] = set()
        for url in endpoints:
            text = await asyncio.to_thread(fetch, url)
            names |= {f.name for f in text_string_to_metric_families(text)}
            names |= {s.name for f in text_string_to_metric_families(text) for s in f.samples}
        return names

    wanted = named_metrics()
    assert {
        "esn_floor_access_seconds",
        "esn_mouth_to_ear_seconds",
        "esn_group_emergency",
        "esn_broker_clients_connected",
    } <= wanted
    # the broker's figures come with Mosquitto's next $SYS publication (every 5 s); an HTTP
    # endpoint offers no event to await, so it is read again until they are there
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 15
    while not wanted <= (found := await exported()) and loop.time() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.5)
    assert wanted <= found, f"named but not exported: {sorted(wanted - found)}"


def test_the_alerts_page_at_the_kpi_targets_the_rest_of_the_project_uses() -> None:
    """Each KPI alert's threshold and words are those of esn/kpi.py (the demo's and the
    load test's), and every KPI a handset or the server exports has an alert."""
    text = RULES.read_text()
    alerts = re.findall(
        r"- alert: (\w+)\n\s+expr: (.+)\n(?:.*\n)*?\s+description: '.*KPI (\d): < (\d+) ms",
        text,
    )
    assert {int(n) for _, _, n, _ in alerts} == {1, 3, 4}  # (KPI 2: the load test's alone)
    for name, expr, number, words in alerts:
        kpi = next(k for k in KPIS if k.number == int(number))
        limits = {float(x) for x in re.findall(r"> ([0-9.]+)", expr)}
        assert limits == {kpi.target_s} and float(words) == kpi.target_ms, name
