"""The wire codec: msgpack bytes <-> `esn.protocol.messages` objects.

`decode` is the only door for peer input. Whatever bytes arrive, it returns a valid
message or raises `ProtocolError` (cause, detail, ref) — never any other exception —
so a malformed payload can only ever earn its sender an `error` reply.
"""

from __future__ import annotations

import math
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, fields
from typing import Any

import msgpack

from esn.protocol import messages as m
from esn.protocol.ids import is_id

MAX_PAYLOAD = 64 * 1024
MAX_LIST = 256
MAX_TEXT_BYTES = 1000
MAX_MEDIA_BYTES = 8 * 1024
_ID_FIELDS = {"tg", "unit", "talker", "sender", "srv", "caller", "preempted", "by"}
_WIRE_NAME = {"sender": "from"}  # `from` is a Python keyword


class ProtocolError(Exception):
    """The peer broke the protocol: answer with `error`/`deny`, count it, carry on."""

    def __init__(self, cause: str, detail: str, ref: int | None = None) -> None:
        super().__init__(f"{cause}: {detail}")
        self.cause = cause
        self.detail = detail
        self.ref = ref


# --- field checks: (name, value) -> normalised value, or raise ValueError -------------

_RANGES = {
    "lat": (-90.0, 90.0),
    "lon": (-180.0, 180.0),
    "acc": (0.0, 1e7),
    "hdg": (0.0, 360.0),
    "spd": (0.0, 1e4),
    "prio": (0, 255),
    "seq": (0, 2**63 - 1),
    "pos": (1, 2**31),
    "max_ms": (0, 2**31),
    "queue": (0, 2**31),
    "code": (0, 65535),
    "seconds": (1, 600),
}


def _check_str(name: str, v: object) -> str:
    if not isinstance(v, str):
        raise ValueError("must be a string")
    if name in _ID_FIELDS and not is_id(v):
        raise ValueError("must be an id [A-Za-z0-9_.-]{1,64}")
    if name == "to":
        scope, _, ident = v.partition(":")
        if scope not in ("unit", "tg") or not is_id(ident):
            raise ValueError("must be 'unit:{id}' or 'tg:{id}'")
    if name == "text":
        if len(v.encode()) > MAX_TEXT_BYTES:
            raise _TooLarge(f"text is over {MAX_TEXT_BYTES} bytes")
    elif len(v) > 256:
        raise ValueError("is too long")
    return v


def _check_int(name: str, v: object) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise ValueError("must be an integer")
    lo, hi = _RANGES.get(name, (-(2**63), 2**64 - 1))
    if not lo <= v <= hi:
        raise ValueError(f"must be within {lo}..{hi}")
    return v


def _check_float(name: str, v: object) -> float:
    if not isinstance(v, int | float) or isinstance(v, bool):
        raise ValueError("must be a number")
    f = float(v)
    lo, hi = _RANGES.get(name, (-math.inf, math.inf))
    if not (math.isfinite(f) and lo <= f <= hi):
        raise ValueError(f"must be a finite number within {lo}..{hi}")
    return f


def _check_bytes(name: str, v: object) -> bytes:
    if not isinstance(v, bytes):
        raise ValueError("must be bytes (msgpack bin)")
    if len(v) > MAX_MEDIA_BYTES:
        raise _TooLarge(f"{name} is over {MAX_MEDIA_BYTES} bytes")
    return v


def _check_bool(name: str, v: object) -> bool:
    if not isinstance(v, bool):
        raise ValueError("must be a boolean")
    return v


def _check_ids(name: str, v: object) -> list[str]:
    if not isinstance(v, list) or len(v) > MAX_LIST:
        raise ValueError(f"must be a list of at most {MAX_LIST} ids")
    if not all(is_id(x) for x in v):
        raise ValueError("must hold only ids [A-Za-z0-9_.-]{1,64}")
    return v


def _check_ints(name: str, v: object) -> list[int]:
    if not isinstance(v, list) or len(v) > MAX_LIST:
        raise ValueError(f"must be a list of at most {MAX_LIST} integers")
    return [_check_int(name, x) for x in v]


def _check_maps(name: str, v: object) -> list[dict[str, Any]]:
    if not isinstance(v, list) or not all(isinstance(x, dict) for x in v):
        raise ValueError("must be a list of maps")
    return v


class _TooLarge(ValueError):
    pass


_CHECKS: dict[str, Callable[[str, object], Any]] = {
    "str": _check_str,
    "int": _check_int,
    "float": _check_float,
    "bytes": _check_bytes,
    "bool": _check_bool,
    "list[str]": _check_ids,
    "list[int]": _check_ints,
    "list[dict[str, Any]]": _check_maps,
}

# Per message type: (attribute, wire key, check, required), built once from the hints.
_Spec = tuple[tuple[str, str, Callable[[str, object], Any], bool], ...]


def _choice(choices: tuple[str, ...]) -> Callable[[str, object], str]:
    """The check of a `Literal` field: one of its strings."""

    def check(name: str, v: object) -> str:
        if v not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return str(v)

    return check


def _spec(cls: type[m.Message]) -> _Spec:
    hints = typing.get_type_hints(cls)
    out = []
    for f in fields(cls):
        if f.name in ("ref", "ts"):
            continue
        hint = hints[f.name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        base = args[0] if typing.get_origin(hint) in (types.UnionType, typing.Union) else hint
        if typing.get_origin(base) is typing.Literal:
            check = _choice(typing.get_args(base))
        else:
            key = base.__name__ if isinstance(base, type) else str(base).replace("typing.", "")
            check = _CHECKS[key]
        required = f.default is MISSING and f.default_factory is MISSING
        out.append((f.name, _WIRE_NAME.get(f.name, f.name), check, required))
    return tuple(out)


_SPECS: dict[str, tuple[type[m.Message], _Spec]] = {c.T: (c, _spec(c)) for c in m.ALL}
_FIELDS: dict[type[m.Message], tuple[tuple[str, str], ...]] = {
    c: tuple((f.name, _WIRE_NAME.get(f.name, f.name)) for f in fields(c)) for c in m.ALL
}


def to_dict(msg: m.Message) -> dict[str, Any]:
    out: dict[str, Any] = {"t": msg.T}
    for attr, key in _FIELDS[type(msg)]:
        value = getattr(msg, attr)
        if value is not None:
            out[key] = value
    return out


def encode(msg: m.Message) -> bytes:
    return msgpack.packb(to_dict(msg), use_bin_type=True)  # type: ignore[no-any-return]


def unpack(payload: bytes) -> dict[str, Any]:
    """msgpack bytes -> a map with string keys, or ProtocolError(malformed/too_large)."""
    if len(payload) > MAX_PAYLOAD:
        raise ProtocolError("too_large", f"payload is {len(payload)} bytes, limit {MAX_PAYLOAD}")
    try:
        obj = msgpack.unpackb(payload, raw=False)
    except Exception as exc:  # any byte string: msgpack raises several types
        raise ProtocolError("malformed", f"not msgpack: {type(exc).__name__}") from None
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise ProtocolError("malformed", "payload must be a msgpack map with string keys")
    return obj


def from_dict(obj: dict[str, Any]) -> m.Message:
    ref = obj.get("ref")
    ref = ref if isinstance(ref, int) and not isinstance(ref, bool) else None
    t = obj.get("t")
    if not isinstance(t, str):
        raise ProtocolError("malformed", "missing message type 't'", ref)
    entry = _SPECS.get(t)
    if entry is None:
        raise ProtocolError("unknown_type", f"unknown message type {t[:40]!r}", ref)
    cls, spec = entry
    kwargs: dict[str, Any] = {}
    for name in ("ref", "ts"):
        if name in obj:
            try:
                kwargs[name] = _check_int(name, obj[name])
            except ValueError as exc:
                raise ProtocolError("invalid_field", f"{t}.{name} {exc}", ref) from None
    for attr, key, check, required in spec:
        if key not in obj:
            if required:
                raise ProtocolError("invalid_field", f"{t}.{key} is required", ref)
            continue
        try:
            kwargs[attr] = check(key, obj[key])
        except _TooLarge as exc:
            raise ProtocolError("too_large", str(exc), ref) from None
        except ValueError as exc:
            raise ProtocolError("invalid_field", f"{t}.{key} {exc}", ref) from None
    return cls(**kwargs)


def decode(payload: bytes) -> m.Message:
    return from_dict(unpack(payload))


def media_from_dict(obj: dict[str, Any]) -> m.Media:
    """`from_dict` for the voice hot path: the same checks, written out for speed."""
    if obj.get("t") != "media":
        raise ProtocolError("unknown_type", "a media topic carries only media")
    call, seq, data, ts = obj.get("call"), obj.get("seq"), obj.get("data"), obj.get("ts")
    if type(call) is not str or len(call) > 256:
        raise ProtocolError("invalid_field", "media.call must be a string")
    if type(seq) is not int or seq < 0:
        raise ProtocolError("invalid_field", "media.seq must be an integer >= 0")
    if type(data) is not bytes:
        raise ProtocolError("invalid_field", "media.data must be bytes (msgpack bin)")
    if len(data) > MAX_MEDIA_BYTES:
        raise ProtocolError("too_large", f"media.data is over {MAX_MEDIA_BYTES} bytes")
    if ts is not None and type(ts) is not int:
        raise ProtocolError("invalid_field", "media.ts must be an integer")
    talker = obj.get("talker")
    if talker is not None and not is_id(talker):
        raise ProtocolError("invalid_field", "media.talker must be an id")
    return m.Media(call=call, seq=seq, data=data, ts=ts, talker=talker)
