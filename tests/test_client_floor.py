"""The handset's floor participant (TS 24.380 states) driven with explicit time."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from esn.client.floor import (
    Action,
    FloorParticipant,
    FloorState,
    Outcome,
    SendRelease,
    SendRequest,
    StartMedia,
    StopMedia,
    Timers,
)
from esn.protocol import messages as m

S = FloorState
T = Timers(t101=0.5, c101=3, give_up_s=5.0, t100=0.5, c100=2)


def state_of(p: FloorParticipant) -> FloorState:
    """Read through a call: mypy would otherwise keep an earlier assert's narrowing."""
    return p.state


def granted(call: str = "c1", kind: m.Kind = "normal") -> m.Granted:
    return m.Granted(tg="g", call=call, prio=100, kind=kind, max_ms=30000)


def outcomes(actions: list[Action]) -> list[tuple[str, str | None]]:
    return [(a.what, a.cause) for a in actions if isinstance(a, Outcome)]


def pressed(now: float = 0.0) -> FloorParticipant:
    p = FloorParticipant("me", T)
    assert p.press("normal", None, 1, now) == [SendRequest("normal", None, 1)]
    assert state_of(p) is S.PENDING_REQUEST
    return p


def talking(now: float = 0.0) -> FloorParticipant:
    p = pressed(now)
    p.received(granted(), now + 0.01)
    assert state_of(p) is S.HAS_PERMISSION
    return p


def test_t101_resends_the_same_request_then_the_press_fails() -> None:
    p = pressed()
    sent: list[tuple[float, Action]] = []
    now = 0.0
    while state_of(p) is S.PENDING_REQUEST:
        now = p.next_deadline() or now
        sent += [(now, a) for a in p.on_timer(now)]
    assert sent == [
        (0.5, SendRequest("normal", None, 1)),
        (1.0, SendRequest("normal", None, 1)),
        (1.5, SendRequest("normal", None, 1)),
        (5.0, Outcome("no_answer")),
    ]
    assert state_of(p) is S.NO_PERMISSION and p.next_deadline() is None


def test_a_timer_fired_early_does_nothing() -> None:
    p = pressed()
    assert p.on_timer(0.2) == [] and p.next_deadline() == 0.5


def test_grant_starts_voice_and_reports_the_access_time() -> None:
    p = pressed(10.0)
    out = p.received(granted(), 10.004)
    assert out[0] == StartMedia("c1")
    (o,) = [a for a in out if isinstance(a, Outcome)]
    assert (o.what, o.via_queue) == ("granted", False)
    assert o.waited_s is not None and abs(o.waited_s - 0.004) < 1e-9
    assert p.next_deadline() is None
    assert p.received(granted(), 10.5) == []  # a repeated grant changes nothing


def test_queued_then_granted_is_a_grant_via_the_queue() -> None:
    p = pressed()
    out = p.received(m.Queued(tg="g", pos=2, prio=100), 0.01)
    assert outcomes(out) == [("queued", None)] and p.queue_pos == 2
    assert p.next_deadline() is None  # no T101 while the server holds our place
    assert p.received(m.Queued(tg="g", pos=1, prio=100), 1.0) == []  # moved up: no news
    assert p.queue_pos == 1
    out = p.received(granted(), 3.0)
    o = next(a for a in out if isinstance(a, Outcome))
    assert o.via_queue and o.waited_s == 3.0 and StartMedia("c1") in out
    assert p.queue_pos is None


def test_deny_ends_the_press() -> None:
    p = pressed()
    assert outcomes(p.received(m.Deny(tg="g", cause="busy"), 0.01)) == [("denied", "busy")]
    assert state_of(p) is S.NO_PERMISSION and p.next_deadline() is None


def test_revoke_stops_voice_at_once_and_releases() -> None:
    p = talking()
    out = p.received(m.Revoke(tg="g", cause="preempted"), 1.0)
    assert out[:2] == [StopMedia(), SendRelease()]
    assert outcomes(out) == [("revoked", "preempted")]
    # the server takes a revoked floor back itself: no release to confirm, no T100
    assert state_of(p) is S.NO_PERMISSION and not p.media and p.next_deadline() is None


def test_a_revoke_for_a_floor_we_do_not_hold_is_ignored() -> None:
    p = pressed()
    assert p.received(m.Revoke(tg="g", cause="no_media"), 0.1) == []
    assert state_of(p) is S.PENDING_REQUEST


def test_t100_resends_an_unconfirmed_release_then_stops_waiting() -> None:
    p = talking()
    assert p.release(1.0) == [StopMedia(), SendRelease()]
    assert state_of(p) is S.PENDING_RELEASE
    assert p.on_timer(1.5) == [SendRelease()]
    assert p.on_timer(2.0) == [SendRelease()]
    assert p.on_timer(2.5) == []
    assert state_of(p) is S.NO_PERMISSION


def test_idle_or_a_state_without_us_confirms_the_release() -> None:
    p = talking()
    p.release(1.0)
    p.received(m.Idle(tg="g", call="c1", seq=4), 1.01)
    assert state_of(p) is S.NO_PERMISSION
    p = talking()
    p.release(1.0)
    state = m.State(tg="g", floor="taken", emergency=False, queue=0, seq=4, since_ts=0, talker="me")
    p.received(state, 1.01)  # still names us: not yet
    assert state_of(p) is S.PENDING_RELEASE
    p.received(m.State(tg="g", floor="idle", emergency=False, queue=0, seq=5, since_ts=0), 1.02)
    assert state_of(p) is S.NO_PERMISSION


def test_release_while_waiting_leaves_the_queue() -> None:
    p = pressed()
    p.received(m.Queued(tg="g", pos=1, prio=100), 0.01)
    assert p.release(1.0) == [SendRelease()]
    assert state_of(p) is S.NO_PERMISSION and p.queue_pos is None
    assert p.release(1.1) == []  # nothing held: nothing to say


def test_a_grant_nobody_wants_any_more_is_handed_back() -> None:
    p = pressed()
    p.release(0.1)
    assert p.received(granted(), 0.2) == [SendRelease()]
    assert state_of(p) is S.NO_PERMISSION and not p.media


def test_server_back_while_talking_asks_again_and_voice_goes_on() -> None:
    p = talking()
    assert p.server_online(7, 2.0) == [SendRequest("normal", None, 7)]
    assert state_of(p) is S.PENDING_REQUEST and p.media  # no StopMedia: the call goes on
    out = p.received(granted("c1"), 2.01)
    assert StartMedia("c1") not in out  # same call: the packet sequence goes on
    assert next(a for a in out if isinstance(a, Outcome)).waited_s is None  # no sample


def test_a_call_lowered_while_talking_is_asked_for_again_at_its_new_kind() -> None:
    """An imminent-peril call cancelled while we talk goes on at normal (docs/protocol.md,
    11.12): a reclaim after the server's `online` must not raise the peril again."""
    p = FloorParticipant("me", T)
    p.press("imminent", None, 1, 0.0)
    p.received(granted(kind="imminent"), 0.01)
    assert p.received(granted(kind="normal"), 1.0) == []  # told, nothing to do
    assert p.server_online(7, 2.0) == [SendRequest("normal", None, 7)]
    p.received(granted(kind="emergency"), 2.01)  # (the reclaim answered at another kind)
    assert p.received(granted("c9", kind="normal"), 2.02) == [] and p.kind == "emergency"


def test_server_back_but_the_floor_was_taken_meanwhile() -> None:
    p = talking()
    p.server_online(7, 2.0)
    out = p.received(m.Queued(tg="g", pos=1, prio=100), 2.01)
    assert out[0] == StopMedia() and state_of(p) is S.QUEUED and not p.media


def test_server_back_while_idle_says_nothing() -> None:
    assert FloorParticipant("me", T).server_online(1, 0.0) == []


def test_group_news_is_kept_for_the_display() -> None:
    p = FloorParticipant("me", T)
    p.received(m.Taken(tg="g", talker="u9", call="c5", prio=1, kind="normal", seq=1), 0.0)
    assert (p.talker, p.call) == ("u9", "c5")
    p.received(m.Idle(tg="g", call="c5", seq=2), 0.1)
    assert p.talker is None and p.call == "c5"
    p.received(m.State(tg="g", floor="idle", emergency=True, queue=0, seq=3, since_ts=0), 0.2)
    assert p.emergency and state_of(p) is S.NO_PERMISSION


# --- invariants over random histories -----------------------------------------------------

KINDS = st.sampled_from(["normal", "imminent", "emergency"])
OTHERS = st.sampled_from(["u2", "u3"])


class ParticipantMachine(RuleBasedStateMachine):
    """Whatever arrives and whenever, the handset's voice follows its permission."""

    def __init__(self) -> None:
        super().__init__()
        self.p = FloorParticipant("me", T)
        self.now = 0.0
        self.ref = 0
        self.voice = False  # what the actions said: StartMedia .. StopMedia
        self.requests: dict[int, int] = {}  # ref -> times sent

    def apply(self, actions: list[Action]) -> None:
        for a in actions:
            if isinstance(a, StartMedia):
                assert not self.voice, "voice started twice"
                self.voice = True
            elif isinstance(a, StopMedia):
                assert self.voice, "voice stopped that was not running"
                self.voice = False
            elif isinstance(a, SendRequest):
                self.requests[a.ref] = self.requests.get(a.ref, 0) + 1

    @rule(dt=st.floats(0, 3))
    def time_passes(self, dt: float) -> None:
        self.now += dt
        while (d := self.p.next_deadline()) is not None and d <= self.now:
            self.apply(self.p.on_timer(d))

    @rule(kind=KINDS)
    def press(self, kind: m.Kind) -> None:
        self.ref += 1
        self.apply(self.p.press(kind, None, self.ref, self.now))

    @rule()
    def release(self) -> None:
        self.apply(self.p.release(self.now))
        assert state_of(self.p) in (S.NO_PERMISSION, S.PENDING_RELEASE) and not self.voice

    @rule()
    def server_online(self) -> None:
        self.ref += 1
        self.apply(self.p.server_online(self.ref, self.now))

    @rule(call=st.sampled_from(["c1", "c2"]), kind=KINDS)
    def granted(self, call: str, kind: m.Kind) -> None:
        self.apply(self.p.received(granted(call, kind), self.now))

    @rule(pos=st.integers(1, 8))
    def queued(self, pos: int) -> None:
        self.apply(self.p.received(m.Queued(tg="g", pos=pos, prio=100), self.now))

    @rule(cause=st.sampled_from(["busy", "queue_full", "rate_limited"]))
    def deny(self, cause: str) -> None:
        self.apply(self.p.received(m.Deny(tg="g", cause=cause), self.now))

    @rule(cause=st.sampled_from(["preempted", "max_talk_time", "no_media", "dispatcher"]))
    def revoke(self, cause: str) -> None:
        self.apply(self.p.received(m.Revoke(tg="g", cause=cause), self.now))

    @rule(talker=OTHERS)
    def taken_by_another(self, talker: str) -> None:
        taken = m.Taken(tg="g", talker=talker, call="c1", prio=1, kind="normal", seq=1)
        self.apply(self.p.received(taken, self.now))

    @rule()
    def idle(self) -> None:
        self.apply(self.p.received(m.Idle(tg="g", call="c1", seq=1), self.now))

    @precondition(lambda self: state_of(self.p) is S.PENDING_REQUEST)
    @rule()
    def nobody_answers(self) -> None:
        self.now += T.give_up_s + 1
        self.time_passes(0)
        assert state_of(self.p) is S.NO_PERMISSION  # a press always ends

    @invariant()
    def voice_follows_permission(self) -> None:
        assert self.voice == self.p.media
        if state_of(self.p) is S.HAS_PERMISSION:
            assert self.voice
        if self.voice:  # talking, or a reclaim awaiting its answer
            assert state_of(self.p) in (S.HAS_PERMISSION, S.PENDING_REQUEST)

    @invariant()
    def a_timer_runs_exactly_while_waiting_on_the_server(self) -> None:
        waiting = state_of(self.p) in (S.PENDING_REQUEST, S.PENDING_RELEASE)
        assert (self.p.next_deadline() is not None) == waiting

    @invariant()
    def a_request_is_sent_at_most_1_plus_c101_times(self) -> None:
        assert all(n <= 1 + T.c101 for n in self.requests.values())

    @invariant()
    def only_a_queued_participant_has_a_position(self) -> None:
        assert (self.p.queue_pos is not None) == (state_of(self.p) is S.QUEUED)


ParticipantMachine.TestCase.settings = settings(
    max_examples=300, stateful_step_count=40, deadline=None
)
test_participant_invariants = ParticipantMachine.TestCase
