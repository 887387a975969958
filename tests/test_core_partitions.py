"""Partition ownership in a cluster (`esn.core.partitions`), with explicit time.

The property that matters: two instances never both act for one partition, whatever the
pauses (SIGSTOP), message delays and clock rates. A model of the key-value bucket (keys
expiring `ttl` after their last write, creates and revision-checked updates) is driven by
hypothesis with several instances, and checked at every step.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from esn.core.partitions import PARTITIONS, Ownership, partition_of, preferred
from esn.protocol.topics import Inbound, Topics

TTL = 3.0


def test_partitions_are_stable_and_even() -> None:
    assert partition_of("tg-1") == partition_of("tg-1")
    counts = [0] * PARTITIONS
    for i in range(20_000):
        counts[partition_of(f"tg-{i}")] += 1
    mean = statistics.mean(counts)
    assert all(0.8 * mean < c < 1.2 * mean for c in counts)


def test_uplinks_moved_by_partition_are_read_as_what_they_were() -> None:
    """A NATS cluster's subject mapping moves uplinks and floor requests under
    `part/P/` (docs/scaling.md); one claiming another partition than its id's, or
    anything else put there, is not of the protocol."""
    t = Topics("esn")
    p, q = partition_of("u1"), partition_of("tg-1")
    assert t.parse_inbound(f"esn/part/{p}/unit/u1/up") == Inbound("up", "u1", None)
    assert t.parse_inbound(f"esn/part/{q}/tg/tg-1/up/u1/floor") == Inbound("floor", "u1", "tg-1")
    for wrong in (
        f"esn/part/{(p + 1) % PARTITIONS}/unit/u1/up",
        f"esn/part/{p + PARTITIONS}/unit/u1/up",
        f"esn/part/{p}/unit/u1/presence",
        f"esn/part/{q}/tg/tg-1/up/u1/media",
        f"esn/part/{q}/cluster/fwd/{q}/u1",
        f"esn/part/{p}/part/{p}/unit/u1/up",
    ):
        assert t.parse_inbound(wrong) is None, wrong


def test_shares_are_even_and_a_member_leaving_moves_few_others() -> None:
    for n in range(1, 8):
        members = [f"srv-{i}" for i in range(n)]
        shares = [sum(preferred(p, members) == m for p in range(PARTITIONS)) for m in members]
        assert sum(shares) == PARTITIONS and max(shares) - min(shares) <= 1
    three, two = ["a", "b", "c"], ["a", "b"]
    moved = [p for p in range(PARTITIONS) if preferred(p, three) != "c"]
    kept = sum(preferred(p, two) == preferred(p, three) for p in moved)
    assert kept >= 0.75 * len(moved)  # besides c's own, few partitions change hands


def test_an_instance_stops_acting_before_its_lease_can_expire() -> None:
    me = Ownership("a", ttl=TTL, margin=1.0)
    plan = me.plan(10.0, ["a"], free=range(PARTITIONS))
    assert len(plan.acquire) == PARTITIONS
    me.written(0, revision=1, sent=10.0)  # the bucket stamps it at 10 or later
    assert me.acting(0, 11.99) and not me.acting(0, 12.0)
    assert not me.acting(1, 10.0)  # no answer yet: not ours
    me.written(0, revision=2, sent=10.8)  # renewed
    assert me.acting(0, 12.5)
    me.written(0, revision=1, sent=10.0)  # an old answer arriving late changes nothing
    assert me.acting(0, 12.5)


# --- a model of the bucket and of several instances --------------------------------------


@dataclass
class Key:
    owner: str
    revision: int
    written: float  # true time of the write


@dataclass
class Instance:
    own: Ownership
    offset: float
    rate: float  # its clock runs at this rate to true time
    paused: bool = False
    inbox: list[tuple[float, str, int, int]] = field(default_factory=list)  # due, what, p, rev
    last_tick: float = -100.0

    def clock(self, t: float) -> float:
        return self.offset + t * self.rate


class Cluster(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.t = 0.0
        self.bucket: dict[int, Key] = {}
        self.revisions = 0
        # due, who, op, partition, revision, sent, and whether its answer is lost
        self.requests: list[tuple[float, str, str, int, int, float, bool]] = []
        self.skew = 0.0  # the bucket leader's wall clock against true time
        self.instances = {
            name: Instance(Ownership(name, ttl=TTL, margin=1.0), offset, rate)
            for name, offset, rate in (("a", 0.0, 1.0), ("b", 500.0, 1.01), ("c", -7.0, 0.99))
        }

    def alive(self, p: int) -> Key | None:
        """The key, unless it has expired by the leader's clock (which stamped it too)."""
        key = self.bucket.get(p)
        return key if key is not None and self.t + self.skew < key.written + TTL else None

    @rule(skew=st.floats(-0.3, 0.3))
    def leader_changes(self, skew: float) -> None:
        """Another node leads the bucket; its wall clock is off by up to 0.3 s."""
        self.skew = skew

    @rule(name=st.sampled_from("abc"), delay=st.floats(0.0, 0.2), lost=st.booleans())
    def tick(self, name: str, delay: float, lost: bool = False) -> None:
        """The instance plans and sends; each request reaches the bucket `delay` later.
        With `lost`, the answers never come back: the shell gives up on them after half
        the lease time and reports them unanswered, though the bucket applied them."""
        inst = self.instances[name]
        if inst.paused:
            return
        inst.last_tick = self.t
        now = inst.clock(self.t)
        live = [n for n, i in self.instances.items() if self.t - i.last_tick < TTL]
        free = [p for p in range(PARTITIONS) if self.alive(p) is None]
        plan = inst.own.plan(now, live, free)
        asked = [(p, "create", 0) for p in plan.acquire]
        asked += [(p, "update", rev) for p, rev in plan.renew]
        asked += [(p, "delete", rev) for p, rev in plan.release]
        for p, op, rev in asked:
            self.requests.append((self.t + delay, name, op, p, rev, now, lost))
            if lost:
                inst.inbox.append((self.t + TTL / 2, "unanswered", p, 0, now))  # type: ignore[arg-type]

    @rule(dt=st.floats(0.01, 1.5), back=st.floats(0.0, 0.2))
    def time_passes(self, dt: float, back: float) -> None:
        """Requests due reach the bucket; answers come back `back` later."""
        self.t += dt
        due = [r for r in self.requests if r[0] <= self.t]
        self.requests = [r for r in self.requests if r[0] > self.t]
        for _, name, op, p, rev, sent, lost in sorted(due):
            key = self.alive(p)
            if op == "create":
                ok = key is None
            else:  # (update and delete both carry the revision last written)
                ok = key is not None and key.owner == name and key.revision == rev
            if ok and op == "delete":
                del self.bucket[p]
            elif ok:
                self.revisions += 1
                self.bucket[p] = Key(name, self.revisions, self.t + self.skew)
            if lost:
                continue
            what = ("released" if op == "delete" else "written") if ok else "refused"
            rev_out = self.revisions if ok and op != "delete" else 0
            self.instances[name].inbox.append((self.t + back, what, p, rev_out))
            self.instances[name].inbox[-1] += (sent,)  # type: ignore[assignment]
        for inst in self.instances.values():
            if inst.paused:
                continue
            ready = [x for x in inst.inbox if x[0] <= self.t]
            inst.inbox = [x for x in inst.inbox if x[0] > self.t]
            for _, what, p, rev, sent in sorted(ready):  # type: ignore[misc]
                if what == "written":
                    inst.own.written(p, rev, sent)
                elif what == "released":
                    inst.own.released(p)
                elif what == "unanswered":
                    inst.own.unanswered(p)
                else:
                    inst.own.refused(p)

    @rule(name=st.sampled_from("abc"))
    def pause_or_resume(self, name: str) -> None:
        """SIGSTOP, or SIGCONT: a paused instance neither plans nor hears answers."""
        self.instances[name].paused = not self.instances[name].paused

    @invariant()
    def never_two_acting_for_one_partition(self) -> None:
        for p in range(PARTITIONS):
            acting = [n for n, i in self.instances.items() if i.own.acting(p, i.clock(self.t))]
            assert len(acting) <= 1, f"partition {p} served by {acting} at t={self.t:.2f}"
            if acting:
                key = self.alive(p)
                assert key is not None and key.owner == acting[0]


Cluster.TestCase.settings = settings(max_examples=200, stateful_step_count=80, deadline=None)
TestNoPartitionHasTwoOwners = Cluster.TestCase


def test_every_partition_is_served_and_a_dead_instance_is_replaced_within_5_s() -> None:
    machine = Cluster()
    machine.check_all = lambda: None  # type: ignore[attr-defined]

    def run(seconds: float, names: str) -> None:
        end = machine.t + seconds
        while machine.t < end:
            for name in names:
                machine.tick(name, 0.005, False)
            machine.time_passes(0.25, 0.005)
            machine.never_two_acting_for_one_partition()

    run(6.0, "abc")
    shares = {n: len(i.own.owned(i.clock(machine.t))) for n, i in machine.instances.items()}
    assert sum(shares.values()) == PARTITIONS and max(shares.values()) - min(shares.values()) <= 1
    dead = machine.instances["c"]
    dead.paused = True  # (as good as SIGKILL: it never acts or renews again)
    died = machine.t
    served_again = None
    while machine.t < died + 10:
        run(0.25, "ab")
        alive = [machine.instances[n] for n in "ab"]
        owned = set().union(*(i.own.owned(i.clock(machine.t)) for i in alive))
        if len(owned) == PARTITIONS and served_again is None:
            served_again = machine.t - died
    assert served_again is not None and served_again < 5.0, served_again


def test_a_handover_waits_out_the_margin_before_the_key_is_freed() -> None:
    """A partition given to its preferred owner: the old one stops acting at once, and
    deletes the key only a margin later, so nothing it did arrives after the new owner's
    first act."""
    me = Ownership("b", ttl=TTL, margin=1.0, grace=0.0)
    ours = next(p for p in range(PARTITIONS) if preferred(p, ["a", "b"]) == "a")
    me.plan(0.0, ["b"], free=[ours])
    me.written(ours, revision=1, sent=0.0)
    assert me.acting(ours, 0.1)
    first = me.plan(0.5, ["a", "b"], free=[])  # a joins: the partition is a's
    assert not me.acting(ours, 0.5) and first.release == []
    assert me.plan(1.2, ["a", "b"], free=[]).release == []
    assert me.plan(1.6, ["a", "b"], free=[]).release == [(ours, 1)]


def test_nothing_is_taken_or_given_up_on_a_view_that_may_be_stale() -> None:
    me = Ownership("a", ttl=TTL, margin=1.0, grace=0.0)
    assert me.plan(0.0, [], free=range(PARTITIONS), sure=False).acquire == []
    me.plan(1.0, [], free=[0])
    me.written(0, revision=1, sent=1.0)
    blind = me.plan(2.0, ["a", "b", "c"], free=range(1, PARTITIONS), sure=False)
    assert blind.acquire == [] and blind.release == [] and blind.renew == [(0, 1)]


def test_a_lease_cut_short_by_a_skewed_leader_clock_is_still_fenced() -> None:
    """The worst case the margin is for: a's key is written by a leader whose clock is
    0.3 s slow, a is paused, and the next leader's clock is 0.3 s fast, so the key expires
    0.6 s early; b takes the partition at once. a must have stopped acting by then."""
    machine = Cluster()
    machine.pause_or_resume("c")
    machine.leader_changes(-0.3)
    machine.tick("a", 0.005, False)  # a alone: it takes every partition
    machine.time_passes(0.02, 0.005)
    machine.time_passes(0.01, 0.0)
    assert len(machine.instances["a"].own.owned(machine.t)) == PARTITIONS
    machine.pause_or_resume("a")
    machine.leader_changes(+0.3)
    machine.time_passes(2.41, 0.0)  # the keys have expired by the new leader's clock
    machine.tick("b", 0.001, False)  # b takes those it is preferred for, at once
    machine.time_passes(0.01, 0.001)
    machine.time_passes(0.01, 0.001)
    taken = machine.instances["b"].own.owned(machine.instances["b"].clock(machine.t))
    assert taken  # (the scenario really hands b partitions a held)
    machine.never_two_acting_for_one_partition()


def test_a_renewal_made_but_not_answered_is_renewed_from_without_acting_longer() -> None:
    """A renewal times out (the bucket was electing a leader) although it was made: the
    next one, with the old revision, is refused. The link finds its own value at a newer
    revision and revises: renewing goes on from there, and the time it may act is not
    stretched by a write whose sending time it does not know."""
    own = Ownership("a", ttl=15.0, margin=1.0, grace=1.5, partitions=1)
    own.plan(0.0, ["a"], [0])
    own.written(0, 5, sent=0.0)
    assert own.acting(0, 13.9) and not own.acting(0, 14.0)
    assert own.plan(4.0, ["a"], []).renew == [(0, 5)]
    own.unanswered(0)  # (made: the key is at revision 6, but no answer came)
    own.revised(0, 6)
    own.revised(0, 4)  # (an older one, late: ignored)
    assert own.plan(4.5, ["a"], []).renew == [(0, 6)]
    assert not own.acting(0, 14.0)  # (not stretched)
    own.written(0, 7, sent=4.5)
    assert own.acting(0, 18.4) and not own.acting(0, 18.5)


def test_a_renewal_seen_in_the_watch_before_its_answer_still_extends_the_lease() -> None:
    """The bucket's watch can show our renewal (revision 6) before the renewal's own
    answer comes: the answer must still count, or the lease would never be extended."""
    own = Ownership("a", ttl=15.0, margin=1.0, grace=1.5, partitions=1)
    own.plan(0.0, ["a"], [0])
    own.written(0, 5, sent=0.0)
    assert own.plan(2.0, ["a"], []).renew == [(0, 5)]
    own.revised(0, 6)  # (the watch)
    own.written(0, 6, sent=2.0)  # (the answer)
    assert own.acting(0, 15.9)


def test_an_answer_after_the_key_was_taken_from_us_makes_no_lease() -> None:
    """Our renewal (revision 7) was made; another instance then deleted the key (revision
    8, seen in the watch); the renewal's answer comes only now. It must not start a new
    lease on a key that is gone; a create of ours after that (revision 9) does."""
    own = Ownership("a", ttl=15.0, margin=1.0, grace=1.5, partitions=1)
    own.plan(0.0, ["a"], [0])
    own.written(0, 5, sent=0.0)
    own.plan(2.0, ["a"], [])
    own.refused(0, at=8)  # (the watch: deleted at revision 8)
    own.written(0, 7, sent=2.0)  # (the late answer)
    assert not own.acting(0, 2.1)
    own.plan(3.0, ["a"], [0])
    own.written(0, 9, sent=3.0)
    assert own.acting(0, 3.1)
