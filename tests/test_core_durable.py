"""Durable state in the core: what a restarted server takes up (`Network.record` and
`Network.load`), with explicit time, through the store's real encoding.

A restart here is a new `Network` whose monotonic clock differs from the old one's (other
`wall_offset`) at the same wall-clock time, loading the records the old one left.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from esn.core.actions import Action, ToGroup, ToUnit
from esn.core.fleet import parse_fleet
from esn.core.network import Network
from esn.protocol import codec
from esn.protocol import messages as m
from esn.store import pack, unpack
from tests.conftest import told as to

FLEET = parse_fleet(
    {
        "defaults": {
            "max_talk_ms": 10000,
            "revoke_grace_ms": 1000,
            "end_of_media_ms": 3000,
            "hang_ms": 2000,
            "queue_depth": 2,
        },
        "talkgroup": [
            {"id": "tg1"},
            {"id": "bc", "broadcast": True},
            {"id": "closed", "members": ["a"]},
        ],
        "unit": [
            {"id": "disp", "role": "dispatcher", "priority": 250},
            {"id": "low", "priority": 50},
        ],
    }
)
_refs = itertools.count(1)


class Store:
    """The records as a store keeps them: bytes by key, written after each step."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    def save(self, net: Network) -> None:
        for key in net.changed:
            record = net.record(key)
            if record is None:
                self.data.pop(key, None)
            else:
                self.data[key] = pack(record)
        net.changed.clear()

    def restart(self, now: float, old: Network) -> tuple[Network, list[str], list[Action]]:
        """A new instance at the moment `now` of the old one's clock (500 s on its own):
        what it could not adopt, and what it did at once."""
        net = Network(FLEET, wall_offset=old.wall_offset - 500.0)
        problems = net.load({k: unpack(v) for k, v in self.data.items()}, now + 500.0)
        return net, problems, net.settle(now + 500.0)


def up(net: Network, store: Store, unit: str, msg: m.Message, now: float) -> list[Action]:
    out = net.unit_message(unit, msg, now)
    store.save(net)
    return out


def floor(net: Network, store: Store, unit: str, msg: m.Message, now: float) -> list[Action]:
    out = net.floor_message(unit, "tg1", msg, now)
    store.save(net)
    return out


def test_a_restart_keeps_what_units_were_told() -> None:
    net, store = Network(FLEET, wall_offset=1000.0), Store()
    for u in ("a", "b", "c", "d", "disp", "x"):
        net.presence(u, m.Presence(state="online"), 0.0)
        up(net, store, u, m.Affiliate(groups=["tg1"], ref=next(_refs)), 0.0)
    floor(net, store, "a", m.Request(), 1.0)
    floor(net, store, "b", m.Request(), 1.1)
    floor(net, store, "c", m.Request(), 1.2)  # queue: b 1st, c 2nd
    up(net, store, "d", m.EmergencyAlert(tg="tg1", ref=next(_refs)), 1.3)
    up(net, store, "disp", m.EmergencyAck(tg="tg1", unit="d", ref=next(_refs)), 1.4)
    up(net, store, "disp", m.Regroup(tg="tmp-1", units=["a", "b"], name="Fire", ref=9), 1.5)
    net.presence("x", m.Presence(state="offline"), 1.6)
    store.save(net)
    sds = m.Sds(to="unit:x", text="call control", ref=next(_refs))
    assert to(up(net, store, "a", sds, 1.7), "a") == [m.SdsStatus(state="queued", ref=sds.ref)]
    before = net.state_msg("tg1", 2.0)

    net, problems, due = store.restart(2.0, net)
    now = 502.0  # the same moment, on the new instance's clock

    assert problems == [] and due == []
    assert net.state_msg("tg1", now) == before  # the call, its talker, seq, emergency
    # a retry of the SDS is told what it was told, and nothing is kept twice
    assert to(net.unit_message("a", sds, now), "a") == [m.SdsStatus(state="queued", ref=sds.ref)]
    # the queue goes on in its order: a releases, b is granted, c moves up
    out = net.floor_message("a", "tg1", m.Release(), now)
    assert isinstance(to(out, "b")[0], m.Granted)
    assert to(out, "c") == [m.Queued(tg="tg1", pos=1, prio=100, ref=None)]
    # the emergency is still open and acknowledged: its originator can cancel it
    assert net.floors["tg1"].emergencies == {"d": "disp"}
    cancelled = to(net.unit_message("d", m.EmergencyCancel(tg="tg1", ref=next(_refs)), now), "d")
    assert cancelled[0] == m.EmergencyState(tg="tg1", state="cancelled", ref=cancelled[0].ref)
    # the regroup is still in force, and can be undone
    assert net.groups["tmp-1"].members == {"a", "b", "disp"}
    assert "tmp-1" in net.affiliations["a"]
    out = net.unit_message("disp", m.Ungroup(tg="tmp-1", ref=next(_refs)), now)
    assert m.Ungrouped(tg="tmp-1") in to(out, "b")
    # the message kept for x is delivered when x comes online, once
    delivered = to(net.presence("x", m.Presence(state="online"), now), "x")
    assert delivered == [m.Sds(to="unit:x", text="call control", sender="a", ref=sds.ref)]


def test_what_fell_due_while_the_server_was_down_happens_at_once() -> None:
    net, store = Network(FLEET, wall_offset=1000.0), Store()
    for u in ("a", "b"):
        up(net, store, u, m.Affiliate(groups=["tg1"], ref=next(_refs)), 0.0)
    floor(net, store, "a", m.Request(ref=5), 0.0)
    floor(net, store, "b", m.Request(), 0.1)

    net, problems, _ = store.restart(20.0, net)  # its talk time (10 s) ended while down

    assert problems == []
    deadline = net.next_deadline()
    assert deadline is not None and deadline <= 520.0
    out = net.on_timer(520.0)
    assert to(out, "a") == [m.Revoke(tg="tg1", cause="max_talk_time", ref=5)]
    out = net.on_timer(521.0)  # T3 over: the floor goes to the head of the queue
    assert isinstance(to(out, "b")[0], m.Granted)


def test_a_holder_not_kept_hands_the_floor_to_its_queue() -> None:
    store = Store()
    store.data["group/tg1"] = pack(
        forged(holder=["low", 200, "normal", 1, 1000.0, None], queue=[["b", 100, "normal", 7]])
    )
    net = Network(FLEET, wall_offset=1000.0)
    problems = net.load({k: unpack(v) for k, v in store.data.items()}, 1.0)
    assert len(problems) == 1 and "priority 200" in problems[0]
    granted = to(net.settle(1.0), "b")
    assert len(granted) == 1 and isinstance(granted[0], m.Granted) and granted[0].ref == 7


def forged(**changes: Any) -> dict[str, Any]:
    """A group record as the server writes it, with `changes`."""
    record: dict[str, Any] = {
        "seq": 3,
        "call": "c1",
        "call_until": 0.0,
        "since": 1000.0,
        "holder": ["a", 100, "normal", 1, 1000.0, None],
        "queue": [],
        "emergencies": [],
    }
    return record | changes


@pytest.mark.parametrize(
    ("key", "record", "why"),
    [
        ("group/closed", forged(holder=["b", 100, "normal", 1, 1000.0, None]), "not a member"),
        ("group/bc", forged(), "receive-only"),
        ("group/tg1", forged(holder=["low", 200, "normal", 1, 1000.0, None]), "priority 200"),
        ("group/tg1", forged(holder=["a", 100, "shouting", 1, 1000.0, None]), "no such kind"),
        ("group/tg1", forged(holder=["a", 100, "normal", 1, float("inf"), None]), "not a time"),
        ("group/tg1", forged(since=-1e12), "not a time"),
        ("group/tg1", forged(holder=["a", True, "normal", 1, 1000.0, None]), "priority True"),
        ("group/tg1", forged(queue=[["b", 1, "normal", "7"]]), "not an integer"),
        ("group/tg1", forged(seq=2**62), "not an integer"),
        ("group/tg1", forged(queue=[["a", 1, "normal", None]] * 3), "queue"),
        ("group/tg1", forged(emergencies=[["a", "b"]]), "b is no dispatcher"),
        ("group/tg1", forged(temporary=["Fire", ["a"]]), "static group"),
        ("group/tmp", forged(temporary=["Fire", ["a"]], seq=-1), "not an integer"),
        ("group/tg9", forged(), "no such group"),
        ("group/tg1", 42, "not a record"),
        ("unit/b", {"groups": ["closed"], "answers": []}, "may no longer join"),
        ("unit/b", {"groups": [], "answers": [[1, b"12345678", "granted"]]}, "malformed"),
        ("sds/b", [m.Affiliate(groups=["tg1"])], "not a short message"),
        ("sds/b", [m.Sds(to="unit:b", text="no sender")], "not a short message"),
        ("group/../tg1", forged(), "not an id"),
        ("locks/tg1", forged(), "no such record kind"),
    ],
)
def test_saved_state_is_checked_as_input_from_a_stranger(key: str, record: Any, why: str) -> None:
    """A store is a file anyone with the account can edit, and a cluster's store is shared:
    nothing read back is adopted that a unit could not have been told."""
    net = Network(FLEET, wall_offset=1000.0)
    problems = net.load({key: unpack(pack(record))}, 1.0)
    assert len(problems) == 1 and problems[0].startswith(f"{key}: ") and why in problems[0]
    assert key in net.changed  # the store is rewritten with what was adopted
    assert "tmp" not in net.groups  # a temporary group is defined only by a sound record
    for each in net.floors.values():
        if each.holder is not None:
            assert each.holder.unit == "a" and each.tg == "tg1"
    assert net.state_msg("tg1", 1.0).seq < 2**40


values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=12), inner),
    max_leaves=20,
)
record_keys = st.sampled_from(
    ["group/tg1", "group/closed", "group/tmp", "unit/a", "sds/a", "unit/disp"]
)
group_like = st.fixed_dictionaries(
    {k: values for k in ("seq", "call", "call_until", "since", "holder", "queue")},
    optional={"emergencies": values, "temporary": values},
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(record_keys, values | group_like))
def test_no_saved_garbage_makes_loading_raise_or_grant_wrongly(records: dict[str, Any]) -> None:
    """Whatever the file holds, loading returns, and what was adopted can be served: its
    state published, its talker answered."""
    net = Network(FLEET, wall_offset=1000.0)
    net.load(records, 1.0)
    net.settle(1.0)
    for each in net.floors.values():
        codec.encode(net.state_msg(each.tg, 1.0))
        h = each.holder
        if h is not None:
            profile = FLEET.profile(h.unit)
            assert profile is not None and each.group.admits(h.unit)
            assert h.prio <= profile.priority
            for a in each.request(h.unit, h.kind, h.prio, 1, 1.0):
                if isinstance(a, ToUnit):
                    codec.encode(a.msg)


def test_a_clock_stepped_back_keeps_the_call() -> None:
    """A grant saved "later" than now (the wall clock stepped back across the restart) is
    taken as made now, not dropped."""
    net = Network(FLEET, wall_offset=1000.0)
    record = forged(holder=["a", 100, "normal", 1, 1003.0, None], since=1003.0)
    assert net.load({"group/tg1": unpack(pack(record))}, 1.0) == []
    assert net.state_msg("tg1", 1.0).talker == "a"
    assert net.state_msg("tg1", 1.0).since_ts == 1001 * 10**9


def test_a_forged_queue_is_put_in_rank_order() -> None:
    net = Network(FLEET, wall_offset=1000.0)
    queue = [["b", 100, "normal", None], ["c", 100, "emergency", None]]
    assert net.load({"group/tg1": unpack(pack(forged(queue=queue)))}, 1.0) == []
    assert [w.unit for w in net.floors["tg1"].queue] == ["c", "b"]


def test_a_repeat_stamped_anew_is_still_a_repeat() -> None:
    """No decision rests on `ts`: a retry with a fresh time stamp is the same message."""
    net = Network(FLEET)
    net.unit_message("a", m.Affiliate(groups=["tg1"], ref=1), 0.0)
    first = net.unit_message("a", m.EmergencyAlert(tg="tg1", ref=2, ts=1), 0.0)
    again = net.unit_message("a", m.EmergencyAlert(tg="tg1", ref=2, ts=2), 0.1)
    assert any(isinstance(a, ToGroup) and isinstance(a.msg, m.Emergency) for a in first)
    assert again == [ToUnit("a", m.EmergencyState(tg="tg1", state="raised", ref=2))]


def test_a_repeated_sds_to_oneself_is_not_delivered_again() -> None:
    net = Network(FLEET)
    net.presence("a", m.Presence(state="online"), 0.0)
    sds = m.Sds(to="unit:a", text="note", ref=3)
    assert len(to(net.unit_message("a", sds, 0.0), "a")) == 2  # delivered, and its status
    assert to(net.unit_message("a", sds, 0.1), "a") == [m.SdsStatus(state="delivered", ref=3)]


def test_a_repeat_spends_none_of_the_units_allowance() -> None:
    """Retries of one SDS (1 a second allowed, burst 5) do not use up the allowance of the
    next message."""
    net = Network(FLEET)
    sds = m.Sds(to="tg:tg1", text="at the gate", ref=40)
    for _ in range(10):
        (answer,) = to(net.unit_message("a", sds, 0.0), "a")
        assert answer == m.SdsStatus(state="delivered", ref=40)
    fresh = to(net.unit_message("a", m.Sds(to="tg:tg1", text="inside", ref=41), 0.0), "a")
    assert fresh == [m.SdsStatus(state="delivered", ref=41)]


def test_made_up_ids_cannot_push_out_the_fleets_own_answers() -> None:
    """Open registration: more ids than the server tracks send messages; a fleet unit's
    retry is still recognised as one."""
    net = Network(FLEET, max_units=10)
    sds = m.Sds(to="tg:tg1", text="evacuate now", ref=7)
    assert len([a for a in net.unit_message("disp", sds, 0.0) if isinstance(a, ToGroup)]) == 1
    for i in range(50):
        net.unit_message(f"made-up-{i}", m.Affiliate(groups=["tg1"], ref=1), 0.0)
    again = net.unit_message("disp", sds, 1.0)
    assert again == [ToUnit("disp", m.SdsStatus(state="delivered", ref=7))]  # not sent again
    assert sum(1 for u in net._answers if u.startswith("made-up-")) <= 10


def test_one_bad_kept_message_costs_no_other() -> None:
    """A sender removed from the fleet between restarts: its kept message is dropped, the
    others for the same unit are kept."""
    closed = parse_fleet(
        {
            "defaults": {"open_registration": False},
            "talkgroup": [{"id": "tg1"}],
            "unit": [{"id": u} for u in ("u1", "u3", "u5")],
        }
    )
    kept = [m.Sds(to="unit:u5", text=f"from {u}", sender=u, ref=1) for u in ("u1", "u2", "u3")]
    net = Network(closed)
    (problem,) = net.load({"sds/u5": unpack(pack(kept))}, 0.0)
    assert "u2" in problem
    delivered = to(net.presence("u5", m.Presence(state="online"), 0.0), "u5")
    assert [x.text for x in delivered if isinstance(x, m.Sds)] == ["from u1", "from u3"]


def test_a_forged_record_of_millions_is_read_only_as_far_as_could_be_real() -> None:
    net = Network(FLEET, wall_offset=1000.0)
    record = forged(
        emergencies=[[f"x{i}", None] for i in range(200_000)],
        queue=[["b", 100, "normal", i] for i in range(200_000)],
    )
    (problem,) = net.load({"group/closed": unpack(pack(record))}, 1.0)
    assert len(problem) < 600
    assert len(net.floors["closed"].emergencies) == 0 and len(net.floors["closed"].queue) == 0
