"""The Prometheus endpoint serves every metric docs/protocol.md names, with live values."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from esn.core.fleet import parse_fleet
from esn.protocol import messages as m
from esn.server.shell import Config, Server
from esn.tools.processes import free_port
from esn.transport import BrokerConfig
from tests.conftest import FLEET, HandsetFactory


async def http_get(port: int, path: str) -> tuple[str, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = raw.decode().partition("\r\n\r\n")
    return head.splitlines()[0], body


@pytest.fixture
async def server(broker: BrokerConfig, prefix: str, mqtt_client: str) -> AsyncIterator[Server]:
    """The server with its metrics endpoint on."""
    srv = Server(
        Config(
            broker=broker,
            prefix=prefix,
            server_id=f"srv-{prefix}",
            metrics_port=free_port(),
            mqtt_client=mqtt_client,
        ),
        parse_fleet(FLEET),
    )
    await srv.start()
    yield srv
    await srv.stop()


@pytest.mark.parametrize("mqtt_client", ["memory", "gmqtt"])
async def test_every_protocol_metric_is_served(server: Server, handset: HandsetFactory) -> None:
    a = await handset("u1", "tg-1")
    b = await handset("u2", "tg-1")
    await a.press("tg-1", kind="emergency")
    await b.press("tg-1")
    assert (await b.private_call("u3")).cause == "offline"
    a.transport.publish(a.topics.unit_up("u1"), b"\xc1")  # one rejected input
    await a.expect(lambda i: isinstance(i.msg, m.Error))
    assert server.config.metrics_port is not None
    status, body = await http_get(server.config.metrics_port, "/metrics")
    assert status == "HTTP/1.1 200 OK"
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(body)
        for s in f.samples
    }
    names = {name for name, _ in samples}
    for name in (
        "esn_floor_access_seconds_bucket",
        "esn_media_relay_seconds_bucket",
        "esn_floor_outcomes_total",
        "esn_messages_total",
        "esn_rejected_total",
        "esn_media_dropped_total",
        "esn_units_online",
        "esn_calls_active",
        "esn_groups_in_emergency",
        "esn_floor_queue_length",
    ):
        assert name in names, name
    assert samples[("esn_floor_access_seconds_count", (("kind", "emergency"),))] == 1
    assert samples[("esn_floor_outcomes_total", (("outcome", "queued"),))] == 1
    assert samples[("esn_rejected_total", (("reason", "malformed"),))] == 1
    assert samples[("esn_rejected_total", (("reason", "forbidden"),))] == 0
    assert samples[("esn_media_dropped_total", (("reason", "not_holder"),))] == 0
    assert samples[("esn_messages_total", (("direction", "in"), ("kind", "request")))] == 2
    assert samples[("esn_units_online", ())] == 2
    assert samples[("esn_calls_active", ())] == 1
    assert samples[("esn_groups_in_emergency", ())] == 1
    assert samples[("esn_floor_queue_length", ())] == 1
    assert samples[("esn_private_calls_total", (("outcome", "offline"),))] == 1
    assert samples[("esn_private_calls_total", (("outcome", "connected"),))] == 0
    buckets = {
        dict(labels)["le"]
        for (name, labels) in samples
        if name == "esn_floor_access_seconds_bucket"
    }
    assert {"0.001", "0.005", "0.01", "0.05", "0.1", "0.3", "1.0"} <= buckets
    status, _ = await http_get(server.config.metrics_port, "/other")
    assert status == "HTTP/1.1 404 Not Found"
