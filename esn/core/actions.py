"""What the core asks the I/O shell to do. The shell performs these and nothing else."""

from __future__ import annotations

from dataclasses import dataclass

from esn.protocol import messages as m


@dataclass(frozen=True, slots=True)
class ToUnit:
    """Send `msg` on the unit's down topic."""

    unit: str
    msg: m.Message


@dataclass(frozen=True, slots=True)
class ToGroup:
    """Send `msg` on one of the group's down topics: `floor` or `event`."""

    tg: str
    channel: str
    msg: m.Message


@dataclass(frozen=True, slots=True)
class StateChanged:
    """Rewrite the group's retained state (rendered once per batch of actions)."""

    tg: str


@dataclass(frozen=True, slots=True)
class StateCleared:
    """The group is gone: clear its retained state."""

    tg: str


@dataclass(frozen=True, slots=True)
class LocationAccepted:
    """Republish the unit's accepted position, retained."""

    unit: str
    msg: m.Location


@dataclass(frozen=True, slots=True)
class StatusChanged:
    """Publish the unit's pre-coded status (`Network.status_msg`) retained, or clear it."""

    unit: str


@dataclass(frozen=True, slots=True)
class Audit:
    """A use of an authority the fleet grants (listening in, remote talk): to be recorded."""

    what: str  # the message type
    text: str


Action = ToUnit | ToGroup | StateChanged | StateCleared | LocationAccepted | StatusChanged | Audit
