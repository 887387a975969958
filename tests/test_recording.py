"""Recording and instant recall (docs/recording.md): the recordings file, the recorder on
a real broker, what survives the recorder being killed, and the console's recall."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import msgpack
import pytest
from textual.widgets import DataTable

from esn.client.handset import Handset
from esn.client.recorder import Recorder
from esn.console.app import ConsoleApp
from esn.protocol import codec
from esn.protocol import messages as m
from esn.server.shell import Server
from esn.store import StoreError
from esn.store.recordings import Recordings
from esn.transport import BrokerConfig
from tests.conftest import HandsetFactory, eventually
from tests.test_console import select

S = 1_000_000_000  # ns


def test_the_file_keeps_bursts_voice_and_events_and_drops_what_is_past_keeping(
    tmp_path: Path,
) -> None:
    rec = Recordings(tmp_path / "r.sqlite3")
    old = rec.open_burst("tg-1", "c1", "u1", "normal", 100, 1 * S)
    rec.add_media(old, 0, 1 * S, b"abc")
    rec.close_burst(old, 2 * S)
    new = rec.open_burst("tg-1", "c2", "u2", "emergency", 200, 100 * S)
    for seq in range(3):
        rec.add_media(new, seq, 100 * S + seq * 60_000_000, b"x" * 10)
    rec.event(100 * S, "tg-1", "emergency", "u2", "lat=51.5;lon=-0.1")
    rec.commit()
    [last, first] = rec.last_bursts(tg="tg-1")
    assert (last.talker, last.kind, last.packets, last.bytes, last.ended_ns) == (
        "u2",
        "emergency",
        3,
        30,
        None,
    )
    assert (first.talker, first.seconds) == ("u1", 1.0)
    assert [s for s, _, _ in rec.media(new)] == [0, 1, 2]
    assert rec.close_open_bursts() == 1  # (left open by a recorder killed: ended)
    assert rec.last_bursts(talker="u2")[0].ended_ns == 100 * S + 120_000_000
    assert rec.trim(150 * S, keep_s=100, keep_bytes=10**9) == 1  # (older than 100 s)
    assert [b.talker for b in rec.last_bursts()] == ["u2"]
    assert rec.trim(150 * S, keep_s=1000, keep_bytes=20) == 1  # (over 20 bytes of voice)
    assert rec.last_bursts() == [] and rec.media(new) == []
    rec.close()


@pytest.fixture
async def recorder(
    server: Server, broker: BrokerConfig, prefix: str, mqtt_client: str, tmp_path: Path
) -> AsyncIterator[Recorder]:
    """A recorder of the test's server into `tmp_path`/r.sqlite3, stopped after the test."""
    made = Recorder(broker, str(tmp_path / "r.sqlite3"), prefix=prefix, mqtt_client=mqtt_client)
    await made.start()
    try:
        yield made
    finally:
        await made.stop()


async def burst(talker: Handset, listener: Handset, packets: int) -> None:
    """A talk burst in tg-1: granted, heard by `listener` for `packets` packets, released,
    and the floor told idle."""
    assert isinstance(await talker.press("tg-1"), m.Granted)
    for _ in range(packets):
        await listener.expect(lambda i: isinstance(i.msg, m.Media))
    idle = listener.expect(lambda i: isinstance(i.msg, m.Idle))
    talker.release("tg-1")
    await idle


async def test_the_recorder_keeps_who_talked_when_and_what_they_said(
    recorder: Recorder, handset: HandsetFactory
) -> None:
    """Tried: two talk bursts in tg-1 (the second pre-empting nobody, after the first),
    an emergency alert. Expect: both bursts with their talker, kind and voice, in order;
    the alert among the events."""
    u1, u2 = await handset("u1", "tg-1"), await handset("u2", "tg-1")
    for talker, listener in ((u1, u2), (u2, u1)):
        await burst(talker, listener, packets=5)
    await u1.ask(m.EmergencyAlert(tg="tg-1", lat=51.5, lon=-0.1, ref=u1.next_ref()))
    db = recorder.recordings._db  # (the recorder's own connection: what it wrote)

    def events() -> list[tuple[str, str]]:
        return db.execute("SELECT type, unit FROM events").fetchall()

    await eventually(lambda: recorder.bursts == 2 and not recorder.open and bool(events()))
    [second, first] = recorder.recordings.last_bursts(tg="tg-1")
    assert (first.talker, second.talker) == ("u1", "u2") and first.kind == "normal"
    assert first.packets >= 5 and second.packets >= 5 and first.ended_ns is not None
    assert [s for s, _, _ in recorder.recordings.media(first.id)][:3] == [0, 1, 2]
    assert events() == [("emergency", "u1")]


@pytest.mark.parametrize("mqtt_client", ["gmqtt"])  # (a process of its own: a real broker)
async def test_nothing_written_is_lost_when_the_recorder_is_killed(
    server: Server,
    handset: HandsetFactory,
    broker: BrokerConfig,
    prefix: str,
    tmp_path: Path,
) -> None:
    """Tried: `esn record` as its own process; a talk burst ends; the recorder is killed
    (SIGKILL) at once. Expect: the burst and its voice are in the file."""
    db = tmp_path / "r.sqlite3"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "esn.cli",
        "record",
        "--broker",
        broker.url(),
        "--db",
        str(db),
        "--prefix",
        prefix,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        assert b"recording every talkgroup" in line, line
        u1, u2 = await handset("u1", "tg-1"), await handset("u2", "tg-1")
        await burst(u1, u2, packets=10)

        def kept() -> list[int]:
            rec = Recordings(db, readonly=True)
            try:
                return [b.packets for b in rec.last_bursts(tg="tg-1") if b.ended_ns]
            finally:
                rec.close()

        await eventually(lambda: bool(kept()))  # (committed at the burst's end)
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        assert kept()[0] >= 10
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def replayed(app: ConsoleApp) -> str | None:
    """The console's log line of a replay that ended, if any."""
    return next((e.text for e in app.model.events if e.text.startswith("replayed ")), None)


async def test_instant_recall_lists_a_groups_last_bursts_and_replays_one(
    recorder: Recorder,
    handset: HandsetFactory,
    broker: BrokerConfig,
    prefix: str,
    mqtt_client: str,
    tmp_path: Path,
) -> None:
    db = tmp_path / "r.sqlite3"
    u1, u2 = await handset("u1", "tg-1"), await handset("u2", "tg-1")
    await burst(u1, u2, packets=5)
    await eventually(lambda: recorder.bursts == 1 and not recorder.open)
    recorder.recordings.commit()
    app = ConsoleApp(broker, "disp", prefix=prefix, mqtt_client=mqtt_client, recordings=str(db))
    async with app.run_test(size=(180, 50)) as pilot:
        await eventually(lambda: app.model.server_state == "online")
        await select(app, pilot, "groups", "tg-1")
        await pilot.press("p")
        await eventually(lambda: len(app.screen.query("#recall")) == 1)
        table = app.screen.query_one("#recall", DataTable)
        await eventually(lambda: table.row_count == 1)
        assert [str(c) for c in table.get_row_at(0)][1:3] == ["tg-1", "u1"]
        await pilot.press("enter")
        await eventually(lambda: app.replaying is not None or replayed(app) is not None)
        await eventually(lambda: replayed(app) is not None)
        assert int((replayed(app) or "").split(", ")[1].split()[0]) >= 5  # its packets


def floor_news(rec: Recorder, tg: str, msg: m.Message, where: str = "down/floor") -> None:
    """What the recorder is handed for a group's topic (as the broker would)."""
    rec._on_message(f"esn/tg/{tg}/{where}", codec.encode(msg))


def taken(talker: str, call: str, seq: int, kind: m.Kind = "normal", tg: str = "tg-1") -> m.Taken:
    return m.Taken(tg=tg, talker=talker, call=call, prio=100, kind=kind, seq=seq)


def test_a_call_raised_in_place_is_one_burst_and_old_news_changes_nothing(
    tmp_path: Path,
) -> None:
    rec = Recorder(BrokerConfig.from_url("mqtt://127.0.0.1:1"), str(tmp_path / "r.sqlite3"))
    try:
        floor_news(rec, "tg-1", taken("u1", "c1", 1))
        floor_news(rec, "tg-1", taken("u1", "c1", 2, kind="emergency"))  # raised in place
        state = m.State(
            tg="tg-1",
            floor="taken",
            emergency=False,
            queue=0,
            seq=1,
            since_ts=1,
            talker="u1",
            call="c1",
            kind="normal",
            prio=100,
        )
        floor_news(rec, "tg-1", state, "state")  # (older: ignored)
        floor_news(rec, "tg-1", taken("u2", "c1", 3))  # pre-empted: a burst of its own
        floor_news(rec, "tg-1", m.Idle(tg="tg-1", call="c1", seq=4))
        bursts = rec.recordings.last_bursts(tg="tg-1")
        assert [(b.talker, b.kind, b.ended_ns is not None) for b in bursts] == [
            ("u2", "normal", True),
            ("u1", "emergency", True),
        ]
        # a temporary group dissolved (its state cleared) and made again counts from 1
        floor_news(rec, "tmp", taken("u3", "c9", 7, tg="tmp"))
        rec._on_message("esn/tg/tmp/state", b"")
        floor_news(rec, "tmp", taken("u4", "c1", 1, tg="tmp"))
        assert [b.talker for b in rec.recordings.last_bursts(tg="tmp")] == ["u4", "u3"]
    finally:
        rec.recordings.close()


def test_a_write_the_disk_refuses_costs_only_what_was_not_committed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rec = Recorder(BrokerConfig.from_url("mqtt://127.0.0.1:1"), str(tmp_path / "r.sqlite3"))
    try:
        floor_news(rec, "tg-1", taken("u1", "c1", 1))
        floor_news(rec, "tg-1", m.Idle(tg="tg-1", call="c1", seq=2))  # (committed)
        floor_news(rec, "tg-2", taken("u2", "c2", 1, tg="tg-2"))
        real = rec.recordings.add_media

        def full(*args: object) -> None:
            raise sqlite3.OperationalError("database or disk is full")

        monkeypatch.setattr(rec.recordings, "add_media", full)
        packet = {"t": "media", "tg": "tg-2", "talker": "u2", "call": "c2", "seq": 0, "data": b"x"}
        rec._on_message("esn/tg/tg-2/down/media", msgpack.packb(packet))
        assert rec.failures == 1 and rec.open == {}  # (tg-2's burst went with the rollback)
        monkeypatch.setattr(rec.recordings, "add_media", real)
        floor_news(rec, "tg-2", taken("u3", "c3", 2, tg="tg-2"))  # recording goes on
        rec._on_message("esn/tg/tg-2/down/media", msgpack.packb({**packet, "talker": "u3"}))
        rec.recordings.commit()
        assert [(b.talker, b.packets) for b in rec.recordings.last_bursts()] == [
            ("u3", 1),
            ("u1", 0),
        ]
    finally:
        rec.recordings.close()


def test_one_recorder_writes_a_file_at_a_time(tmp_path: Path) -> None:
    first = Recordings(tmp_path / "r.sqlite3")
    with pytest.raises(StoreError, match="being written by another recorder"):
        Recordings(tmp_path / "r.sqlite3")
    first.close()
    Recordings(tmp_path / "r.sqlite3").close()  # (free again)
