"""`esn console`: the dispatcher's live screen (Textual).

It connects as a dispatcher unit through the handset model, watches every group's state,
floor and event topics, every unit's presence and position, and the server's status, and
keeps them in a `ConsoleModel`; the widgets redraw from the model twice a second. Actions
go out through the same link, and every answer, refusals included, is shown in words.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

from rich.markup import escape
from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Grid, Vertical
from textual.screen import ModalScreen
from textual.widgets import DataTable, Footer, Header, Input, Label, RichLog, Static

from esn.client.handset import HAS_PERMISSION, ClientError, Handset, Inbound
from esn.console.map import Point, View, render
from esn.console.model import CALL_ENDS, ConsoleModel, say
from esn.protocol import messages as m
from esn.store import StoreError
from esn.store.recordings import Burst, Recordings
from esn.transport import BrokerConfig

SORTS = ("unit", "presence", "age", "speed")


class DispatcherLink(Handset):
    """The console's own unit: it listens to monitored groups' voice only, because it
    watches every group's floor and events through wildcard subscriptions anyway.
    `handing_over` is true while a retained message handed over on subscribing is read."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.handing_over = False
        self.transport.on_retained = self._handed_over
        self.on_cleared: Callable[[str], None] | None = None  # a retained message removed

    def _on_message(self, topic: str, payload: bytes) -> None:
        if not payload and self.on_cleared is not None:
            self.on_cleared(topic)
        super()._on_message(topic, payload)

    def _handed_over(self, topic: str, payload: bytes) -> None:
        self.handing_over = True
        try:
            self._on_retained(topic, payload)
        finally:
            self.handing_over = False

    def group_topics(self, tg: str) -> tuple[str, ...]:
        return (self.topics.media_down(tg),)

    def watch_topics(self) -> tuple[str, ...]:
        p = self.topics.prefix
        return (
            f"{p}/tg/+/state",
            f"{p}/tg/+/down/floor",
            f"{p}/tg/+/down/event",
            f"{p}/unit/+/presence",
            f"{p}/unit/+/status",
            f"{p}/loc/+",
        )


class Recall(ModalScreen[int | None]):
    """A list of recorded talk bursts, newest first: Enter picks one, Escape closes."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Close")]

    def __init__(self, title: str, bursts: list[Burst]) -> None:
        super().__init__()
        self.title_text, self.bursts = title, bursts

    def compose(self) -> ComposeResult:
        with Vertical(id="ask"):
            yield Label(f"Instant recall: {self.title_text}" + ("" if self.bursts else " (none)"))
            yield DataTable(id="recall", cursor_type="row")

    def on_mount(self) -> None:
        table = self.query_one("#recall", DataTable)
        table.add_columns("Time", "Group", "Talker", "Kind/prio", "Length")
        for b in self.bursts:
            when = time.strftime("%H:%M:%S", time.localtime(b.started_ns / 1e9))
            length = f"{b.seconds:.1f} s" if b.ended_ns else "going on"
            table.add_row(when, b.tg, b.talker, f"{b.kind}/{b.prio}", length, key=str(b.id))
        table.focus()

    @on(DataTable.RowSelected)
    def picked(self, event: DataTable.RowSelected) -> None:
        self.dismiss(int(str(event.row_key.value)))

    def action_cancel(self) -> None:
        self.dismiss(None)


def _last_bursts(path: str, tg: str | None, unit: str | None) -> list[Burst]:
    recordings = Recordings(path, readonly=True)
    try:
        return recordings.last_bursts(tg=tg, talker=unit, n=10)
    except sqlite3.Error as exc:
        raise StoreError(f"{path} is not a recordings file: {exc}") from None
    finally:
        recordings.close()


def _media_of(path: str, burst: int) -> list[tuple[int, int, bytes]]:
    recordings = Recordings(path, readonly=True)  # (StoreError: gone since the list)
    try:
        return recordings.media(burst)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read the recordings {path}: {exc}") from None
    finally:
        recordings.close()


class Ask(ModalScreen[str | None]):
    """A one-line question: Enter answers, Escape cancels."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, question: str, placeholder: str = "") -> None:
        super().__init__()
        self.question = question
        self.placeholder = placeholder

    def compose(self) -> ComposeResult:
        with Vertical(id="ask"):
            yield Label(self.question)
            yield Input(placeholder=self.placeholder, id="answer")

    @on(Input.Submitted)
    def answered(self, event: Input.Submitted) -> None:
        self.dismiss(event.value.strip() or None)

    def action_cancel(self) -> None:
        self.dismiss(None)


class Help(ModalScreen[None]):
    """Every key of the console, what it does and on what (the footer shows the main ones)."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,question_mark,q", "close", "Close")]

    def __init__(self, keys: list[tuple[str, str]]) -> None:
        super().__init__()
        self.keys = keys

    def compose(self) -> ComposeResult:
        with Vertical(id="help"):
            yield Label(
                "Keys (Escape closes). Group keys act on the selected group, unit keys "
                "on the selected unit; Tab moves between the tables."
            )
            yield DataTable(id="keys", cursor_type="none", show_header=False)

    def on_mount(self) -> None:
        table = self.query_one("#keys", DataTable)
        table.add_columns("key", "does")
        for key, does in self.keys:
            table.add_row(key, does)

    def action_close(self) -> None:
        self.dismiss(None)


# every key: (key, action, footer label or "" for none, what it does, for the help)
KEYS = [
    ("space", "ptt", "PTT", "push to talk in the selected group; again to release"),
    ("a", "acknowledge", "Ack", "acknowledge the selected group's emergency, or unit's"),
    ("f", "force_release", "Release", "force-release the selected group's floor"),
    ("s", "sds", "SDS", "short message to the selected unit (units table) or group"),
    ("x", "mark", "Mark", "mark or unmark the selected unit"),
    ("r", "regroup", "Regroup", "put the marked units in a temporary group"),
    ("question_mark", "help", "Help", "this list"),
    ("q", "quit", "Quit", "leave the console"),
    ("m", "monitor", "", "monitor the selected group (hear it), or stop"),
    ("i", "cancel_imminent", "", "end imminent peril in the selected group"),
    ("u", "ungroup", "", "dissolve the selected temporary group"),
    ("c", "all_call", "", "talk to every unit (the all-call group)"),
    ("o", "sort_units", "", "sort units by id, presence, age or speed"),
    ("g", "filter_group", "", "show only the selected group's units and events, or all"),
    ("h", "hotspots", "", "incident hotspots on the map, on or off"),
    ("l", "listen", "", "listen in on the selected unit, unknown to its user; again to stop"),
    ("t", "remote_talk", "", "make the selected unit talk in the selected group for 5 s"),
    ("p", "recall", "", "instant recall of the selected group's (or unit's) last calls"),
    ("d", "private_call", "", "call the selected unit alone; again to hang up"),
    ("k", "private_talk", "", "talk in the private call; again to stop"),
    ("plus,equals_sign", "zoom(2)", "", "zoom the map in"),
    ("minus", "zoom(0.5)", "", "zoom the map out"),
    ("H", "pan(-0.25, 0)", "", "pan the map west (L east, K north, J south)"),
    ("L", "pan(0.25, 0)", "", ""),
    ("K", "pan(0, -0.25)", "", ""),
    ("J", "pan(0, 0.25)", "", ""),
]


class ConsoleApp(App[None]):
    CSS_PATH = Path(__file__).with_name("console.tcss")
    TITLE = "ESN dispatcher console"
    # below 120 columns the map gives way, so floor, queue and emergency stay readable
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (120, "-wide")]
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding(key, action, label or does, show=bool(label)) for key, action, label, does in KEYS
    ]

    def __init__(
        self,
        broker: BrokerConfig,
        unit: str,
        *,
        prefix: str = "esn",
        mqtt_client: str = "gmqtt",
        all_call: str = "tg-all",
        recordings: str | None = None,
        names: dict[str, str] | None = None,
    ) -> None:
        super().__init__()
        self.recordings = recordings  # the recorder's file, for instant recall
        self.replaying: str | None = None  # what the status line says of a replay
        self.model = ConsoleModel(prefix, names=names)
        self.not_dispatcher = False  # the server refused it a dispatcher's command
        self._probe: int | None = None  # the ref of the role check
        self.link = DispatcherLink(
            unit, broker, prefix=prefix, mqtt_client=mqtt_client, media_interval=0.06
        )
        self.unit_id = unit
        self.all_call = all_call
        self.view = View()
        self.marked: set[str] = set()
        self.sort = "unit"
        self.group_filter: str | None = None
        self.show_hotspots = True  # incidents of the last 15 minutes on the map
        self.listening: dict[str, int] = {}  # units listened in on -> packets heard
        self.last_access_ms: float | None = None
        self._drawn = -1
        self._units_drawn = 0.0  # when, so the ages shown go on counting on a quiet network
        self._log_drawn = 0
        self._link_lost = False

    # --- layout -----------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Header(show_clock=True)
        with Grid(id="body"):
            yield DataTable(id="groups", cursor_type="row", zebra_stripes=True)
            yield DataTable(id="units", cursor_type="row", zebra_stripes=True)
            yield Static(id="map")
            yield RichLog(id="log", markup=True, wrap=True)
        yield Static(id="status")
        yield Footer()

    def on_mount(self) -> None:
        groups = self.query_one("#groups", DataTable)
        groups.add_columns(*GROUP_COLUMNS)
        units = self.query_one("#units", DataTable)
        units.add_columns(*UNIT_COLUMNS)
        self.query_one("#map", Static).border_title = "Map"
        self.query_one("#log", RichLog).border_title = "Events"
        groups.border_title, units.border_title = "Talkgroups", "Units"
        self.connect()
        self.set_interval(0.5, self.redraw)

    # --- the link to the network --------------------------------------------------------

    @work(exclusive=True, group="link")
    async def connect(self) -> None:
        self.link.on_inbound = self.inbound
        self.link.on_cleared = self.model.cleared
        self.link.on_ambient = self._ambient_heard
        self.link.on_link = self._link_changed
        await self.link.transport.subscribe(*self.link.watch_topics())
        try:
            await self.link.start()
        except Exception as exc:  # a console must say what failed, not vanish
            self.model.log(None, f"cannot connect: {exc}", alarm=True)
            return
        self.model.log(None, f"connected to {self.link.transport.broker.url()} as {self.unit_id}")
        await self._check_role()

    async def _check_role(self) -> None:
        """Whether the server takes this unit for a dispatcher: a force-release of a group
        that cannot exist is refused `invalid_field` to a dispatcher, `forbidden` to anyone
        else, and changes nothing either way."""
        self._probe = self.link.next_ref()
        try:
            reply = await self.link.ask(m.ForceRelease(tg="no-such-group.0", ref=self._probe))
        except TimeoutError:
            return  # (no server yet: the first refused command will say it)
        if isinstance(reply, m.Error) and reply.cause == "forbidden":
            self.not_dispatcher = True
            self.tell(
                f"{self.unit_id} is not a dispatcher in the server's fleet: it can watch, "
                "but acknowledging, regrouping and the other commands will be refused",
                warn=True,
            )

    def _link_changed(self, up: bool) -> None:
        if not up:
            self._link_lost = True
            self.model.log(None, "broker connection lost; reconnecting", alarm=True)
        elif self._link_lost:
            self._link_lost = False
            self.model.log(None, "broker connection back; the screen kept its state")

    def inbound(self, i: Inbound) -> None:
        msg = i.msg
        self.model.apply(i.topic, msg, history=self.link.handing_over)
        if not i.topic.endswith(f"/unit/{self.unit_id}/down"):
            return
        if isinstance(msg, m.Error) and msg.ref == self._probe:
            return  # (the role check's answer: `_check_role` reads it)
        if isinstance(msg, m.Error):
            self.refused(f"refused: {say(msg.cause)} ({msg.detail})")
        elif isinstance(msg, m.Deny):
            self.refused(f"{msg.tg}: floor denied, {say(msg.cause)}")
        elif isinstance(msg, m.Revoke):
            self.refused(f"{msg.tg}: floor revoked, {say(msg.cause)}")
        elif isinstance(msg, m.Queued):
            self.tell(f"{msg.tg}: queued at position {msg.pos}")
        elif isinstance(msg, m.Sds):
            self.notify(f"SDS from {msg.sender}: {msg.text}", timeout=8, markup=False)
        elif isinstance(msg, m.Ambient) and msg.state == "ended" and msg.cause:
            self.listening.pop(msg.unit, None)
            self.refused(f"listening in on {msg.unit} ended: {msg.cause}")
        elif isinstance(msg, m.Private):
            self._private_news(msg)

    def _private_news(self, msg: m.Private) -> None:
        emergency = " EMERGENCY" if msg.kind == "emergency" else ""
        if msg.state == "ended":
            why = CALL_ENDS.get(msg.cause or "", msg.cause or "ended")
            self.tell(f"private call with {msg.unit} ended: {why}", warn=msg.cause != "hung_up")
        elif msg.state == "ringing" and msg.caller != self.unit_id:
            mine = self.link.private is not None and self.link.private.call == msg.call
            doing = "answering" if mine else "refused, you are in another call"
            self.tell(f"{msg.unit} calls you{emergency} (private): {doing}", warn=bool(emergency))
        elif msg.state == "connected":
            talks = f", {msg.talker} talks" if msg.talker else ""
            self.model.log(None, f"private{emergency} call with {msg.unit}: connected{talks}")

    def tell(self, text: str, warn: bool = False) -> None:
        self.model.log(None, text, alarm=warn)
        # (words from the wire may hold brackets: never markup)
        self.notify(text, severity="warning" if warn else "information", timeout=4, markup=False)

    def refused(self, text: str) -> None:
        self.tell(text, warn=True)

    # --- selection ----------------------------------------------------------------------

    def selected_group(self) -> str | None:
        return _row_key(self.query_one("#groups", DataTable))

    def selected_unit(self) -> str | None:
        return _row_key(self.query_one("#units", DataTable))

    # --- actions ------------------------------------------------------------------------

    @work(group="actions")
    async def action_ptt(self, tg: str | None = None) -> None:
        tg = tg or self.selected_group()
        if tg is None:
            return
        if self.link.floor_state(tg) == HAS_PERMISSION:
            self.link.release(tg)
            self.tell(f"{tg}: PTT released")
            return
        if tg not in self.link.groups:
            await self._monitor(tg, True)
        started = time.perf_counter()
        answer = await self.link.press(tg, prio=255)
        if isinstance(answer, m.Granted):
            self.last_access_ms = (time.perf_counter() - started) * 1000
            self.tell(f"{tg}: you have the floor ({self.last_access_ms:.1f} ms)")

    def action_all_call(self) -> None:
        self.action_ptt(self.all_call)

    @work(group="actions")
    async def action_monitor(self) -> None:
        tg = self.selected_group()
        if tg is not None:
            await self._monitor(tg, tg not in self.link.groups)

    async def _monitor(self, tg: str, on_: bool) -> None:
        reply = await (self.link.affiliate(tg) if on_ else self.link.deaffiliate(tg))
        if on_ and tg not in reply.groups:
            cause = next((r["cause"] for r in reply.rejected if r.get("tg") == tg), "?")
            self.refused(f"{tg}: cannot monitor, {say(str(cause))}")
        else:
            self.tell(f"{tg}: monitoring {'on' if on_ else 'off'}")
        self.model.group(tg).monitored = tg in self.link.groups
        self.model.version += 1

    @work(group="actions")
    async def action_acknowledge(self) -> None:
        """The selected unit's emergency (from the units panel: where a group holds
        several, each is acknowledged on its own), else the selected group's last one."""
        units = self.query_one("#units", DataTable)
        picked = self.model.units.get(self.selected_unit() or "")
        unit: str | None
        if self.focused is units and picked is not None and picked.emergency:
            unit, tg = picked.unit, sorted(picked.emergency)[0]
        else:
            g = self.model.groups.get(self.selected_group() or "")
            unit, tg = (g.emergency_unit, g.tg) if g else (None, "")
        if unit is None:
            self.refused("no emergency to acknowledge in the selected group or unit")
            return
        await self._command(
            m.EmergencyAck(unit=unit, tg=tg, ref=self.link.next_ref()),
            f"{tg}: emergency of {unit} acknowledged",
        )

    @work(group="actions")
    async def action_cancel_imminent(self) -> None:
        tg = self.selected_group()
        if tg is not None:
            await self._command(
                m.ImminentCancel(tg=tg, ref=self.link.next_ref()), f"{tg}: imminent peril ended"
            )

    @work(group="actions")
    async def action_listen(self) -> None:
        """Listen in on the selected unit, unknown to its user; again to stop."""
        unit = self.selected_unit()
        if unit is None:
            return
        ending = unit in self.listening
        msg = (m.AmbientEnd if ending else m.AmbientListen)(unit=unit, ref=self.link.next_ref())
        reply = await self._ask(msg)
        if reply is None:
            return
        if isinstance(reply, m.Error):
            if ending:  # (the server had ended it already: a link lost meanwhile)
                self.listening.pop(unit, None)
        elif ending:
            self.listening.pop(unit, None)
            self.tell(f"no longer listening in on {unit}")
        else:
            self.listening.setdefault(unit, 0)
            self.tell(f"listening in on {unit}: its user is shown nothing")

    def _ambient_heard(self, unit: str) -> None:
        if unit in self.listening:
            self.listening[unit] += 1

    @work(group="actions")
    async def action_remote_talk(self) -> None:
        """Make the selected unit talk in the selected group for 5 s."""
        unit, tg = self.selected_unit(), self.selected_group()
        if unit is None or tg is None:
            self.refused("select a unit and a group first")
            return
        await self._command(
            m.RemoteTalk(unit=unit, tg=tg, seconds=5, ref=self.link.next_ref()),
            f"{unit} made to talk in {tg} for 5 s",
        )

    @work(group="actions")
    async def action_private_call(self) -> None:
        """Call the selected unit alone (its user answers); again to hang up."""
        if self.link.private is not None:
            with contextlib.suppress(ClientError, TimeoutError):
                await self.link.hang_up()
            return
        unit = self.selected_unit()
        if unit is None:
            self.refused("select a unit first")
            return
        try:
            answer = await self.link.private_call(unit)
        except (ClientError, TimeoutError) as exc:
            self.refused(f"private call to {unit} failed: {exc}")
            return
        if answer.state != "ended":  # (an end is told as it comes, by `inbound`)
            self.tell(f"calling {unit}: {answer.state}; k talks, d hangs up")

    @work(group="actions")
    async def action_private_talk(self) -> None:
        """PTT in the private call: down, or up again."""
        if self.link.private_talking:
            self.link.release_private()
            return
        try:
            if await self.link.press_private() is None:
                self.refused("no turn to talk: not connected, or the other party talks")
        except (ClientError, TimeoutError) as exc:
            self.refused(f"talk in the call failed: {exc}")

    @work(group="recall", exclusive=True)
    async def action_recall(self) -> None:
        """Instant recall: the selected group's last talk bursts (or, from the units
        panel, the selected unit's), from the recorder's file; Enter replays one."""
        if self.recordings is None:
            self.refused("no recordings: start the console with --recordings FILE")
            return
        units = self.query_one("#units", DataTable)
        unit = self.selected_unit() if self.focused is units else None
        tg = None if unit else self.selected_group()
        try:
            found = await asyncio.to_thread(_last_bursts, self.recordings, tg, unit)
        except StoreError as exc:
            self.refused(str(exc))
            return
        title = f"last talk bursts of {unit or tg or 'every group'}"
        chosen = await self.push_screen_wait(Recall(title, found))
        burst = next((b for b in found if b.id == chosen), None)
        if burst is not None:
            await self._replay(burst)

    async def _replay(self, burst: Burst) -> None:
        """Play a recorded burst back at its own pace (the console has no loudspeaker:
        the status line follows it, packet by packet)."""
        try:
            packets = await asyncio.to_thread(_media_of, self.recordings or "", burst.id)
        except StoreError as exc:
            self.refused(str(exc))
            return
        when = time.strftime("%H:%M:%S", time.localtime(burst.started_ns / 1e9))
        label = f"{burst.talker} in {burst.tg} at {when}"
        start = time.monotonic()
        try:
            for i, (_, ts, _) in enumerate(packets, 1):
                await asyncio.sleep(max(0.0, start + (ts - packets[0][1]) / 1e9 - time.monotonic()))
                self.replaying = f"REPLAYING {label}: {i}/{len(packets)} packets"
        finally:
            self.replaying = None  # (also when another recall cut it short)
        self.tell(f"replayed {label} ({burst.seconds:.1f} s, {len(packets)} packets)")

    @work(group="actions")
    async def action_force_release(self) -> None:
        tg = self.selected_group()
        if tg is not None:
            await self._command(
                m.ForceRelease(tg=tg, ref=self.link.next_ref()), f"{tg}: floor force-released"
            )

    def action_mark(self) -> None:
        unit = self.selected_unit()
        if unit is not None:
            self.marked ^= {unit}
            self.model.version += 1

    @work(group="actions")
    async def action_regroup(self) -> None:
        units = sorted(self.marked) or [u for u in (self.selected_unit(),) if u]
        if not units:
            self.refused("mark units with x first")
            return
        tg = await self.push_screen_wait(Ask(f"Regroup {', '.join(units)} into group id:", "inc-1"))
        if not tg:
            return
        name = await self.push_screen_wait(Ask(f"Name of {tg} (optional):", tg)) or tg
        if await self._command(
            m.Regroup(tg=tg, units=units, name=name, ref=self.link.next_ref()),
            f"{tg}: regrouped {len(units)} units as {name!r}",
        ):
            self.marked.clear()

    @work(group="actions")
    async def action_ungroup(self) -> None:
        tg = self.selected_group()
        if tg is not None:
            await self._command(
                m.Ungroup(tg=tg, ref=self.link.next_ref()), f"{tg}: temporary group dissolved"
            )

    @work(group="actions")
    async def action_sds(self) -> None:
        focused = self.focused.id if self.focused else None
        target = (
            f"unit:{self.selected_unit()}" if focused == "units" else f"tg:{self.selected_group()}"
        )
        if target.endswith(":None"):
            return
        text = await self.push_screen_wait(Ask(f"Short message to {target}:"))
        if text:
            try:
                reply = await self.link.ask(m.Sds(to=target, text=text, ref=self.link.next_ref()))
            except TimeoutError:
                self.refused(f"SDS to {target}: no answer from the server; {text!r} not sent")
                return
            if isinstance(reply, m.Error):
                self.refused(f"SDS to {target} refused: {say(reply.cause)}; {text!r} not sent")
            elif isinstance(reply, m.SdsStatus):
                said = f"SDS {self.unit_id} → {target}: {text} ({reply.state})"
                if target.startswith("tg:"):  # (the group's copy comes back to the log)
                    self.notify(said, timeout=4, markup=False)
                else:
                    self.tell(said, warn=reply.state == "failed")

    def action_help(self) -> None:
        self.push_screen(Help([(_key(k), does) for k, _, _, does in KEYS if does]))

    def action_sort_units(self) -> None:
        self.sort = SORTS[(SORTS.index(self.sort) + 1) % len(SORTS)]
        self.tell(f"units sorted by {self.sort}")
        self.model.version += 1

    def action_filter_group(self) -> None:
        tg = self.selected_group()
        self.group_filter = None if self.group_filter or tg is None else tg
        self.tell(f"showing {'all groups' if self.group_filter is None else self.group_filter}")
        self._log_drawn = 0
        self.query_one("#log", RichLog).clear()
        self.model.version += 1

    def action_hotspots(self) -> None:
        self.show_hotspots = not self.show_hotspots
        self.model.version += 1

    def action_zoom(self, factor: float) -> None:
        self.view.zoom_by(factor)
        self.model.version += 1

    def action_pan(self, dx: float, dy: float) -> None:
        self.view.pan(dx, dy)
        self.model.version += 1

    async def _command(self, msg: m.Message, done: str) -> bool:
        if isinstance(await self._ask(msg), m.Ok):
            self.tell(done)
            return True
        return False

    async def _ask(self, msg: m.Message) -> m.Message | None:
        """The server's answer to `msg`, a refusal already told in words; None (told too)
        when no answer came."""
        try:
            reply = await self.link.ask(msg)
        except TimeoutError:
            self.refused(f"no answer from the server to {msg.T}")
            return None
        if isinstance(reply, m.Error):
            self.refused(f"{msg.T} refused: {say(reply.cause)} ({reply.detail})")
        return reply

    # --- drawing ------------------------------------------------------------------------

    def redraw(self) -> None:
        self._draw_status()
        if self.model.version == self._drawn:
            self._draw_timers()
            if time.monotonic() - self._units_drawn >= 1.0:  # (ages, and hotspots ageing out)
                self._draw_units()
                self._draw_map()
            return
        self._drawn = self.model.version
        self._draw_groups()
        self._draw_units()
        self._draw_map()
        self._draw_log()

    def _draw_status(self) -> None:
        link = self.link.transport
        broker = "connected" if link.connected else "reconnecting…"
        server = self.model.server_state
        ptt = [tg for tg, v in self.link.groups.items() if v.floor.state == HAS_PERMISSION]
        talk = f"  TALKING in {', '.join(ptt)}" if ptt else ""
        access = f"  last access {self.last_access_ms:.1f} ms" if self.last_access_ms else ""
        self.sub_title = f"server {server} · broker {broker}"
        heard = ", ".join(f"{u} ({n} packets)" for u, n in sorted(self.listening.items()))
        listen = f"  LISTENING IN on {heard}" if heard else ""
        listen += f"  {self.replaying}" if self.replaying else ""
        call = self.link.private
        if call is not None:
            talker = f", {call.talker} talks" if call.talker else ""
            listen += f"  PRIVATE CALL with {call.unit} ({call.state}{talker})"
        role = "  [b white on red] NOT A DISPATCHER [/]" if self.not_dispatcher else ""
        self.query_one("#status", Static).update(
            f"{self.unit_id}{role}  server: {server}  broker: {broker}{talk}{access}{listen}"
            f"  marked: {', '.join(sorted(self.marked)) or '-'}"
        )

    def _draw_timers(self) -> None:
        table = self.query_one("#groups", DataTable)
        call = table.ordered_columns[GROUP_COLUMNS.index("Call")].key
        for g in self.model.groups.values():
            if g.floor == "taken" and g.tg in table.rows:
                table.update_cell(g.tg, call, _timer(g.since))

    def _draw_groups(self) -> None:
        table = self.query_one("#groups", DataTable)
        rows = {}
        ranked = sorted(
            self.model.groups.values(), key=lambda g: (not g.emergency, not g.imminent, g.tg)
        )
        for g in ranked:
            g.monitored = g.tg in self.link.groups
            emerg = ""
            if g.emergency:
                by = self.model.acked_by(g, g.emergency_unit)
                ack = f" ✓{escape(by)}" if by else " no ack"
                emerg = f"[b white on red] SOS {escape(g.emergency_unit or '')}{ack} [/]"
            elif g.imminent:
                emerg = "[b black on yellow] PERIL [/]"
            kind = f"{g.kind}/{g.prio}" if g.floor == "taken" else ""
            label = escape(self.model.name(g.tg))
            name = f"[b]{label}[/]" if g.monitored else f"[dim]{label}[/]"
            rows[g.tg] = (
                name + (" (temp)" if g.temporary else ""),
                g.floor,
                g.talker or "",
                str(g.queue or ""),
                emerg,
                _timer(g.since) if g.floor == "taken" else "",
                kind,
                "●" if g.monitored else "",
            )
        _fill(table, rows)

    def _draw_units(self) -> None:
        self._units_drawn = time.monotonic()
        table = self.query_one("#units", DataTable)
        now = time.time()
        units = [
            u
            for u in self.model.units.values()
            if self.group_filter is None or self.group_filter in u.groups
        ]
        key = {
            "unit": lambda u: u.unit,
            "presence": lambda u: (u.presence, u.unit),
            "age": lambda u: -(u.located_at or 0),
            "speed": lambda u: -(u.spd or 0),
        }[self.sort]
        rows = {}
        for u in sorted(units, key=key):
            pos = f"{u.lat:.4f},{u.lon:.4f}" if u.lat is not None else ""
            age = f"{now - u.located_at:.0f}s" if u.located_at else ""
            mark = "✚ " if u.unit in self.marked else ""
            emerg = ""
            presence = {"online": "[green]online[/]", "offline": "[red]offline[/]"}.get(
                u.presence, u.presence
            )
            status = f"{escape(u.status or '')} {_age(now - u.status_at)}" if u.status_at else ""
            if u.emergency:
                acked = all(self.model.acked_by(self.model.group(tg), u.unit) for tg in u.emergency)
                emerg = "[b white on red] SOS ✓ [/]" if acked else "[b white on red] SOS [/]"
            rows[u.unit] = (
                mark + u.unit,
                presence,
                status,
                age,
                emerg,
                ",".join(sorted(u.groups)),
                pos,
                f"{u.spd:.1f}" if u.spd is not None else "",
            )
        _fill(table, rows)

    def _draw_map(self) -> None:
        widget = self.query_one("#map", Static)
        points = [
            Point(u.unit, u.lat, u.lon, bool(u.emergency))
            for u in self.model.units.values()
            if u.lat is not None and u.lon is not None
        ]
        size = widget.content_size
        recent = self.model.hotspots() if self.show_hotspots else []
        heat = [(i.lat, i.lon) for i in recent]
        widget.update(
            render(
                points, size.width, size.height, self.view, self.selected_unit(), heat, scale=True
            )
        )
        shown = f"hotspots, 15 min: {len(recent)}" if self.show_hotspots else "hotspots off"
        widget.border_title = f"Map · {shown} (h)"
        widget.border_subtitle = f"zoom x{self.view.zoom:g}  (+/- zoom, H J K L pan)"

    def _draw_log(self) -> None:
        log = self.query_one("#log", RichLog)
        events = list(self.model.events)
        for e in events[self._log_drawn :]:
            if self.group_filter is not None and e.tg not in (None, self.group_filter):
                continue
            stamp = time.strftime("%H:%M:%S", time.localtime(e.at))
            where = f"[cyan]{escape(self.model.name(e.tg))}[/] " if e.tg else ""
            text = f"[b red]{escape(e.text)}[/]" if e.alarm else escape(e.text)
            log.write(f"[dim]{stamp}[/] {where}{text}")
        self._log_drawn = len(events)
        if len(events) == self.model.events.maxlen:
            self.model.events.clear()
            self._log_drawn = 0

    async def on_unmount(self) -> None:
        await asyncio.wait_for(self.link.stop(), 3)


GROUP_COLUMNS = ("Group", "Floor", "Talker", "Q", "Emergency", "Call", "Kind/prio", "Mon")
UNIT_COLUMNS = ("Unit", "Presence", "Status", "Age", "Emerg", "Groups", "Position", "Speed")


def _row_key(table: DataTable[Any]) -> str | None:
    if table.row_count == 0:
        return None
    key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key
    return str(key.value) if key.value is not None else None


def _fill(table: DataTable[Any], rows: Mapping[str, tuple[str, ...]]) -> None:
    """Bring the table to `rows` (key -> cells) in order, keeping the cursor on its row."""
    keep = _row_key(table)
    table.clear()
    for key, cells in rows.items():
        table.add_row(*cells, key=key)
    if keep is not None and keep in rows:
        table.move_cursor(row=list(rows).index(keep))


def _key(keys: str) -> str:
    names = {"question_mark": "?", "plus": "+", "equals_sign": "=", "minus": "-"}
    return " or ".join(names.get(k, k) for k in keys.split(","))


def _timer(since: float | None) -> str:
    if since is None:
        return ""
    s = max(0, int(time.time() - since))
    return f"{s // 60}:{s % 60:02d}"


def _age(seconds: float) -> str:
    """How long ago, in the largest whole unit: 40s, 12m, 3h."""
    s = max(0, int(seconds))
    return f"{s}s" if s < 60 else f"{s // 60}m" if s < 3600 else f"{s // 3600}h"
