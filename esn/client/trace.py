"""The access trace: one row per floor request, with its outcome and times, as NIST's
MCPTT simulator writes them (docs/traces.md).

A handset tells what became of each of its presses (`Handset.on_access`); the demo writes
those rows (`AccessTrace`). The load generator follows its own bursts instead (it knows
when each was planned): each worker writes its own file, and the runner merges them into
`access.csv` beside `result.json`, in the order the requests were made (`merge`).
"""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path
from typing import IO

from esn.client.floor import Outcome

FIELDS = ("t_s", "unit", "tg", "caller", "outcome", "cause", "answer_ms", "access_ms", "late_ms")
# immediate: granted at once; queued: granted after waiting in the queue; denied; failed:
# no answer; abandoned: the talker let go before the floor came
OUTCOMES = ("immediate", "queued", "denied", "failed", "abandoned")


class Access:
    """One floor request, from the press to its outcome."""

    def __init__(self, sent: float, start: float | None = None, kind: str = "normal") -> None:
        self.sent = sent  # on the schedule's clock (the event loop's)
        self.start = sent if start is None else start  # on the clock `seen` is given
        self.kind = kind
        self.cause = ""
        self.answered: float | None = None
        self.granted: float | None = None
        self.queued = self.denied = self.lost = self.let_go = False

    def heard(self, o: Outcome, now: float) -> None:
        """An outcome of the press as the handset met it at `now` (on `start`'s clock): a
        grant at the time the handset itself measured."""
        waited = o.waited_s if o.what == "granted" else None
        self.seen(o.what, now if waited is None else self.start + waited, o.cause)

    def seen(self, what: str, at: float, cause: str | None = None) -> None:
        """What the handset made of an answer (`Outcome.what`), and when."""
        if self.answered is None and what in ("granted", "queued", "denied"):
            self.answered = at
        if self.granted is not None or self.denied:
            return  # (decided: a revoke later is no part of the access)
        if what == "granted":
            self.granted = at
        elif what == "queued":
            self.queued = True
        elif what == "denied":
            self.denied, self.cause = True, cause or ""
        elif what == "no_answer":  # (also a request made again while queued, unanswered)
            self.lost = True

    @property
    def outcome(self) -> str:
        if self.granted is not None:
            return "queued" if self.queued else "immediate"
        if self.denied:
            return "denied"
        if self.lost:
            return "failed"
        return "abandoned" if self.queued or self.let_go else "failed"


class AccessTrace:
    """A trace file, a row written (and flushed) as each request ends: a run cut short
    keeps what ended."""

    def __init__(self, path: Path, t0: float) -> None:
        self.t0 = t0
        self._file: IO[str] = open(path, "w", newline="")  # noqa: SIM115 (closed by close())
        self._rows = csv.writer(self._file)
        self._rows.writerow(FIELDS)

    def write(self, a: Access, unit: str, tg: str, caller: str, planned: float) -> None:
        if self._file.closed:
            return  # (a press decided after the run's end)

        def ms(at: float | None) -> str:
            return "" if at is None else f"{(at - a.start) * 1000:.3f}"

        self._rows.writerow(  # (flushed: a worker killed later keeps what ended)
            [
                f"{a.sent - self.t0:.3f}",
                unit,
                tg,
                caller,
                a.outcome,
                a.cause,
                ms(a.answered),
                ms(a.granted),
                f"{max(0.0, a.sent - planned) * 1000:.3f}",
            ]
        )
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def merge(parts: list[Path], into: Path) -> Counter[str]:
    """Merge the workers' access traces into one file ordered by the time of each
    request, remove them, and return how many requests had each outcome."""
    rows = _merge(parts, into, FIELDS)
    return Counter(r[FIELDS.index("outcome")] for r in rows)


# the message trace (every control and floor message a handset sent or received, voice
# left out) and the floor state trace (each change of a handset's floor participant)
MESSAGE_FIELDS = ("t_s", "unit", "dir", "type", "tg", "ref", "detail")
FLOOR_FIELDS = ("t_s", "unit", "tg", "from", "to")
# what a message's detail column shows, when it has one of these fields
_DETAIL = ("cause", "state", "kind", "pos", "op", "talker", "to", "code")


class RowTrace:
    """A CSV file of rows in time order, buffered (written out as the file's buffer
    fills, and at close): for the message and floor state traces, many rows a second."""

    def __init__(self, path: Path, fields: tuple[str, ...], t0: float) -> None:
        self.t0 = t0
        self._file: IO[str] = open(path, "w", newline="")  # noqa: SIM115 (closed by close())
        self._rows = csv.writer(self._file)
        self._rows.writerow(fields)

    def row(self, at: float, *cells: object) -> None:
        if not self._file.closed:
            self._rows.writerow([f"{at - self.t0:.6f}", *cells])

    def message(self, at: float, unit: str, direction: str, topic: str, msg: object) -> None:
        tg = getattr(msg, "tg", None) or _group_of(topic)
        ref = getattr(msg, "ref", None)
        detail = ";".join(
            f"{k}={v}" for k in _DETAIL if (v := getattr(msg, k, None)) not in (None, "")
        )
        self.row(
            at, unit, direction, getattr(msg, "T", "?"), tg, "" if ref is None else ref, detail
        )

    def close(self) -> None:
        self._file.close()


def _group_of(topic: str) -> str:
    """The talkgroup a topic names (`.../tg/{tg}/...`), or ""."""
    parts = topic.split("/")
    return parts[parts.index("tg") + 1] if "tg" in parts[:-1] else ""


def merge_rows(parts: list[Path], into: Path, fields: tuple[str, ...]) -> int:
    """Merge the workers' row traces (of `fields`) into one file ordered by time, remove
    them, and return how many rows there are."""
    return len(_merge(parts, into, fields))


def _merge(parts: list[Path], into: Path, fields: tuple[str, ...]) -> list[list[str]]:
    """The rows of the workers' files (their header left out, and any row of another
    length: a stub), in time order, written to `into` under `fields`; the parts removed."""
    rows: list[list[str]] = []
    for part in parts:
        with open(part, newline="") as f:
            rows += [r for r in list(csv.reader(f))[1:] if len(r) == len(fields)]
        part.unlink()
    rows.sort(key=lambda r: float(r[0]))
    with open(into, "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(fields)
        writer.writerows(rows)
    return rows
