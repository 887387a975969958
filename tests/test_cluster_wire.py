"""Every floor rule over the wire again, on a real 3-node NATS cluster's MQTT listeners,
and what survives a server restart there (the server's persistent session is kept by the
cluster, in JetStream).

The tests are those of `tests/test_wire_floor.py` and `tests/test_durable.py`, collected
here with other fixtures: the server is on node 1, and the handsets are spread over all
three nodes, so every grant, voice packet, retained state and will crosses the cluster's
routes.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator

import pytest

from esn.tools.nats import NatsCluster
from esn.transport import BrokerConfig
from tests import test_durable, test_wire_floor
from tests.conftest import HandsetFactory, handsets

pytestmark = [pytest.mark.broker, pytest.mark.cluster]

# the floor rules, collected in this module (its fixtures below replace the harness's)
globals().update({k: v for k, v in vars(test_wire_floor).items() if k.startswith("test_")})
globals().update(
    {
        k: v
        for k, v in vars(test_durable).items()
        if k.startswith("test_") and not hasattr(v, "pytestmark")  # (not the in-process ones)
    }
)
restartable = test_durable.restartable


@pytest.fixture(params=["gmqtt"])
def mqtt_client(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def broker(nats_cluster: NatsCluster) -> BrokerConfig:
    """The server's broker: node 1."""
    return BrokerConfig.from_url(nats_cluster.mqtt_urls[0])


@pytest.fixture
async def handset(
    nats_cluster: NatsCluster, prefix: str, mqtt_client: str
) -> AsyncIterator[HandsetFactory]:
    """Started, affiliated handsets on nodes 2, 3, 1, 2, ... in turn."""
    urls = nats_cluster.mqtt_urls[1:] + nats_cluster.mqtt_urls[:1]
    nodes = itertools.cycle([BrokerConfig.from_url(u) for u in urls])
    async for make in handsets(nodes, prefix, mqtt_client):
        yield make
