"""Every message of the wire protocol (docs/protocol.md) as a small frozen value object.

The type tag `t` is the class attribute `T`; `ref` and `ts` are optional on every
message. A field whose default is `None` is optional on the wire and left out when
unset. These classes carry data only; `esn.protocol.codec` turns them into bytes and back and
is where peer input is validated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, get_args

# Fields typed with these are checked on decode. Causes are typed where they are made (the
# server sends only these) but decoded as plain strings: a newer server may add causes,
# and a receiver must tolerate them (docs/protocol.md, "Versioning").
Kind = Literal["normal", "imminent", "emergency"]
FloorStatus = Literal["idle", "taken"]
DenyCause = Literal[
    "busy",
    "queue_full",
    "receive_only",
    "not_affiliated",
    "unknown_group",
    "rate_limited",
    "not_queued",
]
RevokeCause = Literal["preempted", "max_talk_time", "no_media", "dispatcher"]
ErrorCause = Literal[
    "malformed", "unknown_type", "invalid_field", "forbidden", "rate_limited", "too_large"
]

Answer = Literal["auto", "manual"]  # how the callee of a private call answers (11.14)

KINDS: tuple[Kind, ...] = get_args(Kind)


@dataclass(frozen=True, kw_only=True, slots=True)
class Message:
    T: ClassVar[str] = ""
    ref: int | None = None
    ts: int | None = None


# --- unit control, uplink -------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class Affiliate(Message):
    T: ClassVar[str] = "affiliate"
    groups: list[str]


@dataclass(frozen=True, kw_only=True, slots=True)
class Deaffiliate(Message):
    T: ClassVar[str] = "deaffiliate"
    groups: list[str]


@dataclass(frozen=True, kw_only=True, slots=True)
class Location(Message):
    """Uplink from a unit; the server republishes it with `unit` and `ts` set."""

    T: ClassVar[str] = "location"
    lat: float
    lon: float
    acc: float | None = None
    hdg: float | None = None
    spd: float | None = None
    unit: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class EmergencyAlert(Message):
    T: ClassVar[str] = "emergency_alert"
    tg: str
    lat: float | None = None
    lon: float | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class EmergencyCancel(Message):
    """Uplink from the originator; on a group's event topic it also names the unit."""

    T: ClassVar[str] = "emergency_cancel"
    tg: str
    unit: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class ImminentCancel(Message):
    """Addition to v1 (docs/protocol.md, 11.12): ends imminent peril in group `tg`: the
    sender's own, or every one from a dispatcher. On the group's event topic it names the
    unit that cancelled."""

    T: ClassVar[str] = "imminent_cancel"
    tg: str
    unit: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class Sds(Message):
    """Short data. Uplink carries `to` and `text`; delivery adds `from` (`sender`)."""

    T: ClassVar[str] = "sds"
    to: str
    text: str
    sender: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class UnitStatus(Message):
    """Addition to v1 (docs/protocol.md, 11.11): a pre-coded status, numbered in the fleet
    file. Uplink carries `code`; the server's retained copy on the unit's status topic
    adds `unit`, `text` (the fleet's words for the code) and `ts`."""

    T: ClassVar[str] = "unit_status"
    code: int
    unit: str | None = None
    text: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class EmergencyAck(Message):
    T: ClassVar[str] = "emergency_ack"
    unit: str
    tg: str


@dataclass(frozen=True, kw_only=True, slots=True)
class AmbientListen(Message):
    """Addition to v1 (docs/protocol.md, 11.13): open `unit`'s microphone to the sender,
    with no indication on the unit. For units the fleet authorises."""

    T: ClassVar[str] = "ambient_listen"
    unit: str


@dataclass(frozen=True, kw_only=True, slots=True)
class AmbientEnd(Message):
    """Addition to v1 (11.13): stop listening in on `unit`."""

    T: ClassVar[str] = "ambient_end"
    unit: str


@dataclass(frozen=True, kw_only=True, slots=True)
class RemoteTalk(Message):
    """Addition to v1 (11.13): uplink from an authorised unit, make `unit` talk in `tg` for
    `seconds`; the copy the target gets names who asked (`by`)."""

    T: ClassVar[str] = "remote_talk"
    tg: str
    seconds: int | None = None
    unit: str | None = None
    by: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class PrivateCall(Message):
    """Addition to v1 (11.14): call `unit` alone. `kind` normal (the default) or
    emergency; `floor` false for both talking at will (default: floor control, one at a
    time); `answer` auto to connect without the callee's answer (default: manual)."""

    T: ClassVar[str] = "private_call"
    unit: str
    kind: Kind | None = None
    floor: bool | None = None
    answer: Answer | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class PrivateAnswer(Message):
    """Addition to v1 (11.14): the callee takes (`accept`) or refuses a ringing call; a
    refusal may say `busy` (in another call) as its `cause`."""

    T: ClassVar[str] = "private_answer"
    call: str
    accept: bool
    cause: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class PrivateTalk(Message):
    """Addition to v1 (11.14): PTT down (`on`) or up in a call with floor control."""

    T: ClassVar[str] = "private_talk"
    call: str
    on: bool


@dataclass(frozen=True, kw_only=True, slots=True)
class PrivateEnd(Message):
    """Addition to v1 (11.14): either party hangs up."""

    T: ClassVar[str] = "private_end"
    call: str


@dataclass(frozen=True, kw_only=True, slots=True)
class ForceRelease(Message):
    T: ClassVar[str] = "force_release"
    tg: str


@dataclass(frozen=True, kw_only=True, slots=True)
class Regroup(Message):
    T: ClassVar[str] = "regroup"
    tg: str
    units: list[str]
    name: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class Ungroup(Message):
    T: ClassVar[str] = "ungroup"
    tg: str


# --- unit control, downlink -----------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class Affiliation(Message):
    T: ClassVar[str] = "affiliation"
    groups: list[str]
    rejected: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True, kw_only=True, slots=True)
class Error(Message):
    T: ClassVar[str] = "error"
    cause: str
    detail: str = ""


@dataclass(frozen=True, kw_only=True, slots=True)
class EmergencyState(Message):
    T: ClassVar[str] = "emergency_state"
    tg: str
    state: str
    by: str | None = None
    unit: str | None = None  # addition (11.3): whose emergency, on the group's event topic


@dataclass(frozen=True, kw_only=True, slots=True)
class SdsStatus(Message):
    T: ClassVar[str] = "sds_status"
    state: str


@dataclass(frozen=True, kw_only=True, slots=True)
class Regrouped(Message):
    T: ClassVar[str] = "regrouped"
    tg: str
    name: str = ""


@dataclass(frozen=True, kw_only=True, slots=True)
class Ungrouped(Message):
    """Addition to v1 (docs/protocol.md, 11): a temporary group a unit was in has been dissolved."""

    T: ClassVar[str] = "ungrouped"
    tg: str


@dataclass(frozen=True, kw_only=True, slots=True)
class Ambient(Message):
    """Addition to v1 (11.13): to the listener, how listening in on `unit` stands:
    `listening`, or `ended` (with a `cause` when it did not ask)."""

    T: ClassVar[str] = "ambient"
    unit: str
    call: str
    state: str
    cause: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class MicOpen(Message):
    """Addition to v1 (11.13): to the unit listened in on: send the microphone's sound as
    media of `call` on its unit media topic, showing nothing to its user."""

    T: ClassVar[str] = "mic_open"
    call: str


@dataclass(frozen=True, kw_only=True, slots=True)
class MicClose(Message):
    """Addition to v1 (11.13): stop what `mic_open` started."""

    T: ClassVar[str] = "mic_close"
    call: str


@dataclass(frozen=True, kw_only=True, slots=True)
class Private(Message):
    """Addition to v1 (11.14): to both parties, how a private call stands: `ringing`,
    `connected` (with its `talker`, under floor control) or `ended` with its `cause`;
    `unit` is the other party, `caller` who called."""

    T: ClassVar[str] = "private"
    call: str
    unit: str
    state: str
    kind: Kind | None = None
    floor: bool | None = None
    talker: str | None = None
    caller: str | None = None
    cause: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class Ok(Message):
    """Addition to v1 (docs/protocol.md, 11): a dispatcher command was carried out."""

    T: ClassVar[str] = "ok"
    op: str


@dataclass(frozen=True, kw_only=True, slots=True)
class Presence(Message):
    T: ClassVar[str] = "presence"
    state: str


@dataclass(frozen=True, kw_only=True, slots=True)
class Emergency(Message):
    T: ClassVar[str] = "emergency"
    unit: str
    tg: str
    lat: float | None = None
    lon: float | None = None


# --- floor control --------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class Request(Message):
    T: ClassVar[str] = "request"
    kind: Kind = "normal"
    prio: int | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class Release(Message):
    T: ClassVar[str] = "release"


@dataclass(frozen=True, kw_only=True, slots=True)
class QueueStatus(Message):
    T: ClassVar[str] = "queue_status"


@dataclass(frozen=True, kw_only=True, slots=True)
class Granted(Message):
    T: ClassVar[str] = "granted"
    tg: str
    call: str
    prio: int
    kind: Kind
    max_ms: int


@dataclass(frozen=True, kw_only=True, slots=True)
class Queued(Message):
    T: ClassVar[str] = "queued"
    tg: str
    pos: int
    prio: int


@dataclass(frozen=True, kw_only=True, slots=True)
class Deny(Message):
    T: ClassVar[str] = "deny"
    tg: str
    cause: str


@dataclass(frozen=True, kw_only=True, slots=True)
class Revoke(Message):
    T: ClassVar[str] = "revoke"
    tg: str
    cause: str


@dataclass(frozen=True, kw_only=True, slots=True)
class Taken(Message):
    T: ClassVar[str] = "taken"
    tg: str
    talker: str
    call: str
    prio: int
    kind: Kind
    seq: int
    preempted: str | None = None  # addition (11.15): the holder this grant pre-empted


@dataclass(frozen=True, kw_only=True, slots=True)
class Idle(Message):
    T: ClassVar[str] = "idle"
    tg: str
    call: str
    seq: int


@dataclass(frozen=True, kw_only=True, slots=True)
class State(Message):
    T: ClassVar[str] = "state"
    tg: str
    floor: FloorStatus
    emergency: bool
    queue: int
    seq: int
    since_ts: int
    talker: str | None = None
    call: str | None = None
    kind: Kind | None = None
    prio: int | None = None
    srv: str | None = None  # the id of the server instance serving the group
    imminent: bool | None = None  # addition (11.12): true while in imminent peril


@dataclass(frozen=True, kw_only=True, slots=True)
class Status(Message):
    T: ClassVar[str] = "status"
    state: str
    version: str = ""
    started_ts: int = 0
    parts: list[int] | None = None  # in a cluster: the partitions this instance serves


@dataclass(frozen=True, kw_only=True, slots=True)
class Media(Message):
    """Uplink has `call`, `seq`, `data`; the relayed copy adds `tg`, `talker`, `rts`."""

    T: ClassVar[str] = "media"
    call: str
    seq: int
    data: bytes
    tg: str | None = None
    talker: str | None = None
    rts: int | None = None


ALL: tuple[type[Message], ...] = (
    Affiliate,
    Deaffiliate,
    Location,
    EmergencyAlert,
    EmergencyCancel,
    ImminentCancel,
    Sds,
    UnitStatus,
    EmergencyAck,
    AmbientListen,
    AmbientEnd,
    RemoteTalk,
    PrivateCall,
    PrivateAnswer,
    PrivateTalk,
    PrivateEnd,
    ForceRelease,
    Regroup,
    Ungroup,
    Affiliation,
    Error,
    EmergencyState,
    SdsStatus,
    Regrouped,
    Ungrouped,
    Ambient,
    MicOpen,
    MicClose,
    Private,
    Ok,
    Presence,
    Emergency,
    Request,
    Release,
    QueueStatus,
    Granted,
    Queued,
    Deny,
    Revoke,
    Taken,
    Idle,
    State,
    Status,
    Media,
)
BY_TYPE: dict[str, type[Message]] = {cls.T: cls for cls in ALL}
