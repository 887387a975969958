"""Durable state: what units were told is in effect, kept across server restarts.

The core keeps its durable state as records (`Network.record`): plain lists, dicts,
numbers, strings and protocol messages, one per key (`group/TG`, `unit/ID`, `sds/ID`).
A `Store` keeps them as bytes under their keys and hands them all back at start; `pack`
and `unpack` turn a record into bytes and back (msgpack, with each message in the
protocol's own encoding, so it is validated again when read). One interface, so the
same state can live in SQLite on one machine (`SqliteStore`) or in a replicated
key-value bucket in a cluster.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

import msgpack

from esn.protocol import codec
from esn.protocol import messages as m

_MESSAGE = 1  # msgpack extension type of a protocol message inside a record


class StoreError(Exception):
    """The store cannot be opened or written; the message is one line."""


class Store(ABC):
    """Records by key. `save` applies a batch (None deletes) atomically, and returns only
    once the batch is durable: the server answers a unit after it returns."""

    @abstractmethod
    def load(self) -> dict[str, bytes]:
        """Every record kept."""

    @abstractmethod
    def save(self, changes: Mapping[str, bytes | None]) -> None: ...

    @abstractmethod
    def close(self) -> None: ...


def pack(record: object) -> bytes:
    data: bytes = msgpack.packb(record, default=_pack_message, use_bin_type=True)
    return data


def unpack(data: bytes) -> Any:
    """A record read back; raises ValueError for anything malformed (a message included)."""
    try:
        return msgpack.unpackb(data, ext_hook=_unpack_message, raw=False, strict_map_key=True)
    except _BadMessage:
        raise
    except Exception as exc:  # msgpack raises several types for bad bytes
        raise ValueError(f"undecodable record ({type(exc).__name__} {exc})".strip()) from None


class _BadMessage(ValueError):
    """A record's message that the codec refuses."""


def _pack_message(obj: object) -> msgpack.ExtType:
    if isinstance(obj, m.Message):
        return msgpack.ExtType(_MESSAGE, codec.encode(obj))
    raise TypeError(f"cannot store a {type(obj).__name__}")


def _unpack_message(code: int, data: bytes) -> m.Message:
    if code != _MESSAGE:
        raise _BadMessage(f"unknown record extension {code}")
    try:
        return codec.decode(data)
    except codec.ProtocolError as exc:
        raise _BadMessage(f"a stored message is invalid: {exc.detail}") from None


def open_store(where: str) -> Store:
    """`:memory:` (kept for this process only) or the path of a SQLite file."""
    from esn.store.sqlite import SqliteStore

    return SqliteStore(where)


__all__ = ["Store", "StoreError", "open_store", "pack", "unpack"]
