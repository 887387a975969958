"""The recorder: a client like any console, which keeps every talk burst, its voice and
the groups' events in a recordings file (docs/recording.md).

It subscribes to every group's floor news, voice, events and retained state; a `taken`
opens a burst (closing the one before), `idle` closes it, each voice packet of the talker
is kept with it. News older than what it knows of a group (by `seq`) is ignored. Started
late, or again after being killed, it opens the bursts the retained states show going
on, and ends at their last packet the ones it had left open.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

import msgpack

from esn.protocol import codec
from esn.protocol import messages as m
from esn.protocol.ids import is_id
from esn.store.recordings import Recordings
from esn.transport import BrokerConfig, make_transport

log = logging.getLogger("esn.recorder")

COMMIT_EVERY_S = 0.5
TRIM_EVERY_S = 60.0
# events kept besides the bursts: the fields that say what happened
_EVENTS = (m.Emergency, m.EmergencyCancel, m.EmergencyState, m.ImminentCancel, m.Sds)


@dataclass
class _Open:
    id: int
    talker: str
    call: str


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
        self.bursts = self.packets = 0  # recorded since start
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
            self.recordings.commit()
            if time.monotonic() - trimmed >= TRIM_EVERY_S:
                trimmed = time.monotonic()
                gone = self.recordings.trim(time.time_ns(), self.keep_s, self.keep_bytes)
                if gone:
                    log.info("%d recorded bursts past keeping, dropped", gone)

    # --- what comes in ------------------------------------------------------------------

    def _on_message(self, topic: str, payload: bytes) -> None:
        parts = topic[len(self.prefix) + 1 :].split("/")
        if len(parts) < 3 or parts[0] != "tg" or not is_id(parts[1]) or not payload:
            return
        tg, where = parts[1], "/".join(parts[2:])
        if where == "down/media":
            self._media(tg, payload)
            return
        with contextlib.suppress(codec.ProtocolError):
            msg = codec.decode(payload)
            news = where == "down/floor" and isinstance(msg, m.Taken | m.Idle)
            if news or (where == "state" and isinstance(msg, m.State)):
                assert isinstance(msg, m.Taken | m.Idle | m.State)
                self._floor(tg, msg, msg.seq)
            elif where == "down/event" and isinstance(msg, _EVENTS):
                unit = getattr(msg, "unit", None) or getattr(msg, "sender", None)
                detail = ";".join(
                    f"{k}={v}"
                    for k in ("state", "by", "text", "lat", "lon")
                    if (v := getattr(msg, k, None)) is not None
                )
                self.recordings.event(time.time_ns(), tg, msg.T, unit, detail)

    def _floor(self, tg: str, msg: m.Taken | m.Idle | m.State, seq: int) -> None:
        if seq < self.seqs.get(tg, -1):
            return  # older than what we know (a state overtaken by an idle)
        self.seqs[tg] = seq
        now = time.time_ns()
        talker = msg.talker if isinstance(msg, m.Taken | m.State) else None
        call = msg.call or ""
        current = self.open.get(tg)
        if current is not None and (current.talker, current.call) == (talker, call):
            return  # the same burst, told again (a state after its taken)
        if current is not None:
            self.recordings.close_burst(current.id, now)
            del self.open[tg]
            self.recordings.commit()  # (a burst ended: kept for good now)
        if talker is not None and isinstance(msg, m.Taken | m.State):
            kind, prio = msg.kind or "normal", msg.prio or 0
            burst = self.recordings.open_burst(tg, call, talker, kind, prio, now)
            self.open[tg] = _Open(burst, talker, call)
            self.bursts += 1

    def _media(self, tg: str, payload: bytes) -> None:
        current = self.open.get(tg)
        if current is None:
            return
        try:
            obj = msgpack.unpackb(payload)
            talker, seq, data = obj["talker"], int(obj["seq"]), bytes(obj["data"])
        except Exception:  # any bytes from the wire: not a packet to keep
            return
        if talker == current.talker:
            ts = obj.get("rts") if isinstance(obj.get("rts"), int) else time.time_ns()
            self.recordings.add_media(current.id, seq, ts, data)
            self.packets += 1
