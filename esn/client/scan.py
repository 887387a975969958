"""Scan lists: which of its groups a handset's user hears, without I/O.

A handset affiliated to several groups (TETRA scanning, MCPTT group priorities) has one
selected group, which it talks on, and scanned groups, each with a priority. It hears one
call at a time: the highest-ranked group with a talker. A talker in a group that
outranks the one heard interrupts it; when the heard talker stops, the handset moves to
the best talker still going on, if any (a scan switch, entering that call late). An
emergency call outranks every priority, and a group the handset is in but that is not on
its list (a dispatcher's temporary group, an all-call) outranks every scanned one; among
equals the selected group wins, and then the talker already heard is kept.

Fed with each group's floor news in order (`taken` with the call's kind, or `idle`, and
the `seq` that orders them: older news is ignored); `heard` is the group whose voice is
played, or None.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from esn.protocol import messages as m

SELECTED_PRIORITY = 10  # the selected group's priority, unless given
UNLISTED_PRIORITY = 1000  # a group joined that is not on the list: above every scanned one


@dataclass
class ScanList:
    selected: str
    priorities: dict[str, int] = field(default_factory=dict)  # scanned group -> priority
    calls: dict[str, m.Kind] = field(default_factory=dict)  # groups with a talker: its kind
    heard: str | None = None
    seqs: dict[str, int] = field(default_factory=dict)  # group -> the last news's seq

    def __post_init__(self) -> None:
        self.priorities = {self.selected: SELECTED_PRIORITY, **self.priorities}

    @property
    def groups(self) -> list[str]:
        """Every group on the list, the selected one first."""
        return [self.selected, *sorted(g for g in self.priorities if g != self.selected)]

    def rank(self, tg: str) -> tuple[bool, int, bool]:
        priority = self.priorities.get(tg, UNLISTED_PRIORITY)
        return (self.calls.get(tg) == "emergency", priority, tg == self.selected)

    def floor(self, tg: str, kind: m.Kind | None, seq: int) -> str | None:
        """A group's floor news: taken at `kind`, or idle (None), as of `seq`. Returns the
        group now heard if that changed to another talker's group (a switch), else None."""
        if seq < self.seqs.get(tg, -1):
            return None  # older than what we know (a state overtaken by an idle)
        self.seqs[tg] = seq
        if kind is None:
            self.calls.pop(tg, None)
        else:
            self.calls[tg] = kind
        return self._choose()

    def forget(self, tg: str) -> str | None:
        """The handset left a group: none of its calls is heard any more."""
        self.seqs.pop(tg, None)
        self.calls.pop(tg, None)
        return self._choose()

    def _choose(self) -> str | None:
        before = self.heard
        best = max(sorted(self.calls), key=self.rank, default=None)
        kept = before in self.calls and best is not None and self.rank(best) <= self.rank(before)
        if not kept:
            self.heard = best
        return self.heard if self.heard not in (before, None) else None
