"""A server instance of a cluster killed (SIGKILL) in the middle of a call: the others
take its partitions and go on with what it had told units. Real `esn server --cluster`
processes on a real 3-node NATS cluster, handsets on the nodes the instances are not on.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from esn.client.handset import HAS_PERMISSION, Handset, Inbound
from esn.core.partitions import PARTITIONS, partition_of
from esn.protocol import messages as m
from esn.server.shell import LINK_GRACE_S
from esn.tools.nats import NatsCluster
from esn.tools.processes import free_port, start_server
from esn.transport import BrokerConfig
from tests.test_faults import FLEET_TOML, end

pytestmark = [pytest.mark.broker, pytest.mark.cluster, pytest.mark.fault]


class Instances:
    """Three `esn server --cluster` processes, instance i on node i."""

    def __init__(self, cluster: NatsCluster, fleet: Path, prefix: str) -> None:
        self.cluster, self.fleet, self.prefix = cluster, fleet, prefix
        self.procs: dict[str, asyncio.subprocess.Process] = {}

    async def start(self, index: int) -> None:
        me = f"srv{index}-{self.prefix}"
        self.procs[me] = await start_server(
            self.cluster.brokers_from(index),
            self.fleet,
            metrics_port=free_port(),
            args=(
                "--prefix",
                self.prefix,
                "--server-id",
                me,
                "--cluster",
                ",".join(self.cluster.nats_urls),
            ),
            log=self.fleet.with_name(f"{me}.log"),
        )


@pytest.fixture
async def instances(
    nats_cluster: NatsCluster, tmp_path: Path, prefix: str
) -> AsyncIterator[Instances]:
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(FLEET_TOML)
    made = Instances(nats_cluster, fleet, prefix)
    try:
        await asyncio.gather(*(made.start(i) for i in range(3)))
        yield made
    finally:
        await asyncio.gather(*(end(p) for p in made.procs.values()))


def on(
    kind: type[m.Message], check: Callable[[m.Message], bool] = lambda msg: True
) -> Callable[[Inbound], bool]:
    return lambda i: isinstance(i.msg, kind) and check(i.msg)


async def all_served(watcher: Handset, servers: list[str]) -> dict[str, set[int]]:
    """Wait until the instances' retained statuses list every partition once, in even
    shares (so no partition moves any more while nothing changes)."""
    parts: dict[str, set[int]] = {}
    done = asyncio.Event()

    def seen(i: Inbound) -> bool:
        if isinstance(i.msg, m.Status):
            srv = i.topic.split("/")[-2]
            parts[srv] = set(i.msg.parts or ()) if i.msg.state == "online" else set()
            served = [p for s in servers for p in parts.get(s, ())]
            shares = [len(parts.get(s, ())) for s in servers]
            if sorted(served) == list(range(PARTITIONS)) and max(shares) - min(shares) <= 1:
                done.set()
        return False

    watching = watcher.expect(seen, timeout=30)
    await watcher.transport.subscribe(watcher.topics.status("+"))  # (the retained, again)
    await asyncio.wait_for(done.wait(), 30)
    watching.cancel()
    return parts


async def test_an_instance_killed_mid_call_the_others_go_on_with_it(
    instances: Instances, nats_cluster: NatsCluster, prefix: str
) -> None:
    """Tried: u1 talks in tg-1, u2 queues behind it, disp has acknowledged u3's emergency
    there; the instance serving tg-1 is killed. Expect: another serves tg-1 within
    seconds (its state says which), u4 hears u1 again in the same call, the emergency is
    still acknowledged by disp, and the floor goes to u2 when u1 lets go."""
    nodes = [BrokerConfig.from_url(u) for u in nats_cluster.mqtt_urls]
    made: list[Handset] = []

    async def handset(unit: str, node: int) -> Handset:
        h = Handset(unit, nodes[node], prefix=prefix, media_interval=0.02)
        made.append(h)
        await h.start()
        await h.affiliate("tg-1")
        return h

    try:
        talker, queued, raiser, disp, listener = [
            await handset(u, i % 3) for i, u in enumerate(("u1", "u2", "u3", "disp", "u4"))
        ]
        await all_served(listener, list(instances.procs))
        state = listener.expect(on(m.State, lambda s: s.floor == "taken"))  # type: ignore[attr-defined]
        granted = await talker.press("tg-1")
        assert isinstance(granted, m.Granted)
        old = (await state).msg.srv  # type: ignore[attr-defined]
        assert old in instances.procs
        assert isinstance(await queued.press("tg-1"), m.Queued)
        raised = await raiser.ask(m.EmergencyAlert(tg="tg-1", ref=raiser.next_ref()))
        assert isinstance(raised, m.EmergencyState)
        assert isinstance(
            await disp.ask(m.EmergencyAck(tg="tg-1", unit="u3", ref=disp.next_ref())), m.Ok
        )
        await listener.expect(on(m.Media))

        taken_over = listener.expect(on(m.State, lambda s: s.srv != old), timeout=15)  # type: ignore[attr-defined]
        regranted = talker.expect(on(m.Granted), timeout=15)  # (asked again, told again)
        killed = time.monotonic()
        instances.procs[old].kill()
        await instances.procs[old].wait()
        new = (await taken_over).msg
        served_again = time.monotonic()
        assert isinstance(new, m.State) and new.srv in instances.procs and new.srv != old
        assert (new.floor, new.talker, new.call, new.emergency) == (
            "taken",
            "u1",
            granted.call,
            True,
        )
        heard = (await listener.expect(on(m.Media), timeout=10)).msg
        heard_again = time.monotonic()
        assert isinstance(heard, m.Media) and heard.call == granted.call
        print(
            f"kill -> state from {new.srv}: {served_again - killed:.2f} s; "
            f"-> voice heard again: {heard_again - killed:.2f} s"
        )
        assert (await regranted).msg.call == granted.call  # type: ignore[attr-defined]
        assert talker.floor_state("tg-1") == HAS_PERMISSION
        # the acknowledgement was kept: cancelling finds the emergency, the state clears
        cancelled = await raiser.ask(m.EmergencyCancel(tg="tg-1", ref=raiser.next_ref()))
        assert isinstance(cancelled, m.EmergencyState) and cancelled.state == "cancelled"
        # and the queue: u2 is next
        turn = queued.expect(on(m.Granted), timeout=10)
        talker.release("tg-1")
        await turn
        assert queued.floor_state("tg-1") == HAS_PERMISSION
    finally:
        await asyncio.gather(*(h.stop() for h in made), return_exceptions=True)


async def lead_from(cluster: NatsCluster, node: int, streams: list[str]) -> None:
    """Make `node` the leader of these streams (where it is not already), so that its
    death makes the cluster elect new ones: the case that used to cost calls."""
    import nats

    nc = await nats.connect(cluster.nats_urls[(node + 1) % len(cluster.nodes)])
    try:
        want = cluster.nodes[node].name
        for stream in streams:
            request = json.dumps({"placement": {"preferred": want}}).encode()
            answer = await nc.request(f"$JS.API.STREAM.LEADER.STEPDOWN.{stream}", request, 5)
            error = json.loads(answer.data).get("error", {})
            assert not error or "already leader" in error.get("description", ""), error

        async def leader(stream: str) -> str | None:
            info = await nc.request(f"$JS.API.STREAM.INFO.{stream}", b"", 5)
            return json.loads(info.data).get("cluster", {}).get("leader")  # type: ignore[no-any-return]

        async with asyncio.timeout(15):  # (each stream elects the preferred node)
            for stream in streams:
                while True:
                    if await leader(stream) == want:
                        break
                    await asyncio.sleep(0.1)  # (an election under way: asked again)
    finally:
        await nc.close()


async def test_a_nats_node_dying_costs_the_units_on_the_others_no_call(
    nats_cluster: NatsCluster, tmp_path: Path, prefix: str
) -> None:
    """Tried: two instances on nodes 1 and 2, a call between units on those nodes, and
    node 3 (leader of the lease and member buckets, and of the streams that keep MQTT's
    retained messages and sessions) killed with SIGKILL mid-call. Expect: the call goes
    on without a gap (the leases outlast the cluster's elections, and nothing on the
    instances' links waits for a stream), and a unit on a surviving node that presses
    during the elections is granted at once."""
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(FLEET_TOML)
    made = Instances(nats_cluster, fleet, prefix)
    nodes = [BrokerConfig.from_url(u) for u in nats_cluster.mqtt_urls]
    phones: list[Handset] = []
    try:
        await asyncio.gather(made.start(0), made.start(1))
        for unit, node in (("u1", 0), ("u4", 1), ("u2", 1), ("u3", 2)):
            h = Handset(unit, nodes[node], prefix=prefix, media_interval=0.02, qos=0)
            phones.append(h)
            await h.start()
            await h.affiliate("tg-1", "tg-2")
        talker, listener, other, _ = phones  # (the last is on the node that dies)
        await all_served(listener, list(made.procs))
        streams = [f"KV_{prefix}-leases", f"KV_{prefix}-members", "$MQTT_rmsgs", "$MQTT_sess"]
        await lead_from(nats_cluster, 2, streams)
        heard: list[float] = []
        listener.on_media = lambda tg, unit: heard.append(time.monotonic())
        assert isinstance(await talker.press("tg-1"), m.Granted)
        await listener.expect(on(m.Media))
        revoked = talker.expect(on(m.Revoke), timeout=12)
        await asyncio.to_thread(nats_cluster.kill, 2)
        killed = time.monotonic()
        await asyncio.sleep(2.0)  # (in the middle of the elections, which take 4 to 9 s)
        pressed = time.monotonic()
        assert isinstance(await other.press("tg-2", timeout=2), m.Granted)
        granted_in = time.monotonic() - pressed
        with pytest.raises(TimeoutError):
            await revoked  # (a wait over the window the elections take: nothing may come)
        heard.append(time.monotonic())
        during = [b - a for a, b in itertools.pairwise(heard) if b > killed]
        print(f"longest silence after the kill: {max(during):.3f} s; granted in {granted_in:.3f} s")
        assert max(during) < 0.5
        assert talker.floor_state("tg-1") == HAS_PERMISSION
    finally:
        await asyncio.gather(*(h.stop() for h in phones), return_exceptions=True)
        await asyncio.gather(*(end(p) for p in made.procs.values()))
        await asyncio.to_thread(nats_cluster.restart, 2)


@pytest.mark.parametrize("leader", ["dying", "surviving"])
async def test_an_instance_whose_node_dies_goes_on_from_another_node(
    instances: Instances, nats_cluster: NatsCluster, prefix: str, leader: str
) -> None:
    """Tried: the NATS node of the instance serving tg-1 killed with SIGKILL during a
    call between units on the other nodes; that node made leader of the lease and member
    buckets and of MQTT's streams, or another one. Expect: the instance connects to the
    next node of its `--broker` list and goes on serving tg-1 itself (it kept its
    leases): the listener hears the call again (at once when no election is needed, once
    the elections are over else), the talker keeps the floor, and a press is answered."""
    nodes = [BrokerConfig.from_url(u) for u in nats_cluster.mqtt_urls]
    phones: list[Handset] = []
    try:
        for i in range(6):
            h = Handset(f"u{i + 1}", nodes[i % 3], prefix=prefix, media_interval=0.02, qos=0)
            phones.append(h)
            await h.start()
            await h.affiliate("tg-1")
        parts = await all_served(phones[0], list(instances.procs))
        old = next(s for s, held in parts.items() if partition_of("tg-1") in held)
        dies = int(old.removeprefix("srv").partition("-")[0])  # (instance i on node i)
        talker, listener, other = (
            phones[(dies + 1) % 3],
            phones[(dies + 2) % 3],
            phones[(dies + 1) % 3 + 3],
        )
        streams = [f"KV_{prefix}-leases", f"KV_{prefix}-members", "$MQTT_rmsgs", "$MQTT_sess"]
        await lead_from(nats_cluster, dies if leader == "dying" else (dies + 1) % 3, streams)
        heard: list[float] = []
        listener.on_media = lambda tg, unit: heard.append(time.monotonic())
        state = listener.expect(on(m.State, lambda s: s.floor == "taken"))  # type: ignore[attr-defined]
        assert isinstance(await talker.press("tg-1"), m.Granted)
        assert (await state).msg.srv == old  # type: ignore[attr-defined]
        await listener.expect(on(m.Media), timeout=10)
        revoked = talker.expect(on(m.Revoke), timeout=20)
        await asyncio.to_thread(nats_cluster.kill, dies)
        killed = time.monotonic()
        await listener.expect(lambda i: isinstance(i.msg, m.Media) and heard[-1] > killed, 20)
        back = time.monotonic() - killed
        answer = await other.press("tg-1", timeout=10)
        assert isinstance(answer, m.Queued)
        with pytest.raises(TimeoutError):
            await revoked
        heard.append(time.monotonic())
        during = [b - a for a, b in itertools.pairwise(heard) if b > killed]
        print(f"voice heard again {back:.2f} s after the kill; longest silence {max(during):.2f} s")
        assert back < (1.0 if leader == "surviving" else LINK_GRACE_S)
        assert talker.floor_state("tg-1") == HAS_PERMISSION
        states = [i.msg for i in listener.inbox if isinstance(i.msg, m.State)]
        assert {s.srv for s in states if s.tg == "tg-1"} == {old}  # (no other took it)
    finally:
        await asyncio.gather(*(h.stop() for h in phones), return_exceptions=True)
        await asyncio.to_thread(nats_cluster.restart, dies)
