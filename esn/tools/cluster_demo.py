"""`esn demo --cluster`: the simulation on a NATS cluster that loses a server, then a node.

Starts a 3-node NATS cluster on loopback (`esn.tools.nats`), three `esn server --cluster`
instances (instance i on node i's MQTT port) and the demo's handsets spread over the
nodes (each group has members on all three; the dispatcher is on the first node). It
plays the traffic and scenes of `esn demo`, then, in the middle of calls:

1. kills (SIGKILL) the instance serving a group where a unit is talking, and measures
   the failover as the dispatcher hears it: kill -> the group's state published by the
   instance that took it over -> the first voice packet that instance relayed;
2. kills the NATS node that instance was on (the handsets on it lose their broker), and
   measures what units on the other nodes noticed: the longest silence in a call going
   on meanwhile, and their floor requests left without an answer.

Floor access and mouth-to-ear are reported apart for the steady time and for the 8 s
after each kill. PASS needs no floor granted twice (two connected units holding one
group's floor for over a second), none stuck (every group idle once the traffic stops),
the instance failover within 5 s, no loss of service on the surviving nodes when the node
dies (no silence over 0.5 s in the call, no request unanswered), and the steady time's
KPIs within target.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from esn.client.handset import HAS_PERMISSION, Handset, Inbound
from esn.core.partitions import PARTITIONS, partition_of
from esn.kpi import FLOOR_ACCESS, LATE_ENTRY, MOUTH_TO_EAR
from esn.protocol import codec
from esn.protocol import messages as m
from esn.protocol.topics import Topics
from esn.tomlfile import dump_fleet
from esn.tools.demo import (
    CONSOLE,
    DISPATCHER,
    KPI_HEADER,
    Demo,
    DemoError,
    DemoOptions,
    _after,
    _ms,
    _start_monitoring,
    end_server,
    fleet_doc,
    kpi_row,
    stop_links,
)
from esn.tools.monitoring import MonitoringError, Prometheus, Samples, scrape
from esn.tools.nats import ClusterError, NatsCluster
from esn.tools.processes import ServerStartError, free_port, start_server
from esn.transport import BrokerConfig, Transport, TransportError, make_transport

NODES = 3
WINDOW_S = 8.0  # after a kill: the time counted as "during the failover"
FAILOVER_TARGET_S = 5.0  # kill -> the group served again (issue target, lease included)
Snapshot = dict[int, tuple[int, int]]  # handset -> how many access and mouth-to-ear samples


class ClusterDemo(Demo):
    handset_qos = 0  # as the servers in a cluster (`Handset.qos`)

    def __init__(self, opts: DemoOptions) -> None:
        super().__init__(opts)
        self.nats = NatsCluster(NODES)
        self.servers: dict[str, asyncio.subprocess.Process] = {}
        self.metrics_ports: dict[str, int] = {}
        self.node_of_server: dict[str, int] = {}
        # a unit's node: its rank among its group's members, so every group spans all nodes
        *regular, late = self.unit_ids
        self.node_of = {uid: (i // len(self.groups)) % NODES for i, uid in enumerate(regular)}
        self.node_of.update({DISPATCHER: 0, late: 0})
        self.parts: dict[str, set[int]] = {}  # instance -> partitions, from its status
        self.shared = asyncio.Event()  # every partition served, each instance a fair share
        self.states: dict[str, m.State] = {}  # the dispatcher's latest state of each group
        self.voice: dict[str, asyncio.Future[float]] = {}  # group -> when voice is next heard
        self.tracked: tuple[str, float, float] | None = None  # group, last heard, longest gap
        self.doubled: set[str] = set()  # groups whose floor two units held at once
        self.marks: list[tuple[float, Snapshot]] = []
        self.kills: list[float] = []  # when an instance or node was killed
        self.victim_node: int | None = None  # the killed instance's node: killed next
        self.dead_node: int | None = None  # once it is
        self.results: list[str] = []  # lines of the failover report
        self.watch: Transport | None = None
        self.tasks: list[asyncio.Task[None]] = []

    # --- what is seen -----------------------------------------------------------------

    def on_status(self, topic: str, payload: bytes) -> None:
        try:
            status = codec.decode(payload) if payload else None
        except codec.ProtocolError:
            return
        if not isinstance(status, m.Status):
            return
        srv = topic.split("/")[-2]
        online = status.state == "online"
        self.parts[srv] = set(status.parts or ()) if online else set()
        served = sorted(p for s in self.servers for p in self.parts.get(s, ()))
        fair = all(len(self.parts.get(s, ())) >= PARTITIONS // NODES for s in self.servers)
        if served == list(range(PARTITIONS)) and fair:
            self.shared.set()

    def on_dispatcher_inbound(self, i: Inbound) -> None:
        if isinstance(i.msg, m.State):
            self.states[i.msg.tg] = i.msg

    def on_dispatcher_media(self, tg: str, talker: str) -> None:
        now = time.monotonic()
        waiting = self.voice.pop(tg, None)
        if waiting is not None and not waiting.done():
            waiting.set_result(now)
        if self.tracked is not None and self.tracked[0] == tg:
            _, last, longest = self.tracked
            self.tracked = (tg, now, max(longest, now - last))

    def heard(self, tg: str) -> asyncio.Future[float]:
        """When the dispatcher next hears voice in `tg`."""
        self.voice[tg] = asyncio.get_running_loop().create_future()
        return self.voice[tg]

    def alive(self, h: Handset) -> bool:
        return self.node_of.get(h.unit) != self.dead_node and h.transport.connected

    def member_away_from(self, tg: str, node: int | None) -> Handset:
        return next(h for h in self.members[tg] if self.node_of[h.unit] not in (node, 0))

    def mark(self) -> None:
        """How many samples each handset has now: the samples between two marks are
        counted as taken during a failover when the first mark is within `WINDOW_S` of a
        kill, as steady otherwise."""
        snap = {id(h): (len(h.stats.access_s), len(h.stats.mouth_to_ear_s)) for h in self.everyone}
        self.marks.append((time.monotonic(), snap))

    def killing(self) -> None:
        self.mark()
        self.kills.append(self.marks[-1][0])
        self.tasks.append(asyncio.create_task(self.mark_later(WINDOW_S)))

    async def mark_later(self, delay: float) -> None:
        await asyncio.sleep(delay)
        self.mark()

    def windows(self) -> dict[str, tuple[list[float], list[float]]]:
        self.mark()
        out: dict[str, tuple[list[float], list[float]]] = {"steady": ([], []), "failover": ([], [])}
        for (at, start), (_, end) in zip(self.marks, self.marks[1:], strict=False):
            during = any(k <= at < k + WINDOW_S - 0.01 for k in self.kills)
            access, m2e = out["failover" if during else "steady"]
            for h in self.everyone:
                (a0, m0), (a1, m1) = start.get(id(h), (0, 0)), end.get(id(h), (0, 0))
                access += h.stats.access_s[a0:a1]
                m2e += h.stats.mouth_to_ear_s[m0:m1]
        return out

    async def watch_floors(self) -> None:
        """Two connected units holding one group's floor for over a second: granted twice
        (a pre-emption overlaps for the moment the revoke takes, no longer)."""
        over = dict.fromkeys(self.groups, 0)
        while True:
            await asyncio.sleep(0.1)
            for tg in self.groups:
                held = sum(
                    self.alive(h) and h.floor_state(tg) == HAS_PERMISSION for h in self.group(tg)
                )
                over[tg] = over[tg] + 1 if held > 1 else 0
                if over[tg] >= 10:
                    self.doubled.add(tg)

    def group(self, tg: str) -> list[Handset]:
        return [*self.members[tg], *(h for h in (self.dispatcher, self.late_joiner) if h)]

    def guarded(self, scene: Callable[[str], Awaitable[None]]) -> Callable[[str], Awaitable[None]]:
        """The scene, a failed check (told in one line) if it breaks."""

        async def run(tg: str) -> None:
            try:
                await scene(tg)
            except Exception as exc:
                name = getattr(scene, "__name__", "a scene")
                self.results.append(f"{name} in {tg} broke: {exc!r}")
                self.checks.record(f"{name} ran to its end", False)

        return run

    # --- the two kills ------------------------------------------------------------------

    async def scene_instance_killed(self, tg: str) -> None:
        name = f"instance serving a busy group killed: served again within {FAILOVER_TARGET_S:g} s"
        self.checks.expect(name)
        assert self.dispatcher is not None
        owner = self.states[tg].srv if tg in self.states else None
        talker = self.member_away_from(tg, self.node_of_server.get(owner or ""))
        taken = self.dispatcher.expect(
            lambda i: isinstance(i.msg, m.State) and i.msg.tg == tg and i.msg.talker == talker.unit
        )
        talking = asyncio.create_task(talker.talk_burst(tg, 8.0))
        try:
            await asyncio.wait_for(self.heard(tg), 5)
            state = (await taken).msg
        except TimeoutError:
            self.results.append(f"{tg}: {talker.unit} was not heard; no instance was killed")
            self.checks.record(name, False)
            return
        assert isinstance(state, m.State)
        victim, call = state.srv, state.call
        if victim not in self.servers:
            self.results.append(f"the state of {tg} names no instance of this demo ({victim})")
            self.checks.record(name, False)
            return
        taken_over = self.dispatcher.expect(
            lambda i: isinstance(i.msg, m.State) and i.msg.tg == tg and i.msg.srv != victim, 15
        )
        killed = time.monotonic()
        self.killing()
        self.servers[victim].kill()
        await self.servers.pop(victim).wait()
        self.parts.pop(victim, None)
        try:
            state = (await taken_over).msg
            served = time.monotonic()
            first = await asyncio.wait_for(self.heard(tg), 5)
        except TimeoutError:
            self.results.append(f"{victim} killed: {tg} was not served again within 15 s")
            self.checks.record(name, False)
            return
        assert isinstance(state, m.State)
        self.victim_node = self.node_of_server[victim]
        self.results += [
            f"{victim} killed (SIGKILL) while {talker.unit} talked in {tg}:",
            f"  {tg}'s state published by {state.srv:<22} {served - killed:6.2f} s after the kill"
            f"   target < {FAILOVER_TARGET_S:g} s",
            f"  first voice packet relayed by it        {first - killed:6.2f} s after the kill"
            f"   (same call: {'yes' if state.call == call else 'no'})",
        ]
        self.checks.record(name, served - killed < FAILOVER_TARGET_S)
        await talking

    async def scene_node_killed(self, tg: str) -> None:
        name = "a NATS node killed: no loss of service for units on the other nodes"
        self.checks.expect(name)
        if self.victim_node is None:
            self.results.append("no instance was killed, so no node was either")
            return
        node = self.nats.nodes[self.victim_node]
        talker = self.member_away_from(tg, self.victim_node)
        talking = asyncio.create_task(talker.talk_burst(tg, 2 + WINDOW_S + 2))
        try:
            await asyncio.wait_for(self.heard(tg), 5)
        except TimeoutError:
            self.results.append(f"{tg}: {talker.unit} was not heard; no node was killed")
            return
        self.tracked = (tg, time.monotonic(), 0.0)
        await asyncio.sleep(1.0)
        before = {id(h): h.stats.counts.get("floor_no_answer", 0) for h in self.everyone}
        self.dead_node = self.victim_node
        lost = sum(self.node_of.get(h.unit) == self.dead_node for h in self.everyone)
        self.killing()
        logging.getLogger("esn.transport").setLevel(logging.ERROR)  # (their lost links)
        await asyncio.to_thread(self.nats.kill, self.victim_node)
        await asyncio.sleep(WINDOW_S)
        _, last, longest = self.tracked
        longest = max(longest, time.monotonic() - last)
        self.tracked = None
        unanswered = sum(
            h.stats.counts.get("floor_no_answer", 0) - before[id(h)]
            for h in self.everyone
            if self.node_of.get(h.unit) != self.dead_node
        )
        met = longest < 0.5 and not unanswered
        self.checks.record(name, met)
        self.results += [
            f"NATS node {node.name} killed (SIGKILL), {lost} handsets with it;"
            f" on the other nodes, over {WINDOW_S:g} s:",
            f"  longest silence in {tg}'s call ({talker.unit} talking)  {_ms(longest):>10}",
            f"  floor requests without an answer        {unanswered:6d}",
        ]
        await talking

    # --- the end ------------------------------------------------------------------------

    async def floors_settle(self, timeout: float = 15.0) -> list[str]:
        """The groups still taken (by the dispatcher's states, or a connected handset)
        once the traffic has stopped and the hang time passed; [] when none is stuck."""
        deadline = time.monotonic() + timeout
        while True:
            stuck = [
                tg
                for tg in self.groups
                if (tg in self.states and self.states[tg].floor != "idle")
                or any(
                    self.alive(h) and h.floor_state(tg) == HAS_PERMISSION for h in self.group(tg)
                )
            ]
            if not stuck or time.monotonic() > deadline:
                return stuck
            await asyncio.sleep(0.2)

    def scrape_all(self) -> Samples:
        merged: Samples = {}
        for srv in self.servers:
            with contextlib.suppress(OSError):
                for name, samples in scrape(self.metrics_ports[srv], timeout=2).items():
                    merged.setdefault(name, []).extend(samples)
        return merged

    def report_cluster(self, stuck: list[str]) -> bool:
        print()
        for line in self.results:
            print(line)
        shares = ", ".join(f"{s} {len(self.parts.get(s, ()))}" for s in sorted(self.servers))
        print(f"partitions served at the end: {shares}")
        print()
        print(KPI_HEADER)
        ok = True
        for label, (access, m2e) in self.windows().items():
            when = "steady" if label == "steady" else f"{WINDOW_S:g} s after a kill"
            judged = label == "steady"
            ok &= kpi_row(f"KPI 1 floor access, {when}", access, FLOOR_ACCESS, judged)
            ok &= kpi_row(f"KPI 3 mouth-to-ear, {when}", m2e, MOUTH_TO_EAR, judged)
        late = [x for h in self.everyone for x in h.stats.late_entry_s]
        kpi_row("KPI 4 late entry (affiliate→first media)", late, LATE_ENTRY, judged=False)
        ok &= self.server_summary(self.scrape_all())
        self.checks.record("no floor granted twice", not self.doubled)
        self.checks.record("no floor stuck once the calls ended", not stuck)
        if self.doubled:
            print(f"two units held the floor at once in: {', '.join(sorted(self.doubled))}")
        if stuck:
            print(f"floors still taken at the end: {', '.join(stuck)}")
        return self.check_list() and ok


async def run_cluster_demo(opts: DemoOptions) -> int:
    if opts.groups < 6 or opts.duration < 30:
        print("esn demo: --cluster needs --groups 6 and --duration 30 or more", file=sys.stderr)
        return 2
    demo = ClusterDemo(opts)
    workdir = tempfile.TemporaryDirectory(prefix="esn-demo-")
    demo.server_log = Path(workdir.name) / "server.log"
    background: list[asyncio.Task[None]] = []
    prometheus: Prometheus | None = None
    exporter: asyncio.Server | None = None
    try:
        await asyncio.to_thread(demo.nats.start)
        nodes = demo.nats.nodes
        fleet = Path(workdir.name) / "fleet.toml"
        fleet.write_text(dump_fleet(fleet_doc(demo.groups, demo.supervisors)))
        print(
            f"esn demo: a NATS cluster of {NODES} nodes (MQTT on "
            f"{', '.join(str(n.mqtt_port) for n in nodes)}), {NODES} server instances, "
            f"{len(demo.unit_ids)} handsets in {len(demo.groups)} talkgroups spread over the "
            f"nodes, 1 dispatcher, {opts.duration:g} s"
        )
        demo.watch = make_transport(
            opts.mqtt_client,
            BrokerConfig.from_url(nodes[0].mqtt_url),
            client_id=f"esn-demo-watch-{os.getpid()}",
        )
        demo.watch.on_message = demo.on_status
        await demo.watch.subscribe(Topics().status("+"), qos=0)
        await demo.watch.start()

        async def start(i: int) -> None:
            srv = f"esn-demo-{i + 1}"
            port = demo.metrics_ports[srv] = free_port()
            demo.node_of_server[srv] = i
            demo.servers[srv] = await start_server(
                demo.nats.brokers_from(i),
                fleet,
                metrics_port=port,
                mqtt_client=opts.mqtt_client,
                args=("--server-id", srv, "--cluster", ",".join(demo.nats.nats_urls)),
                log=demo.server_log.with_name(f"{srv}.log"),
            )
            print(f"server {srv} on node {nodes[i].name}: http://127.0.0.1:{port}/metrics")

        try:
            async with asyncio.TaskGroup() as starting:  # (one failing stops the others)
                for i in range(NODES):
                    starting.create_task(start(i))
        except ExceptionGroup as failed:
            raise failed.exceptions[0] from None
        try:
            await asyncio.wait_for(demo.shared.wait(), 30)
        except TimeoutError:
            raise DemoError("the instances did not share the partitions within 30 s") from None
        # the busy group whose instance is killed: one not served from the dispatcher's node
        candidates = demo.groups[3:]
        owner = {
            tg: s for s, ps in demo.parts.items() for tg in candidates if partition_of(tg) in ps
        }
        doomed = next((tg for tg in candidates if demo.node_of_server[owner[tg]] != 0), None)
        if doomed is None:
            raise DemoError("every group was served from the dispatcher's node")
        survivor = next(tg for tg in candidates if tg != doomed)
        print(f"console: ./run esn console --broker {nodes[0].mqtt_url} --unit {CONSOLE}")
        if opts.monitoring:
            prometheus, exporter = await _start_monitoring(demo, list(demo.metrics_ports.values()))

        await demo.start_handsets(
            lambda unit: BrokerConfig.from_url(nodes[demo.node_of.get(unit, 0)].mqtt_url)
        )
        assert demo.dispatcher is not None
        demo.dispatcher.on_inbound = demo.on_dispatcher_inbound
        demo.dispatcher.on_media = demo.on_dispatcher_media
        demo.started = time.monotonic()
        demo.mark()
        d = opts.duration
        busy = [tg for tg in candidates if tg not in (doomed, survivor)]
        demo.tasks += [asyncio.create_task(demo.conversation(tg)) for tg in busy]
        background += [asyncio.create_task(demo.show_progress())]
        background += [asyncio.create_task(demo.watch_floors())]
        scenes = [
            (0.1, demo.scene_preemption, demo.groups[0]),
            (0.2, demo.scene_emergency, demo.groups[1]),
            (0.25, demo.scene_status, demo.groups[0]),
            (0.35, demo.scene_imminent_peril, demo.groups[0]),
            (0.3, demo.scene_late_entry, demo.groups[2]),
            (0.4, demo.scene_instance_killed, doomed),
            (0.65, demo.scene_node_killed, survivor),
        ]
        for frac, scene, tg in scenes:
            demo.tasks.append(asyncio.create_task(_after(frac * d, demo.guarded(scene), tg)))
        await asyncio.sleep(d)
        demo.stopping = True
        await asyncio.wait(demo.tasks, timeout=25)
        stuck = await demo.floors_settle()
        for t in (*demo.tasks, *background):
            t.cancel()
        ok = demo.report_cluster(stuck)
        await asyncio.gather(*(h.stop() for h in demo.everyone), return_exceptions=True)
        for srv, proc in demo.servers.items():
            ok &= await end_server(proc, demo.server_log.with_name(f"{srv}.log"), srv)
        print("\nRESULT:", "PASS" if ok else "FAIL")
        return 0 if ok else 1
    except (
        DemoError,
        ClusterError,
        TransportError,
        MonitoringError,
        ServerStartError,
    ) as exc:
        print(f"esn demo: {exc}", file=sys.stderr)
        return 1
    finally:  # also when interrupted: nothing it started may outlive it
        for t in (*demo.tasks, *background):
            t.cancel()
        links = [h.transport for h in demo.everyone]
        await stop_links([*links, demo.watch] if demo.watch else links)  # (before the nodes go)
        demo.close_trace()
        if exporter is not None:
            exporter.close()
        if prometheus is not None:
            prometheus.close()
        for proc in demo.servers.values():
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        await asyncio.to_thread(demo.nats.close)
        workdir.cleanup()
