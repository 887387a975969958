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
    assert s.floor("traffic", "normal") == "traffic"  # nothing else on: heard
    assert s.floor("home", "normal") == "home"  # the selected group outranks it
    assert s.floor("fire", "normal") == "fire"  # and fire outranks both
    assert s.floor("traffic", None) is None  # (not the one heard: no switch)
    assert s.floor("fire", None) == "home"  # back to the best call still on
    assert s.floor("home", None) is None and s.heard is None


def test_an_emergency_outranks_any_priority_and_equals_keep_the_call_heard() -> None:
    s = ScanList("home", {"a": 5, "b": 5})
    assert s.floor("a", "normal") == "a"
    assert s.floor("b", "normal") is None  # as high, not higher: a is kept
    assert s.floor("b", "emergency") == "b"  # raised to an emergency: it interrupts
    assert s.floor("home", "imminent") is None  # imminent peril outranks no priority
    assert s.floor("nowhere", "emergency") is None and "nowhere" not in s.calls


calls = st.lists(
    st.tuples(
        st.sampled_from(["home", "fire", "traffic", "other"]),
        st.sampled_from(["normal", "imminent", "emergency", None]),
    ),
    max_size=40,
)


@given(calls)
def test_a_scanning_handset_never_hears_a_lower_call_while_a_higher_one_is_on(
    steps: list[tuple[str, m.Kind | None]],
) -> None:
    s = scan()
    for tg, kind in steps:
        before = s.heard
        switched = s.floor(tg, kind)
        assert (s.heard is None) == (not s.calls)
        if s.heard is not None:
            assert s.heard in s.calls
            assert all(s.rank(g) <= s.rank(s.heard) for g in s.calls)
        assert switched == (s.heard if s.heard not in (before, None) else None)


async def test_a_scanning_handset_hears_one_call_and_switches_by_priority(
    server: Server, handset: HandsetFactory
) -> None:
    """Tried: a handset whose own group is tg-1 scans tg-2 above it; a call in tg-1, then
    one in tg-2 while the first goes on, then the tg-2 call ends. Expect: it hears tg-1,
    switches to tg-2 at once (a scan entry measured), and back to tg-1; the voice of the
    group not heard is received and counted, never played."""
    scanner = await handset("u1", scan=ScanList("tg-1", {"tg-2": SELECTED_PRIORITY + 1}))
    await scanner.affiliate(*scanner.scan.groups)  # type: ignore[union-attr]
    home, fire = await handset("u2", "tg-1"), await handset("u3", "tg-2")
    heard = scanner.expect(lambda i: isinstance(i.msg, m.Media) and i.msg.tg == "tg-1")
    assert isinstance(await home.press("tg-1"), m.Granted)
    await heard
    switched = scanner.expect(lambda i: isinstance(i.msg, m.Media) and i.msg.tg == "tg-2")
    assert isinstance(await fire.press("tg-2"), m.Granted)
    await switched
    assert scanner.scan is not None and scanner.scan.heard == "tg-2"
    assert len(scanner.stats.scan_entry_s) == 2  # tg-1 first, then tg-2
    unheard = scanner.stats.counts.get("media_unheard", 0)
    await eventually(lambda: scanner.stats.counts.get("media_unheard", 0) > unheard + 3)
    back = scanner.expect(lambda i: isinstance(i.msg, m.Media) and i.msg.tg == "tg-1")
    fire.release("tg-2")
    await back
    assert scanner.scan.heard == "tg-1" and len(scanner.stats.scan_entry_s) == 3
    home.release("tg-1")
