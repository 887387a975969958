"""The floor rules of docs/protocol.md, driven through the sans-I/O core with explicit time."""

from __future__ import annotations

import itertools

import pytest

from esn.core.actions import Action, StateChanged, ToGroup, ToUnit
from esn.core.fleet import FleetError, parse_fleet
from esn.core.network import Network
from esn.protocol import messages as m
from tests.conftest import told as to

FLEET = {
    "defaults": {
        "max_talk_ms": 10000,
        "revoke_grace_ms": 1000,
        "end_of_media_ms": 3000,
        "hang_ms": 2000,
        "queue_depth": 2,
        "preempt_threshold": 200,
    },
    "talkgroup": [
        {"id": "tg1"},
        {"id": "nq", "queue": False},
        {"id": "bc", "broadcast": True},
        {"id": "closed", "members": ["a"]},
    ],
    "unit": [
        {"id": "disp", "role": "dispatcher", "priority": 250},
        {"id": "boss", "priority": 220},
        {"id": "low", "priority": 50},
    ],
}


@pytest.fixture
def net() -> Network:
    n = Network(parse_fleet(FLEET))
    for u in ("a", "b", "c", "d", "disp", "boss", "low"):
        n.unit_message(u, m.Affiliate(groups=["tg1", "nq", "bc"]), 0.0)
    return n


def queued(actions: list[Action], unit: str) -> list[m.Queued]:
    return [x for x in to(actions, unit) if isinstance(x, m.Queued)]


def group(actions: list[Action]) -> list[m.Message]:
    return [a.msg for a in actions if isinstance(a, ToGroup)]


def req(
    net: Network,
    unit: str,
    now: float,
    kind: m.Kind = "normal",
    prio: int | None = None,
    tg: str = "tg1",
    ref: int | None = None,
) -> list[Action]:
    return net.floor_message(unit, tg, m.Request(kind=kind, prio=prio, ref=ref), now)


def rel(net: Network, unit: str, now: float, tg: str = "tg1") -> list[Action]:
    return net.floor_message(unit, tg, m.Release(), now)


def test_idle_request_is_granted_and_group_told(net: Network) -> None:
    out = req(net, "a", 1.0, ref=7)
    (granted,) = to(out, "a")
    assert isinstance(granted, m.Granted)
    assert (granted.tg, granted.kind, granted.prio, granted.max_ms, granted.ref) == (
        "tg1",
        "normal",
        100,
        10000,
        7,
    )
    (taken,) = group(out)
    assert isinstance(taken, m.Taken) and taken.talker == "a" and taken.call == granted.call
    assert StateChanged("tg1") in out
    state = net.state_msg("tg1")
    assert (state.floor, state.talker, state.call, state.seq) == ("taken", "a", granted.call, 1)


def test_busy_floor_queues_and_threshold_priority_preempts(net: Network) -> None:
    req(net, "a", 0.0)
    (q_b,) = to(req(net, "b", 0.1), "b")
    assert isinstance(q_b, m.Queued) and (q_b.pos, q_b.prio) == (1, 100)
    out = req(net, "boss", 0.2)  # 220 > 100 and >= preempt_threshold 200
    assert to(out, "a") == [m.Revoke(tg="tg1", cause="preempted")]
    assert isinstance(to(out, "boss")[0], m.Granted)
    (taken,) = group(out)  # (consoles name who was cut off)
    assert isinstance(taken, m.Taken) and (taken.talker, taken.preempted) == ("boss", "a")
    assert to(out, "b") == []  # the queue is untouched by a pre-emption
    assert net.state_msg("tg1").talker == "boss"


def test_queue_positions_move_when_a_higher_priority_arrives() -> None:
    n = Network(
        parse_fleet(
            {
                "defaults": {"queue_depth": 8},
                "talkgroup": [{"id": "g"}],
                "unit": [{"id": "hi", "priority": 150}],
            }
        )
    )
    for u in ("a", "b", "c", "hi"):
        n.unit_message(u, m.Affiliate(groups=["g"]), 0)
    req(n, "a", 0, tg="g")
    assert to(req(n, "b", 1, tg="g"), "b")[0].pos == 1  # type: ignore[attr-defined]
    assert to(req(n, "c", 2, tg="g"), "c")[0].pos == 2  # type: ignore[attr-defined]
    out = req(n, "hi", 3, tg="g")  # 150 > 100 but below the threshold: queued first
    assert [(u, x.pos) for u in ("hi", "b", "c") for x in queued(out, u)] == [
        ("hi", 1),
        ("b", 2),
        ("c", 3),
    ]
    out = rel(n, "a", 4, tg="g")
    assert isinstance(to(out, "hi")[0], m.Granted)
    assert [(u, x.pos) for u in ("b", "c") for x in queued(out, u)] == [("b", 1), ("c", 2)]
    assert n.state_msg("g").queue == 2


def test_queue_full_and_no_queue_denials(net: Network) -> None:
    req(net, "a", 0)
    req(net, "b", 0)
    req(net, "c", 0)
    (deny,) = to(req(net, "d", 0), "d")
    assert isinstance(deny, m.Deny) and deny.cause == "queue_full"
    req(net, "a", 0, tg="nq")
    (deny,) = to(req(net, "b", 0, tg="nq"), "b")
    assert isinstance(deny, m.Deny) and deny.cause == "busy"


@pytest.mark.parametrize(
    ("held", "asked", "preempts"),
    [
        (("normal", 100), ("emergency", 1), True),
        (("imminent", 250), ("emergency", 1), True),
        (("emergency", 100), ("emergency", 100), False),
        (("emergency", 100), ("emergency", 101), True),
        (("normal", 100), ("imminent", 1), True),
        (("imminent", 100), ("imminent", 100), False),
        (("imminent", 100), ("imminent", 101), True),
        (("emergency", 1), ("imminent", 255), False),
        (("normal", 100), ("normal", 199), False),  # higher but under the threshold
        (("normal", 100), ("normal", 200), True),
        (("normal", 220), ("normal", 220), False),  # equal never pre-empts
        (("imminent", 1), ("normal", 255), False),
        (("emergency", 1), ("normal", 255), False),
    ],
)
def test_preemption_rules(
    held: tuple[m.Kind, int], asked: tuple[m.Kind, int], preempts: bool
) -> None:
    n = Network(
        parse_fleet(
            {
                "talkgroup": [{"id": "g"}],
                "unit": [{"id": "x", "priority": 255}, {"id": "y", "priority": 255}],
            }
        )
    )
    for u in ("x", "y"):
        n.unit_message(u, m.Affiliate(groups=["g"]), 0)
    req(n, "x", 0, kind=held[0], prio=held[1], tg="g")
    out = req(n, "y", 1, kind=asked[0], prio=asked[1], tg="g")
    revokes = [x for x in to(out, "x") if isinstance(x, m.Revoke)]
    got = to(out, "y")[0]
    if preempts:
        assert revokes[0].cause == "preempted" and isinstance(got, m.Granted)
        assert n.state_msg("g").talker == "y"
    else:
        assert not revokes and isinstance(got, m.Queued)
        assert n.state_msg("g").talker == "x"


def test_prio_is_capped_at_the_units_priority(net: Network) -> None:
    (granted,) = to(req(net, "low", 0, prio=255), "low")
    assert isinstance(granted, m.Granted) and granted.prio == 50


def test_repeated_request_with_same_ref_is_idempotent(net: Network) -> None:
    first = to(req(net, "a", 0, ref=5), "a")[0]
    again = req(net, "a", 2, ref=5)
    assert isinstance(again[0], ToUnit) and len(again) == 1  # no new taken, no seq bump
    assert isinstance(again[0].msg, m.Granted) and again[0].msg.call == first.call  # type: ignore[attr-defined]
    assert again[0].msg.max_ms == 8000
    q1 = to(req(net, "b", 3, ref=9), "b")[0]
    q2 = to(req(net, "b", 4, ref=9), "b")[0]
    assert q1 == q2 and net.state_msg("tg1").queue == 1


def test_t2_revokes_then_t3_takes_back_and_grants_the_queue(net: Network) -> None:
    req(net, "a", 0)
    req(net, "b", 1)
    assert net.next_deadline() is not None
    net.media_drop_reason("a", "tg1", 0)
    for t in (2.5, 5, 7.5, 9.9):  # keep T1 from firing
        assert net.media_drop_reason("a", "tg1", t) is None
        assert net.on_timer(t) == []
    out = net.on_timer(10.0)
    assert [(x.T, x.cause) for x in to(out, "a")] == [("revoke", "max_talk_time")]  # type: ignore[attr-defined]
    assert net.media_drop_reason("a", "tg1", 10.1) == "revoked"
    again = to(req(net, "a", 10.2, ref=4), "a")  # asking again does not undo the revoke
    assert again == [m.Revoke(tg="tg1", cause="max_talk_time", ref=4)]
    assert net.state_msg("tg1").talker == "a"  # still held during the grace time
    out = net.on_timer(11.0)
    assert isinstance(to(out, "b")[0], m.Granted)
    assert net.state_msg("tg1").talker == "b"


def test_release_during_grace_ends_talk_at_once() -> None:
    net2 = Network(
        parse_fleet(
            {"defaults": {"max_talk_ms": 1000, "end_of_media_ms": 5000}, "talkgroup": [{"id": "g"}]}
        )
    )
    net2.unit_message("a", m.Affiliate(groups=["g"]), 0)
    req(net2, "a", 0, tg="g")
    net2.on_timer(1.0)
    out = rel(net2, "a", 1.2, tg="g")
    assert [x.T for x in group(out)] == ["idle"]


def test_t1_no_media_revokes_and_idles(net: Network) -> None:
    req(net, "a", 0)
    assert net.media_drop_reason("a", "tg1", 1.0) is None
    assert net.on_timer(3.9) == []
    out = net.on_timer(4.0)
    assert [(x.T, x.cause) for x in to(out, "a")] == [("revoke", "no_media")]  # type: ignore[attr-defined]
    assert [x.T for x in group(out)] == ["idle"]


def test_hang_time_keeps_the_call_then_ends_it(net: Network) -> None:
    call = to(req(net, "a", 0), "a")[0].call  # type: ignore[attr-defined]
    rel(net, "a", 1)
    assert net.state_msg("tg1").call == call
    assert to(req(net, "b", 2.5), "b")[0].call == call  # type: ignore[attr-defined]
    rel(net, "b", 3)
    net.on_timer(5.0)
    assert net.state_msg("tg1").call is None
    assert to(req(net, "c", 6), "c")[0].call != call  # type: ignore[attr-defined]


def test_media_only_from_the_holder(net: Network) -> None:
    assert net.media_drop_reason("a", "tg1", 0) == "not_holder"
    req(net, "a", 0)
    assert net.media_drop_reason("a", "tg1", 0.1) is None
    assert net.media_drop_reason("b", "tg1", 0.1) == "not_holder"
    assert net.media_drop_reason("a", "nope", 0.1) == "unknown_group"


def test_receive_only_group_admits_only_dispatchers(net: Network) -> None:
    (deny,) = to(req(net, "a", 0, tg="bc"), "a")
    assert isinstance(deny, m.Deny) and deny.cause == "receive_only"
    assert isinstance(to(req(net, "disp", 0, tg="bc"), "disp")[0], m.Granted)


def test_unknown_group_and_not_affiliated(net: Network) -> None:
    assert to(req(net, "a", 0, tg="zz"), "a")[0].cause == "unknown_group"  # type: ignore[attr-defined]
    assert to(req(net, "stranger", 0), "stranger")[0].cause == "not_affiliated"  # type: ignore[attr-defined]


def test_affiliation_rejects_unknown_and_non_members(net: Network) -> None:
    (aff,) = to(net.unit_message("b", m.Affiliate(groups=["closed", "zz", "tg1"]), 0), "b")
    assert isinstance(aff, m.Affiliation)
    assert "tg1" in aff.groups and "closed" not in aff.groups
    assert aff.rejected == [
        {"tg": "closed", "cause": "not_member"},
        {"tg": "zz", "cause": "unknown_group"},
    ]


def test_offline_releases_floor_and_queue_and_deaffiliates(net: Network) -> None:
    req(net, "a", 0)
    req(net, "b", 0)
    req(net, "c", 0)
    out = net.presence("b", m.Presence(state="offline"), 1)
    assert to(out, "c")[0].pos == 1  # type: ignore[attr-defined]
    out = net.presence("a", m.Presence(state="offline"), 2)
    assert isinstance(to(out, "c")[0], m.Granted)
    assert to(req(net, "a", 3), "a")[0].cause == "not_affiliated"  # type: ignore[attr-defined]


def test_emergency_request_sets_group_emergency_until_cancel(net: Network) -> None:
    req(net, "a", 0)
    out = req(net, "b", 1, kind="emergency")
    assert net.state_msg("tg1").emergency and net.state_msg("tg1").kind == "emergency"
    assert to(out, "a")[0].cause == "preempted"  # type: ignore[attr-defined]
    rel(net, "b", 2)
    assert net.state_msg("tg1").emergency
    out = net.unit_message("b", m.EmergencyCancel(tg="tg1"), 3)
    assert to(out, "b")[0] == m.EmergencyState(tg="tg1", state="cancelled")
    assert not net.state_msg("tg1").emergency


def test_emergency_alert_ack_by_dispatcher_only(net: Network) -> None:
    out = net.unit_message("a", m.EmergencyAlert(tg="tg1", lat=51.5, lon=-0.1), 0)
    (ev,) = group(out)
    assert isinstance(ev, m.Emergency) and ev.unit == "a" and ev.lat == 51.5
    assert net.state_msg("tg1").emergency
    err = to(net.unit_message("b", m.EmergencyAck(unit="a", tg="tg1", ref=3), 1), "b")[0]
    assert isinstance(err, m.Error) and err.cause == "forbidden" and err.ref == 3
    out = net.unit_message("disp", m.EmergencyAck(unit="a", tg="tg1"), 1)
    assert to(out, "a")[0] == m.EmergencyState(tg="tg1", state="acknowledged", by="disp")
    # the group's copy says whose emergency it was (a group may hold several)
    assert group(out) == [m.EmergencyState(tg="tg1", state="acknowledged", by="disp", unit="a")]


def test_force_release_revokes_with_cause_dispatcher_and_clears_emergency(net: Network) -> None:
    req(net, "a", 0, kind="emergency")
    out = net.unit_message("disp", m.ForceRelease(tg="tg1"), 1)
    assert to(out, "a")[0].cause == "dispatcher"  # type: ignore[attr-defined]
    assert [x.T for x in group(out)] == ["idle"]
    state = net.state_msg("tg1")
    assert state.floor == "idle" and not state.emergency


def test_regroup_and_ungroup(net: Network) -> None:
    out = net.unit_message("disp", m.Regroup(tg="inc-7", units=["a", "b"], name="Fire"), 0)
    assert to(out, "a")[0] == m.Regrouped(tg="inc-7", name="Fire")
    assert isinstance(to(req(net, "b", 1, tg="inc-7"), "b")[0], m.Granted)
    out = net.unit_message("disp", m.Ungroup(tg="inc-7"), 2)
    assert to(out, "b")[0].cause == "dispatcher"  # type: ignore[attr-defined]
    assert m.Ungrouped(tg="inc-7") in to(out, "a")
    assert to(req(net, "a", 3, tg="inc-7"), "a")[0].cause == "unknown_group"  # type: ignore[attr-defined]
    err = to(net.unit_message("disp", m.Regroup(tg="tg1", units=["a"]), 4), "disp")[0]
    assert isinstance(err, m.Error) and err.cause == "invalid_field"


def test_sds_delivered_queued_and_failed() -> None:
    n = Network(
        parse_fleet(
            {
                "defaults": {"open_registration": False},
                "talkgroup": [{"id": "g"}],
                "unit": [{"id": "a"}, {"id": "b"}],
            }
        )
    )
    n.presence("a", m.Presence(state="online"), 0)
    out = n.unit_message("a", m.Sds(to="unit:b", text="hello", ref=1), 0)
    assert to(out, "a") == [m.SdsStatus(state="queued", ref=1)]
    out = n.presence("b", m.Presence(state="online"), 1)
    assert to(out, "b") == [m.Sds(to="unit:b", text="hello", sender="a", ref=1)]
    out = n.unit_message("b", m.Sds(to="unit:a", text="hi", ref=2), 2)
    assert to(out, "b") == [m.SdsStatus(state="delivered", ref=2)] and to(out, "a")
    assert to(n.unit_message("a", m.Sds(to="unit:zz", text="x", ref=3), 3), "a") == [
        m.SdsStatus(state="failed", ref=3)
    ]
    assert n.unit_message("zz", m.Sds(to="unit:a", text="x"), 3)[0].msg.cause == "forbidden"  # type: ignore[union-attr]


def test_location_spoof_is_dropped_and_counted(net: Network) -> None:
    assert net.unit_message("a", m.Location(lat=1, lon=2, unit="b"), 0) == []
    assert net.rejected == {"spoofed": 1}
    (acc,) = net.unit_message("a", m.Location(lat=1, lon=2, spd=3), 0)
    assert acc.msg.unit == "a" and acc.msg.spd == 3  # type: ignore[union-attr]


def test_floor_request_flood_is_rate_limited_and_told_once_per_second() -> None:
    n = Network(
        parse_fleet({"talkgroup": [{"id": "g"}], "limits": {"floor": {"per_s": 5, "burst": 10}}})
    )
    n.unit_message("x", m.Affiliate(groups=["g"]), 0)
    answers = [to(n.floor_message("x", "g", m.Request(ref=i), 1.0), "x") for i in range(30)]
    decided = [a for a in answers[:10] if a]
    assert len(decided) == 10  # the burst is served (granted, then repeats of the grant)
    assert answers[10] == [m.Deny(tg="g", cause="rate_limited", ref=10)]
    assert all(a == [] for a in answers[11:])  # refused quietly: no amplification
    assert n.rejected["rate_limited"] == 20
    # tokens come back at 5/s
    assert to(n.floor_message("x", "g", m.Request(ref=99), 1.5), "x")[0].T == "granted"


def test_location_and_sds_floods_are_rate_limited() -> None:
    n = Network(
        parse_fleet(
            {"limits": {"location": {"per_s": 1, "burst": 2}, "sds": {"per_s": 1, "burst": 1}}}
        )
    )
    out = [n.unit_message("x", m.Location(lat=1, lon=1, ref=i), 0) for i in range(4)]
    assert [type(a[0]).__name__ if a else None for a in out] == [
        "LocationAccepted",
        "LocationAccepted",
        "ToUnit",
        None,
    ]
    told = out[2][0]
    assert isinstance(told, ToUnit)
    assert told.msg == m.Error(cause="rate_limited", detail="too many location messages", ref=2)
    n.unit_message("x", m.Sds(to="unit:y", text="a"), 0)
    (err,) = to(n.unit_message("x", m.Sds(to="unit:y", text="b", ref=5), 0), "x")
    assert isinstance(err, m.Error) and err.cause == "rate_limited"


def test_limits_in_the_fleet_file_are_checked() -> None:
    from esn.core.fleet import FleetError

    with pytest.raises(FleetError, match=r"limits\.floor\.per_s: must be a number above 0"):
        parse_fleet({"limits": {"floor": {"per_s": 0}}})
    with pytest.raises(FleetError, match="unknown kind 'media'"):
        parse_fleet({"limits": {"media": {"per_s": 1}}})


def test_qos1_duplicates_are_harmless(net: Network) -> None:
    net.presence("b", m.Presence(state="online"), 0)
    first = net.unit_message("a", m.Sds(to="unit:b", text="once", ref=7), 0)
    again = net.unit_message("a", m.Sds(to="unit:b", text="once", ref=7), 0)
    assert len(to(first, "b")) == 1 and to(again, "b") == []
    assert to(again, "a") == [m.SdsStatus(state="delivered", ref=7)]
    req(net, "a", 1, ref=3)
    assert len(req(net, "a", 1, ref=3)) == 1  # just the grant again
    rel(net, "a", 2)
    assert rel(net, "a", 2) == []  # a second release changes nothing
    assert net.state_msg("tg1").seq == 2


@pytest.mark.parametrize("now", [0.0, 3.3, 234.43537133582825, 262129.22955873786])
def test_a_fresh_grant_offers_the_whole_talk_time(now: float) -> None:
    """(granted_at + T2) - now is not exactly T2 in floating point; it must still say 30 s."""
    n = Network(parse_fleet({"talkgroup": [{"id": "g"}]}))
    n.unit_message("a", m.Affiliate(groups=["g"]), now)
    granted = to(req(n, "a", now, tg="g"), "a")[0]
    assert isinstance(granted, m.Granted) and granted.max_ms == 30000


# --- emergencies and membership (issue 11, findings 4 and 8) -------------------------------


_refs = itertools.count(1)  # each message a new one: a ref used again is a retry


def alert(net: Network, unit: str, tg: str = "tg1") -> list[Action]:
    return net.unit_message(unit, m.EmergencyAlert(tg=tg, ref=next(_refs)), 0.0)


def cancel(net: Network, unit: str, tg: str = "tg1") -> list[Action]:
    return net.unit_message(unit, m.EmergencyCancel(tg=tg, ref=next(_refs)), 0.0)


def test_the_group_stays_in_emergency_while_any_alert_is_open(net: Network) -> None:
    alert(net, "a")
    alert(net, "b")
    cancel(net, "a")
    assert net.state_msg("tg1").emergency  # b's is still open
    assert isinstance(to(cancel(net, "a"), "a")[0], m.Error)  # a has none left to cancel
    cancel(net, "b")
    assert not net.state_msg("tg1").emergency


def test_an_emergency_call_without_an_alert_can_be_acknowledged(net: Network) -> None:
    req(net, "a", 0, kind="emergency")
    out = net.unit_message("disp", m.EmergencyAck(unit="a", tg="tg1", ref=5), 0.1)
    assert to(out, "disp") == [m.Ok(op="emergency_ack", ref=5)]
    assert m.EmergencyState(tg="tg1", state="acknowledged", by="disp") in to(out, "a")
    assert isinstance(to(cancel(net, "a"), "a")[0], m.EmergencyState)  # and cancelled by it


def test_a_talker_raising_its_own_call_to_emergency_gets_an_emergency_call(
    net: Network,
) -> None:
    first = to(req(net, "a", 0), "a")[0]
    out = req(net, "a", 1, kind="emergency")
    granted = to(out, "a")[0]
    assert isinstance(first, m.Granted) and isinstance(granted, m.Granted)
    assert (granted.kind, granted.call) == ("emergency", first.call)
    (taken,) = group(out)
    assert isinstance(taken, m.Taken) and taken.kind == "emergency" and taken.talker == "a"
    state = net.state_msg("tg1")
    assert (state.kind, state.emergency, state.talker) == ("emergency", True, "a")


def test_an_emergency_takes_a_floor_in_its_revoke_grace_at_once(net: Network) -> None:
    req(net, "a", 0)
    revoke = to(net.on_timer(10.0), "a")  # T2: revoke, T3 grace of 1 s begins
    assert [type(x) for x in revoke] == [m.Revoke]
    out = req(net, "b", 10.2, kind="emergency")
    assert isinstance(to(out, "b")[0], m.Granted)  # not after the grace: now
    assert to(out, "a") == []  # told to stop already: no second revoke
    assert net.floors["tg1"].holder is not None and net.floors["tg1"].holder.unit == "b"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("max_talk_ms", 0),
        ("max_talk_ms", 2**31),
        ("end_of_media_ms", 0),
        ("hang_ms", 2**31),
    ],
)
def test_timers_must_fit_the_wire(key: str, value: int) -> None:
    with pytest.raises(FleetError, match=f"defaults.{key}"):
        parse_fleet({"defaults": {key: value}})


def test_a_non_member_cannot_raise_an_alert_or_send_short_data_to_a_closed_group(
    net: Network,
) -> None:
    for msg in (m.EmergencyAlert(tg="closed", ref=1), m.Sds(to="tg:closed", text="hi", ref=2)):
        out = net.unit_message("b", msg, 0.0)
        assert [(type(x), getattr(x, "cause", None)) for x in to(out, "b")] == [
            (m.Error, "forbidden")
        ], msg
        assert group(out) == []
    assert not net.state_msg("closed").emergency
    for unit in ("a", "disp"):  # the member, and a dispatcher, may
        assert group(net.unit_message(unit, m.Sds(to="tg:closed", text="hi", ref=3), 0.0))
    assert group(alert(net, "a", "closed")) and net.state_msg("closed").emergency


# --- short data duplicates (issue 11, finding 3) ------------------------------------------


def sds_status(out: list[Action], unit: str) -> list[str]:
    return [x.state for x in to(out, unit) if isinstance(x, m.SdsStatus)]


def test_a_repeated_sds_is_told_what_the_first_was_told(net: Network) -> None:
    """A retry to an offline unit was answered `delivered` though only queued."""
    net.presence("zz", m.Presence(state="online"), 0.0)
    net.presence("zz", m.Presence(state="offline"), 0.0)  # a unit we know, now offline
    first = net.unit_message("a", m.Sds(to="unit:zz", text="hello", ref=7), 0.0)
    again = net.unit_message("a", m.Sds(to="unit:zz", text="hello", ref=7), 1.0)
    assert sds_status(first, "a") == sds_status(again, "a") == ["queued"]
    delivered = net.presence("zz", m.Presence(state="online"), 2.0)
    assert [x.text for x in to(delivered, "zz") if isinstance(x, m.Sds)] == ["hello"]  # once


def test_an_old_ref_with_new_content_is_a_new_message(net: Network) -> None:
    """A handset whose refs started again after a restart: its next SDS was answered
    `delivered` and dropped as a duplicate."""
    net.presence("b", m.Presence(state="online"), 0.0)
    net.unit_message("a", m.Sds(to="unit:b", text="before the restart", ref=1), 0.0)
    out = net.unit_message("a", m.Sds(to="unit:b", text="after the restart", ref=1), 5.0)
    assert sds_status(out, "a") == ["delivered"]
    assert [x.text for x in to(out, "b") if isinstance(x, m.Sds)] == ["after the restart"]


# --- made-up unit ids (issue 11, finding 6) ---------------------------------------------


def test_made_up_unit_ids_cannot_grow_memory() -> None:
    n = Network(
        parse_fleet({"talkgroup": [{"id": "tg1"}], "unit": [{"id": "listed"}]}), max_units=10
    )
    for i in range(50):
        n.presence(f"fake-{i}", m.Presence(state="online"), 0.0)
        n.unit_message(f"aff-{i}", m.Affiliate(groups=["tg1"]), 0.0)
        n.presence(f"gone-{i}", m.Presence(state="offline"), 0.0)
    assert len(n.online) == 10 and len(n.affiliations) == 10 and len(n.offline) <= 10
    assert n.rejected["too_many_units"] == 40
    n.presence("listed", m.Presence(state="online"), 0.0)  # the fleet's own always fit
    assert "listed" in n.online
    out = [
        n.unit_message("listed", m.Sds(to=f"unit:nobody-{i}", text="x", ref=i), float(i))
        for i in range(20)
    ]  # to ids never seen: not kept
    assert {s for o in out for s in sds_status(o, "listed")} == {"failed"}
    assert n._sds_store == {}


def test_closed_registration_keeps_no_trace_of_strangers() -> None:
    n = Network(parse_fleet({"defaults": {"open_registration": False}, "unit": [{"id": "listed"}]}))
    n.presence("stranger", m.Presence(state="online"), 0.0)
    assert n.online == set() and n.rejected["forbidden"] == 1


def test_leaving_groups_one_never_joined_keeps_no_trace() -> None:
    """deaffiliate from made-up ids used to add an entry each, past every cap."""
    n = Network(parse_fleet({"talkgroup": [{"id": "tg1"}]}), max_units=10)
    for i in range(50):
        n.unit_message(f"fake-{i}", m.Deaffiliate(groups=["tg1"], ref=1), 0.0)
    assert n.affiliations == {}
    assert n.unit_message("real", m.Affiliate(groups=["tg1"], ref=2), 0.0)  # not crowded out
    assert n.affiliations == {"real": {"tg1"}}
