"""The durable state in one SQLite file: the default store, for one server on one machine.

One table, `records(key, value, saved_ns)`, in write-ahead-log mode. A batch is one
transaction; with `synchronous=NORMAL` a committed batch survives the server process
being killed (SIGKILL included), though not the machine losing power in the next moments.
The file is locked for as long as the server runs (exclusive locking mode), so a second
server given the same file refuses to start instead of the two overwriting each other.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Mapping
from pathlib import Path

from esn.store import Store, StoreError

SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL,
    saved_ns INTEGER NOT NULL
)
"""


class SqliteStore(Store):
    def __init__(self, path: str) -> None:
        self.path = path
        if path != ":memory:":
            try:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"cannot create the folder of state file {path}: {exc}") from None
        try:
            # isolation_level=None: transactions are begun and committed here, explicitly
            self._db = sqlite3.connect(path, timeout=0, isolation_level=None)
            self._db.execute("PRAGMA locking_mode=EXCLUSIVE")
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("BEGIN IMMEDIATE")  # takes the lock, kept until close
            self._db.execute(SCHEMA)
            self._db.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc):
                raise StoreError(
                    f"state file {path} is in use by another server: stop it, or give this "
                    f"one another --state"
                ) from None
            raise StoreError(f"cannot open state file {path}: {exc}") from None
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"state file {path} is not a database: {exc}") from None

    def load(self) -> dict[str, bytes]:
        """Every record; a value that is not bytes (someone edited the file) comes back
        empty, for the caller to find undecodable."""
        try:
            rows = self._db.execute("SELECT key, value FROM records").fetchall()
        except sqlite3.DatabaseError as exc:
            raise StoreError(
                f"state file {self.path} is damaged ({exc}): move it aside to start without it"
            ) from None
        return {str(k): v if isinstance(v, bytes) else b"" for k, v in rows}

    def save(self, changes: Mapping[str, bytes | None]) -> None:
        if not changes:
            return
        now = time.time_ns()
        try:
            self._db.execute("BEGIN")
            for key, value in changes.items():
                if value is None:
                    self._db.execute("DELETE FROM records WHERE key = ?", (key,))
                else:
                    self._db.execute(
                        "INSERT INTO records (key, value, saved_ns) VALUES (?, ?, ?) "
                        "ON CONFLICT (key) DO UPDATE SET value = excluded.value, "
                        "saved_ns = excluded.saved_ns",
                        (key, value, now),
                    )
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise StoreError(f"cannot write state file {self.path}: {exc}") from None

    def close(self) -> None:
        self._db.close()
