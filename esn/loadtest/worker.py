"""One load-generator worker process: its share of the handsets, each on its own MQTT
connection, driven on an open-loop schedule.

The worker connects its handsets at its share of the ramp rate, waits for the common
start signal, then plays the traffic model: for each of its talkgroups a Poisson stream of
sessions made of talk bursts (sometimes with a competing press), emergencies, imminent-peril
calls, dispatcher pre-emptions, late joiners, status messages and location reports. Every action is
launched at its planned time whether or not earlier ones have finished. Measurements go
to HdrHistograms (and to Prometheus on the worker's own port); a status line goes to the
parent every second and the merged-ready histograms at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import cProfile
import gc
import io
import multiprocessing
import pstats
import random
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from time import perf_counter
from typing import Any

from esn.client.floor import Outcome
from esn.client.handset import ClientError, Handset
from esn.client.metrics import HandsetMetrics
from esn.client.scan import ScanList
from esn.client.trace import FLOOR_FIELDS, MESSAGE_FIELDS, Access, AccessTrace, RowTrace
from esn.exporter import serve_metrics
from esn.loadtest.recorder import Recorder
from esn.loadtest.scenario import Traffic
from esn.protocol import messages as m
from esn.protocol.codec import MAX_LIST
from esn.tools.processes import peak_rss_kb
from esn.transport import BrokerConfig

STATUS_EVERY_S = 1.0
# An action's task is made this long before it is due and waits for its time itself: made
# at its time, it started a turn of the event loop late (a turn under load: milliseconds)
AHEAD_S = 0.05


@dataclass
class WorkerPlan:
    index: int
    mqtt_client: str
    units: list[tuple[str, list[str]]]  # unit -> groups to affiliate at start
    talkers: dict[str, list[str]]  # group driven by this worker -> members who talk in it
    dispatchers: list[str]
    late: list[tuple[str, str]]  # unit joining group tg in the middle of a call
    traffic: Traffic
    ramp_per_s: float
    duration_s: float
    share: float  # this worker's share of the fleet, for the per-minute event rates
    seed: int
    metrics_port: int
    prefix: str = "esn"
    broker_url: str = ""  # set by the runner once its broker is up (a cluster's: several,
    # comma-separated; each unit keeps to one of them)
    qos: int = 1  # the handsets' (`Handset.qos`): 0 on a NATS cluster
    trace: str = ""  # where this worker writes its access trace (docs/traces.md), if set
    full_trace: str = ""  # where it writes messages-N.csv and floor-N.csv, if set
    profile: str = ""  # where it writes profile-N.pstats and profile-N.txt, if set
    statuses: list[int] = field(default_factory=list)  # the fleet's pre-coded status codes
    scans: dict[str, dict[str, int]] = field(default_factory=dict)  # unit -> scanned: prio
    extra: dict[str, Any] = field(default_factory=dict)


class _Fanout:
    """Hand each handset measurement to the HdrHistograms and to Prometheus."""

    def __init__(self, *observers: Any) -> None:
        self.observers = observers

    def access(self, seconds: float, kind: str) -> None:
        for o in self.observers:
            o.access(seconds, kind)

    def mouth_to_ear(self, seconds: float) -> None:
        for o in self.observers:
            o.mouth_to_ear(seconds)

    def late_entry(self, seconds: float) -> None:
        for o in self.observers:
            o.late_entry(seconds)

    def scan_entry(self, seconds: float) -> None:
        for o in self.observers:
            o.scan_entry(seconds)


class Worker:
    def __init__(self, plan: WorkerPlan, queue: Any, go: Any, stop: Any) -> None:
        self.plan = plan
        self.began, self.cpu0 = time.monotonic(), time.process_time()
        self._gc_began = 0.0
        self.playing = False  # (the traffic has begun)
        self.queue = queue
        self.go = go
        self.stop = stop  # set by the parent to end the traffic early (it was interrupted)
        self.rng = random.Random(plan.seed * 1000 + plan.index)
        self.rec = Recorder()
        self.prom = HandsetMetrics()
        self.observer = _Fanout(self.rec, self.prom)
        self.handsets: dict[str, Handset] = {}
        self.homes = {unit: groups[0] for unit, groups in plan.units if groups}
        # the groups its dispatchers watch and break into: as many as one affiliation may
        # name (above that the server refuses it, and the dispatcher would not connect)
        self.watched = list(plan.talkers)[:MAX_LIST]
        self.busy: set[str] = set()  # units in a talk burst right now
        self.tasks: set[asyncio.Task[None]] = set()
        self.series: list[dict[str, float]] = []
        self.stopping = False
        self.t0 = 0.0
        self.trace: AccessTrace | None = None
        self.rows: list[RowTrace] = []  # the message and floor state traces, if asked

    # --- life cycle ---------------------------------------------------------------------

    async def main(self) -> None:
        loop = asyncio.get_running_loop()
        exporter = await serve_metrics(self.prom.registry, self.plan.metrics_port)
        lag = asyncio.create_task(self.watch_loop_lag())
        status = asyncio.create_task(self.report_status())
        gc.callbacks.append(self.gc_timed)
        profiler = cProfile.Profile() if self.plan.profile else None
        if profiler is not None:
            profiler.enable()
        try:
            await self.connect_all()
            # Every handset and its link live until the end: out of the collector's sight,
            # its full collections no longer walk them all. At 5,000 handsets a worker
            # that cut the longest pause in the traffic from 0.37-0.43 s to 34-45 ms
            # (docs/benchmarks.md)
            gc.collect()
            gc.freeze()
            self.send("ready")
            while not await asyncio.to_thread(self.go.wait, 1.0):
                parent = multiprocessing.parent_process()
                if parent is not None and not parent.is_alive():
                    return  # orphaned: nobody will say go
            if self.stop.is_set():
                return  # interrupted during the ramp: nothing to play; the final goes out
            self.t0, self.playing = loop.time(), True
            # (its cost is counted from here, as the server's and the broker's are)
            self.began, self.cpu0 = time.monotonic(), time.process_time()
            if self.plan.trace:
                self.trace = AccessTrace(Path(self.plan.trace), self.t0)
            if self.plan.full_trace:
                self.trace_everything(Path(self.plan.full_trace))
            await self.play()
        finally:
            self.stopping, self.playing = True, False
            gc.callbacks.remove(self.gc_timed)
            if profiler is not None:  # (written before the handsets go: none is cut short)
                profiler.disable()
                write_profile(profiler, Path(self.plan.profile))
            for trace in [self.trace, *self.rows]:
                if trace is not None:
                    with contextlib.suppress(OSError):  # (a full disk costs the trace only)
                        trace.close()
            lag.cancel()
            status.cancel()
            exporter.close()
            self.send(
                "final",
                hist=self.rec.encode(),
                actions=self.rec.actions,
                overruns=self.rec.overruns,
                series=self.series,
                cpu_s=time.process_time() - self.cpu0,  # (its handsets all still up)
                wall_s=time.monotonic() - self.began,
                max_rss_kb=peak_rss_kb(),
                handsets=len(self.handsets),
            )
            await self.disconnect_all()

    def send(self, kind: str, **data: Any) -> None:
        self.queue.put(
            {"kind": kind, "worker": self.plan.index, "counts": dict(self.rec.counts), **data}
        )

    def handset(self, unit: str) -> Handset:
        urls = self.plan.broker_url.split(",")
        cfg = BrokerConfig.from_url(urls[zlib.crc32(unit.encode()) % len(urls)])
        scanned = self.plan.scans.get(unit)
        spot = zlib.crc32(unit.encode("utf-8") + b"home")  # somewhere in Greater London
        home = (51.38 + (spot % 1000) / 1000 * 0.24, -0.35 + (spot // 1000 % 1000) / 1000 * 0.5)
        h = Handset(
            unit,
            cfg,
            qos=self.plan.qos,
            prefix=self.plan.prefix,
            mqtt_client=self.plan.mqtt_client,
            media_interval=self.plan.traffic.media_interval_s,
            keep_inbox=False,
            keep_stats=False,
            metrics=self.observer,
            scan=ScanList(self.homes[unit], dict(scanned)) if scanned else None,
            home=home,
        )
        self.handsets[unit] = h
        return h

    def trace_everything(self, folder: Path) -> None:
        """Every handset's control and floor messages, and floor state changes, from now
        (on the loop's clock, which every worker shares: the runner merges them)."""
        i = self.plan.index
        messages = RowTrace(folder / f"messages-{i}.csv", MESSAGE_FIELDS, self.t0)
        floors = RowTrace(folder / f"floor-{i}.csv", FLOOR_FIELDS, self.t0)
        self.rows = [messages, floors]
        for h in self.handsets.values():
            _trace(h, messages, floors)

    async def connect_all(self) -> None:
        """Connect at the ramp rate, each on its own connection; count failures."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        everyone = [(u, g) for u, g in self.plan.units] + [
            (d, self.watched) for d in self.plan.dispatchers
        ]
        everyone += [(u, []) for u, _ in self.plan.late]
        sem = asyncio.Semaphore(200)

        async def one(i: int, unit: str, groups: list[str]) -> None:
            await asyncio.sleep(max(0.0, start + i / self.plan.ramp_per_s - loop.time()))
            async with sem:
                h = self.handset(unit)
                began = time.perf_counter()
                try:
                    await h.start()
                    self.rec.observe("connect", time.perf_counter() - began)
                    if groups:
                        await h.affiliate(*groups)
                    self.rec.count("connected")
                except Exception:  # a refused or timed-out connection is a result, not a crash
                    self.rec.count("connect_failures")

        await asyncio.gather(*(one(i, u, g) for i, (u, g) in enumerate(everyone)))

    async def disconnect_all(self) -> None:
        for batch in _chunks(list(self.handsets.values()), 200):
            await asyncio.gather(*(h.stop() for h in batch), return_exceptions=True)

    # --- the traffic model ------------------------------------------------------------

    async def play(self) -> None:
        t = self.plan.traffic
        for h in self.handsets.values():
            if not h.unit.startswith("disp"):  # (spread: 5,000 at once held the loop 0.2 s)
                first = self.rng.uniform(0, t.location_interval_s)
                h.start_location_reports(t.location_interval_s, first_after=first)
        schedules = [
            asyncio.create_task(self.sessions(tg, members))
            for tg, members in self.plan.talkers.items()
            if len(members) >= 2
        ]
        if t.emergencies_per_min > 0:
            rate = t.emergencies_per_min * self.plan.share
            schedules.append(asyncio.create_task(self.poisson(rate, self.emergency)))
        if t.preemptions_per_min > 0 and self.plan.dispatchers:
            rate = t.preemptions_per_min * self.plan.share
            schedules.append(asyncio.create_task(self.poisson(rate, self.preemption)))
        if t.imminent_per_min > 0:
            rate = t.imminent_per_min * self.plan.share
            schedules.append(asyncio.create_task(self.poisson(rate, self.imminent)))
        for per_min, action in (
            (t.listen_ins_per_min, self.listen_in),
            (t.remote_talks_per_min, self.remote_talk),
        ):
            if per_min > 0 and self.plan.dispatchers:
                rate = per_min * self.plan.share
                schedules.append(asyncio.create_task(self.poisson(rate, action)))
        if t.private_calls_per_min > 0 and len(self.plan.units) >= 2:
            rate = t.private_calls_per_min * self.plan.share
            schedules.append(asyncio.create_task(self.poisson(rate, self.private_call)))
        if t.statuses_per_min > 0 and self.plan.statuses and self.plan.units:
            rate = t.statuses_per_min * self.plan.share
            schedules.append(asyncio.create_task(self.poisson(rate, self.status)))
        for i, (unit, tg) in enumerate(self.plan.late):
            at = self.plan.duration_s * (i + 1) / (len(self.plan.late) + 1)
            self.spawn(self.at(at, self.late_entry(unit, tg)))
        await asyncio.to_thread(self.stop.wait, self.plan.duration_s)  # or until stopped
        self.stopping, self.playing = True, False  # (the drain is not measured as traffic)
        for task in schedules:  # no new actions; the ones under way may finish
            task.cancel()
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=10)
        for task in self.tasks:
            task.cancel()

    def spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def at(self, offset: float, coro: Any) -> None:
        try:
            delay = self.t0 + offset - asyncio.get_running_loop().time()
            if delay > 0:
                await asyncio.sleep(delay)
            if not self.stopping:
                await coro
        finally:
            coro.close()  # (not begun, when stopped or cancelled first: said not awaited)

    async def sessions(self, tg: str, members: list[str]) -> None:
        """Open loop: each burst is launched at its planned time, not after the previous."""
        t = self.plan.traffic
        idle_mean = t.mean_session_s * (1 - t.activity) / t.activity
        planned = self.t0 + self.rng.expovariate(1 / idle_mean)
        loop = asyncio.get_running_loop()
        while True:
            end = planned + self.rng.expovariate(1 / t.mean_session_s)
            while planned < end:
                burst = self.rng.expovariate(1 / t.mean_talk_s)
                await asyncio.sleep(max(0.0, planned - AHEAD_S - loop.time()))
                if self.stopping:
                    return
                self.spawn(self.burst(tg, members, planned, burst))
                if self.rng.random() < t.second_speaker:
                    self.spawn(self.burst(tg, members, planned + 0.2, burst / 2))
                planned += burst + self.rng.expovariate(2.0)  # a short gap between bursts
            planned = end + self.rng.expovariate(1 / idle_mean)

    async def burst(
        self,
        tg: str,
        members: list[str],
        planned: float,
        seconds: float,
        kind: m.Kind = "normal",
        unit: str | None = None,
    ) -> None:
        loop = asyncio.get_running_loop()
        if planned > loop.time():  # (not sleep(0) when due: that waits a turn of the loop)
            await asyncio.sleep(planned - loop.time())
        if self.stopping:
            return
        free = [u for u in members if u not in self.busy and u in self.handsets]
        unit = unit or (self.rng.choice(free) if free else None)
        if unit is None or unit in self.busy:  # (one press at a time each)
            self.rec.count("skipped_no_free_member")
            return
        h = self.handsets[unit]
        self.busy.add(unit)
        try:
            sent = loop.time()
            self.rec.started(planned, sent)
            access = Access(sent, perf_counter())  # (the loop's clock has 1 ms steps)

            def record(o: Outcome) -> None:  # as it happens: a run may end mid-burst
                access.heard(o, perf_counter())
                if o.what == "granted" and o.via_queue:
                    self.rec.count("granted_after_queue")
                elif o.what == "granted":
                    assert o.waited_s is not None
                    self.rec.completed("floor_access", planned, sent, sent + o.waited_s)
                    self.rec.count(f"granted_{kind}")
                elif o.what == "denied":
                    self.rec.count(f"denied_{o.cause}")
                else:
                    self.rec.count(o.what)  # queued, revoked, no_answer

            try:
                await h.talk_burst(tg, seconds, kind, on_outcome=record)
            except TimeoutError:  # (no outcome at all: counted, the run goes on)
                self.rec.count("press_unanswered")
                return
            if self.trace is not None:  # (a press the run's end cut short is left out)
                caller = "dispatcher" if unit in self.plan.dispatchers else kind
                self.trace.write(access, unit, tg, caller, planned)
        finally:
            self.busy.discard(unit)

    async def poisson(self, per_min: float, action: Any) -> None:
        loop = asyncio.get_running_loop()
        planned = self.t0
        while not self.stopping:
            planned += self.rng.expovariate(per_min / 60)
            await asyncio.sleep(max(0.0, planned - AHEAD_S - loop.time()))
            if not self.stopping:
                self.spawn(self.at(planned - self.t0, action(planned)))

    def free_member(self) -> tuple[str, list[str], str] | None:
        """A group of this worker's, its talkers, and one of them not talking now."""
        tg, members = self.rng.choice(list(self.plan.talkers.items()))
        free = [u for u in members if u not in self.busy]
        return (tg, members, self.rng.choice(free)) if free else None

    async def emergency(self, planned: float) -> None:
        picked = self.free_member()
        if picked is None:
            return
        tg, members, unit = picked
        h = self.handsets[unit]
        lat, lon = h.position
        h.send(m.EmergencyAlert(tg=tg, lat=lat, lon=lon, ref=h.next_ref()))
        self.rec.count("emergencies")
        await self.burst(tg, members, planned, 3.0, kind="emergency", unit=unit)
        h.send(m.EmergencyCancel(tg=tg, ref=h.next_ref()))

    async def imminent(self, planned: float) -> None:
        """An imminent-peril call, cancelled half-way through: it goes on at normal."""
        picked = self.free_member()
        if picked is None:
            return
        tg, members, unit = picked
        h = self.handsets[unit]
        self.rec.count("imminent_calls")
        midway = asyncio.ensure_future(self.cancel_imminent(h, tg, planned + 1.5))
        try:
            await self.burst(tg, members, planned, 3.0, kind="imminent", unit=unit)
            if not await midway:  # (its call had no floor then: the peril, if any, ends now)
                await self.cancel_imminent(h, tg, 0.0)
        finally:
            midway.cancel()

    async def cancel_imminent(self, h: Handset, tg: str, planned: float) -> bool:
        """Whether the unit's imminent peril ended then (refused: it had none open)."""
        await asyncio.sleep(max(0.0, planned - asyncio.get_running_loop().time()))
        try:
            answer = await h.ask(m.ImminentCancel(tg=tg, ref=h.next_ref()), timeout=10)
        except TimeoutError:
            answer = None
        ended = isinstance(answer, m.Ok)
        self.rec.count("imminent_cancelled" if ended else "imminent_refused")
        return ended

    async def listen_in(self, planned: float) -> None:
        """A dispatcher listens in on a handset for 3 s (docs/protocol.md, 11.13)."""
        d = self.handsets[self.rng.choice(self.plan.dispatchers)]
        unit, _ = self.rng.choice(self.plan.units)
        try:
            answer = await d.ask(m.AmbientListen(unit=unit, ref=d.next_ref()), timeout=10)
            if not isinstance(answer, m.Ambient):
                self.rec.count("listen_ins_refused")
                return
            self.rec.count("listen_ins")
            await asyncio.sleep(3.0)
            await d.ask(m.AmbientEnd(unit=unit, ref=d.next_ref()), timeout=10)
        except TimeoutError:
            self.rec.count("listen_ins_unanswered")

    async def remote_talk(self, planned: float) -> None:
        """A dispatcher makes a free handset talk in its group for 2 s."""
        picked = self.free_member()
        if picked is None:
            return
        tg, _, unit = picked
        d = self.handsets[self.rng.choice(self.plan.dispatchers)]
        asked = m.RemoteTalk(unit=unit, tg=tg, seconds=2, ref=d.next_ref())
        self.busy.add(unit)  # (its handset presses for itself: no burst of ours meanwhile)
        try:
            answer = await d.ask(asked, timeout=10)
            self.rec.count("remote_talks" if isinstance(answer, m.Ok) else "remote_talks_refused")
            await asyncio.sleep(3.0)
        except TimeoutError:
            self.rec.count("remote_talks_unanswered")
        finally:
            self.busy.discard(unit)

    async def preemption(self, planned: float) -> None:
        tg = self.rng.choice(self.watched)
        disp = self.rng.choice(self.plan.dispatchers)
        self.rec.count("dispatcher_presses")
        await self.burst(tg, [disp], planned, 2.0, unit=disp)

    async def status(self, planned: float) -> None:
        """A handset reports a pre-coded status and waits for the server to confirm it."""
        unit, _ = self.rng.choice(self.plan.units)
        h = self.handsets.get(unit)
        if h is None:
            return
        self.rec.count("statuses")
        try:
            await h.report_status(self.rng.choice(self.plan.statuses), timeout=10)
            self.rec.count("statuses_confirmed")
        except (TimeoutError, ClientError):
            self.rec.count("statuses_unconfirmed")

    async def private_call(self, planned: float) -> None:
        """A free handset calls another alone (automatic answer, floor control): each
        talks for 2 s in turn, then the caller hangs up. Set-up is press -> connected."""
        (a, _), (b, _) = self.rng.sample(self.plan.units, 2)
        if {a, b} & self.busy or not {a, b} <= self.handsets.keys():
            self.rec.count("skipped_no_free_member")
            return
        caller, callee = self.handsets[a], self.handsets[b]
        self.busy |= {a, b}
        try:
            answer = await caller.private_call(b, answer="auto", timeout=10)
            if answer.state != "connected":
                self.rec.count(f"private_calls_{answer.cause}")
                return  # (from plan: a late start counts against it)
            self.rec.observe("private_setup", asyncio.get_running_loop().time() - planned)
            self.rec.count("private_calls")
            await caller.talk_private(2.0, timeout=10)
            await callee.talk_private(2.0, timeout=10)
            await caller.hang_up(timeout=10)
        except (TimeoutError, ClientError):
            self.rec.count("private_calls_failed")
        finally:
            self.busy -= {a, b}

    async def late_entry(self, unit: str, tg: str) -> None:
        """Switch on in the middle of a call: wait for one, then affiliate."""
        watcher = self.handsets.get(self.plan.talkers.get(tg, [unit])[0])
        h = self.handsets.get(unit)
        if h is None or watcher is None:
            return
        with contextlib.suppress(TimeoutError):
            await watcher.expect(lambda i: isinstance(i.msg, m.Taken) and i.msg.tg == tg, 60)
            await h.affiliate(tg)
            self.rec.count("late_joins")

    # --- health and status ------------------------------------------------------------

    def gc_timed(self, phase: str, info: dict[str, int]) -> None:
        """Each garbage collection's pause during the traffic (the loop stands still)."""
        if phase == "start":
            self._gc_began = time.perf_counter()
        elif self.playing:
            self.rec.observe("gc_pause", time.perf_counter() - self._gc_began)

    async def watch_loop_lag(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + 0.1
            await asyncio.sleep(0.1)
            if self.playing:  # (the traffic's: the ramp's is no measure of the run)
                self.rec.observe("loop_lag", max(0.0, loop.time() - due))

    async def report_status(self) -> None:
        while True:
            await asyncio.sleep(STATUS_EVERY_S)
            # (in steps, each a few milliseconds at 5,000 handsets: one whole would hold
            # up every press and packet due meanwhile)
            rx = sum(h.stats.counts.get("media_rx", 0) for h in self.handsets.values())
            await asyncio.sleep(0)
            connected = sum(h.transport.connected for h in self.handsets.values())
            await asyncio.sleep(0)
            talking = len(self.busy)
            h = self.rec.hist
            access = h["floor_access"].get_value_at_percentile(95) / 1000
            await asyncio.sleep(0)
            m2e = h["mouth_to_ear"].get_value_at_percentile(95) / 1000
            await asyncio.sleep(0)
            point = {
                "t": time.time(),
                "connected": connected,
                "talking": talking,
                "media_rx": rx,
                "grants": sum(v for k, v in self.rec.counts.items() if k.startswith("granted")),
            }
            self.series.append(point)
            self.send(
                "status",
                **point,
                access_p95_ms=access,
                m2e_p95_ms=m2e,
                lag_p99_ms=h["loop_lag"].get_value_at_percentile(99) / 1000,
                actions=self.rec.actions,
                overruns=self.rec.overruns,
            )


def _trace(h: Handset, messages: RowTrace, floors: RowTrace) -> None:
    """Write what `h` sends and receives, and its floor state changes, from now on."""
    clock, unit = time.monotonic, h.unit
    h.on_wire = lambda way, topic, msg: messages.message(clock(), unit, way, topic, msg)
    h.follow_floor(lambda tg, was, now: floors.row(clock(), unit, tg, was, now))


def _chunks(items: list[Handset], n: int) -> list[list[Handset]]:
    return [items[i : i + n] for i in range(0, len(items), n)]


def run_worker(plan: WorkerPlan, queue: Any, go: Any, stop: Any) -> None:
    """Entry point of a worker process. The terminal's Ctrl-C (and hang-up) reach the whole
    process group: the parent alone decides, and tells the workers through `stop`, so they
    can send what they have. SIGTERM still ends a worker, and one whose parent has gone
    stops waiting for it."""
    import signal

    from esn.runtime import run
    from esn.tools.processes import raise_fd_limit

    for signum in (signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    raise_fd_limit()
    try:
        run(Worker(plan, queue, go, stop).main(), stoppable=False)
    except Exception as exc:  # tell the parent in words rather than vanish
        queue.put({"kind": "error", "worker": plan.index, "error": f"{type(exc).__name__}: {exc}"})
        raise


def write_profile(profiler: cProfile.Profile, path: Path) -> None:
    """`path`.pstats (for pstats, snakeviz, ...) and `path`.txt: the functions that took
    the most time of their own, then the most time with what they called. A profile that
    cannot be written (a full disk) is said on stderr; the run goes on."""
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text).strip_dirs()
    for order, title in (("tottime", "own time"), ("cumulative", "time with callees")):
        text.write(f"=== the 40 functions with the most {title} ===\n")
        stats.sort_stats(order).print_stats(40)
    try:  # (each whole or not at all)
        part = path.with_suffix(".pstats.part")
        profiler.dump_stats(part)
        part.replace(path.with_suffix(".pstats"))
        part = path.with_suffix(".txt.part")
        part.write_text(text.getvalue())
        part.replace(path.with_suffix(".txt"))
    except OSError as exc:
        print(f"esn loadtest: the profile {path} was not written: {exc}", file=sys.stderr)
