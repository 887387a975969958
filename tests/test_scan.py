"""Scan lists (docs/scanning.md): which call a handset affiliated to several groups lets
its user hear. The rules without I/O, an invariant with hypothesis, then a scanning
handset on a real broker."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from esn.client.scan import SELECTED_PRIORITY, ScanList
from esn.protocol import messages as m
from esn.server.shell import Server
from tests.conftest import HandsetFactory, eventually


def scan() -> ScanList:
    return ScanList("home", {"fire": 15, "traffic": 5})


def test_a_higher_priority_call_interrupts_and_the_best_remaining_one_follows() -> None:
    s = scan()
    assert s.groups == ["home", "fire", "traffic"]
    assert s.priorities["home"] == SELECTED_PRIORITY
    assert s.floor("traffic", "normal", 1) == "traffic"  # nothing else on: heard
    assert s.floor("home", "normal", 1) == "home"  # the selected group outranks it
    assert s.floor("fire", "normal", 1) == "fire"  # and fire outranks both
    assert s.floor("traffic", None, 2) is None  # (not the one heard: no switch)
    assert s.floor("fire", None, 2) == "home"  # back to the best talker still on
    assert s.floor("home", None, 2) is None and s.heard is None


def test_an_emergency_outranks_any_priority_and_equals_keep_the_call_heard() -> None:
    s = ScanList("home", {"a": 5, "b": 5})
    assert s.floor("a", "normal", 1) == "a"
    assert s.floor("b", "normal", 1) is None  # as high, not higher: a is kept
    assert s.floor("b", "emergency", 2) == "b"  # raised to an emergency: it interrupts
    assert s.floor("home", "imminent", 1) is None  # imminent peril outranks no priority


def test_a_group_joined_off_the_list_outranks_the_scanned_ones() -> None:
    """A dispatcher's temporary group, or an all-call: what the control room sends to a
    handset is heard over anything it scans."""
    s = scan()
    s.floor("fire", "normal", 1)
    assert s.floor("all-call", "normal", 1) == "all-call"
    assert s.floor("fire", "emergency", 2) == "fire"  # (an emergency is above even that)


def test_old_news_is_ignored_and_a_group_left_is_forgotten() -> None:
    s = scan()
    s.floor("home", "normal", 5)
    s.floor("home", None, 6)
    assert s.floor("home", "normal", 5) is None and s.heard is None  # a state overtaken
    s.floor("fire", "normal", 1)
    s.floor("home", "normal", 7)
    assert s.forget("fire") == "home"  # left while its call went on: never heard again
    assert "fire" not in s.calls
    priorities = {"fire": 3}
    ScanList("home", priorities)
    assert priorities == {"fire": 3}  # (the caller's own dict is left alone)


calls = st.lists(
    st.tuples(
        st.sampled_from(["home", "fire", "traffic", "unlisted"]),
        st.sampled_from(["normal", "imminent", "emergency", None, "left"]),
        st.integers(0, 5),
    ),
    max_size=40,
)


@given(calls)
def test_a_scanning_handset_never_hears_a_lower_call_while_a_higher_one_is_on(
    steps: list[tuple[str, m.Kind | str | None, int]],
) -> None:
    s = scan()
    for tg, kind, seq in steps:
        before = s.heard
        switched = s.forget(tg) if kind == "left" else s.floor(tg, kind, seq)  # type: ignore[arg-type]
        assert (s.heard is None) == (not s.calls)
        if s.heard is not None:
            assert s.heard in s.calls
            assert all(s.rank(g) <= s.rank(s.heard) for g in s.calls)
        assert switched == (s.heard if s.heard not in (before, None) else None)


async def test_a_scanning_handset_hears_one_call_and_switches_by_priority(
    server: Server, handset: HandsetFactory
) -> None:
    """Tried: a handset whose own group is tg-1 scans tg-closed above it; a call in tg-1,
    then one in tg-closed while the first goes on, then the tg-closed talker stops.
    Expect: it hears tg-1, switches to tg-closed at once (a scan entry measured), and back
    to tg-1; the voice of the group not heard is received and counted, never played."""
    scanner = await handset("u1", scan=ScanList("tg-1", {"tg-closed": SELECTED_PRIORITY + 1}))
    assert scanner.scan is not None
    await scanner.affiliate(*scanner.scan.groups)
    home, fire = await handset("u2", "tg-1"), await handset("disp", "tg-closed")
    heard = scanner.expect(lambda i: isinstance(i.msg, m.Media) and i.msg.tg == "tg-1")
    assert isinstance(await home.press("tg-1"), m.Granted)
    await heard
    switched = scanner.expect(lambda i: isinstance(i.msg, m.Media) and i.msg.tg == "tg-closed")
    assert isinstance(await fire.press("tg-closed"), m.Granted)
    await switched
    assert scanner.scan.heard == "tg-closed"
    assert len(scanner.stats.scan_entry_s) == 2  # tg-1 first, then tg-closed
    unheard = scanner.stats.counts.get("media_unheard", 0)
    await eventually(lambda: scanner.stats.counts.get("media_unheard", 0) > unheard + 3)
    back = scanner.expect(lambda i: isinstance(i.msg, m.Media) and i.msg.tg == "tg-1")
    fire.release("tg-closed")
    await back
    assert scanner.scan.heard == "tg-1" and len(scanner.stats.scan_entry_s) == 3
    home.release("tg-1")
