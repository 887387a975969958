"""Three server instances sharing the groups on a real 3-node NATS cluster.

Each instance is connected to its own node and serves a share of the partitions; the
handsets are spread over the nodes. The floor rules of `tests/test_wire_floor.py` are run
again here: a unit's messages are acted on by the instance serving it and handed to the
one serving the group they are about, and which groups a unit is in is known to every
instance. `server` is the instance serving tg-1, whose metrics those tests read.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
from collections.abc import AsyncIterator, Callable

import pytest

from esn import __version__
from esn.client.handset import Inbound
from esn.core.fleet import parse_fleet
from esn.core.partitions import PARTITIONS, partition_of
from esn.protocol import codec
from esn.protocol import messages as m
from esn.protocol.topics import Topics
from esn.server.shell import LINK_GRACE_S, Config, Server
from esn.tools.nats import NatsCluster
from esn.tools.processes import free_port
from esn.transport import BrokerConfig, make_transport
from tests import test_ambient, test_wire_floor
from tests.conftest import FLEET, HandsetFactory, eventually, handsets
from tests.test_private import is_private

pytestmark = [pytest.mark.broker, pytest.mark.cluster]

globals().update({k: v for k, v in vars(test_wire_floor).items() if k.startswith("test_")})
# listening in and remote talk, acted on by the instance serving the target unit or group
globals().update(
    {
        k: v
        for k, v in vars(test_ambient).items()
        if k
        in (
            "test_a_dispatcher_hears_a_unit_whose_user_is_shown_nothing",
            "test_remote_talk_makes_a_unit_talk_in_its_group",
        )
    }
)


@pytest.fixture(params=["gmqtt"])
def mqtt_client(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def servers(
    nats_cluster: NatsCluster, prefix: str, mqtt_client: str
) -> AsyncIterator[list[Server]]:
    """Three instances, on nodes 1, 2, 3, once the partitions are shared evenly (no more
    move then)."""
    made = [
        Server(
            Config(
                broker=BrokerConfig.from_url(url),
                prefix=prefix,
                server_id=f"srv{i}-{prefix}",
                mqtt_client=mqtt_client,
                keepalive=5,
                cluster=tuple(nats_cluster.nats_urls),
            ),
            parse_fleet(FLEET),
        )
        for i, url in enumerate(nats_cluster.mqtt_urls, 1)
    ]
    await asyncio.gather(*(s.start() for s in made))
    try:
        even = sorted([PARTITIONS // 3 + (i < PARTITIONS % 3) for i in range(3)])
        await eventually(lambda: sorted(len(s._ready) for s in made) == even, 20)
        yield made
    finally:
        await asyncio.gather(*(s.stop() for s in made), return_exceptions=True)


def on_topic(topic: str) -> Callable[[Inbound], bool]:
    return lambda i: i.topic == topic


def on_state(tg: str) -> Callable[[Inbound], bool]:
    return lambda i: isinstance(i.msg, m.State) and i.msg.tg == tg


def serving(servers: list[Server], ident: str) -> Server:
    return next(s for s in servers if partition_of(ident) in s._ready)


@pytest.fixture
def server(servers: list[Server]) -> Server:
    return serving(servers, "tg-1")


@pytest.fixture
async def handset(
    nats_cluster: NatsCluster, prefix: str, mqtt_client: str, servers: list[Server]
) -> AsyncIterator[HandsetFactory]:
    """Started, affiliated handsets on nodes 2, 3, 1, 2, ... in turn."""
    urls = nats_cluster.mqtt_urls[1:] + nats_cluster.mqtt_urls[:1]
    nodes = itertools.cycle([BrokerConfig.from_url(u) for u in urls])
    async for make in handsets(nodes, prefix, mqtt_client):
        yield make


async def test_the_partitions_are_shared_and_each_state_names_its_server(
    servers: list[Server], handset: HandsetFactory
) -> None:
    parts = [s._ready for s in servers]
    assert set().union(*parts) == set(range(PARTITIONS))
    assert sum(map(len, parts)) == PARTITIONS  # (no partition served twice)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    a = await handset("u1")
    topics = [s.topics.status(s.config.server_id) for s in servers]
    statuses = [a.expect(on_topic(t)) for t in topics]
    states = [a.expect(on_state(tg)) for tg in ("tg-1", "tg-2")]
    await a.transport.subscribe(*topics)  # (their retained statuses, again)
    for s, status in zip(servers, statuses, strict=True):  # each lists what it serves
        got = (await status).msg
        assert isinstance(got, m.Status) and got.parts == sorted(s._ready)
    await a.affiliate("tg-1", "tg-2")
    for tg, state in zip(("tg-1", "tg-2"), states, strict=True):
        got = (await state).msg
        assert isinstance(got, m.State) and got.srv == serving(servers, tg).config.server_id


async def test_a_unit_served_by_one_instance_talks_in_a_group_served_by_another(
    servers: list[Server], handset: HandsetFactory
) -> None:
    units = [f"u{i}" for i in range(1, 5)]
    talker = next(u for u in units if serving(servers, u) is not serving(servers, "tg-1"))
    listener = await handset(next(u for u in units if u != talker), "tg-1")
    t = await handset(talker, "tg-1")
    heard = listener.expect(lambda i: isinstance(i.msg, m.Media))
    assert isinstance(await t.press("tg-1"), m.Granted)
    assert (await heard).msg.talker == talker  # type: ignore[attr-defined]
    # an emergency is about the group: handed to the instance serving it, answered by it
    raised = await t.ask(m.EmergencyAlert(tg="tg-1", ref=t.next_ref()))
    assert isinstance(raised, m.EmergencyState) and raised.state == "raised"
    assert serving(servers, "tg-1").network.floors["tg-1"].emergencies == {talker: None}
    # leaving the group (told to the unit's instance) lets go of the floor in the other
    idle = listener.expect(lambda i: isinstance(i.msg, m.Idle))
    await t.deaffiliate("tg-1")
    await idle


async def test_a_private_call_between_units_of_two_instances(
    servers: list[Server], handset: HandsetFactory
) -> None:
    """Tried: a private call between units served by different instances, each talking
    in turn, the callee hanging up; a third unit, served elsewhere again, calling the
    callee meanwhile. Expect: the call kept by the callee's instance only (the set-up
    and the caller's turns handed to it), so the third is told busy; voice both ways,
    each packet relayed once."""
    units = [f"u{i}" for i in range(1, 60)]
    b = next(u for u in units if serving(servers, u) is not serving(servers, "u1"))
    c = next(
        u for u in units if serving(servers, u) not in (serving(servers, x) for x in ("u1", b))
    )
    caller, callee, third = [await handset(u, "tg-1") for u in ("u1", b, c)]
    connected = caller.expect(is_private("connected"), timeout=10)
    assert (await caller.private_call(b)).state == "ringing"
    await connected
    assert [len(s.network.private.calls) for s in servers].count(1) == 1
    assert serving(servers, b).network.private.of_unit(b) is not None
    assert (await third.private_call(b)).cause == "busy"
    seqs: list[int] = []

    def heard_from(talker: str) -> Callable[[Inbound], bool]:
        def seen(i: Inbound) -> bool:
            if isinstance(i.msg, m.Media) and i.msg.talker == talker:
                seqs.append(i.msg.seq)
                return len(seqs) >= 5
            return False

        return seen

    heard = callee.expect(heard_from("u1"))
    assert await caller.talk_private(0.3)
    await heard
    assert len(seqs) == len(set(seqs))
    heard = caller.expect(heard_from(b))
    seqs.clear()
    assert await callee.talk_private(0.3)
    await heard
    assert len(seqs) == len(set(seqs))  # (relayed by one instance, not two)
    hung = await callee.hang_up()
    assert hung is not None and hung.cause == "hung_up"
    await eventually(lambda: caller.private is None)


async def test_each_instance_exports_what_it_serves(servers: list[Server]) -> None:
    """What the dashboards and the EsnPartitionUnserved alert read: summed over the
    instances, the partitions served make up all there are."""
    served, taken = [], []
    for s in servers:
        registry, me = s.metrics.registry, {"server": s.config.server_id}
        assert registry.get_sample_value("esn_server_info", {**me, "version": __version__}) == 1
        assert registry.get_sample_value("esn_cluster_partitions") == PARTITIONS
        served.append(registry.get_sample_value("esn_cluster_partitions_served", me))
        taken.append(registry.get_sample_value("esn_cluster_partitions_taken_total", me))
    assert served == [len(s._ready) for s in servers]
    assert sum(served) == PARTITIONS  # type: ignore[arg-type]
    assert all(t is not None and t >= n for t, n in zip(taken, served, strict=True))  # type: ignore[operator]


async def test_a_forged_offline_status_takes_nothing_from_a_live_instance(
    servers: list[Server], handset: HandsetFactory
) -> None:
    """Tried: publish, as anyone may in the open profile, a retained `offline` status in
    the name of the instance serving tg-1, with its start time (a will, to the others).
    Expect: it keeps tg-1, since its heartbeats go on; no other instance acts for it at
    any moment; it says `online` again, and still grants."""
    owner = serving(servers, "tg-1")
    others = [s for s in servers if s is not owner]
    a = await handset("u1", "tg-1")
    topic = owner.topics.status(owner.config.server_id)
    again = a.expect(
        lambda i: i.topic == topic and isinstance(i.msg, m.Status) and i.msg.state == "online"
    )
    forged = m.Status(state="offline", version="x", started_ts=owner.started_ns)
    a.transport.publish(topic, codec.encode(forged), qos=0, retain=True)
    await again
    part = partition_of("tg-1")
    loop = asyncio.get_running_loop()
    until = loop.time() + 3.0  # (an ended run's leases go 3 ticks, 0.75 s, after its will)
    while loop.time() < until:  # the invariant, watched over that window
        assert part in owner._ready and not any(s.link and s.link.acting(part) for s in others)
        await asyncio.sleep(0.05)
    state = a.expect(on_state("tg-1"))
    assert isinstance(await a.press("tg-1"), m.Granted)
    got = (await state).msg
    assert isinstance(got, m.State) and got.srv == owner.config.server_id


async def test_each_instance_hears_the_uplinks_of_its_partitions_only(
    servers: list[Server], handset: HandsetFactory
) -> None:
    """What keeps an instance's load a share of the fleet's (docs/scaling.md): the
    cluster's subject mapping delivers a unit's uplinks (its location reports among them)
    and a group's floor requests to the instance serving their partition, to no other."""
    units = [f"u{i}" for i in range(1, 13)]
    assert len({id(serving(servers, u)) for u in units}) == 3  # (units of every instance)
    made = [await handset(u) for u in units]
    before = [s.metrics.foreign for s in servers]

    def located() -> int:
        return sum(s.metrics.messages.get(("location", "in"), 0) for s in servers)

    start = located()
    for h in made:
        h.transport.publish(h.topics.unit_up(h.unit), codec.encode(m.Location(lat=51.5, lon=0.1)))
    await eventually(lambda: located() == start + len(units), 10)
    talker = made[0]
    await talker.affiliate("tg-1")
    assert isinstance(await talker.press("tg-1"), m.Granted)
    assert [s.metrics.foreign for s in servers] == before
    for s in servers:
        registry, me = s.metrics.registry, {"server": s.config.server_id}
        assert registry.get_sample_value("esn_cluster_foreign_total", me) == s.metrics.foreign


async def test_the_cluster_moves_uplinks_to_the_partition_we_compute(
    nats_cluster: NatsCluster, prefix: str
) -> None:
    """The partition NATS computes (FNV-1a of the id as NATS writes it, `.` as `//`) is
    `partition_of`'s, for ids of every shape the protocol allows."""
    ids = ["u1", "a.b", "x_y-Z", "UNIT.7.x..", "9" * 64, "-"]
    topics, heard = Topics(prefix), asyncio.Queue[str]()
    sub = make_transport("gmqtt", BrokerConfig.from_url(nats_cluster.mqtt_urls[1]), client_id="s")
    pub = make_transport("gmqtt", BrokerConfig.from_url(nats_cluster.mqtt_urls[0]), client_id="p")
    sub.on_message = lambda topic, payload: heard.put_nowait(topic)
    await sub.start()
    await pub.start()
    try:
        await sub.subscribe(*topics.parted_uplinks(), qos=0)
        for ident in ids:
            pub.publish(topics.unit_up(ident), b"", qos=1)
            pub.publish(topics.floor_up(ident, "u1"), b"", qos=1)
        arrived = []
        for _ in range(2 * len(ids)):
            topic = await asyncio.wait_for(heard.get(), 5)
            where = topics.parse_inbound(topic)
            assert where is not None, topic
            arrived.append(where.tg or where.unit)
        assert sorted(arrived) == sorted(ids * 2)
    finally:
        await asyncio.gather(pub.stop(), sub.stop())


async def test_without_a_subject_mapping_every_instance_hears_everything(
    prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A NATS cluster set up without the mapping (a user's own): the instances say so at
    start, hear every uplink and floor request, drop what is not theirs, and serve."""
    with NatsCluster(3, mappings=False) as cluster:
        url = BrokerConfig.from_url(cluster.mqtt_urls[0])
        made = [
            Server(
                Config(
                    broker=url,
                    prefix=prefix,
                    server_id=f"srv{i}-{prefix}",
                    keepalive=5,
                    cluster=tuple(cluster.nats_urls),
                ),
                parse_fleet(FLEET),
            )
            for i in (1, 2)
        ]
        await asyncio.gather(*(s.start() for s in made))
        try:
            assert "does not move uplinks by partition" in caplog.text
            await eventually(lambda: sorted(len(s._ready) for s in made) == [16, 16], 20)
            other = next(s for s in made if partition_of("tg-1") not in s._ready)
            async for make in handsets(itertools.repeat(url), prefix, "gmqtt"):
                a = await make("u1", "tg-1")
                assert isinstance(await a.press("tg-1"), m.Granted)
                await eventually(lambda: other.metrics.foreign >= 1)  # (the request)
        finally:
            await asyncio.gather(*(s.stop() for s in made), return_exceptions=True)


def test_a_port_taken_before_a_node_binds_it_is_given_up_for_another() -> None:
    """The launcher picks free ports, and another process may take one first (a test
    broker, a server's metrics): the cluster starts on other ports instead."""
    cluster = NatsCluster(3)
    taken = cluster.nodes[1].mqtt_port
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", taken))
        holder.listen()
        with cluster:
            assert taken not in cluster.nodes[1].__dict__.values()
            assert all(node.healthy() for node in cluster.nodes)


async def test_an_instance_with_no_node_to_go_to_steps_aside_after_its_grace(
    nats_cluster: NatsCluster, prefix: str
) -> None:
    """Tried: an instance given its own node and one that does not exist, and its node
    killed. Expect: it keeps its partitions while it tries to reconnect (no one else acts
    for them), then, `LINK_GRACE_S` after the loss, gives them up to the other instance."""
    nowhere = BrokerConfig.from_url(f"mqtt://127.0.0.1:{free_port()}")

    def instance(node: int, others: tuple[BrokerConfig, ...]) -> Server:
        return Server(
            Config(
                broker=BrokerConfig.from_url(nats_cluster.mqtt_urls[node]),
                prefix=prefix,
                server_id=f"srv{node}-{prefix}",
                keepalive=5,
                cluster=tuple(nats_cluster.nats_urls),
                others=others,
            ),
            parse_fleet(FLEET),
        )

    cut_off, other = instance(0, (nowhere,)), instance(1, ())
    await asyncio.gather(cut_off.start(), other.start())
    loop = asyncio.get_running_loop()
    try:
        await eventually(lambda: sorted(len(s._ready) for s in (cut_off, other)) == [16, 16], 20)
        held = set(cut_off._ready)
        await asyncio.to_thread(nats_cluster.kill, 0)
        killed, took = loop.time(), None
        while loop.time() < killed + LINK_GRACE_S + 15:
            if held <= other._ready:
                took = loop.time() - killed
                break
            await asyncio.sleep(0.05)
        assert took is not None and took > LINK_GRACE_S - 1, took
    finally:
        await asyncio.gather(cut_off.stop(), other.stop(), return_exceptions=True)
        await asyncio.to_thread(nats_cluster.restart, 0)


async def test_a_units_status_is_kept_by_its_instance_and_outlives_it(
    servers: list[Server], handset: HandsetFactory
) -> None:
    """Tried: a unit reports "at scene" (docs/protocol.md, 11.11); the instance serving the
    unit then stops. Expect: the instance that takes the unit's partition over holds the
    status (from the unit's record, replicated by the cluster) and confirms a repeat of it
    as the first one was, and consoles are told it the whole time."""
    a = await handset("u1")
    owner = serving(servers, "u1")
    status = m.UnitStatus(code=3, ref=a.next_ref())
    assert await a.ask(status) == m.Ok(op="unit_status", ref=status.ref)
    kept = owner.network.status_msg("u1")
    assert kept is not None and kept.text == "at scene"
    await owner.stop()
    others = [s for s in servers if s is not owner]
    await eventually(lambda: any(s.network.status_msg("u1") == kept for s in others), 20)
    assert await a.ask(status, timeout=10) == m.Ok(op="unit_status", ref=status.ref)
    heir = serving(others, "u1")
    assert heir.network.status_msg("u1") == kept  # the repeat was not taken anew
    topic = a.topics.unit_status("u1")
    shown = a.expect(on_topic(topic))
    await a.transport.subscribe(topic)
    assert (await shown).msg == kept
