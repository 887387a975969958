"""Where incidents happen: emergencies and imminent-peril calls counted by map cell.

The server sees every emergency alert (often with a position), every call raised to
emergency or imminent peril, and every position report; this keeps the last position of
each unit and counts incidents by a coarse grid cell, for `esn_incidents_total{cell,
kind}`: Grafana shows where they concentrated over the last minutes from the counters'
increase. Bounded: at most MAX_CELLS cells (the rest count as `other`), positions of at
most MAX_UNITS units (the least recently heard go first), and one incident per unit and
kind per REPEAT_S, so a unit raising its call in place, or an alert followed by its
emergency call, is one incident.
"""

from __future__ import annotations

import math
from collections import OrderedDict

CELL_DEG = 0.05  # about 5.5 km north-south, 3.5 km east-west in the UK
MAX_CELLS = 256
MAX_UNITS = 100_000
REPEAT_S = 60.0


def cell_of(lat: float, lon: float) -> str:
    """The grid cell of a position, named by its south-west corner: `51.50,-0.15`."""
    return (
        f"{math.floor(lat / CELL_DEG) * CELL_DEG:.2f},{math.floor(lon / CELL_DEG) * CELL_DEG:.2f}"
    )


class Hotspots:
    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], int] = {}  # (cell, kind) -> incidents
        self._cells: set[str] = set()
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
        key = (unit, kind)
        last = self._last.get(key)
        self._last[key] = now
        self._last.move_to_end(key)
        if len(self._last) > MAX_UNITS:
            self._last.popitem(last=False)
        if last is not None and now - last < REPEAT_S:
            return
        if lat is not None and lon is not None:
            self.located(unit, lat, lon)
        where = self._where.get(unit)
        cell = "unknown" if where is None else cell_of(*where)
        if cell not in self._cells and cell != "unknown":
            if len(self._cells) >= MAX_CELLS:
                cell = "other"
            else:
                self._cells.add(cell)
        self.counts[(cell, kind)] = self.counts.get((cell, kind), 0) + 1
