"""Where incidents happen: emergencies and imminent-peril calls by map cell, lately.

The server sees every emergency alert (often with a position), every call raised to
emergency or imminent peril, and every position report; this keeps the last position of
each unit and the incidents of the last WINDOW_S, and counts them by a coarse grid cell
for `esn_incidents_recent{cell,kind}`, the figure Grafana's hotspot panel shows as it is.
The console draws the same from what it sees, with the same window and repeat rule.

Bounded: positions of at most MAX_UNITS units (the least recently heard go first), at
most MAX_RECENT incidents kept, at most MAX_CELLS cells exported (the busiest; the rest
summed as `other`), and one incident per unit and kind per REPEAT_S, so a unit raising
its call in place, or an alert followed by its emergency call, is one incident.
"""

from __future__ import annotations

import math
from collections import Counter, OrderedDict, deque

CELLS_PER_DEGREE = 20  # 0.05°: about 5.5 km north-south, 3.5 km east-west in the UK
WINDOW_S = 15 * 60
REPEAT_S = 60.0
MAX_CELLS = 256
MAX_UNITS = 100_000
MAX_RECENT = 100_000


def cell_of(lat: float, lon: float) -> str:
    """The grid cell of a position, named by its south-west corner: `51.50,-0.15`."""
    n = CELLS_PER_DEGREE
    return f"{math.floor(lat * n) / n:.2f},{math.floor(lon * n) / n:.2f}"


class Hotspots:
    def __init__(self) -> None:
        self.totals: dict[str, int] = {}  # kind -> incidents since start
        self._recent: deque[tuple[float, str, str]] = deque(maxlen=MAX_RECENT)
        self._where: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._last: OrderedDict[tuple[str, str], float] = OrderedDict()

    def located(self, unit: str, lat: float, lon: float) -> None:
        self._where[unit] = (lat, lon)
        self._where.move_to_end(unit)
        if len(self._where) > MAX_UNITS:
            self._where.popitem(last=False)

    def incident(
        self, unit: str, kind: str, now: float, lat: float | None = None, lon: float | None = None
    ) -> None:
        """`kind` (emergency, imminent) raised by `unit` at `now`, where it says or was."""
        if lat is not None and lon is not None:
            self.located(unit, lat, lon)
        key = (unit, kind)
        last = self._last.get(key)
        if last is not None and now - last < REPEAT_S:
            return
        self._last[key] = now
        self._last.move_to_end(key)
        if len(self._last) > MAX_UNITS:
            self._last.popitem(last=False)
        where = self._where.get(unit)
        self._recent.append((now, "unknown" if where is None else cell_of(*where), kind))
        self.totals[kind] = self.totals.get(kind, 0) + 1

    def recent(self, now: float) -> dict[tuple[str, str], int]:
        """(cell, kind) -> incidents of the last WINDOW_S, the busiest MAX_CELLS cells."""
        while self._recent and now - self._recent[0][0] > WINDOW_S:
            self._recent.popleft()
        counts = Counter((cell, kind) for _, cell, kind in self._recent)
        by_cell = Counter[str]()
        for (cell, _), n in counts.items():
            by_cell[cell] += n
        shown = {cell for cell, _ in by_cell.most_common(MAX_CELLS - 1)}
        out: dict[tuple[str, str], int] = {}
        for (cell, kind), n in counts.items():
            key = (cell if cell in shown else "other", kind)
            out[key] = out.get(key, 0) + n
        return out
