"""Nothing a unit was told is lost when the server restarts, and nothing sent while it is
away is lost either: the state store, the server's persistent session, handset retries.

Run on the in-process broker and on Mosquitto with both MQTT stacks.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from esn.client import handset as handset_module
from esn.client.handset import Handset, Inbound
from esn.core.fleet import parse_fleet
from esn.protocol import codec
from esn.protocol import messages as m
from esn.server.shell import Config, Server
from esn.store import StoreError, open_store, pack, unpack
from esn.transport import BrokerConfig, make_transport
from esn.transport.memory import MemoryBroker
from tests.conftest import FLEET, HandsetFactory, eventually

_servers = itertools.count(1)


class Restartable:
    """A server that can be stopped and started again under its id and state file."""

    def __init__(self, broker: BrokerConfig, prefix: str, mqtt_client: str, state: Path) -> None:
        self.config = Config(
            broker=broker,
            prefix=prefix,
            server_id=f"dur-{prefix}-{next(_servers)}",
            mqtt_client=mqtt_client,
            keepalive=5,
            state=str(state),
        )
        self.server: Server | None = None

    async def start(self) -> Server:
        self.server = Server(self.config, parse_fleet(FLEET))
        await self.server.start()
        return self.server

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop()
            self.server = None


@pytest.fixture
async def restartable(
    broker: BrokerConfig, prefix: str, mqtt_client: str, tmp_path: Path
) -> AsyncIterator[Restartable]:
    srv = Restartable(broker, prefix, mqtt_client, tmp_path / "state.sqlite3")
    yield srv
    await srv.stop()


def answer_to(ref: int | None) -> Callable[[Inbound], bool]:
    return lambda i: i.msg.ref == ref and i.topic.endswith("/down") and not isinstance(i.msg, m.Sds)


def of_type(t: type[m.Message]) -> Callable[[Inbound], bool]:
    return lambda i: isinstance(i.msg, t)


async def test_what_units_were_told_survives_a_server_restart(
    restartable: Restartable, handset: HandsetFactory
) -> None:
    """Tried: a call with a unit queued behind it, an open and acknowledged emergency, a
    regroup and a message kept for an offline unit; the server stops and a new one starts
    on the same state file. Expect: each goes on as the units were told."""
    await restartable.start()
    u1 = await handset("u1", "tg-1")
    u2 = await handset("u2", "tg-1")
    u3 = await handset("u3", "tg-1")
    disp = await handset("disp", "tg-1")
    away = await handset("away")
    await away.stop()  # known, and offline
    assert isinstance(await u1.press("tg-1"), m.Granted)
    assert isinstance(await u2.press("tg-1"), m.Queued)
    raised = await u3.ask(m.EmergencyAlert(tg="tg-1", ref=u3.next_ref()))
    assert isinstance(raised, m.EmergencyState) and raised.state == "raised"
    regroup = m.Regroup(tg="tg-tmp", units=["u1", "u2"], name="Fire", ref=disp.next_ref())
    assert isinstance(await disp.ask(regroup), m.Ok)
    kept = await u1.ask(m.Sds(to="unit:away", text="meet at the gate", ref=u1.next_ref()))
    assert kept == m.SdsStatus(state="queued", ref=kept.ref)

    await restartable.stop()
    server = await restartable.start()

    assert server.network.state_msg("tg-1").talker == "u1"
    ack = m.EmergencyAck(tg="tg-1", unit="u3", ref=disp.next_ref())
    assert isinstance(await disp.ask(ack), m.Ok)
    cancelled = await u3.ask(m.EmergencyCancel(tg="tg-1", ref=u3.next_ref()))
    assert isinstance(cancelled, m.EmergencyState) and cancelled.state == "cancelled"
    granted = u2.expect(of_type(m.Granted))
    u1.release("tg-1")
    await granted  # u2's place in the queue was kept
    ungrouped = u2.expect(of_type(m.Ungrouped))
    assert isinstance(await disp.ask(m.Ungroup(tg="tg-tmp", ref=disp.next_ref())), m.Ok)
    await ungrouped
    back = Handset("away", u1.transport.broker, prefix=u1.topics.prefix, mqtt_client=_kind(u1))
    delivered = back.expect(of_type(m.Sds))
    await back.start()
    try:
        sds = (await delivered).msg
        assert isinstance(sds, m.Sds) and (sds.text, sds.sender) == ("meet at the gate", "u1")
    finally:
        await back.stop()


async def test_what_is_sent_while_the_server_is_down_takes_effect_once(
    restartable: Restartable,
    handset: HandsetFactory,
    broker: BrokerConfig,
    mqtt_client: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Tried: the server stops; a unit that sends each message once (no retries) raises
    an emergency and sends an SDS while it is away. Expect: the broker keeps them for the
    server's session, the new server acts on each once, and the units hear the answers."""
    monkeypatch.setattr(handset_module, "RETRY_AFTER_S", ())
    await restartable.start()
    u1 = await handset("u1", "tg-1")
    u2 = await handset("u2", "tg-1")
    await restartable.stop()

    # something listening to u1's uplink shows the broker has taken each message
    seen = make_transport(mqtt_client, broker, client_id=f"watch-{u1.topics.prefix}")
    taken: asyncio.Queue[m.Message] = asyncio.Queue()
    seen.on_message = lambda topic, payload: taken.put_nowait(codec.decode(payload))
    await seen.start()
    # (on a NATS cluster, where its subject mapping moves uplinks: docs/scaling.md)
    await seen.subscribe(u1.topics.unit_up("u1"), u1.topics.parted_uplinks()[0])
    try:
        alert = m.EmergencyAlert(tg="tg-1", ref=u1.next_ref())
        sds = m.Sds(to="unit:u2", text="going in", ref=u1.next_ref())
        raised, status = u1.expect(answer_to(alert.ref), 15), u1.expect(answer_to(sds.ref), 15)
        heard = u2.expect(of_type(m.Sds), 15)
        u1.send(alert)
        u1.send(sds)
        for _ in range(2):
            await asyncio.wait_for(taken.get(), 5)
    finally:
        await seen.stop()

    await restartable.start()

    assert (await raised).msg == m.EmergencyState(tg="tg-1", state="raised", ref=alert.ref)
    assert (await status).msg == m.SdsStatus(state="delivered", ref=sds.ref)
    assert isinstance((await heard).msg, m.Sds)
    # a retry of either (the handset's, had the answer been late) changes nothing
    again = u1.expect(answer_to(sds.ref))
    u1.send(sds)
    await again
    assert sum(isinstance(i.msg, m.Sds) for i in u2.inbox) == 1


async def test_a_handset_retries_what_no_server_took(
    restartable: Restartable, handset: HandsetFactory
) -> None:
    """Tried: an SDS sent before the server ever ran (no session kept it). Expect: the
    handset sends it again until the server, once up, answers."""
    u1 = await handset("u1")
    sds = m.Sds(to="unit:u1", text="note to self", ref=u1.next_ref())
    status = u1.expect(answer_to(sds.ref), 20)
    u1.send(sds)
    await asyncio.sleep(0)  # (sent now, to nobody)
    await restartable.start()
    assert (await status).msg == m.SdsStatus(state="delivered", ref=sds.ref)
    assert u1.stats.counts.get("retried", 0) >= 1


@pytest.mark.parametrize("mqtt_client", ["memory"])
async def test_a_state_file_serves_one_server_at_a_time(
    restartable: Restartable, broker: BrokerConfig, prefix: str
) -> None:
    """Tried: a second server on the state file of one that runs. Expect: it refuses to
    start, saying why in one line, and the first goes on."""
    first = await restartable.start()
    second = Server(
        Config(broker=broker, prefix=prefix, server_id="other", state=restartable.config.state),
        parse_fleet(FLEET),
    )
    with pytest.raises(StoreError, match="in use by another server") as refused:
        await second.start()
    assert "\n" not in str(refused.value)
    assert first.transport.connected


def _kind(h: Handset) -> str:
    return {"GmqttTransport": "gmqtt", "PahoTransport": "paho"}.get(
        type(h.transport).__name__, "memory"
    )


@pytest.mark.parametrize("mqtt_client", ["memory"])
async def test_a_damaged_state_file_costs_only_what_is_damaged(
    restartable: Restartable, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Tried: a state file holding a record of a kind this version does not know, bytes
    that are no record, a time of minus infinity, and one sound call. Expect: the server
    starts, serves the sound call, says what it dropped, and the file keeps only the
    sound record."""
    sound = {
        "seq": 3,
        "call": "c1",
        "call_until": 0.0,
        "since": time.time(),
        "holder": ["u1", 100, "normal", 1, time.time(), None],
        "queue": [],
        "emergencies": [],
    }
    store = open_store(restartable.config.state)
    store.save(
        {
            "route/u1": b"\x01",
            "unit/u2": b"\xc1 not msgpack",
            "group/tg-2": pack(sound | {"since": float("-inf")}),
            "group/tg-1": pack(sound),
        }
    )
    store.close()

    server = await restartable.start()

    assert server.network.state_msg("tg-1").talker == "u1"
    assert server.network.state_msg("tg-2").talker is None
    said = [r.getMessage() for r in caplog.records]
    dropped = [line for line in said if line.startswith("saved state not adopted: ")]
    assert len(dropped) == 3 and any("route/u1" in line for line in dropped)
    assert any("unit/u2: undecodable record" in line for line in dropped)
    assert "3 saved records not adopted in all, in part or whole" in said
    await restartable.stop()
    store = open_store(restartable.config.state)
    assert set(store.load()) == {"group/tg-1"}  # tg-2 had nothing worth keeping
    store.close()


@pytest.mark.parametrize("mqtt_client", ["memory"])
async def test_a_state_file_that_refuses_writes_costs_no_service_and_is_caught_up(
    restartable: Restartable, handset: HandsetFactory
) -> None:
    """Tried: the state file refuses writes (SQLite's query-only mode, as a full disk or a
    read-only file would) while a unit takes the floor. Expect: the unit is granted all
    the same, the failure is counted, and the next write that works includes the grant."""
    server = await restartable.start()
    u1 = await handset("u1", "tg-1")
    assert server.store is not None
    db = server.store._db  # type: ignore[attr-defined]
    db.execute("PRAGMA query_only=ON")
    assert isinstance(await u1.press("tg-1"), m.Granted)
    assert server.metrics.state_failures >= 1
    db.execute("PRAGMA query_only=OFF")
    await u1.ask(m.Affiliate(groups=["tg-1"], ref=u1.next_ref()))  # any next write
    record = unpack(server.store.load()["group/tg-1"])
    assert record["holder"][0] == "u1"


@pytest.mark.parametrize("mqtt_client", ["memory"])
async def test_location_reports_do_not_crowd_out_an_alert_while_the_server_is_away(
    restartable: Restartable, handset: HandsetFactory, broker: BrokerConfig
) -> None:
    """Tried: the broker keeps at most 50 messages for the absent server; a unit sends 200
    location reports, then an emergency alert. Expect: the alert is acted on (reports are
    QoS 0: not kept for an absent server, the next one replaces them)."""
    memory = _memory_broker(broker)
    memory.max_queued = 50
    await restartable.start()
    u1 = await handset("u1", "tg-1")
    await restartable.stop()
    for i in range(200):
        u1.send(m.Location(lat=51.0 + i / 1000, lon=0.0))
    alert = m.EmergencyAlert(tg="tg-1", ref=u1.next_ref())
    raised = u1.expect(answer_to(alert.ref), 5)
    u1.send(alert)
    await restartable.start()
    assert (await raised).msg == m.EmergencyState(tg="tg-1", state="raised", ref=alert.ref)


def _memory_broker(config: BrokerConfig) -> MemoryBroker:
    from esn.transport.memory import _brokers

    return _brokers[config.port]


@pytest.mark.parametrize("mqtt_client", ["memory"])
async def test_an_alert_is_sent_again_until_a_server_answers(
    restartable: Restartable, handset: HandsetFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tried: an emergency alert while no server runs, for longer than other messages are
    retried. Expect: the handset keeps sending it, and the server that comes answers it."""
    monkeypatch.setattr(handset_module, "RETRY_AFTER_S", (0.02, 0.04))
    u1 = await handset("u1")
    alert = m.EmergencyAlert(tg="tg-1", ref=u1.next_ref())
    raised = u1.expect(answer_to(alert.ref), 10)
    u1.send(alert)
    await eventually(lambda: u1.stats.counts.get("retried", 0) >= 6)  # past the schedule
    await restartable.start()
    assert (await raised).msg == m.EmergencyState(tg="tg-1", state="raised", ref=alert.ref)
