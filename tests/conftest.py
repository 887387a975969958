"""Test harness: a real Mosquitto per session, an in-process server per test.

Every test gets its own topic prefix and server id, so tests sharing the broker never
see each other's messages. Broker tests run on both MQTT transports.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest

from esn.broker import Mosquitto
from esn.core.fleet import parse_fleet
from esn.handset import Handset
from esn.server import Config, Server
from esn.transport import BrokerConfig

_ids = itertools.count(1)

FLEET: dict[str, Any] = {
    "defaults": {"max_talk_ms": 30000, "revoke_grace_ms": 500, "end_of_media_ms": 5000,
                 "hang_ms": 1000, "queue_depth": 4, "preempt_threshold": 200},
    "talkgroup": [
        {"id": "tg-1", "name": "Response North"},
        {"id": "tg-2", "name": "Short talk", "max_talk_ms": 400, "revoke_grace_ms": 300},
        {"id": "tg-bc", "name": "All-call", "broadcast": True},
        {"id": "tg-closed", "members": ["u1", "disp"]},
    ],
    "unit": [
        {"id": "disp", "role": "dispatcher", "priority": 250},
        {"id": "boss", "priority": 220},
    ],
}


@pytest.fixture(scope="session")
def mosquitto() -> Iterator[Mosquitto]:
    broker = Mosquitto().start()
    yield broker
    broker.close()


@pytest.fixture
def broker(mosquitto: Mosquitto) -> BrokerConfig:
    return BrokerConfig.from_url(mosquitto.url)


@pytest.fixture
def prefix() -> str:
    return f"esn-t{next(_ids)}"


@pytest.fixture(params=["gmqtt", "paho"])
def mqtt_client(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def server(broker: BrokerConfig, prefix: str, mqtt_client: str) -> AsyncIterator[Server]:
    srv = Server(Config(broker=broker, prefix=prefix, server_id=f"srv-{prefix}",
                        mqtt_client=mqtt_client, keepalive=5), parse_fleet(FLEET))
    await srv.start()
    yield srv
    await srv.stop()


HandsetFactory = Callable[..., Awaitable[Handset]]


@pytest.fixture
async def handset(broker: BrokerConfig, prefix: str,
                  mqtt_client: str) -> AsyncIterator[HandsetFactory]:
    """Make started handsets affiliated to `groups`; all are stopped after the test."""
    made: list[Handset] = []

    async def make(unit: str, *groups: str, **kw: Any) -> Handset:
        kw.setdefault("media_interval", 0.02)
        h = Handset(unit, broker, prefix=prefix, mqtt_client=mqtt_client, **kw)
        made.append(h)
        await h.start()
        if groups:
            await h.affiliate(*groups)
        return h

    yield make
    await asyncio.gather(*(h.stop() for h in made), return_exceptions=True)


async def eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait until `check()` holds (state changed by an event we cannot await directly)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.01)
