"""Scan lists: which of its groups a handset's user hears, without I/O.

A handset affiliated to several groups (TETRA scanning, MCPTT group priorities) has one
selected group, which it talks on, and scanned groups, each with a priority. It hears one
call at a time: the highest-ranked group with a call going on. A call in a group that
outranks the one heard interrupts it; when the heard call ends, the handset moves to the
best call still going on, if any (a scan switch, entering that call late). An emergency
call outranks every priority; among equals the selected group wins, and then the call
already heard is kept.

Fed with each group's floor (`taken` with the call's kind, or `idle`); `heard` is the
group whose voice is played, or None.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from esn.protocol import messages as m

SELECTED_PRIORITY = 10  # the selected group's priority, unless given


@dataclass
class ScanList:
    selected: str
    priorities: dict[str, int] = field(default_factory=dict)  # scanned group -> priority
    calls: dict[str, m.Kind] = field(default_factory=dict)  # groups with a call: its kind
    heard: str | None = None

    def __post_init__(self) -> None:
        self.priorities.setdefault(self.selected, SELECTED_PRIORITY)

    @property
    def groups(self) -> list[str]:
        """Every group the handset listens to, the selected one first."""
        return [self.selected, *sorted(g for g in self.priorities if g != self.selected)]

    def rank(self, tg: str) -> tuple[bool, int, bool]:
        return (self.calls.get(tg) == "emergency", self.priorities[tg], tg == self.selected)

    def floor(self, tg: str, kind: m.Kind | None) -> str | None:
        """A group's floor changed: taken at `kind`, or idle (None). Returns the group now
        heard if that changed to another call (a scan switch), else None."""
        if tg not in self.priorities:
            return None
        if kind is None:
            self.calls.pop(tg, None)
        else:
            self.calls[tg] = kind
        before = self.heard
        best = max(sorted(self.calls), key=self.rank, default=None)
        kept = before in self.calls and best is not None and self.rank(best) <= self.rank(before)
        if not kept:
            self.heard = best
        return self.heard if self.heard not in (before, None) else None
