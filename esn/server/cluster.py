"""The server's link to the other instances of a cluster: leases on partitions, over NATS.

The shell around `esn.core.partitions.Ownership`. It connects to the NATS cluster
(`nats-py`, `esn[cluster]`), keeps two JetStream key-value buckets whose entries expire
after the lease time: `{prefix}-members` (each instance writes its key every tick, so the
live ones are those heard from within the lease time) and `{prefix}-leases` (one key per
partition, naming its owner). Every tick it asks `Ownership.plan` what to do, sends those
requests, and reports each outcome with the time its request was sent; a request not
answered within 2 s (half the lease time if shorter) (or failing for another reason than a refusal)
leaves a lease held to run out on its fenced clock, renewed again meanwhile. Both
buckets are watched, so which partitions are free and which instances live is known
without polling. The view is
trusted only while our own member key's writes come back through the watch; when they do
not (a NATS node died, and with it the watch), only the leases held are renewed, and the
watches are made anew. Times are read from CLOCK_BOOTTIME, which goes on counting while
the machine is suspended. The buckets' own expiry runs on the NATS nodes' wall clocks:
they must agree to well within the margin (NTP slewing, not stepping).

An instance said to have ended (`gone`: the server heard its will) whose heartbeats (its
member key, naming its run) have also stopped for three ticks is left out of the live
members, and the leases of that run are deleted, so its partitions are taken without
waiting for their keys to expire. A status alone (stale, or forged: anyone may publish one
in the open profile) takes nothing from an instance that still beats. An instance whose
own lease key is deleted or written by another stops acting for it at once.

Whoever acts for a partition asks `acting(p)` at the moment it acts (the lease may lapse
between ticks); `on_change` is told the set of partitions held whenever it changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from esn.core.partitions import PARTITIONS, Ownership, Plan
from esn.extras import need

log = logging.getLogger("esn.cluster")

# The lease time of `esn server --cluster`: longer than NATS takes to elect new leaders
# when a node dies (4 to 9 s each; more than 10 s for the lease bucket in one of our runs),
# so that no lease lapses meanwhile. An instance that dies is replaced sooner: its broker
# publishes its will, and its heartbeats stop (`gone`).
SERVER_LEASE_S = 30.0
MAX_GONE = 256  # instances remembered as gone (`gone`)


class ClusterError(Exception):
    """The NATS cluster could not be reached or refused us; the message is one line."""


def _ignore(owned: set[int]) -> None:
    return None


class ClusterLink:
    def __init__(
        self,
        servers: Sequence[str],
        me: str,
        *,
        prefix: str = "esn",
        ttl: float = 3.0,
        margin: float = 1.0,
        tick: float = 0.25,
        partitions: int = PARTITIONS,
        incarnation: str = "",
    ) -> None:
        need("nats", "cluster", "the cluster mode")
        self.servers = list(servers)
        self.me = me
        # what our lease keys hold: our id and this run of it (`gone` names one run)
        self.value = f"{me} {incarnation}".strip().encode()
        self.prefix = prefix
        self.ttl, self.tick = ttl, tick
        # how long a request to the buckets is waited for: short enough to be asked again
        # several times within a lease (one sent while a leader is elected hangs so long)
        self.wait = min(ttl / 2, 2.0)
        self.own = Ownership(
            me, ttl=ttl, margin=margin, grace=2 * tick + 1.0, partitions=partitions
        )
        self.partitions = partitions
        self.on_change: Callable[[set[int]], None] = _ignore
        self.held: set[int] = set()  # as last told to on_change
        self._seen_members: dict[str, float] = {}  # member -> when its key was last written
        self._seen_leases: dict[int, float] = {}  # partition -> when its key was last written
        self._lease_values: dict[int, tuple[bytes, int]] = {}  # partition -> value, revision
        self._gone: dict[bytes, str] = {}  # runs said to have ended (`gone`) -> member
        self._beats: dict[bytes, float] = {}  # run -> when its member key was last written
        self._runs: dict[str, bytes] = {}  # member -> its run last heard
        self._dropping: set[int] = set()  # deletes of an ended run's leases under way
        self._tasks: set[asyncio.Task[Any]] = set()
        self._watchers: list[Any] = []
        self._echo = -1e9  # when our own member key last came back through the watch
        self._watched = asyncio.Event()  # both watches have read what the buckets hold
        self._rewatch_at = 0.0  # the earliest the watches are made anew, when quiet
        self._nc: Any = None
        self._leases: Any = None
        self._members: Any = None
        self._standby = False  # (`standby`)

    @staticmethod
    def clock() -> float:
        return time.clock_gettime(time.CLOCK_BOOTTIME)

    def acting(self, partition: int) -> bool:
        return self.own.acting(partition, self.clock())

    def standby(self, on: bool) -> None:
        """Step aside while the server cannot serve (its MQTT link is down): act for no
        partition from now on, give the leases back after the margin, and leave the
        members, so the others take over; come back when `on` is False."""
        if on == self._standby:
            return
        self._standby = on
        if on:
            self.own.stop_acting(self.clock())
            self._tell()
            if self._members is not None:
                self._spawn(self._members.delete(f"m-{self.me}"))

    def gone(self, member: str, incarnation: str = "") -> None:
        """That run of `member` is said to have ended (its broker published its will).
        Once its heartbeats have stopped too (`_ended`), it is left out of the live members
        and the leases of that run are deleted, so that its partitions are taken then
        rather than when their keys expire."""
        value = f"{member} {incarnation}".strip().encode()
        if member == self.me:
            return
        self._gone[value] = member
        while len(self._gone) > MAX_GONE:
            del self._gone[next(iter(self._gone))]

    def back(self, member: str) -> None:
        """`member` says it is online (a new run, or the same one reconnected)."""
        self._gone = {v: m for v, m in self._gone.items() if m != member}

    def _ended(self, run: bytes, now: float) -> bool:
        return run in self._gone and now - self._beats.get(run, -1e9) >= 3 * self.tick

    def _drop_ended(self, now: float) -> None:
        """Delete the leases of runs that have ended, unless written again since seen."""
        for p, (run, revision) in list(self._lease_values.items()):
            if p not in self._dropping and self._ended(run, now):
                self._dropping.add(p)
                self._spawn(self._drop(p, revision))

    async def _drop(self, partition: int, revision: int) -> None:
        try:
            if self._leases is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(
                        self._leases.delete(f"p{partition}", last=revision), self.wait
                    )
        finally:
            self._dropping.discard(partition)

    # --- lifecycle --------------------------------------------------------------------

    @staticmethod
    async def _nats_error(exc: Exception) -> None:
        """nats-py's errors (a node gone, say: it reconnects to another), in one line."""
        log.warning("cluster link: NATS: %s", str(exc) or type(exc).__name__)

    async def start(self) -> None:
        import nats
        from nats.js.api import KeyValueConfig

        try:
            self._nc = await nats.connect(
                servers=self.servers,
                name=self.me,
                connect_timeout=3,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.2,
                allow_reconnect=True,
                error_cb=self._nats_error,
            )
        except Exception as exc:
            raise ClusterError(f"cannot reach NATS at {', '.join(self.servers)}: {exc}") from None
        try:
            js = self._nc.jetstream(timeout=self.wait)
            buckets = []
            for name in (f"{self.prefix}-members", f"{self.prefix}-leases"):
                try:
                    bucket = await js.key_value(name)
                except Exception:
                    bucket = await self._create(js, KeyValueConfig, name)
                await self._check(bucket, name)
                buckets.append(bucket)
            self._members, self._leases = buckets
            await self._start_watching()
            self._rewatch_at = self.clock() + 2.0
        except BaseException:
            await self._close()
            raise
        self._spawn(self._run())

    async def _check(self, bucket: Any, name: str) -> None:
        """Fencing rests on the bucket's expiry: one made with another lease time (by
        another version, or by hand) would let a key expire while its owner still acts."""
        from nats.js.errors import NotFoundError

        for _ in range(30):  # (made by another instance a moment ago: not yet known here)
            try:
                status = await bucket.status()
                break
            except NotFoundError:
                await asyncio.sleep(0.1)
        else:
            raise ClusterError(f"key-value bucket {name} was made, but cannot be found")
        ttl = status.ttl or 0.0
        if abs(ttl - self.ttl) > 0.01 or status.history != 1:
            raise ClusterError(
                f"key-value bucket {name} keeps entries {ttl:g} s and {status.history} per "
                f"key; this server needs {self.ttl:g} s and 1: remove the bucket, or give "
                f"this cluster another prefix"
            )

    async def _start_watching(self) -> None:
        for watcher in self._watchers:
            with contextlib.suppress(Exception):
                await watcher.stop()
        self._watched.clear()
        self._watchers = [await self._members.watchall(), await self._leases.watchall()]
        ready = [asyncio.Event(), asyncio.Event()]
        self._spawn(self._watch(self._watchers[0], self._member_seen, ready[0]))
        self._spawn(self._watch(self._watchers[1], self._lease_seen, ready[1]))
        await asyncio.wait_for(asyncio.gather(*(r.wait() for r in ready)), self.ttl)
        self._watched.set()

    async def _watch_again(self) -> None:
        try:
            await self._start_watching()
        except Exception as exc:  # (the cluster is electing leaders: tried again later)
            log.warning("cluster link: cannot watch the buckets yet: %s", exc or type(exc).__name__)

    async def _create(self, js: Any, config: Any, name: str) -> Any:
        """The bucket, replicated on three nodes where the cluster has them."""
        last: Exception | None = None
        for replicas in (3, 1):
            try:
                bucket = await js.create_key_value(
                    config(bucket=name, ttl=self.ttl, history=1, replicas=replicas)
                )
            except Exception as exc:  # (fewer nodes than replicas) or a race with another
                last = exc
                with contextlib.suppress(Exception):
                    return await js.key_value(name)
                continue
            if replicas == 1:
                log.warning("key-value bucket %s has one copy only (%s)", name, last)
            return bucket
        raise ClusterError(f"cannot create the key-value bucket {name}: {last}")

    async def stop(self) -> None:
        """Stop acting for every partition, wait out the margin (what we did is out by
        then), give the leases back so others need not wait for them to expire, and
        leave."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        held = self.own.stop_acting(self.clock())
        self._tell()
        if self._nc is None:
            return
        await asyncio.sleep(self.own.margin)
        deletes = [self._leases.delete(f"p{p}", last=rev) for p, rev in held.items()]
        deletes.append(self._members.delete(f"m-{self.me}"))
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*deletes, return_exceptions=True), 2)
        await self._close()

    async def _close(self) -> None:
        for watcher in self._watchers:
            with contextlib.suppress(Exception):
                await watcher.stop()
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._nc.close(), 2)

    # --- the loop ---------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            try:
                await self._step()
            except Exception:  # (never the end of the loop: leases lapse without it)
                log.exception("cluster link: a step failed")
            await asyncio.sleep(self.tick)

    async def _step(self) -> None:
        now = self.clock()
        if not self._standby:
            self._spawn(self._put_member())
        sure = not self._standby and self._watched.is_set() and now - self._echo < 4 * self.tick
        if not sure and not self._standby and now >= self._rewatch_at:
            if self._echo > 0:
                log.warning("cluster link: the watches went quiet; watching again")
            self._rewatch_at = now + 2.0
            self._spawn(self._watch_again())
        for run in [r for r, at in self._beats.items() if now - at >= self.ttl]:
            del self._beats[run]
        self._drop_ended(now)
        live = [
            m
            for m, at in self._seen_members.items()
            if now - at < self.ttl and not self._ended(self._runs.get(m, b""), now)
        ]
        free = [
            p
            for p in range(self.partitions)
            if p not in self.own.leases and now - self._seen_leases.get(p, -1e9) >= self.ttl
        ]
        self._perform(self.own.plan(now, live, free, sure=sure), now)
        self._tell()

    def _perform(self, plan: Plan, sent: float) -> None:
        value = self.value
        for p in plan.acquire:
            self._spawn(self._ask(p, sent, self._leases.create(f"p{p}", value)))
        for p, rev in plan.renew:
            self._spawn(self._ask(p, sent, self._leases.update(f"p{p}", value, last=rev), rev))
        for p, rev in plan.release:
            self._spawn(self._release(p, self._leases.delete(f"p{p}", last=rev)))

    async def _ask(self, partition: int, sent: float, request: Any, last: int = 0) -> None:
        from nats.js.errors import KeyWrongLastSequenceError

        try:
            revision = await asyncio.wait_for(request, self.wait)
        except KeyWrongLastSequenceError:  # taken by another, or expired, or moved on by us
            if not await self._still_ours(partition, last):
                log.info("lease of partition %d refused", partition)
                self.own.refused(partition)
        except Exception:  # no answer in time, or none to be had (a leader election)
            self.own.unanswered(partition)
        else:
            self.own.written(partition, int(revision), sent)
            if self._standby:  # (asked for before we stepped aside: given back too)
                self.own.stop_acting(self.clock())
        self._tell()

    async def _still_ours(self, partition: int, last: int) -> bool:
        """After a renewal was refused: whether the key still holds this run's value (a
        renewal of ours was made although its answer was lost: during a leader election,
        say); if so, renew from its revision."""
        from nats.js.errors import KeyDeletedError, KeyNotFoundError

        if partition not in self.own.leases:
            return False
        try:
            entry = await asyncio.wait_for(self._leases.get(f"p{partition}"), self.wait)
        except (KeyNotFoundError, KeyDeletedError):
            return False
        except Exception:  # no answer: a leader election, during which no one else can
            # take the key either; a delete made before it shows in the watch (`_lease_seen`)
            self.own.unanswered(partition)
            return True
        if bytes(entry.value or b"") != self.value or int(entry.revision) <= last:
            return False  # (another's, or a replica behind the refusal)
        self.own.revised(partition, int(entry.revision))
        self.own.unanswered(partition)  # (asked again at the next tick)
        return True

    async def _release(self, partition: int, request: Any) -> None:
        """Give a lease back (we act for it no more); tried again, while the bucket has no
        leader, until the key would have expired anyway."""
        deadline = self.clock() + self.ttl
        while True:
            try:
                await asyncio.wait_for(request, self.wait)
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                from nats.js.errors import KeyWrongLastSequenceError

                if isinstance(exc, KeyWrongLastSequenceError) or self._leases is None:
                    break  # (written by another since, or expired: not ours to delete)
                await asyncio.sleep(1.0)
                lease = self.own.leases.get(partition)
                if lease is None or self.clock() > deadline:
                    break
                request = self._leases.delete(f"p{partition}", last=lease.revision)
        self.own.released(partition)

    async def _put_member(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._members.put(f"m-{self.me}", self.value), self.wait)

    def _tell(self) -> None:
        held = self.own.owned(self.clock())
        if held != self.held:
            self.held = held
            self.on_change(set(held))

    # --- what the buckets say ---------------------------------------------------------

    async def _watch(
        self, watcher: Any, seen: Callable[[Any, bool], None], ready: asyncio.Event
    ) -> None:
        """Hand each entry on, saying whether it was written now (`live`) or is what the
        bucket held when the watch began (maybe written long ago: a watch made again
        after a node died replays every key still there)."""
        live = False
        async for entry in watcher:
            if entry is None:  # (the end of what the bucket held when the watch began)
                live = True
                ready.set()
            else:
                seen(entry, live)

    def _member_seen(self, entry: Any, live: bool) -> None:
        member, gone = entry.key.removeprefix("m-"), _deleted(entry)
        now = self.clock()
        if gone:
            self._seen_members.pop(member, None)
        elif live or member not in self._seen_members:  # (a replay is no heartbeat)
            self._seen_members[member] = now
            run = self._runs[member] = bytes(entry.value or b"")
            if live:
                self._beats[run] = now
            if member == self.me and live:
                self._echo = now

    def _lease_seen(self, entry: Any, live: bool) -> None:
        with contextlib.suppress(ValueError):
            p = int(entry.key.removeprefix("p"))
            deleted = _deleted(entry)
            value, revision = bytes(entry.value or b""), int(entry.revision)
            lease = self.own.leases.get(p)
            if lease and revision > lease.revision:
                if deleted or value != self.value:
                    log.info("lease of partition %d deleted or taken under us", p)
                    self.own.refused(p, at=revision)  # (deleted by another, who took us for ended)
                    self._tell()
                else:  # (a write of ours whose answer was lost)
                    self.own.revised(p, revision)
            if deleted:
                self._seen_leases.pop(p, None)
                self._lease_values.pop(p, None)
                return
            if live or p not in self._seen_leases:  # (a replay: written when, we know not)
                self._seen_leases[p] = self.clock()
            self._lease_values[p] = (value, revision)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _deleted(entry: Any) -> bool:
    return entry.operation in ("DEL", "PURGE")
