"""The group-communication server: the core wired to MQTT.

This shell only decodes, calls `esn.core.network.Network`, and performs the actions it
returns; it also relays media (the hot path), keeps the core's timers on the event loop,
publishes retained state and status, and measures the critical path for Prometheus.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass, replace
from time import perf_counter
from typing import Any

import msgpack

from esn import __version__
from esn.core.actions import (
    Action,
    Audit,
    LocationAccepted,
    StateChanged,
    StateCleared,
    StatusChanged,
    ToGroup,
    ToUnit,
)
from esn.core.fleet import Fleet
from esn.core.limits import Rate, RateLimiter, Verdict
from esn.core.network import Network
from esn.core.partitions import PARTITIONS, acts_on, partition_of
from esn.exporter import serve_metrics
from esn.protocol import codec
from esn.protocol import messages as m
from esn.protocol.ids import call_owner
from esn.protocol.topics import Inbound, Topics
from esn.runtime import AUDIT_LOGGER
from esn.server.cluster import SERVER_LEASE_S, ClusterLink
from esn.server.metrics import BROKER_SYS, ServerMetrics
from esn.store import Store, StoreError, open_store, pack, unpack
from esn.transport import BrokerConfig, Transport, Will, make_transport

log = logging.getLogger("esn.server")
audit = logging.getLogger(AUDIT_LOGGER)

# What one unit may send per topic kind, checked before anything is decoded: far above any
# honest use, so a flood costs a lookup per message, not a decode, and cannot take the event
# loop from everyone else. Voice has no such limit: a non-holder's is dropped unread anyway,
# and the holder's rate is the codec's business (the bench sends thousands a second).
INTAKE = {
    "up": Rate(per_s=100.0, burst=200.0),
    "floor": Rate(per_s=100.0, burst=200.0),
    "presence": Rate(per_s=5.0, burst=20.0),
    "fwd": Rate(per_s=100.0, burst=200.0),  # (what another instance hands on, per unit)
    "unit_media": Rate(per_s=100.0, burst=200.0),  # (a private call's, or listened in on)
}


# uplinks held while recovering (the broker queues at most 100,000 for us in our profiles,
# each at most 64 KiB); held in bytes, as many as could be real and no more
MAX_BACKLOG_BYTES = 64 * 1024 * 1024
BACKLOG_SLICE = 200  # held uplinks acted on between two turns of the event loop
# a cluster instance whose link to its NATS node is lost keeps what it serves this long
# while it connects to another node (a new connection waits for JetStream's elections,
# 4 to 9 s once NATS notices, when the node that died led the stream of MQTT sessions;
# we measured up to 13.4 s)
LINK_GRACE_S = 20.0


class DuplicateServerError(RuntimeError):
    """Another server under the same id is online; the message is one line."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Config:
    broker: BrokerConfig
    server_id: str = "esn-1"
    prefix: str = "esn"
    metrics_port: int | None = None
    mqtt_client: str = "gmqtt"
    keepalive: int = 30
    state: str = ":memory:"  # the durable state's SQLite file (`:memory:`: none)
    # NATS URLs: share the groups with the other instances of a cluster (docs/scaling.md);
    # the durable state is then kept retained in the cluster, not in `state`
    cluster: tuple[str, ...] = ()
    # more MQTT listeners of the same cluster, tried in turn when a link to `broker` is lost
    others: tuple[BrokerConfig, ...] = ()


class Server:
    def __init__(self, config: Config, fleet: Fleet, metrics: ServerMetrics | None = None) -> None:
        self.config = config
        self.topics = Topics(config.prefix)
        self.started_ns = time.time_ns()
        loop = asyncio.get_running_loop()
        self._loop = loop
        # core time is the loop's monotonic clock; wall_offset turns it into Unix time
        self.network = Network(
            fleet,
            call_prefix=f"{self.started_ns // 1_000_000 % 10**8:x}-",
            wall_offset=time.time() - loop.time(),
        )
        self.metrics = metrics or ServerMetrics()
        self.metrics.watch(self.network)
        self._status_topic = status_topic = self.topics.status(config.server_id)
        self.transport: Transport = make_transport(
            config.mqtt_client,
            config.broker,
            client_id=config.server_id,
            keepalive=config.keepalive,
            will=Will(status_topic, self._status("offline")),
            # the broker keeps our uplinks while we restart; not in a cluster, where the
            # others serve while we are away (and QoS 1 stalls when a NATS node dies)
            persistent=not config.cluster,
            others=config.others,
        )
        self.metrics.publish_dropped = lambda: self.transport.dropped
        self.metrics.server_id = config.server_id
        if config.cluster:
            self.metrics.served = lambda: self._ready
        self.transport.on_message = self._on_message
        self.transport.on_retained = self._on_retained
        self.transport.on_connect = self._on_connect
        self.transport.on_disconnect = self._on_disconnect
        # where retained state and locations are published: in a cluster, a link of their
        # own (NATS stores a retained message while reading the publisher's connection,
        # and stalls it for seconds when that store has no leader: a node died)
        self._retainer = self.transport
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._http: asyncio.Server | None = None
        self._accepting = False
        # retained states while recovering at start; {} from construction to the end of it
        self._recovered: dict[str, m.State] | None = {}
        # what units sent, held until recovery has the whole picture (who is online, which
        # calls go on): a persistent session hands over its queue before any of it
        self._backlog: deque[tuple[str, bytes]] = deque()
        self._backlog_bytes = 0
        self._holding = True  # up messages go to the backlog until it has been worked through
        self._replay: asyncio.Task[None] | None = None
        self._count_msg = self.metrics.count_message
        # answers to garbage are capped per unit, so a flood cannot make us flood the broker
        self._error_replies = RateLimiter(
            {"error": Rate(per_s=1.0, burst=5.0), "mic": Rate(per_s=1.0, burst=2.0)}
        )
        # what one unit may send, per topic kind, before anything is decoded
        self._intake = RateLimiter(INTAKE)
        self.received = 0  # every message the broker handed us
        self.rival: DuplicateServerError | None = None  # another instance has our id
        self._link_losses: deque[float] = deque(maxlen=2)
        self._grace: asyncio.TimerHandle | None = None  # (`_link_down`)
        self.gave_way = asyncio.Event()
        self.store: Store | None = None
        # in a cluster: the link, the partitions we serve (held and taken up), the groups
        # whose uplinks we follow, the records read while taking partitions up
        self.link: ClusterLink | None = None
        self._ready: set[int] = set()
        self._following: set[str] = set()
        self._sync_topic = self.topics.sync(config.server_id)
        self._state_sync = self.topics.sync(f"{config.server_id}-state")  # (the state link's)
        # in a cluster, sent at QoS 0: NATS delivers QoS 1 through JetStream consumers,
        # which stalled for many seconds when a node died; QoS 0 goes round a dead node
        # at once. Retries (the handsets') and retained state make up for the rest.
        self._qos = 0 if config.cluster else 1
        self._records_head = f"{self.topics.prefix}/cluster/rec/"
        self._status_head = f"{self.topics.prefix}/server/"
        self._parted_head = f"{self.topics.prefix}/part/"
        self._echoes: dict[bytes, asyncio.Event] = {}
        self._gathering: set[int] = set()
        self._gathered: dict[str, bytes] = {}
        self._taking: asyncio.Task[None] | None = None
        self._chores: set[asyncio.Task[None]] = set()
        self._republishing: asyncio.Task[None] | None = None  # statuses, after a (re)connect
        self._deferred: set[tuple[str, int | None]] = set()  # (`_ahead_of_record`)

    # --- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        if self.config.cluster:
            await self._join()
            return
        self.store = open_store(self.config.state)  # StoreError: in use, or unreadable
        self._load(self.store)
        self._accepting = True
        try:
            await self.transport.start()
        except BaseException:
            self.store.close()  # (its lock with it: a later start may take the file)
            raise
        up, presence, group, unit_media = self.topics.server_subscriptions()
        # (where a NATS cluster's subject mapping moves uplinks and floor requests to)
        parted_up, parted_floor = self.topics.parted_uplinks()
        # QoS 1 in a persistent session: what units send while we restart waits at the broker
        await self.transport.subscribe(up, presence, parted_up)
        # Floor and voice are of the moment: a request made while we were away is sent
        # again by the handset (T101), not served late. Our own status too: another
        # instance under our id announcing itself (see _rival_seen).
        await self.transport.subscribe(group, parted_floor, unit_media, self._status_topic, qos=0)
        await self.transport.subscribe(*BROKER_SYS, qos=0)  # broker health, where allowed
        await self._recover()
        if self.config.metrics_port is not None:
            self._http = await serve_metrics(self.metrics.registry, self.config.metrics_port)
        log.info(
            "serving %d talkgroups on %s as %s",
            len(self.network.groups),
            self.config.broker.url(),
            self.config.server_id,
        )

    @property
    def metrics_url(self) -> str | None:
        if self._http is None or not self._http.sockets:
            return None
        return f"http://127.0.0.1:{self._http.sockets[0].getsockname()[1]}/metrics"

    async def stop(self) -> None:
        """Stop taking input, tell peers we are offline (unless the status is another
        instance's), then close the link and endpoint."""
        if self._grace is not None:
            self._grace.cancel()
        if self.link is not None:
            await self.link.stop()  # (acts for nothing from its first step, then waits)
        self._accepting = False
        if self._timer is not None:
            self._timer.cancel()
        if self._replay is not None:
            self._replay.cancel()
        for chore in [self._taking, *self._chores]:
            if chore is not None:
                chore.cancel()
        if self.rival is None:  # (on the main link if need be: its will is discarded)
            status = self._status("offline")
            link = self._retainer if self._retainer.connected else self.transport
            link.publish(self._status_topic, status, self._qos, True)
        if self._retainer is not self.transport:
            await self._retainer.stop()
        await self.transport.stop()
        if self._http is not None:
            self._http.close()
            await self._http.wait_closed()
        if self.store is not None:
            self.store.close()

    def _load(self, store: Store) -> None:
        """Take up the durable state the previous instance saved: stored short data, open
        emergencies and their acknowledgements, regroups, queues, calls, affiliations and
        the answers units may ask for again. Each record is checked as input from a
        stranger; what is not adopted is logged, and rewritten in the store."""
        records, problems = {}, []
        for key, data in store.load().items():
            try:
                records[key] = unpack(data)
            except ValueError as exc:
                problems.append(f"{key}: {exc}")
                self.network.changed.add(key)
        problems += self.network.load(records, self._loop.time())
        for line in problems[:5]:
            log.warning("saved state not adopted: %s", line[:500])
        if problems:  # (one line of its own: the log throttle passes 5 of the above)
            log.warning("%d saved records not adopted in all, in part or whole", len(problems))
        self._save()
        if records:
            log.info(
                "took up %d saved records from %s (%d calls)",
                len(records),
                self.config.state,
                sum(f.holder is not None for f in self.network.floors.values()),
            )

    def _save(self) -> None:
        """Write what the core changed, before any answer about it goes out."""
        if self.config.cluster:
            self._share()
            return
        changed = self.network.changed
        if not changed or self.store is None:
            return
        began = perf_counter()
        batch = {}
        for key in changed:
            record = self.network.record(key)
            batch[key] = None if record is None else pack(record)
        changed.clear()
        try:
            self.store.save(batch)
        except StoreError as exc:
            # (a full disk, say) service goes on; the batch is tried again with the next
            self.metrics.state_failures += 1
            changed.update(batch)
            log.error("%s; what units are told now may not survive a restart", exc)
            return
        self.metrics.state_write.observe(perf_counter() - began)

    async def _recover(self, timeout: float = 5.0) -> None:
        """Read the groups' retained state left by a previous instance and adopt what is
        still true, so a call survives a server restart (SIGKILL included).

        The retained presence arrives with the subscriptions made before this; a marker
        sent to our own sync topic comes back after every retained state, so once it is
        back the picture is complete.
        """
        t = self.topics
        me = self.config.server_id
        marker = f"{self.started_ns}".encode()
        self._synced = asyncio.Event()
        self._sync_marker = marker
        # our groups' states only: foreign ones (anyone may publish in the local profile)
        # must not crowd out a real call before the marker comes back
        states = [t.state(tg) for tg in self.network.groups]
        await self.transport.subscribe(*states, t.sync(me))
        self.transport.publish(t.sync(me), marker, qos=1)
        try:
            await asyncio.wait_for(self._synced.wait(), timeout)
        except TimeoutError:
            log.warning("no echo from the broker within %g s; recovering what arrived", timeout)
        await self.transport.unsubscribe(*states, t.sync(me))
        if self.rival is not None:  # another instance has our id: leave it be
            await self.stop()
            raise self.rival
        recovered, self._recovered = self._recovered or {}, None
        now = self._loop.time()
        for state in recovered.values():
            if state.tg in self.network.stored:
                continue  # the store is written before the state is published: it is newer
            why = self.network.restore(state, now)
            if why is not None:
                log.warning("retained state of %s not adopted: %s", state.tg, why)
        due = self.network.settle(now)  # a floor whose talker was not kept: its queue's turn
        self._save()
        self._rearm()  # (after settle: the grants it made have deadlines too)
        self._announce()  # only now: units reclaiming a floor find it restored
        self._perform(due)
        self._replay = asyncio.create_task(self._work_through_backlog())
        taken = sum(f.holder is not None for f in self.network.floors.values())
        if recovered:
            log.info("read %d retained group states; %d calls go on", len(recovered), taken)

    async def _work_through_backlog(self) -> None:
        """Act on what units sent while no server was up (and since), in order, a slice at a
        time: between slices the loop serves live floor control and takes the broker's
        acks, so answers are never dropped for want of packet ids."""
        done = 0
        while self._backlog and self._accepting:
            for _ in range(min(BACKLOG_SLICE, len(self._backlog))):
                topic, payload = self._backlog.popleft()
                self._backlog_bytes -= len(payload)
                self._on_message(topic, payload, held=True)
                done += 1
            await self.transport.writable()
        self._holding = False
        if done:
            log.info("acted on %d messages sent while no server was up", done)

    def _hold(self, topic: str, payload: bytes) -> None:
        if len(payload) > codec.MAX_PAYLOAD:
            self.metrics.count_rejected("too_large")
        elif self._backlog_bytes + len(payload) > MAX_BACKLOG_BYTES:
            self.metrics.count_rejected("rate_limited")
        else:
            self._backlog.append((topic, payload))
            self._backlog_bytes += len(payload)

    def _on_recovery(self, topic: str, payload: bytes) -> bool:
        """During recovery: keep retained states and watch for our marker."""
        if topic == self.topics.sync(self.config.server_id):
            if payload == self._sync_marker:
                self._synced.set()
            return True
        tg = self.topics.state_group(topic)
        if tg is None:
            return False
        with contextlib.suppress(codec.ProtocolError):
            msg = codec.decode(payload) if payload else None
            if isinstance(msg, m.State) and msg.tg == tg:
                self._recovered[tg] = msg  # type: ignore[index]
        return True

    def _rival_seen(self, payload: bytes) -> None:
        """Two servers under one id push each other off the broker (same client id) for
        ever, each missing the other's `online` while pushed off. The one that started
        later gives way (it stops, and `serve` ends with a one-line error; the older goes
        on) once it has been pushed off twice within 10 s and then finds a status of an
        older start (the older's will, fired as it was pushed off). A status alone is no
        evidence: a stale one (a broker restored from disk) or a forged one (anyone may
        publish in the local profile) must not stop a server, nor must one broker restart."""
        with contextlib.suppress(codec.ProtocolError):
            status = codec.decode(payload) if payload else None
            losses = self._link_losses
            pushed_off = len(losses) >= 2 and losses[-1] - losses[-2] < 10.0
            if (
                self.rival is None
                and pushed_off
                and isinstance(status, m.Status)
                and status.started_ts < self.started_ns
            ):
                since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(status.started_ts / 1e9))
                self.rival = DuplicateServerError(
                    f"another server with id {self.config.server_id!r} is online on "
                    f"{self.config.broker.url()} (started {since}): stop it, or give this one "
                    f"another --server-id"
                )
                self.gave_way.set()

    def _peer_status_seen(self, topic: str, payload: bytes) -> None:
        """Another instance's status. `offline` is its will (or its goodbye): the broker
        has closed its link, so nothing it sends reaches anyone any more, and its
        partitions may be taken at once rather than when its leases expire."""
        srv = topic[len(self._status_head) :].removesuffix("/status")
        with contextlib.suppress(codec.ProtocolError):
            status = codec.decode(payload) if payload else None
            if isinstance(status, m.Status) and self.link is not None:
                if status.state == "online":
                    self.link.back(srv)
                else:
                    self.link.gone(srv, str(status.started_ts))

    def _own_status_seen(self, payload: bytes) -> None:
        """Our own status said `offline` while we are online (a will of ours fired late,
        or a forgery: the open profile lets anyone publish there): say `online` again.
        It costs us no partition, as our heartbeats go on (`ClusterLink.gone`)."""
        with contextlib.suppress(codec.ProtocolError):
            status = codec.decode(payload) if payload else None
            if isinstance(status, m.Status) and status.state != "online":
                log.warning("our status was set offline while we serve: online again")
                self._say_online()

    def _say_online(self) -> None:
        """Our retained status `online` (in a cluster, with the partitions we serve)."""
        self._retainer.publish(self._status_topic, self._status("online"), self._qos, True)

    def _status(self, state: str) -> bytes:
        parts = sorted(self._ready) if self.config.cluster and state == "online" else None
        status = m.Status(state=state, version=__version__, started_ts=self.started_ns, parts=parts)
        return codec.encode(status)

    # --- a cluster: the groups shared with other instances (docs/scaling.md) ------------

    async def _join(self) -> None:
        """Start as one instance of a cluster: serve nothing until the link holds leases.
        Every instance hears every unit's presence and which groups each unit is in (the
        units' records, kept retained by the instance serving the unit); what a unit sends
        up is acted on by the instance serving the unit, or handed by it to the instance
        serving the group (or unit) the message is about."""
        self._accepting = True
        self._recovered, self._holding = None, False  # (nothing is held for later here)
        config = self.config
        self._retainer = make_transport(
            config.mqtt_client,
            config.broker,
            client_id=f"{config.server_id}-state",
            keepalive=config.keepalive,
            others=config.others,
        )
        # what changes with the partitions served (records read at a take-up, the groups'
        # voice, what others hand on) is subscribed on it too: each SUBSCRIBE makes NATS
        # store the session, stalling that connection meanwhile, and the main one must not
        self._retainer.on_message = self._on_message
        self._retainer.on_retained = self._on_retained
        self._retainer.on_connect = self._on_connect
        # (not a loss of the main link: no evidence of a rival, see _rival_seen)
        self._retainer.on_disconnect = self._link_down
        # made before we hear the others' statuses: a will heard is passed to it (`gone`)
        self.link = ClusterLink(
            config.cluster,
            config.server_id,
            prefix=config.prefix.replace("/", "_"),
            ttl=SERVER_LEASE_S,
            incarnation=str(self.started_ns),
        )
        self.link.on_change = self._shares_changed
        await self._retainer.start()
        try:
            await self.transport.start()
        except BaseException:
            await self._retainer.stop()
            raise
        t = self.topics
        up, presence, _, unit_media = t.server_subscriptions()
        # QoS 0: on a NATS cluster, what is subscribed at QoS 1 stalls when a node dies.
        # Every unit's presence and record comes to every instance. Uplinks and floor
        # requests come by partition (`_follow`), moved there by the cluster's subject
        # mapping; without one, every instance hears them all and drops those of
        # partitions it does not serve by their topic. Voice, by group (`_follow`).
        # What units send comes on the state link, presence included: in the order sent.
        # (a unit's voice listened in on comes to every instance: few units send it)
        mine = (t.status("+"), self._sync_topic, t.unit_records(), unit_media)
        await self.transport.subscribe(*mine, qos=0)
        await self.transport.subscribe(*BROKER_SYS, qos=0)
        await self._retainer.subscribe(presence, self._state_sync, qos=0)
        if not await self._probe():
            log.warning(
                "the cluster does not move uplinks by partition (no subject mapping, see "
                "docs/scaling.md): every instance hears every unit's uplinks"
            )
            await self._retainer.subscribe(up, t.floors_up(), qos=0)
        # (the retained presence, records and statuses are in once these come back)
        await self._echo(self.transport, self._sync_topic)
        await self._echo(self._retainer, self._state_sync)
        self._say_online()
        try:
            await self.link.start()
        except BaseException:
            self.link = None
            await self.stop()
            raise
        if self.config.metrics_port is not None:
            self._http = await serve_metrics(self.metrics.registry, self.config.metrics_port)
        log.info(
            "joined the cluster at %s as %s", ", ".join(self.config.cluster), self.config.server_id
        )

    async def _probe(self, timeout: float = 2.0) -> bool:
        """Whether the cluster's subject mapping moves uplinks by partition: an uplink
        no unit can send, looked for where the mapping would deliver it."""
        sent, seen = self.topics.probe(self.config.server_id)
        await self.transport.subscribe(seen, qos=0)
        try:
            return await self._echo(self.transport, sent, timeout, warn=False)
        finally:
            await self.transport.unsubscribe(seen)

    async def _echo(
        self, link: Transport, topic: str, timeout: float = 5.0, warn: bool = True
    ) -> bool:
        """Whether a marker sent to ourselves on `link` came back within `timeout`: the
        retained messages of the subscriptions made on it before have all arrived then."""
        marker = os.urandom(8).hex().encode()
        back = self._echoes[marker] = asyncio.Event()
        link.publish(topic, marker, qos=self._qos)
        try:
            await asyncio.wait_for(back.wait(), timeout)
            return True
        except TimeoutError:
            if warn:
                log.warning("no echo from the broker within %g s", timeout)
            return False
        finally:
            del self._echoes[marker]

    def _serving(self, partition: int) -> bool:
        """Whether we act for the partition now: taken up, and its lease not lapsed."""
        return partition in self._ready and self.link is not None and self.link.acting(partition)

    def _shares_changed(self, held: set[int]) -> None:
        self._fence()
        if self._taking is None or self._taking.done():
            self._taking = asyncio.ensure_future(self._take_up())

    def _fence(self) -> None:
        """Forget at once the partitions whose lease lapsed or went to another."""
        lost = {p for p in self._ready if not self._serving(p)}
        if not lost:
            return
        self._ready -= lost
        self.network.forget(lambda ident: partition_of(ident) in lost)
        self._follow()
        self._say_online()
        log.info("serve partitions %s no more", _spans(lost))

    async def _take_up(self) -> None:
        """Serve the partitions newly held: read their records (kept retained by whoever
        served them), adopt what checks out, then follow their groups' uplinks."""
        assert self.link is not None
        try:
            await self._take_up_held()
        finally:  # (no uplinks of partitions we did not take up after all)
            self._gathering = set()
            if self._accepting:
                self._follow()

    async def _take_up_held(self) -> None:
        assert self.link is not None
        while self._accepting and (new := self.link.held - self._ready):
            t = self.topics
            self._gathering, self._gathered = new, {}
            self._follow()  # (their uplinks: to have them from the moment we serve them)
            topics = [t.records(p) for p in sorted(new)]
            try:  # (bounded: an ack lost to a reconnect is never answered)
                await asyncio.wait_for(self._retainer.subscribe(*topics, qos=0), 10)
                complete = await self._echo(self._retainer, self._state_sync)
                await asyncio.wait_for(self._retainer.unsubscribe(*topics), 10)
            except Exception as exc:  # (the link went down: we stand aside until it is back)
                complete, why = False, str(exc)
            else:
                why = "no echo"
            if not complete:  # serve nothing on a partial picture: try again
                log.warning("records of partitions %s not read (%s)", _spans(new), why)
                self._gathering = set()
                self._follow()
                await asyncio.sleep(1.0)
                continue
            gathered, self._gathering = self._gathered, set()
            self._fence()  # (lost again meanwhile? then no floor of it is settled below)
            new = {p for p in new if self.link.acting(p)}
            records, problems = {}, []
            for key, data in gathered.items():
                if partition_of(key.partition("/")[2]) not in new or not data:
                    continue
                try:
                    records[key] = unpack(data)
                except ValueError as exc:
                    problems.append(f"{key}: {exc}")
            now = self._loop.time()
            problems += self.network.load(records, now)
            for line in problems[:5]:
                log.warning("record not adopted: %s", line[:500])
            for tg, group in self.network.groups.items():
                if group.temporary and partition_of(tg) in new:  # (a regroup put them there)
                    for unit in group.members:
                        self.network.affiliations.setdefault(unit, set()).add(tg)
            self._ready |= new
            self.metrics.partitions_taken += len(new)
            due = self.network.settle(now) + self.network.deliver_stored()
            self._save()
            self._rearm()
            self._follow()
            for tg in self.network.groups:
                if partition_of(tg) in new:
                    self._publish_state(tg)
            self._chore(self._republish_statuses(new))
            # (handsets waiting in a queue ask for their place again)
            self._say_online()
            self._perform(due)
            calls = sum(f.holder is not None for f in self.network.floors.values())
            log.info("serve partitions %s (%d records, %d calls)", _spans(new), len(records), calls)

    def _follow(self) -> None:
        """Subscribe to the voice of the groups we serve, to the uplinks of the partitions
        we serve or take up, and to what other instances hand us; and no more to those of
        the groups and partitions we do not."""
        t = self.topics
        parts = self._ready | self._gathering
        want = (
            {t.forwards(p) for p in self._ready}
            | {t.parted(p) for p in parts}
            | {t.voice_up(tg) for tg in self.network.groups if self._serving(partition_of(tg))}
        )
        more, less = want - self._following, self._following - want
        self._following = want
        if more:
            self._chore(self._retainer.subscribe(*sorted(more), qos=0))
        if less:
            self._chore(self._retainer.unsubscribe(*sorted(less)))

    def _chore(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(work)
        self._chores.add(task)
        task.add_done_callback(self._chores.discard)
        return task

    def _on_record(self, topic: str, payload: bytes) -> None:
        """A record another instance kept (or one we asked for while taking up)."""
        found = self.topics.record_key(topic)
        if found is None:
            return
        partition, key = found
        kind, _, ident = key.partition("/")
        if partition != partition_of(ident):
            self.metrics.count_rejected("bad_topic")
            return
        if partition in self._gathering:
            self._gathered[key] = payload
            return
        if kind != "unit" or self._serving(partition):
            return  # (ours: we wrote it)
        self._fence()
        groups: object = []
        if payload:
            try:
                record = unpack(payload)
            except ValueError:
                self.metrics.count_rejected("malformed")
                return
            groups = record.get("groups") if isinstance(record, dict) else None
        before = set(self.network.affiliations.get(ident, ()))
        self._perform(self.network.adopt_affiliations(ident, groups, self._loop.time()))
        self._late_entry(ident, before)
        self._rearm()

    def _late_entry(self, unit: str, before: set[str]) -> None:
        """`unit` was in the groups `before`: state again those it joined since, if ours
        and with a call going on.
        The retained state may not be there for it yet: NATS updates each node's copy of
        what is retained a moment after the store, so a unit subscribing on another node
        just after a grant can be handed the state from before it; the unit subscribed
        before it affiliated, so it hears this one."""
        for tg in self.network.affiliations.get(unit, set()) - before:
            floor = self.network.floors.get(tg)
            if floor is not None and floor.holder is not None and self._serving(partition_of(tg)):
                self._publish_state(tg)

    def _share(self) -> None:
        """Keep what the core changed, retained in the cluster, for the partitions we
        serve: whoever serves them next reads it back; the others read the units' records
        (which groups a unit is in) as they come. On the state link, as everything
        retained: a store stalled by a leader election delays no answer."""
        t = self.topics
        unsent = set()
        for key in self.network.changed:
            partition = partition_of(key.partition("/")[2])
            if self._serving(partition):
                if not self._retainer.connected:  # (written once it is back: `_on_connect`)
                    unsent.add(key)
                    continue
                record = self.network.record(key)
                data = b"" if record is None else pack(record)
                self._retainer.publish(t.record(partition, key), data, qos=self._qos, retain=True)
        self.network.changed = unsent

    def _on_disconnect(self) -> None:
        self._link_losses.append(self._loop.time())
        self._link_down()

    def _link_down(self) -> None:
        """In a cluster, one of our MQTT links is lost: no one can reach us, so the others
        serve meanwhile. With other nodes to go to (`Config.others`), we keep what we
        serve while the link is made again there, for `LINK_GRACE_S` at most."""
        if self.link is None:
            return
        if not self.config.others:
            self.link.standby(True)
        elif self._grace is None:
            self._grace = self._loop.call_later(LINK_GRACE_S, self._step_aside)

    def _step_aside(self) -> None:
        self._grace = None
        if (
            self._accepting
            and self.link is not None
            and not (self.transport.connected and self._retainer.connected)
        ):
            log.warning("no MQTT link for %g s: the others serve meanwhile", LINK_GRACE_S)
            self.link.standby(True)

    def _on_connect(self) -> None:
        if self.link is not None and self.transport.connected and self._retainer.connected:
            if self._grace is not None:
                self._grace.cancel()
                self._grace = None
            self.link.standby(False)
            # written again: what changed while a link was down, or just before it was
            # known to be (QoS 0, lost with the node), might not be in the cluster
            network = self.network
            network.changed |= {k for k in network.record_keys() if network.record(k)}
            self._save()
        if self._recovered is None and self._accepting:  # a reconnect, not the first connect
            self._announce()

    def _announce(self) -> None:
        """Status online, every group's state and every unit's status: the broker may have
        lost all it retained."""
        self._say_online()
        for tg in self.network.groups:
            if not self.config.cluster or self._serving(partition_of(tg)):
                self._publish_state(tg)
        if self._republishing is not None:  # (one at a time: this one has them all)
            self._republishing.cancel()
        self._republishing = self._chore(self._republish_statuses())

    # --- inbound ----------------------------------------------------------------------

    def _on_retained(self, topic: str, payload: bytes) -> None:
        """A retained message, delivered because we subscribed. Presence, group state and
        status are meant to be retained; an uplink never is: replayed at every start, a
        retained request would take a floor and a retained SDS be delivered again. So it
        is dropped, counted, and cleared at the broker."""
        if topic == self._status_topic:  # (ours from before: no news of now, but a rival's)
            self._rival_seen(payload)
            return
        where = self.topics.parse_inbound(topic)
        if (where is None and not topic.startswith(self._parted_head)) or (
            where is not None and where.kind == "presence"
        ):
            self._on_message(topic, payload)
            return
        self.metrics.count_rejected("retained")
        if payload:  # (cleared on the state link: a retained write can stall its link)
            self._retainer.publish(topic, b"", qos=self._qos, retain=True)
            kind = where.kind if where else "misplaced"
            log.warning("a retained %s message on %s: ignored and cleared", kind, topic)

    def _on_message(self, topic: str, payload: bytes, held: bool = False) -> None:
        if not held:
            self.received += 1
        if not self._accepting:
            return
        received = perf_counter()
        if topic.startswith("$SYS/"):
            self.metrics.broker_figure(topic, payload)
            return
        if topic == self._status_topic:  # (formatted once: this is every message's path)
            self._rival_seen(payload)
            if self.config.cluster:
                self._own_status_seen(payload)
            return
        if self.config.cluster:
            if topic.startswith(self._status_head) and topic.endswith("/status"):
                self._peer_status_seen(topic, payload)
                return
            if topic in (self._sync_topic, self._state_sync) or "/~" in topic:  # (or a probe)
                echo = self._echoes.get(payload)
                if echo is not None:
                    echo.set()
                return
            if topic.startswith(self._records_head):
                self._on_record(topic, payload)
                return
        if self._recovered is not None and self._on_recovery(topic, payload):
            return
        if self._holding and not held and topic.endswith("/up"):
            self._hold(topic, payload)  # acted on once recovery knows who is online
            return
        if self._recovered is not None and not topic.endswith("/presence"):
            return  # floor and voice of the moment: handsets ask again (T101)
        where = self.topics.parse_inbound(topic)
        if where is None:
            self.metrics.count_rejected("bad_topic")
            return
        if self.config.cluster and not self._ours(where):
            if where.kind not in ("fwd", "unit_media") and (
                partition_of(where.tg or where.unit) not in self._gathering
            ):  # (a unit's voice listened in on comes to every instance: not foreign)
                self.metrics.foreign += 1
            return
        if self.config.cluster and not self.transport.connected and where.kind != "presence":
            return  # (no answer could go out: the unit asks again)
        if where.kind in INTAKE and (
            self._intake.check(where.unit, where.kind, self._loop.time()) is not Verdict.ALLOW
        ):
            self.metrics.count_rejected("rate_limited")
            return
        if where.kind == "media":
            self._relay(where.unit, where.tg or "", payload, received)
            return
        if where.kind == "unit_media":
            self._relay_unit_voice(where.unit, payload, received)
            return
        if where.kind == "presence" and not payload:
            return  # a cleared retained presence
        try:
            msg = codec.decode(payload)
        except codec.ProtocolError as exc:
            self.metrics.count_rejected(exc.cause)
            allowed = self._error_replies.check(where.unit, "error", self._loop.time())
            if where.kind != "presence" and allowed == Verdict.ALLOW:
                self._send(where.unit, m.Error(cause=exc.cause, detail=exc.detail, ref=exc.ref))
            return
        self._count_msg(msg.T, "in")
        now = self._loop.time()
        if where.kind == "presence":
            if not isinstance(msg, m.Presence):
                self.metrics.count_rejected("invalid_field")
                return
            if self.config.cluster:
                self._fence()
            actions = self.network.presence(where.unit, msg, now)
        elif where.kind == "floor":
            assert where.tg is not None
            if self.config.cluster and self._ahead_of_record(where, msg, topic, payload):
                return
            actions = self.network.floor_message(where.unit, where.tg, msg, now)
        elif self.config.cluster and not self._acts_here(where, msg, payload):
            return
        elif self.config.cluster and isinstance(msg, m.Affiliate):
            before = set(self.network.affiliations.get(where.unit, ()))
            actions = self.network.unit_message(where.unit, msg, now)
            self._late_entry(where.unit, before)
        else:
            actions = self.network.unit_message(where.unit, msg, now)
        self._save()
        self._perform(actions)
        if self.config.cluster and isinstance(msg, m.Regroup | m.Ungroup):
            self._follow()
        if isinstance(msg, m.Request):
            for a in actions:
                if isinstance(a, ToUnit) and a.unit == where.unit and isinstance(a.msg, m.Granted):
                    self.metrics.floor_access.labels(msg.kind).observe(perf_counter() - received)
        self._rearm()

    def _ahead_of_record(self, where: Inbound, msg: m.Message, topic: str, payload: bytes) -> bool:
        """A floor request from another instance's unit not (yet) in the group here: its
        record, sent before the unit was told it joined, takes another way through the
        cluster than the request and can come a moment later. Decide once it had 0.2 s
        to arrive (once per request)."""
        if (
            not isinstance(msg, m.Request)
            or where.tg in self.network.affiliations.get(where.unit, ())
            or self._serving(partition_of(where.unit))
            or (where.unit, msg.ref) in self._deferred
        ):
            return False
        if len(self._deferred) >= 1000:
            self._deferred.clear()
        self._deferred.add((where.unit, msg.ref))
        self._loop.call_later(0.2, self._on_message, topic, payload, True)
        return True

    def _ours(self, where: Inbound) -> bool:
        """In a cluster: whether a message is for a partition we serve (presence is for
        everyone: every instance's floors let go of a unit that went offline; a unit's
        voice in a private call is for its caller's)."""
        if where.kind == "presence":
            return True
        if where.kind == "fwd":
            partition = int(where.tg or "")
            return partition < PARTITIONS and self._serving(partition)
        if where.kind == "unit_media":  # (the calls kept here are known: nothing to decode)
            call = self.network.private.of.get(where.unit)
            kept = call is not None and self._serving(partition_of(call_owner(call) or ""))
            return kept or self._serving(partition_of(where.unit))
        return self._serving(partition_of(where.tg or where.unit))

    def _acts_here(self, where: Inbound, msg: m.Message, payload: bytes) -> bool:
        """In a cluster: whether a unit's message is acted on here, or handed on to the
        instance serving the group or unit it is about (as it came: that one checks it
        again, answers and keeps the answer for a repeat)."""
        partition = partition_of(acts_on(where.unit, msg))
        if where.kind == "fwd":
            if partition != int(where.tg or ""):
                self.metrics.count_rejected("spoofed")  # (only instances forward)
                return False
            return True
        if partition == partition_of(where.unit) or self._serving(partition):
            return True
        self.transport.publish(self.topics.forward(partition, where.unit), payload, qos=0)
        return False

    def _relay(self, unit: str, tg: str, payload: bytes, received: float) -> None:
        """The hot path: one voice packet from the talker to the group."""
        self._count_msg("media", "in")
        refused = self.network.media_sender(unit, tg)
        if refused is not None:  # not the talker's: dropped before the cost of decoding it
            self.metrics.count_media_dropped(refused)
            return
        msg = self._voice_of(unit, payload)
        if msg is None:
            return
        reason = self.network.media_drop_reason(unit, tg, self._loop.time())
        if reason is not None:
            self.metrics.count_media_dropped(reason)
            return
        call = self.network.floors[tg].call
        self._pass_on(self.topics.media_down(tg), unit, call, msg, received, tg)

    def _relay_unit_voice(self, unit: str, payload: bytes, received: float) -> None:
        """A unit's voice outside any group: to the other party of its private call
        (11.14), or to whoever listens in on it (11.13). A unit in neither is dropped
        before the cost of decoding (a microphone left open is told to close, sparingly)."""
        self._count_msg("media", "in")
        net = self.network
        private, session = net.private.of.get(unit), net.ambient_listener(unit)
        if private is None and session is None:
            if self.config.cluster:  # (its voice may be for a call another instance keeps)
                self.metrics.foreign += 1
            else:
                self.metrics.count_media_dropped("not_holder")
            self._close_mic(unit, None, payload)
            return
        msg = self._voice_of(unit, payload)
        if msg is None:
            return
        if msg.call == private:
            to = net.private_voice_to(unit, msg.call, self._loop.time())
        elif session is not None and msg.call == session[1]:
            to = session[0]
        else:
            to = None
            self._close_mic(unit, msg.call)
        if to is None:  # not its call, not connected, or the other's turn
            self.metrics.count_media_dropped("not_holder")
            return
        self._pass_on(self.topics.unit_media_down(to), unit, msg.call, msg, received)

    def _voice_of(self, unit: str, payload: bytes) -> m.Media | None:
        """A voice packet of `unit` decoded, or None (counted) when it is unreadable or
        names another talker."""
        try:
            msg = codec.media_from_dict(codec.unpack(payload))
        except codec.ProtocolError as exc:
            self.metrics.count_media_dropped(exc.cause)
            return None
        if msg.talker is not None and msg.talker != unit:
            self.metrics.count_media_dropped("spoofed")
            return None
        return msg

    def _pass_on(
        self,
        topic: str,
        unit: str,
        call: str | None,
        msg: m.Media,
        received: float,
        tg: str | None = None,
    ) -> None:
        """Relay a voice packet as the talker's (in group `tg`, if one), stamped now."""
        out: dict[str, object] = {
            "t": "media",
            "tg": tg,
            "talker": unit,
            "call": call,
            "seq": msg.seq,
            "data": msg.data,
            "rts": time.time_ns(),
        }
        if tg is None:
            del out["tg"]  # (a unit's voice outside any group)
        if msg.ts is not None:
            out["ts"] = msg.ts
        self.transport.publish(topic, msgpack.packb(out), qos=0)
        self._count_msg("media", "out")
        self.metrics.media_relay.observe(perf_counter() - received)

    def _close_mic(self, unit: str, call: str | None, payload: bytes = b"") -> None:
        """Tell a unit sending voice nobody listens to to close its microphone (at most
        twice, then once a second): not for a private call's, whose end it was told. The
        call is read from `payload` only when it is sent (not decoded yet)."""
        if self._error_replies.check(unit, "mic", self._loop.time()) is not Verdict.ALLOW:
            return
        if call is None:
            with contextlib.suppress(codec.ProtocolError):
                call = codec.media_from_dict(codec.unpack(payload)).call
        if call is not None and call_owner(call) is None:
            self._send(unit, m.MicClose(call=call))

    # --- outbound ---------------------------------------------------------------------

    def _send(self, unit: str, msg: m.Message) -> None:
        self.transport.publish(self.topics.unit_down(unit), codec.encode(msg), qos=self._qos)
        self._count_msg(msg.T, "out")

    def _perform(self, actions: list[Action]) -> None:
        states: dict[str, None] = {}
        t = self.topics
        for a in actions:
            match a:
                case ToUnit():
                    self._send(a.unit, a.msg)
                case ToGroup():
                    topic = t.floor_down(a.tg) if a.channel == "floor" else t.event_down(a.tg)
                    self.transport.publish(topic, codec.encode(a.msg), qos=self._qos)
                    self._count_msg(a.msg.T, "out")
                    self._incident(a.msg)
                case StateChanged():
                    states[a.tg] = None
                case StateCleared():
                    states.pop(a.tg, None)
                    self._retainer.publish(t.state(a.tg), b"", qos=self._qos, retain=True)
                case LocationAccepted():
                    location = codec.encode(a.msg)
                    self._retainer.publish(t.location(a.unit), location, qos=self._qos, retain=True)
                    self.metrics.hotspots.located(a.unit, a.msg.lat, a.msg.lon)
                case StatusChanged():
                    self._publish_unit_status(a.unit)
                case Audit():  # (the log's repeat filter passes every one)
                    audit.warning("audit: %s", a.text)
                    self.metrics.count_audited(a.what)
        for tg in states:
            self._publish_state(tg)

    def _incident(self, msg: m.Message) -> None:
        """An emergency raised, or a call at emergency or imminent peril: on the map."""
        now = time.monotonic()  # (the clock the metrics read the window with)
        if isinstance(msg, m.Emergency):
            self.metrics.hotspots.incident(msg.unit, "emergency", now, msg.lat, msg.lon)
        elif isinstance(msg, m.Taken) and msg.kind != "normal":
            self.metrics.hotspots.incident(msg.talker, msg.kind, now)

    def _publish_unit_status(self, unit: str) -> None:
        status = self.network.status_msg(unit)  # (none: cleared)
        payload = b"" if status is None else codec.encode(status)
        self._retainer.publish(self.topics.unit_status(unit), payload, qos=self._qos, retain=True)

    async def _republish_statuses(self, parts: set[int] | None = None) -> None:
        """Every unit's last status again (of the partitions `parts`, else of all), a chunk
        at a time: a fleet's worth at once would use up the link's packet ids. In a cluster
        each is checked to be ours still when it goes (a lease may lapse meanwhile)."""
        cluster = self.config.cluster
        units = [u for u in self.network.statuses if parts is None or partition_of(u) in parts]
        for i in range(0, len(units), 500):
            await self._retainer.writable()
            for unit in units[i : i + 500]:
                if unit in self.network.statuses and (
                    not cluster or self._serving(partition_of(unit))
                ):
                    self._publish_unit_status(unit)

    def _publish_state(self, tg: str) -> None:
        state = replace(self.network.state_msg(tg, self._loop.time()), srv=self.config.server_id)
        self._retainer.publish(
            self.topics.state(tg), codec.encode(state), qos=self._qos, retain=True
        )

    # --- timers -----------------------------------------------------------------------

    def _rearm(self) -> None:
        deadline = self.network.next_deadline()
        if deadline is None or (self._timer_at is not None and self._timer_at <= deadline):
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = self._loop.call_at(deadline, self._fire)

    def _fire(self) -> None:
        self._timer = self._timer_at = None
        if self.config.cluster:
            self._fence()  # (no floor of a partition lapsed since is woken)
        actions = self.network.on_timer(self._loop.time())
        self._save()
        self._perform(actions)
        self._rearm()


def _spans(partitions: Iterable[int]) -> str:
    """`0-3,7` for {0, 1, 2, 3, 7}."""
    spans: list[list[int]] = []
    for p in sorted(partitions):
        if spans and spans[-1][1] == p - 1:
            spans[-1][1] = p
        else:
            spans.append([p, p])
    return ",".join(f"{a}-{b}" if a != b else f"{a}" for a, b in spans)


async def serve(config: Config, fleet: Fleet, stop: asyncio.Event) -> None:
    """Run a server until `stop` is set, then shut it down in order. Once it serves it says
    so in one line: what, where, and the metrics URL (the port chosen, with port 0)."""
    server = Server(config, fleet)
    await server.start()
    how = f"in the cluster at {', '.join(config.cluster)}" if config.cluster else "alone"
    print(
        f"esn server {config.server_id}: serving {len(fleet.groups)} talkgroups on "
        f"{config.broker.url()} ({how}); metrics {server.metrics_url or 'off'}; "
        "Ctrl-C or SIGTERM stops it",
        flush=True,
    )
    waits = [asyncio.ensure_future(e.wait()) for e in (stop, server.gave_way)]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
        await server.stop()
    if server.rival is not None:
        raise server.rival
