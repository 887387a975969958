"""The codec: any bytes decode to a valid message or to ProtocolError, never anything else."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from esn.protocol import codec
from esn.protocol import messages as m

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=80)
    | st.binary(max_size=80)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
type_names = st.sampled_from(sorted(m.BY_TYPE)) | st.text(max_size=12)
field_names = st.sampled_from(
    sorted({f for c in m.ALL for f in c.__dataclass_fields__} | {"t", "ref", "ts", "from"})
)
maps = st.dictionaries(field_names, values, max_size=8).flatmap(
    lambda d: type_names.map(lambda t: {**d, "t": t})
)


@settings(max_examples=800, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_decode_or_raise_protocol_error(payload: bytes) -> None:
    try:
        msg = codec.decode(payload)
    except codec.ProtocolError as exc:
        assert exc.cause in {"malformed", "unknown_type", "invalid_field", "too_large"}
    else:
        assert isinstance(msg, m.Message)


@settings(max_examples=800, deadline=None)
@given(maps)
def test_any_map_decodes_to_a_valid_message_or_a_protocol_error(obj: dict[str, object]) -> None:
    payload = msgpack.packb(obj, use_bin_type=True)
    try:
        msg = codec.decode(payload)
    except codec.ProtocolError as exc:
        assert exc.cause in {"malformed", "unknown_type", "invalid_field", "too_large"}
        return
    # a message that decoded encodes back to what it said
    assert codec.decode(codec.encode(msg)) == msg


@settings(max_examples=800, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["t", "call", "seq", "data", "ts", "talker", "tg"]), values, max_size=7
    )
)
def test_media_fast_path_agrees_with_the_generic_decoder(obj: dict[str, object]) -> None:
    obj = {"t": "media", **obj} if "t" not in obj else obj
    try:
        generic: m.Message | str = codec.from_dict(obj)
    except codec.ProtocolError as exc:
        generic = exc.cause
    try:
        fast: m.Message | str = codec.media_from_dict(obj)
    except codec.ProtocolError as exc:
        fast = exc.cause
    if isinstance(generic, m.Media):
        assert isinstance(fast, m.Media)
        assert (fast.call, fast.seq, fast.data, fast.ts, fast.talker) == (
            generic.call,
            generic.seq,
            generic.data,
            generic.ts,
            generic.talker,
        )
    else:
        assert isinstance(fast, str)


@pytest.mark.parametrize(
    "msg",
    [
        m.Request(kind="emergency", prio=255, ref=1, ts=123),
        m.Sds(to="tg:tg-1", text="héllo ✓", sender="u1", ref=9),
        m.Affiliation(groups=["a", "b"], rejected=[{"tg": "c", "cause": "not_member"}]),
        m.State(
            tg="g",
            floor="taken",
            emergency=True,
            queue=2,
            seq=5,
            since_ts=1,
            talker="u",
            call="c1",
            kind="normal",
            prio=100,
        ),
        m.Media(call="c1", seq=3, data=b"\x00\xff", ts=5, tg="g", talker="u", rts=6),
    ],
)
def test_round_trip(msg: m.Message) -> None:
    assert codec.decode(codec.encode(msg)) == msg


def test_wire_names() -> None:
    raw = msgpack.unpackb(codec.encode(m.Sds(to="unit:a", text="x", sender="b")))
    assert raw == {"t": "sds", "to": "unit:a", "text": "x", "from": "b"}
    assert "prio" not in msgpack.unpackb(codec.encode(m.Request()))


def test_ref_is_echoed_even_when_the_message_is_invalid() -> None:
    with pytest.raises(codec.ProtocolError) as err:
        codec.decode(msgpack.packb({"t": "location", "lat": 1, "ref": 77}))
    assert (err.value.cause, err.value.ref) == ("invalid_field", 77)
    assert "location.lon is required" in err.value.detail


@pytest.mark.parametrize(
    ("obj", "detail"),
    [
        (
            {"t": "request", "kind": "urgent"},
            "request.kind must be one of normal, imminent, emergency",
        ),
        (
            {
                "t": "state",
                "tg": "g",
                "floor": "open",
                "emergency": False,
                "queue": 0,
                "seq": 1,
                "since_ts": 0,
            },
            "state.floor must be one of idle, taken",
        ),
    ],
)
def test_closed_choices_are_checked(obj: dict[str, object], detail: str) -> None:
    with pytest.raises(codec.ProtocolError) as err:
        codec.from_dict(obj)
    assert (err.value.cause, err.value.detail) == ("invalid_field", detail)


def test_a_cause_this_version_does_not_know_still_decodes() -> None:
    """A newer server may add causes; receivers tolerate them (docs/protocol.md)."""
    msg = codec.from_dict({"t": "deny", "tg": "g", "cause": "maintenance"})
    assert msg == m.Deny(tg="g", cause="maintenance")
