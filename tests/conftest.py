"""Test harness: a real Mosquitto per session, an in-process server per test.

Every test gets its own topic prefix and server id, so tests sharing the broker never
see each other's messages. Tests taking `mqtt_client` run three times: on the in-process
broker (the fast tier, `-m "not broker"`), and on a real Mosquitto with each MQTT stack
(marked `broker`). Any test that uses the real Mosquitto is marked `broker` here.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest

from esn.client.handset import Handset
from esn.core.actions import Action, ToUnit
from esn.core.fleet import Fleet, parse_fleet
from esn.core.network import Network
from esn.protocol import messages as m
from esn.server.shell import Config, Server
from esn.tools.broker import Mosquitto
from esn.tools.nats import NatsCluster
from esn.transport import BrokerConfig
from esn.transport.memory import MemoryBroker

_ids = itertools.count(1)

FLEET: dict[str, Any] = {
    "defaults": {
        "max_talk_ms": 30000,
        "revoke_grace_ms": 500,
        "end_of_media_ms": 5000,
        "hang_ms": 1000,
        "queue_depth": 4,
        "preempt_threshold": 200,
    },
    "talkgroup": [
        {"id": "tg-1", "name": "Response North"},
        {"id": "tg-2", "name": "Short talk", "max_talk_ms": 400, "revoke_grace_ms": 300},
        {"id": "tg-bc", "name": "All-call", "broadcast": True},
        {"id": "tg-closed", "members": ["u1", "disp"]},
    ],
    "unit": [
        {
            "id": "disp",
            "role": "dispatcher",
            "priority": 250,
            "may": ["ambient_listening", "remote_talk"],
        },
        {"id": "boss", "priority": 220},
    ],
}


@pytest.fixture(scope="session", autouse=True)
def state_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """`esn server` keeps its state under $XDG_STATE_HOME by default: the servers tests
    start keep theirs in a temporary folder, never in the user's."""
    old = os.environ.get("XDG_STATE_HOME")
    os.environ["XDG_STATE_HOME"] = str(tmp_path_factory.mktemp("state"))
    yield
    if old is None:
        del os.environ["XDG_STATE_HOME"]
    else:
        os.environ["XDG_STATE_HOME"] = old


@pytest.fixture(scope="session")
def mosquitto() -> Iterator[Mosquitto]:
    broker = Mosquitto().start()
    yield broker
    broker.close()


@pytest.fixture(scope="session")
def nats_cluster() -> Iterator[NatsCluster]:
    """A 3-node NATS cluster on loopback, JetStream and MQTT on each node."""
    cluster = NatsCluster(3).start()
    yield cluster
    cluster.close()


REAL_CLIENTS = ("gmqtt", "paho")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        callspec = getattr(item, "callspec", None)
        client = callspec.params.get("mqtt_client") if callspec is not None else None
        if "mosquitto" in getattr(item, "fixturenames", ()) or client in REAL_CLIENTS:
            item.add_marker(pytest.mark.broker)


@pytest.fixture
def broker(request: pytest.FixtureRequest, mqtt_client: str) -> Iterator[BrokerConfig]:
    """The broker of this test's `mqtt_client`: in-process for "memory", else Mosquitto."""
    if mqtt_client != "memory":
        yield BrokerConfig.from_url(request.getfixturevalue("mosquitto").url)
        return
    memory = MemoryBroker()
    yield memory.config
    memory.close()


@pytest.fixture
def prefix() -> str:
    return f"esn-t{next(_ids)}"


@pytest.fixture(params=["memory", *REAL_CLIENTS])
def mqtt_client(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def server(broker: BrokerConfig, prefix: str, mqtt_client: str) -> AsyncIterator[Server]:
    srv = Server(
        Config(
            broker=broker,
            prefix=prefix,
            server_id=f"srv-{prefix}",
            mqtt_client=mqtt_client,
            keepalive=5,
        ),
        parse_fleet(FLEET),
    )
    await srv.start()
    yield srv
    await srv.stop()


HandsetFactory = Callable[..., Awaitable[Handset]]


@pytest.fixture
async def handset(
    broker: BrokerConfig, prefix: str, mqtt_client: str
) -> AsyncIterator[HandsetFactory]:
    """Make started handsets affiliated to `groups`; all are stopped after the test."""
    async for make in handsets(itertools.repeat(broker), prefix, mqtt_client):
        yield make


async def handsets(
    brokers: Iterator[BrokerConfig], prefix: str, mqtt_client: str
) -> AsyncIterator[HandsetFactory]:
    """A handset factory whose handsets connect to the next of `brokers` in turn."""
    made: list[Handset] = []

    async def make(unit: str, *groups: str, **kw: Any) -> Handset:
        kw.setdefault("media_interval", 0.02)
        h = Handset(unit, next(brokers), prefix=prefix, mqtt_client=mqtt_client, **kw)
        made.append(h)
        await h.start()
        if groups:
            await h.affiliate(*groups)
        return h

    yield make
    await asyncio.gather(*(h.stop() for h in made), return_exceptions=True)


async def spawn_handset(
    url: str,
    prefix: str,
    unit: str,
    *,
    keepalive: int = 30,
    talk: bool = False,
    mqtt_client: str = "gmqtt",
) -> tuple[asyncio.subprocess.Process, str]:
    """A handset in its own process (tests/handset_process.py), affiliated to tg-1; returns
    the process and the line it printed (`ready`, or the answer to its press)."""
    args = ["--keepalive", str(keepalive), "--mqtt-client", mqtt_client]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.handset_process",
        url,
        prefix,
        unit,
        *args,
        *(["--talk"] if talk else []),
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 20)
    return proc, line.decode().strip()


def told(actions: list[Action], unit: str) -> list[m.Message]:
    """What the core's actions send to one unit, in order."""
    return [a.msg for a in actions if isinstance(a, ToUnit) and a.unit == unit]


def online_network(fleet: Fleet, *units: str, group: str = "tg1") -> Network:
    """The core of `fleet` with these units online and in `group`, at time 0."""
    net = Network(fleet)
    for u in units:
        net.presence(u, m.Presence(state="online"), 0.0)
        net.unit_message(u, m.Affiliate(groups=[group]), 0.0)
    return net


async def eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait until `check()` holds (state changed by an event we cannot await directly)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.01)
