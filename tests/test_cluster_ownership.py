"""Partition ownership on a real 3-node NATS cluster: server instances' cluster links as
processes, killed and paused with real signals.

Each instance prints the partitions it acts for whenever that changes (tests/cluster_member.py);
the tests read those timelines.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterator

import pytest

from esn.core.partitions import PARTITIONS
from esn.server.cluster import ClusterError, ClusterLink
from esn.tools.nats import NatsCluster

pytestmark = [pytest.mark.broker, pytest.mark.cluster, pytest.mark.fault]

_runs = itertools.count(1)


class Member:
    def __init__(self, me: str, proc: asyncio.subprocess.Process) -> None:
        self.me = me
        self.proc = proc
        self.timeline: list[tuple[float, set[int]]] = []
        self.news = asyncio.Event()
        # (from, to) Unix times it was killed or paused: it says nothing then, and what it
        # last said is no evidence (the test of a pause looks at its first word after it)
        self.silent: list[tuple[float, float]] = []
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for line in self.proc.stdout:
            said = json.loads(line)
            self.timeline.append((said["t"], set(said["owned"])))
            self.news.set()

    @property
    def owned(self) -> set[int]:
        return self.timeline[-1][1] if self.timeline else set()

    def silence(self) -> None:
        self.silent.append((time.time(), float("inf")))

    def spoke(self) -> None:
        """It has said what it acts for again: its silence ends with that word."""
        self.silent[-1] = (self.silent[-1][0], self.timeline[-1][0])

    def owned_at(self, t: float) -> set[int]:
        if any(start <= t < end for start, end in self.silent):
            return set()
        now: set[int] = set()
        for at, owned in self.timeline:
            if at > t:
                break
            now = owned
        return now


@pytest.fixture(scope="module")
def cluster() -> Iterator[NatsCluster]:
    c = NatsCluster(3).start()
    yield c
    c.close()


@pytest.fixture
async def members(cluster: NatsCluster) -> AsyncIterator[dict[str, Member]]:
    """Three instances, each connected to its own node, in a bucket of their own."""
    prefix = f"own{next(_runs)}"
    made: dict[str, Member] = {}
    for i, me in enumerate(("a", "b", "c")):
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.cluster_member",
            ",".join(cluster.nats_urls[i:] + cluster.nats_urls[:i]),
            me,
            prefix,
            stdout=asyncio.subprocess.PIPE,
        )
        made[me] = Member(me, proc)
    yield made
    for m in made.values():
        if m.proc.returncode is None:
            m.proc.send_signal(signal.SIGCONT)
            m.proc.kill()
        await m.proc.wait()
        m.reader.cancel()


async def until(check: object, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():  # type: ignore[operator]
        if loop.time() > deadline:
            raise AssertionError(f"not so within {timeout} s")
        await asyncio.sleep(0.05)


def never_shared(members: dict[str, Member]) -> None:
    """At no moment any instance announced did two act for one partition."""
    moments = sorted(t for m in members.values() for t, _ in m.timeline)
    for t in moments:
        seen: set[int] = set()
        for m in members.values():
            owned = m.owned_at(t)
            assert not (owned & seen), f"partitions {owned & seen} had two owners at {t}"
            seen |= owned


def spread(members: dict[str, Member], names: str) -> bool:
    shares = [len(members[n].owned) for n in names]
    union = set().union(*(members[n].owned for n in names))
    return len(union) == PARTITIONS and max(shares) - min(shares) <= 1


async def test_instances_share_the_partitions_evenly(members: dict[str, Member]) -> None:
    await until(lambda: spread(members, "abc"), 20)
    never_shared(members)


async def test_a_killed_instance_is_replaced_within_5_s(members: dict[str, Member]) -> None:
    """Tried: SIGKILL one of three instances. Expect: the two others serve every partition
    within 5 s (lease time included), and never two at once."""
    await until(lambda: spread(members, "abc"), 20)
    loop = asyncio.get_running_loop()
    members["c"].proc.kill()
    members["c"].silence()
    killed = loop.time()
    await until(lambda: spread(members, "ab"), 10)
    took = loop.time() - killed
    print(f"served again {took:.2f} s after the kill")
    assert took < 5.0, took
    never_shared(members)


async def test_a_paused_instance_acts_for_nothing_it_lost(members: dict[str, Member]) -> None:
    """Tried: SIGSTOP one instance past its lease time (the others take its partitions),
    then SIGCONT. Expect: at the first moment it runs again it acts for none of them."""
    await until(lambda: spread(members, "abc"), 20)
    paused = members["c"]
    had = set(paused.owned)
    paused.proc.send_signal(signal.SIGSTOP)
    paused.silence()
    await until(lambda: spread(members, "ab"), 10)
    taken = set().union(members["a"].owned, members["b"].owned)
    assert had <= taken
    paused.news.clear()
    paused.proc.send_signal(signal.SIGCONT)
    await asyncio.wait_for(paused.news.wait(), 5)
    paused.spoke()
    assert not (paused.timeline[-1][1] & taken), "acted for partitions another held"
    await until(lambda: spread(members, "abc"), 20)  # and it gets its share back
    never_shared(members)


async def test_a_bucket_made_with_another_lease_time_is_refused(cluster: NatsCluster) -> None:
    """Fencing rests on the bucket's expiry: a leases bucket that keeps entries for less
    than the lease time (made by hand, or by another version) stops the link at start."""
    import nats
    from nats.js.api import KeyValueConfig

    nc = await nats.connect(cluster.nats_urls[0])
    try:
        await nc.jetstream().create_key_value(KeyValueConfig(bucket="short-leases", ttl=1.5))
    finally:
        await nc.close()
    link = ClusterLink(cluster.nats_urls, "x", prefix="short")
    with pytest.raises(ClusterError, match=r"keeps entries 1\.5 s"):
        await link.start()


async def test_a_nats_node_dying_leaves_no_partition_with_two_owners(
    cluster: NatsCluster, members: dict[str, Member]
) -> None:
    """Tried: SIGKILL one NATS node (each instance is connected to a different one, and
    lists all three). Expect: never two owners; every partition served again, evenly,
    once the cluster has elected its new leaders; the node started again rejoins."""
    await until(lambda: spread(members, "abc"), 20)
    loop = asyncio.get_running_loop()
    cluster.kill(1)
    killed = loop.time()
    try:
        # the invariant is watched over a window that covers the leases' expiry and the
        # cluster's elections (not a wait for something to happen: nothing need change)
        await asyncio.sleep(3 * 3.0)
        await until(lambda: spread(members, "abc"), 30)
        print(f"evenly served {loop.time() - killed:.1f} s after the node died")
        changes = sum(len(m.timeline) for m in members.values())
        print(f"{changes} changes of ownership announced in all")
        never_shared(members)
    finally:
        await asyncio.to_thread(cluster.restart, 1)
