"""Nothing a unit was told is lost when the server restarts, and nothing sent while it is
away is lost either: the state store, the server's persistent session, handset retries.

Run on the in-process broker and on Mosquitto with both MQTT stacks.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from esn.client import handset as handset_module
from esn.client.handset import Handset, Inbound
from esn.core.fleet import parse_fleet
from esn.protocol import codec
from esn.protocol import messages as m
from esn.server.shell import Config, Server
from esn.store import StoreError
from esn.transport import BrokerConfig, make_transport
from tests.conftest import FLEET, HandsetFactory

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
    await seen.subscribe(u1.topics.unit_up("u1"))
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
