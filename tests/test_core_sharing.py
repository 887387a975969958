"""The core's side of a cluster, with explicit time: another instance's word on which
groups a unit is in, letting go of what another instance serves now, and short messages
handed over with a partition."""

from __future__ import annotations

from esn.core.actions import ToUnit
from esn.core.network import Network
from esn.protocol import messages as m
from tests.test_core_durable import FLEET


def online(net: Network, *units: str) -> None:
    for unit in units:
        net.presence(unit, m.Presence(state="online"), 0.0)


def test_a_unit_that_left_a_group_elsewhere_lets_go_of_its_floor_here() -> None:
    net = Network(FLEET)
    online(net, "a", "b")
    net.adopt_affiliations("a", ["tg1"], 0.0)
    net.adopt_affiliations("b", ["tg1"], 0.0)
    granted = net.floor_message("a", "tg1", m.Request(ref=1), 0.1)
    assert any(isinstance(x, ToUnit) and isinstance(x.msg, m.Granted) for x in granted)
    # its own instance says it is in no group now: the floor goes, and b may have it
    out = net.adopt_affiliations("a", [], 0.2)
    assert net.floors["tg1"].holder is None and out
    denied = net.floor_message("a", "tg1", m.Request(ref=2), 0.3)
    assert denied == [ToUnit("a", m.Deny(tg="tg1", cause="not_affiliated", ref=2))]


def test_what_another_instance_says_is_checked() -> None:
    net = Network(FLEET)
    assert net.adopt_affiliations("a", ["tg1", "closed", "nope", 7], 0.0) == []
    assert net.affiliations["a"] == {"tg1", "closed"}  # a is a member of closed
    net.adopt_affiliations("b", ["closed"], 0.0)  # b is not
    assert "b" not in net.affiliations
    small = Network(FLEET, max_units=1)  # (open registration: made-up ids are bounded)
    small.adopt_affiliations("x1", ["tg1"], 0.0)
    small.adopt_affiliations("x2", ["tg1"], 0.0)
    assert set(small.affiliations) == {"x1"}
    net.adopt_affiliations("a", "tg1", 0.0)  # not a list: refused, nothing changed
    assert net.affiliations["a"] == {"tg1", "closed"}


def test_forgetting_a_partition_drops_its_floors_and_keeps_the_view() -> None:
    net = Network(FLEET)
    online(net, "a")
    net.adopt_affiliations("a", ["tg1"], 0.0)
    net.floor_message("a", "tg1", m.Request(ref=1), 0.0)
    net.unit_message("disp", m.Sds(to="unit:b", text="hi", ref=3), 0.0)  # b is offline
    net.forget(lambda ident: ident in ("tg1", "b"))
    assert "tg1" not in net.floors and net.next_deadline() is not None  # (a stale wake-up)
    assert net.on_timer(100.0) == []  # nothing of tg1 wakes
    assert net.affiliations["a"] == {"tg1"}
    online(net, "b")  # b's short message went with its partition
    assert net.record("sds/b") is None


def test_short_messages_taken_over_reach_units_already_online() -> None:
    net = Network(FLEET)
    online(net, "b")
    assert net.load({"sds/b": [m.Sds(to="unit:b", text="kept", sender="disp")]}, 0.0) == []
    out = net.deliver_stored()
    assert out == [ToUnit("b", m.Sds(to="unit:b", text="kept", sender="disp"))]
    assert net.deliver_stored() == [] and net.record("sds/b") is None
