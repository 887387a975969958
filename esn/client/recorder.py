"""The recorder: a client like any console, which keeps every talk burst, its voice and
the groups' events in a recordings file (docs/recording.md).

It subscribes to every group's floor news, voice, events and retained state. A grant (a
`taken`, or a `state` naming a talker) newer than what it knows of the group opens a
burst, ending the one before, unless it is the same talker's call raised or lowered in
place (then the burst's kind changes); `idle` ends it; each voice packet of its talker is
kept with it. News older than what it knows of a group (by `seq`) is ignored, except
after the group's state was cleared (a temporary group dissolved: its count starts
again). Started late, or again after being killed, it opens the bursts the retained
states show going on (from their grant time), and ends at their last packet the ones it
had left open. A write the file refuses (a full disk) costs what was not yet committed,
and is logged; recording goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass

import msgpack

from esn.protocol import codec
from esn.protocol import messages as m
from esn.protocol.codec import MAX_MEDIA_BYTES
from esn.protocol.ids import is_id
from esn.store.recordings import Recordings
from esn.transport import BrokerConfig, make_transport

log = logging.getLogger("esn.recorder")

COMMIT_EVERY_S = 0.5
TRIM_EVERY_S = 60.0
# events kept besides the bursts, with the fields that say what happened
_EVENTS = (m.Emergency, m.EmergencyCancel, m.EmergencyState, m.ImminentCancel, m.Sds)
_DETAIL = ("state", "by", "text", "lat", "lon")


@dataclass
class _Open:
    id: int
    talker: str
    call: str
    kind: str
    prio: int


class Recorder:
    def __init__(
        self,
        broker: BrokerConfig,
        path: str,
        *,
        unit: str = "recorder",
        prefix: str = "esn",
        mqtt_client: str = "gmqtt",
        keep_days: float = 30.0,
        keep_mb: float = 1024.0,
    ) -> None:
        self.recordings = Recordings(path)
        self.prefix = prefix
        self.keep_s, self.keep_bytes = keep_days * 86400, int(keep_mb * 1e6)
        self.open: dict[str, _Open] = {}  # group -> its burst being recorded
        self.seqs: dict[str, int] = {}  # group -> the last floor news's seq
        self.bursts = self.packets = self.failures = 0  # since start
        self.transport = make_transport(mqtt_client, broker, client_id=unit)
        self.transport.on_message = self._on_message
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        left = self.recordings.close_open_bursts()
        if left:
            log.warning("%d bursts left open by a recorder stopped before: ended", left)
        p = self.prefix
        await self.transport.subscribe(
            f"{p}/tg/+/down/floor", f"{p}/tg/+/down/event", f"{p}/tg/+/state", qos=1
        )
        await self.transport.subscribe(f"{p}/tg/+/down/media", qos=0)
        await self.transport.start()
        self._tasks = [asyncio.create_task(self._keep())]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await self.transport.stop()
        with contextlib.suppress(sqlite3.Error):
            now = time.time_ns()
            for burst in self.open.values():
                self.recordings.close_burst(burst.id, now)
        self.open.clear()
        self.recordings.close()

    async def _keep(self) -> None:
        """Commit what was written every half second; drop what is past keeping now and
        then."""
        trimmed = time.monotonic()
        while True:
            await asyncio.sleep(COMMIT_EVERY_S)
            with self._writing():
                self.recordings.commit()
                if time.monotonic() - trimmed >= TRIM_EVERY_S:
                    trimmed = time.monotonic()
                    gone = self.recordings.trim(time.time_ns(), self.keep_s, self.keep_bytes)
                    if gone:
                        log.info("%d recorded bursts past keeping, dropped", gone)

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """A write the file refuses: what the transaction held is gone, so are the bursts
        open in it (the next grant, or the retained state, opens them again)."""
        try:
            yield
        except sqlite3.Error as exc:
            self.failures += 1
            log.warning(f"recordings {self.recordings.path}: a write failed ({exc}); going on")
            self.open.clear()
            self.seqs.clear()
            with contextlib.suppress(sqlite3.Error):
                self.recordings.rollback()

    # --- what comes in ------------------------------------------------------------------

    def _on_message(self, topic: str, payload: bytes) -> None:
        parts = topic[len(self.prefix) + 1 :].split("/")
        if len(parts) < 3 or parts[0] != "tg" or not is_id(parts[1]):
            return
        tg, where = parts[1], "/".join(parts[2:])
        with self._writing():
            if where == "down/media":
                self._media(tg, payload)
            elif where == "state" and not payload:
                self._cleared(tg)
            elif payload:
                with contextlib.suppress(codec.ProtocolError):
                    self._news(tg, where, codec.decode(payload))

    def _news(self, tg: str, where: str, msg: m.Message) -> None:
        floor_news = where == ("state" if isinstance(msg, m.State) else "down/floor")
        if isinstance(msg, m.Taken | m.Idle | m.State) and floor_news:
            self._floor(tg, msg)
        elif where == "down/event" and isinstance(msg, _EVENTS):
            unit = getattr(msg, "unit", None) or getattr(msg, "sender", None)
            detail = {k: v for k in _DETAIL if (v := getattr(msg, k, None)) is not None}
            self.recordings.event(time.time_ns(), tg, msg.T, unit, json.dumps(detail))

    def _cleared(self, tg: str) -> None:
        """The group's state was cleared (a temporary group dissolved): its count of
        floor news starts again if it comes back."""
        self.seqs.pop(tg, None)
        self._end(tg, time.time_ns())

    def _floor(self, tg: str, msg: m.Taken | m.Idle | m.State) -> None:
        if msg.seq < self.seqs.get(tg, -1):
            return  # older than what we know (a state overtaken by an idle)
        if msg.seq == self.seqs.get(tg) and not isinstance(msg, m.Idle):
            return  # the same news, told again (a state after its taken)
        self.seqs[tg] = msg.seq
        now = time.time_ns()
        talker = None if isinstance(msg, m.Idle) else msg.talker
        current = self.open.get(tg)
        if talker is None or isinstance(msg, m.Idle):
            self._end(tg, now)
            return
        assert not isinstance(msg, m.Idle)
        kind, prio, call = msg.kind or "normal", msg.prio or 0, msg.call or ""
        if current is not None and (current.talker, current.call) == (talker, call):
            if (current.kind, current.prio) != (kind, prio):  # raised or lowered in place
                self.recordings.raised(current.id, kind, prio)
                current.kind, current.prio = kind, prio
            return
        self._end(tg, now)
        # (a burst found going on when we start began at its grant, the state says)
        began = msg.since_ts if isinstance(msg, m.State) and 0 < msg.since_ts <= now else now
        burst = self.recordings.open_burst(tg, call, talker, kind, prio, began)
        self.open[tg] = _Open(burst, talker, call, kind, prio)
        self.bursts += 1

    def _end(self, tg: str, now: int) -> None:
        current = self.open.pop(tg, None)
        if current is not None:
            self.recordings.close_burst(current.id, now)
            self.recordings.commit()  # (a burst ended: kept for good now)

    def _media(self, tg: str, payload: bytes) -> None:
        current = self.open.get(tg)
        if current is None or not payload:
            return
        try:
            obj = msgpack.unpackb(payload)
            talker, seq, data, rts = obj["talker"], obj["seq"], obj["data"], obj.get("rts")
        except Exception:  # any bytes from the wire: not a packet to keep
            return
        if not (isinstance(data, bytes) and len(data) <= MAX_MEDIA_BYTES):
            return
        if talker != current.talker or type(seq) is not int or not 0 <= seq < 2**63:
            return
        ts = rts if type(rts) is int and 0 < rts < 2**63 else time.time_ns()
        self.recordings.add_media(current.id, seq, ts, data)
        self.packets += 1
