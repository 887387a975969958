"""Unit and talkgroup ids: `[A-Za-z0-9_.-]{1,64}`, the one syntax every layer checks."""

from __future__ import annotations

import re
from functools import lru_cache

ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def is_id(value: object) -> bool:
    return isinstance(value, str) and ID_RE.fullmatch(value) is not None


PARTITIONS = 32  # a cluster's share unit: a few dozen, to spread over instances, cheap to lease


@lru_cache(maxsize=65536)  # (asked for every voice packet a cluster relays)
def partition_of(ident: str, partitions: int = PARTITIONS) -> int:
    """The partition of a talkgroup or unit id, the same everywhere and for ever: the
    32-bit FNV-1a hash of the id modulo `partitions`, which is what a NATS subject mapping
    `{{partition(32,N)}}` computes from the id's token. NATS writes each `.` of an MQTT
    topic as `//` in the subject, so the id is hashed that way (docs/scaling.md)."""
    h = 0x811C9DC5
    for byte in ident.replace(".", "//").encode():
        h = ((h ^ byte) * 0x01000193) & 0xFFFFFFFF
    return h % partitions


def call_owner(call: str) -> str | None:
    """The unit a private call's id names (docs/protocol.md, 11.14: `CALLEE~token`), whose
    partition keeps the call; None for any other id (a group call's, listening in)."""
    head, sep, _ = call.partition("~")
    return head if sep and is_id(head) else None
