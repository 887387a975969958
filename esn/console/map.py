"""Unit positions drawn with braille dots: each character cell holds 2 x 4 dots.

The view fits every known position, then zoom and pan move it. A cell holding an
emergency is red, the selected unit's cell is reversed, so both stand out even where
units crowd. Incident hotspots, when given, shade the character cells they fall in by
how many there were (a cell with no unit in it shows the count). The selected unit and
units in emergency carry their ids, and a scale bar gives the distances.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from rich.text import Text

# braille dot bits by (column, row) inside a cell
_DOTS = ((0x01, 0x02, 0x04, 0x40), (0x08, 0x10, 0x20, 0x80))


@dataclass(frozen=True)
class Point:
    unit: str
    lat: float
    lon: float
    emergency: bool = False


@dataclass
class View:
    zoom: float = 1.0  # 2.0 shows half the area
    pan_x: float = 0.0  # in fractions of the visible width
    pan_y: float = 0.0

    def zoom_by(self, factor: float) -> None:
        self.zoom = min(256.0, max(0.25, self.zoom * factor))

    def pan(self, dx: float, dy: float) -> None:
        self.pan_x += dx / self.zoom
        self.pan_y += dy / self.zoom


def bounds(points: list[Point], view: View) -> tuple[float, float, float, float]:
    """(lat_min, lat_max, lon_min, lon_max) of what the view shows."""
    lats = [p.lat for p in points]
    lons = [p.lon for p in points]
    lat_c, lon_c = (min(lats) + max(lats)) / 2, (min(lons) + max(lons)) / 2
    lat_h = max((max(lats) - min(lats)) / 2 * 1.1, 0.002) / view.zoom
    lon_h = max((max(lons) - min(lons)) / 2 * 1.1, 0.002) / view.zoom
    lat_c -= view.pan_y * 2 * lat_h * view.zoom
    lon_c += view.pan_x * 2 * lon_h * view.zoom
    return lat_c - lat_h, lat_c + lat_h, lon_c - lon_h, lon_c + lon_h


# background of a hotspot cell by its count: 1, 2, 3 or more
_HEAT = ("on grey30", "on dark_orange3", "on red3")


def render(
    points: list[Point],
    width: int,
    height: int,
    view: View,
    selected: str | None = None,
    heat: Sequence[tuple[float, float]] = (),
    scale: bool = False,
) -> Text:
    """The map as text. With `scale`, the bottom line is a scale bar; the selected unit and
    every unit in emergency are labelled with their ids where the cells beside them are free."""
    width, height = max(width, 4), max(height, 2)
    if not points:
        return Text("no positions yet", style="dim")
    lat0, lat1, lon0, lon1 = bounds(points, view)
    rows = height - 1 if scale and height > 2 else height  # (the last one for the scale)
    hot: dict[tuple[int, int], int] = {}
    for lat, lon in heat:
        if lat0 <= lat <= lat1 and lon0 <= lon <= lon1:
            x = min(width - 1, int((lon - lon0) / (lon1 - lon0) * width))
            y = min(rows - 1, int((lat1 - lat) / (lat1 - lat0) * rows))
            hot[(x, y)] = hot.get((x, y), 0) + 1
    cells: dict[tuple[int, int], int] = {}
    style: dict[tuple[int, int], str] = {}
    labels: list[tuple[tuple[int, int], str, str]] = []
    for p in points:
        if not (lat0 <= p.lat <= lat1 and lon0 <= p.lon <= lon1):
            continue
        x = min(width * 2 - 1, int((p.lon - lon0) / (lon1 - lon0) * width * 2))
        y = min(rows * 4 - 1, int((lat1 - p.lat) / (lat1 - lat0) * rows * 4))
        cell = (x // 2, y // 4)
        cells[cell] = cells.get(cell, 0) | _DOTS[x % 2][y % 4]
        if p.unit == selected:
            style[cell] = "reverse bold yellow"
            labels.append((cell, p.unit, "bold yellow"))
        elif p.emergency:
            if style.get(cell) != "reverse bold yellow":
                style[cell] = "bold red"
            labels.append((cell, p.unit, "bold red"))
    grid: dict[tuple[int, int], tuple[str, str]] = {}
    for row in range(rows):
        for col in range(width):
            bits = cells.get((col, row))
            n = hot.get((col, row), 0)
            shade = f" {_HEAT[min(n, 3) - 1]}" if n else ""
            if bits is None:
                grid[(col, row)] = (str(n) if 0 < n < 10 else "+" if n else " ", f"bold{shade}")
            else:
                grid[(col, row)] = (chr(0x2800 + bits), style.get((col, row), "green") + shade)
    for (col, row), unit, colour in sorted(labels, key=lambda item: item[2] != "bold yellow"):
        n = len(unit) + 1  # (a blank, then the id: right of the unit, else left of it)
        for spot in (
            [(c, row) for c in range(col + 1, col + 1 + n)],
            [(c, row) for c in range(col - n, col)],
        ):
            free = spot[0][0] >= 0 and spot[-1][0] < width
            if free and all(c not in cells and grid[c][0] == " " for c in spot):
                text_cells = spot[1:] if spot[0][0] > col else spot[:-1]
                for c, ch in zip(text_cells, unit, strict=True):
                    grid[c] = (ch, colour)
                cells.update({c: 0 for c in spot})  # (no label over another)
                break
    text = Text()
    for row in range(rows):
        for col in range(width):
            ch, st = grid[(col, row)]
            text.append(ch, style=st)
        if row < height - 1:
            text.append("\n")
    if rows < height:
        text.append(scale_bar(lat0, lat1, lon0, lon1, width), style="dim")
    return text


def scale_bar(lat0: float, lat1: float, lon0: float, lon1: float, width: int) -> str:
    """A bar of a round distance, at most a third of the map's width: "├────┤ 500 m"."""
    km_across = (lon1 - lon0) * 111.32 * math.cos(math.radians((lat0 + lat1) / 2))
    per_cell = km_across / width
    if not (math.isfinite(per_cell) and per_cell > 1e-9):
        return ""  # (at a pole, or panned past one: no distance to show)
    fits = [d for d in _ROUND_KM if d / per_cell <= width / 3] or [_ROUND_KM[0]]
    d = fits[-1]
    cells = max(2, min(width - 8, round(d / per_cell)))
    label = f"{d * 1000:.0f} m" if d < 1 else f"{d:g} km"
    return ("├" + "─" * (cells - 2) + "┤ " + label)[:width]


_ROUND_KM = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)
