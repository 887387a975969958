"""Recorded calls in one SQLite file: who talked when, in what priority, and what they
said (docs/recording.md). Written by the recorder (`esn record`), read by the console's
instant recall and by anyone with `sqlite3`.

Write-ahead-log mode with `synchronous=NORMAL`: what a commit wrote survives the recorder
being killed (SIGKILL included), though not the machine losing power in the next moments.
The recorder commits every half second and at the end of each talk burst; readers (the
console) open the file read-only and never block it. One recorder at a time: it holds a
lock on `FILE.lock` while it writes.

Schema (times in Unix nanoseconds):

    bursts(id, tg, call, talker, kind, prio, started_ns, ended_ns, packets, bytes)
    media(burst, seq, ts_ns, data)      -- each voice packet, as relayed
    events(at_ns, tg, type, unit, detail)  -- emergencies, acknowledgements, cancels, SDS...
                                           -- (detail: a JSON object)
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from esn.store import StoreError

SCHEMA = """
CREATE TABLE IF NOT EXISTS bursts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    tg TEXT NOT NULL,
    call TEXT NOT NULL,
    talker TEXT NOT NULL,
    kind TEXT NOT NULL,
    prio INTEGER NOT NULL,
    started_ns INTEGER NOT NULL,
    ended_ns INTEGER,
    packets INTEGER NOT NULL DEFAULT 0,
    bytes INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS bursts_by_tg ON bursts (tg, started_ns);
CREATE INDEX IF NOT EXISTS bursts_by_talker ON bursts (talker, started_ns);
CREATE INDEX IF NOT EXISTS bursts_by_time ON bursts (started_ns);
CREATE TABLE IF NOT EXISTS media (
    burst INTEGER NOT NULL REFERENCES bursts (id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    ts_ns INTEGER NOT NULL,
    data BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS media_by_burst ON media (burst, seq);
CREATE TABLE IF NOT EXISTS events (
    at_ns INTEGER NOT NULL,
    tg TEXT,
    type TEXT NOT NULL,
    unit TEXT,
    detail TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS events_by_time ON events (at_ns);
"""


@dataclass(frozen=True)
class Burst:
    id: int
    tg: str
    call: str
    talker: str
    kind: str
    prio: int
    started_ns: int
    ended_ns: int | None
    packets: int
    bytes: int

    @property
    def seconds(self) -> float:
        return 0.0 if self.ended_ns is None else (self.ended_ns - self.started_ns) / 1e9


MAX_EVENTS = 1_000_000  # events kept at most (the oldest go first): short data floods


class Recordings:
    """The file, for writing (the recorder) or for reading (`readonly`)."""

    def __init__(self, path: str | Path, readonly: bool = False) -> None:
        self.path = str(path)
        self._lock: int | None = None
        try:
            if readonly:
                uri = Path(path).resolve().as_uri() + "?mode=ro"
                self._db = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=2)
                return
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._lock = os.open(f"{path}.lock", os.O_CREAT | os.O_RDWR, 0o644)
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._db = sqlite3.connect(self.path, isolation_level=None, timeout=2)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(SCHEMA)
            self._db.execute("BEGIN")
        except BlockingIOError:
            raise StoreError(f"recordings {path} are being written by another recorder") from None
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open recordings {path}: {exc}") from None

    # --- writing ------------------------------------------------------------------------

    def open_burst(self, tg: str, call: str, talker: str, kind: str, prio: int, at_ns: int) -> int:
        cur = self._db.execute(
            "INSERT INTO bursts (tg, call, talker, kind, prio, started_ns) VALUES (?,?,?,?,?,?)",
            (tg, call, talker, kind, prio, at_ns),
        )
        return int(cur.lastrowid or 0)

    def close_burst(self, burst: int, at_ns: int) -> None:
        self._db.execute("UPDATE bursts SET ended_ns = ? WHERE id = ?", (at_ns, burst))

    def raised(self, burst: int, kind: str, prio: int) -> None:
        """The burst's call was raised (or lowered) in place: its kind and priority now."""
        self._db.execute("UPDATE bursts SET kind = ?, prio = ? WHERE id = ?", (kind, prio, burst))

    def add_media(self, burst: int, seq: int, ts_ns: int, data: bytes) -> None:
        self._db.execute("INSERT INTO media VALUES (?,?,?,?)", (burst, seq, ts_ns, data))
        self._db.execute(
            "UPDATE bursts SET packets = packets + 1, bytes = bytes + ? WHERE id = ?",
            (len(data), burst),
        )

    def event(self, at_ns: int, tg: str | None, type_: str, unit: str | None, detail: str) -> None:
        self._db.execute("INSERT INTO events VALUES (?,?,?,?,?)", (at_ns, tg, type_, unit, detail))

    def commit(self) -> None:
        """What was written so far, kept for good (a kill after this loses none of it)."""
        if self._db.in_transaction:
            self._db.execute("COMMIT")
        self._db.execute("BEGIN")

    def rollback(self) -> None:
        """After a failed write (a full disk): what the open transaction held is gone; a
        new one begins."""
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")
        self._db.execute("BEGIN")

    def close_open_bursts(self) -> int:
        """At start: bursts a killed recorder left open end at their last packet."""
        cur = self._db.execute(
            "UPDATE bursts SET ended_ns = COALESCE("
            "(SELECT MAX(ts_ns) FROM media WHERE burst = bursts.id), started_ns) "
            "WHERE ended_ns IS NULL"
        )
        self.commit()
        return cur.rowcount

    def trim(self, now_ns: int, keep_s: float, keep_bytes: int) -> int:
        """Drop the ended bursts older than `keep_s`, then the oldest ended ones while the
        voice kept is over `keep_bytes`; events older than `keep_s`, and beyond
        MAX_EVENTS. Returns how many bursts went."""
        cutoff = max(0, now_ns - int(keep_s * 1e9))
        ended = "ended_ns IS NOT NULL"
        gone = self._db.execute(
            f"DELETE FROM bursts WHERE started_ns < ? AND {ended}", (cutoff,)
        ).rowcount
        self._db.execute("DELETE FROM events WHERE at_ns < ?", (cutoff,))
        self._db.execute(
            "DELETE FROM events WHERE rowid <= (SELECT MAX(rowid) FROM events) - ?", (MAX_EVENTS,)
        )
        total = self._db.execute("SELECT COALESCE(SUM(bytes), 0) FROM bursts").fetchone()[0]
        excess, last = total - keep_bytes, None
        rows = self._db.execute(f"SELECT id, bytes FROM bursts WHERE {ended} ORDER BY id")
        for burst, size in rows if excess > 0 else ():
            if excess <= 0:
                break
            excess, last = excess - size, burst
        if last is not None:
            gone += self._db.execute(
                f"DELETE FROM bursts WHERE id <= ? AND {ended}", (last,)
            ).rowcount
        self.commit()
        return int(gone)

    # --- reading ------------------------------------------------------------------------

    def last_bursts(
        self, tg: str | None = None, talker: str | None = None, n: int = 10
    ) -> list[Burst]:
        """The last `n` talk bursts (of a group, a talker, or all), newest first."""
        where, args = [], []
        if tg is not None:
            where.append("tg = ?")
            args.append(tg)
        if talker is not None:
            where.append("talker = ?")
            args.append(talker)
        sql = "SELECT * FROM bursts" + (" WHERE " + " AND ".join(where) if where else "")
        rows = self._db.execute(sql + " ORDER BY started_ns DESC LIMIT ?", (*args, n))
        return [Burst(*row) for row in rows.fetchall()]

    def media(self, burst: int) -> list[tuple[int, int, bytes]]:
        """(seq, ts_ns, data) of a burst's packets, in order."""
        rows = self._db.execute(
            "SELECT seq, ts_ns, data FROM media WHERE burst = ? ORDER BY rowid", (burst,)
        )
        return [(int(s), int(t), bytes(d)) for s, t, d in rows.fetchall()]

    def close(self) -> None:
        try:
            if self._db.in_transaction:
                self._db.execute("COMMIT")
        finally:
            self._db.close()
            if self._lock is not None:
                os.close(self._lock)  # (the lock with it)
