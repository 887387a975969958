"""Playing an exercise: its own server (and Mosquitto, unless given a broker), a handset
per field unit, background talk in the crews' groups, and the scripted events at their
times. Events that wait on the dispatcher become `Ask`s; what the dispatcher does is seen
from the field units' side, as a real crew would see it: an acknowledgement of their SOS,
an SDS or a call or voice from a dispatcher, a regroup."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import operator
import random
import re
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from esn.client.handset import ClientError, Handset, Inbound
from esn.exercise.debrief import write_report
from esn.exercise.script import Event, Exercise
from esn.protocol import messages as m
from esn.tomlfile import dump_fleet
from esn.tools.broker import BrokerError, Mosquitto
from esn.tools.demo import end_server, esn_command, stop_links
from esn.tools.processes import ServerStartError, free_port, start_server
from esn.transport import BrokerConfig, TransportError

METRES_PER_DEGREE = 111_320.0
MAX_MOMENTS = 5000  # lines of the timeline kept; what the crews saw beyond is only counted


@dataclass
class Ask:
    """Something the dispatcher is expected to do, from when it was first asked."""

    event: Event
    raised: float  # seconds from the start of the exercise
    asked: list[float] = field(default_factory=list)  # each time it was asked, again
    answered: float | None = None
    by: str | None = None
    how: str = ""
    done: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def seconds(self) -> float | None:
        return None if self.answered is None else self.answered - self.raised

    @property
    def verdict(self) -> str:
        s = self.seconds
        return "missed" if s is None else "on time" if s <= self.event.within_s else "late"


@dataclass(frozen=True)
class Moment:
    """A line of the timeline: `kind` is scripted, repeated, failed, answered, seen or
    missed."""

    at: float
    kind: str
    text: str


class Play:
    def __init__(
        self, ex: Exercise, broker: BrokerConfig, mqtt_client: str = "gmqtt", prefix: str = "esn"
    ) -> None:
        self.ex = ex
        self.rng = random.Random(ex.seed)
        self.dispatchers = {u for u, p in ex.fleet.units.items() if p.role == "dispatcher"}
        self.handsets: dict[str, Handset] = {}
        for crew in ex.crews:
            for unit in crew.units:
                home = _near(crew.near, crew.spread_m, self.rng)
                self.handsets[unit] = Handset(
                    unit,
                    broker,
                    prefix=prefix,
                    mqtt_client=mqtt_client,
                    home=home,
                    keep_inbox=False,
                )
        self.asks: list[Ask] = []
        self.timeline: list[Moment] = []
        self.regrouped: dict[str, str] = {}  # field unit -> the temporary group it is in
        self.offline: set[str] = set()
        self.scripted: set[str] = set()  # units in a scripted event now: no background talk
        self.handed_over = False  # a retained message is being read: history, no answer
        self.unseen = 0  # lines past MAX_MOMENTS, counted only
        self.started = 0.0
        self.stopping = False

    def now(self) -> float:
        return time.monotonic() - self.started if self.started else 0.0

    def note(self, kind: str, text: str) -> None:
        if kind in ("seen", "repeated", "failed") and len(self.timeline) >= MAX_MOMENTS:
            self.unseen += 1  # (what the script and the answers did is always kept)
            return
        self.timeline.append(Moment(round(self.now(), 2), kind, text))

    # --- set-up -----------------------------------------------------------------------

    async def start(self) -> None:
        sem = asyncio.Semaphore(50)

        async def bring_up(unit: str, h: Handset) -> None:
            async with sem:
                h.on_inbound = lambda i: self.seen(unit, i)
                h.on_media = lambda tg, talker: self.heard(unit, tg, talker)
                h.transport.on_retained = functools.partial(self.retained, h)
                await h.start()
                await h.affiliate(self.ex.home[unit])
                self.report_position(h)

        await asyncio.gather(*(bring_up(u, h) for u, h in self.handsets.items()))

    def report_position(self, h: Handset, spd: float = 0.0) -> None:
        lat, lon = h.position
        h.send(m.Location(lat=lat, lon=lon, acc=5.0, spd=spd, ts=time.time_ns()))

    # --- what the field units see of the dispatcher ---------------------------------------

    def retained(self, h: Handset, topic: str, payload: bytes) -> None:
        """What the broker kept from before answers nothing now (a forged retained
        acknowledgement would answer every SOS to come)."""
        self.handed_over = True
        try:
            h._on_retained(topic, payload)
        finally:
            self.handed_over = False

    def seen(self, unit: str, i: Inbound) -> None:
        """What a crew was told. Answers count only from the server's topic for that unit
        (the group's copies would count once per member) and from a dispatcher."""
        msg, own = i.msg, i.topic == self.handsets[unit].topics.unit_down(unit)
        if self.handed_over:
            return
        if isinstance(msg, m.EmergencyState) and msg.state == "acknowledged" and own:
            if msg.by in self.dispatchers:
                self.answer(
                    lambda a: (
                        a.event.do == "sos" and a.event.unit == unit and a.event.group == msg.tg
                    ),
                    msg.by,
                    "acknowledged",
                )
        elif isinstance(msg, m.Sds) and msg.sender in self.dispatchers:
            self.answer(self._of(unit), msg.sender, f"SDS {msg.text!r}")
        elif isinstance(msg, m.Private) and msg.caller in self.dispatchers and own:
            if msg.state == "connected":  # (a call that rang out answered nothing)
                self.answer(self._of(unit), msg.caller, "private call")
        elif isinstance(msg, m.Regrouped) and own:
            self.regrouped[unit] = msg.tg
            self.note("seen", f"{unit} regrouped into {msg.tg} ({msg.name})")
            self.check_regroups()
        elif isinstance(msg, m.Ungrouped) and own and self.regrouped.get(unit) == msg.tg:
            del self.regrouped[unit]

    def check_regroups(self) -> None:
        """A regroup request is answered once all its units are in one temporary group
        (made before the request too: it is then answered as it is raised)."""
        for a in self.open_asks("regroup_request"):
            groups = {self.regrouped.get(u) for u in a.event.units}
            if len(groups) == 1 and None not in groups:
                self.answer(
                    functools.partial(operator.is_, a), None, f"regrouped into {groups.pop()}"
                )

    def heard(self, unit: str, tg: str, talker: object) -> None:
        if isinstance(talker, str) and talker in self.dispatchers:
            self.answer(self._of(unit), talker, f"voice in {tg}")

    def _of(self, unit: str) -> Callable[[Ask], bool]:
        """Asks a dispatcher answers by speaking to `unit`."""

        def match(a: Ask) -> bool:
            e = a.event
            return e.do not in ("sos", "regroup_request") and e.unit == unit

        return match

    def open_asks(self, do: str | None = None) -> list[Ask]:
        return [a for a in self.asks if a.answered is None and do in (None, a.event.do)]

    def answer(self, which: Callable[[Ask], bool], by: str | None, how: str) -> None:
        for a in self.open_asks():
            if which(a):
                a.answered, a.by, a.how = round(self.now(), 2), by, how
                a.done.set()
                who = f" by {by}" if by else ""
                self.note("answered", f"{a.event.asks()}: {how}{who}, {a.seconds:.1f} s")

    # --- the script -------------------------------------------------------------------

    async def play(self, event: Event) -> None:
        await asyncio.sleep(max(0.0, event.at - self.now()))
        if self.stopping:
            return
        h = self.handsets.get(event.unit or "")
        if h is not None and event.unit in self.offline:
            self.note("scripted", f"(skipped, {event.unit} is offline) {event.label()}")
            return
        self.note("scripted", event.label())
        if event.unit:
            self.scripted.add(event.unit)
        try:
            while True:
                ask = Ask(event, round(self.now(), 2)) if event.answer else None
                if ask is not None:
                    self.asks.append(ask)
                    self.check_regroups()
                if await self.act_told(event, h, first=True) or event.do != "talk":
                    break
                # a request by voice that found no floor was heard by no one: it is not
                # the dispatcher's to answer yet; the crew tries again later
                if ask is not None and ask.answered is None:
                    self.asks.remove(ask)
                elif ask is not None:
                    break
                await asyncio.sleep(event.repeat_s)
                if self.stopping or event.unit in self.offline:
                    return
            while ask is not None and not ask.done.is_set() and not self.stopping:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ask.done.wait(), event.repeat_s)
                if ask.done.is_set() or self.stopping or event.unit in self.offline:
                    break
                ask.asked.append(round(self.now(), 2))
                self.note("repeated", f"again: {event.label()}")
                await self.act_told(event, h, first=False)
        finally:
            self.scripted.discard(event.unit or "")

    async def act_told(self, e: Event, h: Handset | None, first: bool) -> bool:
        """`act`, a failure (no answer from the server, a link down, no floor to talk on)
        noted on the timeline rather than ending the event: it is tried again."""
        try:
            if await self.act(e, h, first):
                return True
            self.note("failed", f"{e.label()}: {e.unit} did not get the floor of {e.group}")
        except (TimeoutError, ClientError, TransportError) as exc:
            self.note("failed", f"{e.label()}: {exc or type(exc).__name__}")
        return False

    async def act(self, e: Event, h: Handset | None, first: bool) -> bool:
        """Do what the event says; whether it was said (a talk needs the floor first)."""
        again = "" if first else "(again) "
        if e.do == "sos" and h is not None and e.group:
            lat, lon = h.position
            h.send(m.EmergencyAlert(tg=e.group, lat=lat, lon=lon, ref=h.next_ref()))
            if e.call_s and first:
                await h.talk(e.group, e.call_s, kind="emergency")
        elif e.do == "talk" and h is not None and e.group:
            return await h.talk(e.group, e.seconds)
        elif e.do in ("sds", "regroup_request") and h is not None:
            to = e.to or f"unit:{self.ex.trainee}"
            h.send(m.Sds(to=to, text=again + e.text, ref=h.next_ref()))
        elif e.do == "status" and h is not None:
            h.send(m.UnitStatus(code=e.code, ref=h.next_ref()))
        elif e.do == "move" and e.target is not None:
            await asyncio.gather(
                *(self.move(self.handsets[u], e.target, e.speed_mps) for u in e.units)
            )
        elif e.do == "busy" and e.group:
            await self.busy(e.group, e.seconds)
        elif e.do == "offline" and h is not None and e.unit:
            self.offline.add(e.unit)
            await h.stop()
        return True

    async def move(self, h: Handset, to: tuple[float, float], speed: float) -> None:
        """Drive toward `to` at `speed` m/s, reporting the position every 2 s."""
        while not self.stopping and h.unit not in self.offline:
            lat, lon = h.position
            dy = (to[0] - lat) * METRES_PER_DEGREE
            dx = (to[1] - lon) * METRES_PER_DEGREE * math.cos(math.radians(lat))
            left = math.hypot(dx, dy)
            step = min(left, speed * 2.0)
            if left > 0:
                h.position = (
                    lat + dy / left * step / METRES_PER_DEGREE,
                    lon + dx / left * step / METRES_PER_DEGREE / math.cos(math.radians(lat)),
                )
            arrived = step >= left
            self.report_position(h, 0.0 if arrived else speed)
            if arrived:
                self.note("seen", f"{h.unit} at {to[0]:.4f},{to[1]:.4f}")
                return
            await asyncio.sleep(2.0)

    def free_members(self, tg: str) -> list[Handset]:
        """The crew of `tg` that is neither offline nor in a scripted event now."""
        taken = self.offline | self.scripted
        return [h for u, h in self.handsets.items() if self.ex.home[u] == tg and u not in taken]

    async def busy(self, tg: str, seconds: float) -> None:
        end = self.now() + seconds
        while self.now() < end and not self.stopping:
            free = self.free_members(tg)
            if not free:
                return
            with contextlib.suppress(TimeoutError, ClientError, TransportError):
                await self.rng.choice(free).talk(
                    tg, max(0.5, min(end - self.now(), self.rng.uniform(2, 6)))
                )
            await asyncio.sleep(self.rng.uniform(0.2, 1.0))

    async def background(self, tg: str) -> None:
        """The everyday talk of a group: a member talks now and then (exponential gaps)."""
        while not self.stopping:
            await asyncio.sleep(self.rng.expovariate(1 / self.ex.gap_mean_s))
            free = self.free_members(tg)
            if free and not self.stopping:
                burst = min(10.0, self.rng.expovariate(1 / self.ex.talk_mean_s))
                with contextlib.suppress(TimeoutError, ClientError, TransportError):
                    await self.rng.choice(free).talk(tg, max(0.5, burst))

    async def positions(self) -> None:
        """Units that are not moving still report where they are, as handsets do."""
        while not self.stopping:
            await asyncio.sleep(self.ex.location_interval_s)
            for u, h in self.handsets.items():
                if u not in self.offline and h.transport.connected:
                    self.report_position(h)

    def progress_line(self) -> str:
        waiting = ", ".join(
            f"{a.event.asks()} ({self.now() - a.raised:.0f} s)" for a in self.open_asks()
        )
        fired = sum(e.at <= self.now() for e in self.ex.events)
        return (
            f"t={self.now():5.0f}s  events {fired}/{len(self.ex.events)}"
            f"  waiting on the dispatcher: {waiting or 'nothing'}"
        )


def _near(p: tuple[float, float], spread_m: float, rng: random.Random) -> tuple[float, float]:
    r, a = spread_m * math.sqrt(rng.random()), rng.uniform(0, 2 * math.pi)
    dlat = r * math.cos(a) / METRES_PER_DEGREE
    dlon = r * math.sin(a) / METRES_PER_DEGREE / math.cos(math.radians(p[0]))
    return (p[0] + dlat, p[1] + dlon)


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "exercise"


async def run_exercise(
    ex: Exercise,
    *,
    broker_url: str | None = None,
    out: Path | None = None,
    wait_for_trainee: bool = True,
    mqtt_client: str = "gmqtt",
    stop: asyncio.Event | None = None,
    prefix: str = "esn",
) -> int:
    """Play `ex` to its end (every event over and answered, or its duration, or `stop`:
    `esn exercise` sets it on Ctrl-C and SIGTERM), then write the debrief, in every case."""
    stop = stop or asyncio.Event()
    out = out or Path("runs") / f"{slug(ex.name)}-{time.strftime('%Y%m%d-%H%M%S')}"
    broker: Mosquitto | None = None
    server: asyncio.subprocess.Process | None = None
    workdir = tempfile.TemporaryDirectory(prefix="esn-exercise-")
    play: Play | None = None
    tasks: list[asyncio.Task[None]] = []
    try:
        if broker_url is None:
            broker = Mosquitto().start()
        url = broker_url or broker.url  # type: ignore[union-attr]
        fleet = Path(workdir.name) / "fleet.toml"
        fleet.write_text(dump_fleet(ex.fleet_doc))
        log = Path(workdir.name) / "server.log"
        port = free_port()
        server = await start_server(
            url,
            fleet,
            metrics_port=port,
            mqtt_client=mqtt_client,
            log=log,
            args=("--server-id", "esn-exercise", "--prefix", prefix),
            own_session=True,  # (Ctrl-C ends the exercise, which then stops it in order)
        )
        play = Play(ex, BrokerConfig.from_url(url), mqtt_client, prefix)
        print(
            f"esn exercise: {ex.name!r}: {len(play.handsets)} field units in "
            f"{len(ex.crews)} crews, {len(ex.events)} events, at most {ex.duration_s:g} s; "
            f"broker {url}"
        )
        if ex.brief:
            print(f"brief: {ex.brief}")
        print(
            f"trainee's console: {esn_command()} console --broker {url} --unit {ex.trainee} "
            f"--fleet {fleet}" + (f" --prefix {prefix}" if prefix != "esn" else "")
        )
        await play.start()
        if wait_for_trainee:
            print(f"waiting for {ex.trainee} to come online (Ctrl-C to stop)…", flush=True)
            if not await _online(play, ex.trainee, stop):
                print("esn exercise: stopped before the trainee came online", file=sys.stderr)
                return 1
        play.started = time.monotonic()
        print("exercise started", flush=True)
        tasks = [asyncio.create_task(play.play(e)) for e in ex.events]
        tasks += [asyncio.create_task(play.background(tg)) for tg in ex.traffic_groups]
        tasks.append(asyncio.create_task(play.positions()))
        # (units still driving somewhere keep nobody waiting: the exercise may end on them)
        scripted = [t for t, e in zip(tasks, ex.events, strict=False) if e.do != "move"]
        ended = "every event is over and answered"
        tty = sys.stdout.isatty()
        last = 0.0
        while True:
            if stop.is_set():
                ended = "stopped by the trainer"
                break
            if play.now() >= ex.duration_s:
                ended = f"its {ex.duration_s:g} s are up"
                break
            if all(t.done() for t in scripted) and not play.open_asks():
                break
            if play.now() - last >= (1.0 if tty else 10.0):
                last = play.now()
                line = play.progress_line()
                print(f"\r{line[:160]}\033[K" if tty else line, end="" if tty else "\n", flush=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.25)
        if tty:
            print()
        play.stopping = True
        for a in play.open_asks():
            play.note("missed", f"{a.event.asks()}: not done")
        if play.unseen:  # (past the cap, said once)
            kept = f"{play.unseen} more lines of what was seen, repeated or failed, not kept"
            play.timeline.append(Moment(round(play.now(), 2), "seen", kept))
        print(f"exercise over at {play.now():.0f} s: {ended}")
        print(write_report(ex, play.asks, play.timeline, play.now(), ended, out))
        print(f"debrief: {out / 'debrief.html'} (and debrief.json)")
        return 0
    except (BrokerError, ServerStartError, TransportError, OSError) as exc:
        print(f"esn exercise: {exc}", file=sys.stderr)
        return 1
    finally:
        for t in tasks:
            t.cancel()
        if play is not None:
            await stop_links([h.transport for h in play.handsets.values()])
        if server is not None and server.returncode is None:
            await end_server(server, Path(workdir.name) / "server.log", "server")
        if broker is not None:
            broker.close()
        workdir.cleanup()


async def _online(play: Play, unit: str, stop: asyncio.Event) -> bool:
    """Wait until `unit` (the trainee's console) is online, or `stop`."""
    watcher = next(iter(play.handsets.values()))
    topic = watcher.topics.presence(unit)
    came = watcher.expect(
        lambda i: i.topic == topic and getattr(i.msg, "state", None) == "online", 86_400
    )
    await watcher.transport.subscribe(topic, qos=1)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait((came, stopped), return_when=asyncio.FIRST_COMPLETED)
        return came.done() and not came.cancelled() and came.exception() is None
    finally:
        came.cancel()
        stopped.cancel()
        with contextlib.suppress(Exception):
            await watcher.transport.unsubscribe(topic)
