"""MQTT topic names of docs/protocol.md: build them, and parse what arrives at the server."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from esn.protocol.ids import is_id, partition_of


@dataclass(frozen=True, slots=True)
class Topics:
    prefix: str = "esn"

    # unit-scoped
    def unit_up(self, unit: str) -> str:
        return f"{self.prefix}/unit/{unit}/up"

    def unit_down(self, unit: str) -> str:
        return f"{self.prefix}/unit/{unit}/down"

    def presence(self, unit: str) -> str:
        return f"{self.prefix}/unit/{unit}/presence"

    def location(self, unit: str) -> str:
        return f"{self.prefix}/loc/{unit}"

    def unit_media_up(self, unit: str) -> str:
        """A unit's voice outside any group: what it sends while listened in on (11.13)."""
        return f"{self.prefix}/unit/{unit}/up/media"

    def unit_media_down(self, unit: str) -> str:
        """Voice for one unit outside any group: what it listens in on."""
        return f"{self.prefix}/unit/{unit}/down/media"

    def unit_status(self, unit: str) -> str:
        """Where the server keeps a unit's last pre-coded status, retained."""
        return f"{self.prefix}/unit/{unit}/status"

    # group-scoped
    def floor_up(self, tg: str, unit: str) -> str:
        return f"{self.prefix}/tg/{tg}/up/{unit}/floor"

    def media_up(self, tg: str, unit: str) -> str:
        return f"{self.prefix}/tg/{tg}/up/{unit}/media"

    def floor_down(self, tg: str) -> str:
        return f"{self.prefix}/tg/{tg}/down/floor"

    def media_down(self, tg: str) -> str:
        return f"{self.prefix}/tg/{tg}/down/media"

    def event_down(self, tg: str) -> str:
        return f"{self.prefix}/tg/{tg}/down/event"

    def group_down_all(self, tg: str) -> str:
        return f"{self.prefix}/tg/{tg}/down/#"

    def state(self, tg: str) -> str:
        return f"{self.prefix}/tg/{tg}/state"

    def status(self, server_id: str) -> str:
        return f"{self.prefix}/server/{server_id}/status"

    def sync(self, server_id: str) -> str:
        """The server's own echo topic: a marker sent to itself to know a backlog is read."""
        return f"{self.prefix}/server/{server_id}/sync"

    def state_group(self, topic: str) -> str | None:
        """The talkgroup of a retained state topic, else None."""
        parts = topic.split("/")
        head = self.prefix.split("/")
        n = len(head)
        if (
            len(parts) == n + 3
            and parts[:n] == head
            and parts[n] == "tg"
            and parts[n + 2] == "state"
            and is_id(parts[n + 1])
        ):
            return parts[n + 1]
        return None

    # between the instances of a cluster (docs/scaling.md)
    def record(self, partition: int, key: str) -> str:
        """Where a record of the durable state (`group/TG`, `unit/ID`, `sds/ID`) is kept,
        retained, by the instance serving its partition."""
        return f"{self.prefix}/cluster/rec/{partition}/{key}"

    def records(self, partition: int) -> str:
        return f"{self.prefix}/cluster/rec/{partition}/#"

    def unit_records(self) -> str:
        return f"{self.prefix}/cluster/rec/+/unit/+"

    def record_key(self, topic: str) -> tuple[int, str] | None:
        """(partition, key) of a record topic, else None."""
        head = f"{self.prefix}/cluster/rec/"
        if not topic.startswith(head):
            return None
        parts = topic[len(head) :].split("/")
        if len(parts) != 3 or not _number(parts[0]) or not is_id(parts[2]):
            return None
        return int(parts[0]), f"{parts[1]}/{parts[2]}"

    def forward(self, partition: int, unit: str) -> str:
        """A unit's message handed to the instance serving `partition` (the group it
        names, or the unit it is for)."""
        return f"{self.prefix}/cluster/fwd/{partition}/{unit}"

    def forwards(self, partition: int) -> str:
        return f"{self.prefix}/cluster/fwd/{partition}/+"

    def floors_up(self) -> str:
        return f"{self.prefix}/tg/+/up/+/floor"

    def parted(self, partition: int) -> str:
        """Where a NATS cluster delivers the uplinks and floor requests of one partition:
        its subject mapping (docs/scaling.md) moves `unit/U/up` to `part/P/unit/U/up` and
        `tg/T/up/U/floor` to `part/P/tg/T/up/U/floor`, P the partition of U or T."""
        return f"{self.prefix}/part/{partition}/#"

    def probe(self, server_id: str) -> tuple[str, str]:
        """An uplink topic no unit has (`~` is in no id), and where the cluster's subject
        mapping delivers it: how an instance finds out whether the mapping is there."""
        unit = f"~{server_id}"
        return self.unit_up(unit), f"{self.prefix}/part/+/unit/{unit}/up"

    def voice_up(self, tg: str) -> str:
        return f"{self.prefix}/tg/{tg}/up/+/media"

    # what the server subscribes to
    def server_subscriptions(self) -> list[str]:
        p = self.prefix
        return [
            f"{p}/unit/+/up",
            f"{p}/unit/+/presence",
            f"{p}/tg/+/up/+/+",
            f"{p}/unit/+/up/media",
        ]

    def parted_uplinks(self) -> tuple[str, str]:
        """Every partition's uplinks and floor requests as a NATS cluster's subject mapping
        delivers them (see `parted`): a single server on such a cluster hears them here."""
        p = self.prefix
        return f"{p}/part/+/unit/+/up", f"{p}/part/+/tg/+/up/+/floor"

    def parse_inbound(self, topic: str) -> Inbound | None:
        """Classify a topic the server receives; None for anything not of the protocol."""
        return _parse_inbound(self.prefix, topic)


@lru_cache(maxsize=65536)  # the same few topics arrive again with every voice packet
def _parse_inbound(prefix: str, topic: str) -> Inbound | None:
    head = prefix + "/"
    if not topic.startswith(head):
        return None
    parts = topic[len(head) :].split("/")
    part = None
    if (
        len(parts) in (5, 7)
        and parts[0] == "part"
        and _number(parts[1])
        and parts[1] == str(int(parts[1]))
    ):
        # moved here by a NATS subject mapping: an uplink or a floor request, by partition
        part, parts = int(parts[1]), parts[2:]
        if parts[-1] not in ("up", "floor"):
            return None
    if len(parts) == 3 and parts[0] == "unit" and parts[2] in ("up", "presence"):
        kind, unit, tg = parts[2], parts[1], None
    elif len(parts) == 4 and parts[0] == "unit" and parts[2:] == ["up", "media"] and part is None:
        kind, unit, tg = "unit_media", parts[1], None
    elif len(parts) == 4 and parts[:2] == ["cluster", "fwd"] and _number(parts[2]):
        kind, unit, tg = "fwd", parts[3], parts[2]  # (`tg` carries the partition)
    elif (
        len(parts) == 5 and parts[0] == "tg" and parts[2] == "up" and parts[4] in ("floor", "media")
    ):
        kind, unit, tg = parts[4], parts[3], parts[1]
    else:
        return None
    if not is_id(unit) or (tg is not None and not is_id(tg)):
        return None
    if part is not None and part != partition_of(tg or unit):  # (which is < PARTITIONS)
        return None
    return Inbound(kind, unit, tg)


def _number(text: str) -> bool:
    return text.isascii() and text.isdecimal() and len(text) <= 4


@dataclass(frozen=True, slots=True)
class Inbound:
    # "up", "presence", "floor", "media", "unit_media" (listened in on), or "fwd" (between
    # instances)
    kind: str
    unit: str
    tg: str | None
