"""The fault and abuse suite (`pytest -m fault`): each test says what it tries, and asserts
that nothing was lost and the service stayed up.

Servers and handsets that must die run as their own processes and are killed with real
signals; brokers are killed and restarted on the same port.
"""

from __future__ import annotations

import asyncio
import os
import signal
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import NamedTuple

import msgpack
import pytest

from esn.client.handset import HAS_PERMISSION, Handset, Inbound
from esn.core.fleet import parse_fleet
from esn.protocol import codec
from esn.protocol import messages as m
from esn.server.shell import Config, Server
from esn.tools.broker import Mosquitto
from esn.tools.processes import free_port, start_server
from esn.tools.secure import SecureProfile, generate
from esn.transport import BrokerConfig, TransportError, make_transport
from tests.conftest import FLEET, REAL_CLIENTS, HandsetFactory, eventually, spawn_handset

pytestmark = [pytest.mark.broker, pytest.mark.fault]


@pytest.fixture(params=REAL_CLIENTS)
def mqtt_client(request: pytest.FixtureRequest) -> str:
    """Real processes and real brokers are killed here: the MQTT stacks only."""
    return str(request.param)


FLEET_TOML = """
[defaults]
hang_ms = 10000
[[talkgroup]]
id = "tg-1"
[[talkgroup]]
id = "tg-2"
[[talkgroup]]
id = "tg-closed"
members = ["u1", "disp"]
[[unit]]
id = "disp"
role = "dispatcher"
priority = 250
"""


async def handset_process(
    url: str, prefix: str, unit: str, *, keepalive: int = 30, talk: bool = False
) -> asyncio.subprocess.Process:
    proc, said = await spawn_handset(url, prefix, unit, keepalive=keepalive, talk=talk)
    assert said in ("granted", "ready"), said
    return proc


async def end(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGCONT)
        proc.kill()
    await proc.wait()


async def spawn_server(url: str, prefix: str, fleet: Path) -> asyncio.subprocess.Process:
    """`esn server` as its own process; returns once it has recovered and is serving. Its
    state file is beside the fleet file, so the one a test restarts takes up its state."""
    return await start_server(
        url,
        fleet,
        metrics_port=free_port(),
        state=fleet.with_name("state.sqlite3"),
        args=("--prefix", prefix, "--server-id", "fault-srv"),
    )


@pytest.fixture
def fleet_file(tmp_path: Path) -> Path:
    path = tmp_path / "fleet.toml"
    path.write_text(FLEET_TOML)
    return path


@pytest.fixture
async def own_broker() -> AsyncIterator[Mosquitto]:
    """A broker this test may kill."""
    broker = Mosquitto().start()
    yield broker
    broker.close()


def media_from(talker: str) -> Callable[[Inbound], bool]:
    return lambda i: isinstance(i.msg, m.Media) and i.msg.talker == talker


async def pair(url: str, prefix: str) -> tuple[Handset, Handset]:
    """u1 and u2, started and affiliated to tg-1; u1 sends voice every 20 ms when talking."""
    cfg = BrokerConfig.from_url(url)
    talker = Handset("u1", cfg, prefix=prefix, media_interval=0.02)
    other = Handset("u2", cfg, prefix=prefix)
    for h in (talker, other):
        await h.start()
        await h.affiliate("tg-1")
    return talker, other


# --- the server dies ----------------------------------------------------------------------


async def test_server_killed_mid_call_the_call_goes_on(
    own_broker: Mosquitto, fleet_file: Path, prefix: str
) -> None:
    """Tried: SIGKILL the server while u1 talks, start a new one. Expect: the new server
    adopts the call from the retained state, u2 keeps hearing u1 in the same call."""
    server = await spawn_server(own_broker.url, prefix, fleet_file)
    talker, listener = await pair(own_broker.url, prefix)
    try:
        granted = await talker.press("tg-1")
        assert isinstance(granted, m.Granted)
        await listener.expect(media_from("u1"))
        server.kill()
        await server.wait()
        regranted = talker.expect(lambda i: isinstance(i.msg, m.Granted), timeout=15)
        server = await spawn_server(own_broker.url, prefix, fleet_file)
        heard = listener.expect(media_from("u1"), timeout=10)
        packet = (await heard).msg
        assert isinstance(packet, m.Media) and packet.call == granted.call
        assert (await regranted).msg.call == granted.call  # type: ignore[attr-defined]
        assert talker.floor_state("tg-1") == HAS_PERMISSION
        # and the floor is really the restored one: release hands it on
        idle = listener.expect(lambda i: isinstance(i.msg, m.Idle))
        talker.release("tg-1")
        await idle
    finally:
        await talker.stop()
        await listener.stop()
        await end(server)


async def test_stale_state_is_not_adopted_after_a_restart(
    own_broker: Mosquitto, fleet_file: Path, prefix: str
) -> None:
    """Tried: the talker leaves while the server is dead. Expect: the new server does not
    resurrect its call; the group is idle and others can talk."""
    server = await spawn_server(own_broker.url, prefix, fleet_file)
    talker, other = await pair(own_broker.url, prefix)
    try:
        await talker.press("tg-1")
        server.kill()
        await server.wait()
        await talker.stop()  # retained presence: offline
        idle_state = other.expect(lambda i: isinstance(i.msg, m.State) and i.msg.floor == "idle")
        server = await spawn_server(own_broker.url, prefix, fleet_file)
        await idle_state
        await eventually(lambda: other.floor_state("tg-1") == "no_permission")
        assert isinstance(await other.press("tg-1"), m.Granted)
    finally:
        await other.stop()
        await end(server)


async def test_server_killed_keeps_queues_emergencies_and_messages(
    own_broker: Mosquitto, fleet_file: Path, prefix: str
) -> None:
    """Tried: SIGKILL the server with u2 queued behind u1, an emergency open and a message
    kept for an offline unit; a unit raises another emergency while no server runs.
    Expect: the new server takes each up from its state file and its session: u2 is
    granted when u1 releases, the dispatcher acknowledges both emergencies, the offline
    unit gets its message when it comes back."""
    server = await spawn_server(own_broker.url, prefix, fleet_file)
    cfg = BrokerConfig.from_url(own_broker.url)
    u1, u2 = await pair(own_broker.url, prefix)
    disp = Handset("disp", cfg, prefix=prefix)
    away = Handset("away", cfg, prefix=prefix)
    for h in (disp, away):
        await h.start()
    await disp.affiliate("tg-1")
    await away.stop()
    try:
        assert isinstance(await u1.press("tg-1"), m.Granted)
        assert isinstance(await u2.press("tg-1"), m.Queued)
        assert isinstance(
            await u2.ask(m.EmergencyAlert(tg="tg-1", ref=u2.next_ref())), m.EmergencyState
        )
        kept = await u1.ask(m.Sds(to="unit:away", text="bring the ladder", ref=u1.next_ref()))
        assert kept == m.SdsStatus(state="queued", ref=kept.ref)
        server.kill()
        await server.wait()
        raised = u1.expect(lambda i: isinstance(i.msg, m.EmergencyState), timeout=20)
        u1.send(m.EmergencyAlert(tg="tg-1", ref=u1.next_ref()))  # to no server

        server = await spawn_server(own_broker.url, prefix, fleet_file)

        assert (await raised).msg.state == "raised"  # type: ignore[attr-defined]
        for unit in ("u2", "u1"):
            ack = m.EmergencyAck(tg="tg-1", unit=unit, ref=disp.next_ref())
            assert isinstance(await disp.ask(ack), m.Ok)
        granted = u2.expect(lambda i: isinstance(i.msg, m.Granted), timeout=10)
        u1.release("tg-1")
        await granted
        back = Handset("away", cfg, prefix=prefix)
        delivered = back.expect(lambda i: isinstance(i.msg, m.Sds), timeout=10)
        await back.start()
        assert (await delivered).msg.text == "bring the ladder"  # type: ignore[attr-defined]
        await back.stop()
    finally:
        for h in (u1, u2, disp):
            await h.stop()
        await end(server)


async def test_a_backlog_beyond_the_packet_ids_in_flight_is_answered_in_full(
    own_broker: Mosquitto, prefix: str, tmp_path: Path
) -> None:
    """Tried: while the server is away, 25,500 units send an affiliation each (more
    answers than QoS 1 publishes may await acks at once). Expect: the new server answers
    every one, dropping none."""
    cfg = BrokerConfig.from_url(own_broker.url)
    config = Config(broker=cfg, prefix=prefix, server_id=f"bl-{prefix}", state=str(tmp_path / "s"))
    server = Server(config, parse_fleet(FLEET))
    await server.start()
    await server.stop()
    sender = make_transport("gmqtt", cfg, client_id=f"sender-{prefix}")
    counter = make_transport("gmqtt", cfg, client_id=f"counter-{prefix}")
    answers = 0
    last = asyncio.Event()

    def count(topic: str, payload: bytes) -> None:
        nonlocal answers
        answers += 1
        if answers == 25_500:
            last.set()

    counter.on_message = count
    await counter.start()
    await counter.subscribe(f"{prefix}/unit/+/down")
    await sender.start()
    try:
        affiliate = codec.encode(m.Affiliate(groups=["tg-1"], ref=1))
        for u in range(25_500):
            sender.publish(f"{prefix}/unit/b{u}/up", affiliate, qos=1)
            if u % 1000 == 999:
                await sender.writable()
        await asyncio.wait_for(sender._drain(), 30)
        server = Server(config, parse_fleet(FLEET))
        await server.start()
        await asyncio.wait_for(last.wait(), 30)
        assert server.transport.dropped == 0
    finally:
        await server.stop()
        await sender.stop()
        await counter.stop()


# --- the broker dies ----------------------------------------------------------------------


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
async def test_broker_restart_mid_call_the_call_goes_on(
    own_broker: Mosquitto, prefix: str, how: signal.Signals
) -> None:
    """Tried: kill the broker (SIGKILL: no wills; SIGTERM: every will fires) while u1
    talks, restart it on the same port. Expect: server and handsets reconnect, the server
    republishes its state, u1 reclaims the floor and u2 hears u1 again."""
    cfg = BrokerConfig.from_url(own_broker.url)
    srv = Server(Config(broker=cfg, prefix=prefix, keepalive=5), parse_fleet(FLEET))
    await srv.start()
    talker, listener = await pair(own_broker.url, prefix)
    try:
        await talker.press("tg-1")
        await listener.expect(media_from("u1"))
        own_broker.stop(how)
        await eventually(lambda: not listener.transport.connected)
        own_broker.start()
        await listener.expect(media_from("u1"), timeout=20)
        assert srv.network.state_msg("tg-1").talker == "u1"
        await eventually(lambda: talker.floor_state("tg-1") == HAS_PERMISSION)
    finally:
        for h in (talker, listener):
            await h.stop()
        await srv.stop()


async def test_broker_stopped_a_queued_unit_keeps_its_turn(
    own_broker: Mosquitto, prefix: str
) -> None:
    """Tried: stop the broker (SIGTERM: every will fires, and the server may hear them and
    drop the talker and the queue) while u2 waits behind u1; restart it. Expect: u2 asks
    again when the server is back and is granted, at once or after u1's turn."""
    cfg = BrokerConfig.from_url(own_broker.url)
    srv = Server(Config(broker=cfg, prefix=prefix, keepalive=5), parse_fleet(FLEET))
    await srv.start()
    talker, waiter = await pair(own_broker.url, prefix)
    try:
        await talker.press("tg-1")
        assert isinstance(await waiter.press("tg-1"), m.Queued)
        own_broker.stop(signal.SIGTERM)
        await eventually(lambda: not waiter.transport.connected)
        answer = waiter.expect(lambda i: isinstance(i.msg, m.Queued | m.Granted), timeout=20)
        own_broker.start()
        if isinstance((await answer).msg, m.Queued):
            granted = waiter.expect(lambda i: isinstance(i.msg, m.Granted), timeout=10)
            await eventually(lambda: talker.floor_state("tg-1") == HAS_PERMISSION, timeout=20)
            talker.release("tg-1")
            await granted
        assert waiter.floor_state("tg-1") == HAS_PERMISSION
    finally:
        for h in (talker, waiter):
            await h.stop()
        await srv.stop()


# --- handsets die or stall ----------------------------------------------------------------


async def test_a_silently_dead_handset_loses_the_floor_by_its_will(
    handset: HandsetFactory, mosquitto: Mosquitto, broker: BrokerConfig, prefix: str
) -> None:
    """Tried: freeze (SIGSTOP) a talking handset with keep-alive 2 s: its socket stays open
    but silent. Expect: the broker gives up on it, its will fires, the server releases the
    floor and grants the queued unit. (T1 is set long here so that only the will can.)

    MQTT asks the broker to give up after 1.5 keep-alives; Mosquitto 2.0 checks keep-alives
    every 5 s, so 1.5 x 2 s + 5 s is the bound that can be kept."""
    slow_t1 = {**FLEET, "defaults": {**FLEET["defaults"], "end_of_media_ms": 60000}}
    srv = Server(Config(broker=broker, prefix=prefix), parse_fleet(slow_t1))
    await srv.start()
    proc = await handset_process(mosquitto.url, prefix, "u1", keepalive=2, talk=True)
    try:
        waiting = await handset("u2", "tg-1")
        assert isinstance(await waiting.press("tg-1"), m.Queued)
        granted = waiting.expect(lambda i: isinstance(i.msg, m.Granted), timeout=15)
        loop = asyncio.get_running_loop()
        frozen_at = loop.time()
        proc.send_signal(signal.SIGSTOP)
        await granted
        assert loop.time() - frozen_at <= 1.5 * 2 + 5 + 1
        assert "u1" in srv.network.offline
    finally:
        await end(proc)
        await srv.stop()


@pytest.mark.parametrize("mqtt_client", ["gmqtt"])
async def test_a_slow_consumer_does_not_slow_anyone_else(
    server: Server, handset: HandsetFactory, mosquitto: Mosquitto, prefix: str
) -> None:
    """Tried: a listener stops reading (SIGSTOP) during a call. Expect: the other listener
    keeps receiving every packet in order, and the server keeps relaying."""
    slow = await handset_process(mosquitto.url, prefix, "u3")
    try:
        talker = await handset("u1", "tg-1")
        listener = await handset("u2", "tg-1")
        slow.send_signal(signal.SIGSTOP)
        await talker.press("tg-1")
        seqs: list[int] = []
        done = asyncio.Event()

        def watch(i) -> None:  # type: ignore[no-untyped-def]
            if isinstance(i.msg, m.Media):
                seqs.append(i.msg.seq)
                if len(seqs) >= 100:
                    done.set()

        listener.on_inbound = watch
        listener.expect(lambda i: False, timeout=60)  # keeps media flowing into on_inbound
        await asyncio.wait_for(done.wait(), 30)
        assert seqs[:100] == list(range(seqs[0], seqs[0] + 100))  # nothing lost, in order
    finally:
        await end(slow)


async def test_duplicate_client_id_does_not_break_the_service(
    server: Server, handset: HandsetFactory, broker: BrokerConfig, prefix: str, mqtt_client: str
) -> None:
    """Tried: a second connection under u1's client id. Expect: the broker drops the older
    one; no floor stays stuck, and other units are served throughout."""
    first = await handset("u1", "tg-1")
    await first.press("tg-1")
    other = await handset("u2", "tg-2")
    impostor = Handset("u1", broker, prefix=prefix, mqtt_client=mqtt_client)
    await impostor.start()
    try:
        # the will of the displaced session releases the floor it held
        await eventually(lambda: server.network.state_msg("tg-1").floor == "idle", timeout=10)
        assert isinstance(await other.press("tg-2"), m.Granted)
    finally:
        await impostor.stop()


# --- floods -------------------------------------------------------------------------------


async def test_a_floor_request_flood_leaves_other_groups_served(
    server: Server, handset: HandsetFactory, broker: BrokerConfig, prefix: str, mqtt_client: str
) -> None:
    """Tried: one unit sends 3000 floor requests as fast as it can. Expect: it is rate
    limited (told at most about once a second), and a unit in another group gets every
    one of its grants meanwhile."""
    flooder = await handset("u9", "tg-1")
    worker = await handset("u2", "tg-2")
    denied: list[m.Message] = []
    flooder.on_inbound = lambda i: denied.append(i.msg) if isinstance(i.msg, m.Deny) else None
    topic = flooder.topics.floor_up("tg-1", "u9")
    from esn.protocol import codec

    for i in range(3000):
        flooder.transport.publish(topic, codec.encode(m.Request(ref=10_000 + i)), qos=0)
    for _ in range(5):
        assert isinstance(await worker.press("tg-2"), m.Granted)
        worker.release("tg-2")

    def refused() -> int:  # at intake, before decoding, or by the core's floor limit
        return sum(
            r.get("rate_limited", 0) for r in (server.metrics.rejected, server.network.rejected)
        )

    def told() -> int:
        return sum(d.cause == "rate_limited" for d in denied)  # type: ignore[attr-defined]

    await eventually(lambda: refused() >= 2000 and told() >= 1, timeout=20)
    assert told() <= 10


# --- the secure profile -------------------------------------------------------------------


class Secure(NamedTuple):
    profile: SecureProfile
    server: Server
    broker: Mosquitto


@pytest.fixture
async def secure(prefix: str) -> AsyncIterator[Secure]:
    fleet = parse_fleet({**FLEET, "unit": [*FLEET["unit"], {"id": "u1"}, {"id": "u2"}]})
    work = tempfile.TemporaryDirectory(prefix="esn-secure-")  # the broker's account passes
    os.chmod(work.name, 0o711)  # through to its files (pytest's tmp_path is closed to it)
    profile = generate(
        fleet,
        Path(work.name) / "broker",
        port=free_port(),
        tls_port=free_port(),
        server_id="esn-sec",
        prefix=prefix,
    )
    broker = Mosquitto(profile.port, profile.conf, complete=True).start()
    cfg = BrokerConfig.from_url(
        f"mqtts://127.0.0.1:{profile.tls_port}",
        username="esn-sec",
        password=profile.password("esn-sec"),
        ca_file=str(profile.ca_file),
    )
    srv = Server(Config(broker=cfg, prefix=prefix, server_id="esn-sec"), fleet)
    await srv.start()
    try:
        yield Secure(profile, srv, broker)
    finally:
        await srv.stop()
        broker.close()
        work.cleanup()


def unit_broker(profile: SecureProfile, unit: str, password: str | None = None) -> BrokerConfig:
    return BrokerConfig.from_url(
        f"mqtt://127.0.0.1:{profile.port}",
        username=unit,
        password=password or profile.password(unit),
    )


async def test_secure_profile_refuses_a_wrong_password(secure: Secure, prefix: str) -> None:
    """Tried: connect as u1 with a wrong password, and with no credentials. Expect: refused."""
    profile = secure.profile
    for cfg in (
        unit_broker(profile, "u1", "guess"),
        BrokerConfig.from_url(f"mqtt://127.0.0.1:{profile.port}"),
    ):
        with pytest.raises(TransportError, match="refused"):
            await Handset("u1", cfg, prefix=prefix).transport.start()


async def test_secure_profile_stops_a_unit_speaking_as_another(secure: Secure, prefix: str) -> None:
    """Tried: u2 publishes a floor request and a location on u1's topics. Expect: the
    broker drops both; the server never sees them; u1's own request still works."""
    profile, srv = secure.profile, secure.server
    u1 = Handset("u1", unit_broker(profile, "u1"), prefix=prefix)
    u2 = Handset("u2", unit_broker(profile, "u2"), prefix=prefix)
    try:
        for h in (u1, u2):
            await h.start()
            await h.affiliate("tg-1")
        from esn.protocol import codec

        u2.transport.publish(u2.topics.floor_up("tg-1", "u1"), codec.encode(m.Request()), qos=1)
        u2.transport.publish(u2.topics.unit_up("u1"), codec.encode(m.Location(lat=1, lon=1)), 1)
        # a round trip of u2's own after the spoofs: had they passed, they came first
        await u2.ask(m.Affiliate(groups=["tg-1"], ref=u2.next_ref()))
        assert srv.network.state_msg("tg-1").floor == "idle"
        assert srv.metrics.messages.get(("location", "in"), 0) == 0
        assert isinstance(await u1.press("tg-1"), m.Granted)
    finally:
        await u1.stop()
        await u2.stop()


async def test_secure_profile_keeps_a_closed_group_to_its_members(
    secure: Secure, prefix: str
) -> None:
    """Tried: u2, not a member, subscribes to tg-closed while member u1 talks there.
    Expect: u1's fellow member (the dispatcher) hears it; u2 receives nothing."""
    profile = secure.profile
    u1 = Handset("u1", unit_broker(profile, "u1"), prefix=prefix, media_interval=0.02)
    disp = Handset("disp", unit_broker(profile, "disp"), prefix=prefix)
    u2 = Handset("u2", unit_broker(profile, "u2"), prefix=prefix)
    try:
        for h in (u1, disp, u2):
            await h.start()
        await u1.affiliate("tg-closed")
        await disp.affiliate("tg-closed")
        reply = await u2.affiliate("tg-closed")  # the server says no ...
        assert reply.rejected == [{"tg": "tg-closed", "cause": "not_member"}]
        t = u2.topics  # ... and listening anyway gets nothing from the broker
        await u2.transport.subscribe(t.group_down_all("tg-closed"), t.state("tg-closed"))
        await u1.press("tg-closed")
        for _ in range(5):
            await disp.expect(media_from("u1"))
        await u2.ask(m.Affiliate(groups=[], ref=u2.next_ref()))
        assert not any("tg-closed" in i.topic for i in u2.inbox)
    finally:
        for h in (u1, disp, u2):
            await h.stop()


async def test_secure_profile_keeps_a_listened_in_voice_to_its_listener(
    secure: Secure, prefix: str
) -> None:
    """Tried: the dispatcher listens in on u1 (docs/protocol.md, 11.13) while u2 subscribes
    to the dispatcher's unit media topic and publishes a packet as u1's. Expect: the
    dispatcher hears u1; u2 receives nothing and its forged packet is not relayed."""
    profile = secure.profile
    u1 = Handset("u1", unit_broker(profile, "u1"), prefix=prefix, media_interval=0.02)
    u2 = Handset("u2", unit_broker(profile, "u2"), prefix=prefix)
    disp = Handset("disp", unit_broker(profile, "disp"), prefix=prefix)
    try:
        for h in (u1, u2, disp):
            await h.start()
        await u2.transport.subscribe(disp.topics.unit_media_down("disp"))
        answer = await disp.ask(m.AmbientListen(unit="u1", ref=disp.next_ref()))
        assert isinstance(answer, m.Ambient) and answer.state == "listening"
        forged = {"t": "media", "call": answer.call, "seq": 999_999, "data": b"x"}
        u2.transport.publish(u2.topics.unit_media_up("u1"), msgpack.packb(forged), qos=1)
        for _ in range(5):
            got = await disp.expect(lambda i: isinstance(i.msg, m.Media))
            assert isinstance(got.msg, m.Media) and got.msg.talker == "u1"
            assert got.msg.seq < 999_999  # (u1's own, not the forgery)
        await u2.ask(m.Affiliate(groups=[], ref=u2.next_ref()))
        assert u2.stats.counts.get("ambient_rx", 0) == 0
    finally:
        for h in (u1, u2, disp):
            await h.stop()


async def test_secure_profile_lets_only_the_server_write_a_status(
    secure: Secure, prefix: str
) -> None:
    """Tried: u2 publishes retained `unit_status` messages of its own making ("at scene")
    on u1's status topic and on its own. Expect: the broker drops both; a dispatcher
    watching every status sees only the one the server publishes when u1 reports."""
    profile = secure.profile
    u1 = Handset("u1", unit_broker(profile, "u1"), prefix=prefix)
    u2 = Handset("u2", unit_broker(profile, "u2"), prefix=prefix)
    disp = Handset("disp", unit_broker(profile, "disp"), prefix=prefix)
    try:
        for h in (u1, u2, disp):
            await h.start()
        await disp.transport.subscribe(f"{prefix}/unit/+/status")
        await disp.ask(m.Affiliate(groups=[], ref=disp.next_ref()))  # (subscribed by now)
        shown = disp.expect(lambda i: isinstance(i.msg, m.UnitStatus))  # the first one
        lie = codec.encode(m.UnitStatus(code=3, unit="u1", text="at scene", ts=1))
        for unit in ("u1", "u2"):
            u2.transport.publish(u2.topics.unit_status(unit), lie, qos=1, retain=True)
        await u2.ask(m.Affiliate(groups=[], ref=u2.next_ref()))  # (the broker had them)
        await u1.report_status(1)
        got = (await shown).msg
        assert isinstance(got, m.UnitStatus) and (got.unit, got.text) == ("u1", "available")
    finally:
        for h in (u1, u2, disp):
            await h.stop()


def process_uid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/status").read_text().split("Uid:")[1].split()[0])


def listening_ports(pid: int) -> set[int]:
    """The TCP ports process `pid` listens on (from /proc: its sockets, and the tables)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd)
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


async def test_secure_profile_listens_only_where_it_says_and_not_as_root(
    secure: Secure,
) -> None:
    """Tried: start the generated profile. Expect: exactly its two loopback listeners (the
    client-id option before them used to open 1883 on every interface), not run as root."""
    pid = secure.broker.proc.pid  # type: ignore[union-attr]
    assert listening_ports(pid) == {secure.profile.port, secure.profile.tls_port}
    assert process_uid(pid) != 0


@pytest.mark.parametrize("victim", ["u1", "esn-sec"])
async def test_secure_profile_keeps_a_client_id_to_its_account(
    secure: Secure, prefix: str, victim: str
) -> None:
    """Tried: u2, with its own password, connects under u1's client id, and under the
    server's. Expect: harmless: the broker names the session after the account, so u1 and
    the server stay connected and are not pushed off."""
    profile, srv = secure.profile, secure.server
    u1 = Handset("u1", unit_broker(profile, "u1"), prefix=prefix)
    await u1.start()
    await u1.affiliate("tg-1")
    intruder = make_transport("gmqtt", unit_broker(profile, "u2"), client_id=victim)
    try:
        await intruder.start()
        # a round trip of u1's through the server after the intruder is in
        assert isinstance(await u1.press("tg-1"), m.Granted)
        assert (u1.transport.reconnects, srv.transport.reconnects) == (0, 0)
        assert u1.transport.connected and srv.transport.connected
    finally:
        await intruder.stop()
        await u1.stop()
