"""The handset as its user meets it: one talk-burst procedure, retries when the server is
silent, and refusals as typed exceptions."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from esn.client.floor import Timers
from esn.client.handset import HAS_PERMISSION, NO_PERMISSION, Handset, Refused
from esn.core.fleet import parse_fleet
from esn.protocol import codec
from esn.protocol import messages as m
from esn.server.shell import Config, Server
from esn.transport import BrokerConfig, Transport, make_transport
from tests.conftest import HandsetFactory, eventually


async def test_a_burst_that_gets_the_floor_talks_and_releases(
    server: Server, handset: HandsetFactory
) -> None:
    a = await handset("u1", "tg-1")
    b = await handset("u2", "tg-1")
    heard = b.expect(lambda i: isinstance(i.msg, m.Media) and i.msg.talker == "u1")
    burst = await a.talk_burst("tg-1", 0.3)
    assert burst.outcome == "talked" and not burst.queued
    assert burst.access_s is not None and 0 < burst.access_s < 5
    await heard
    await eventually(lambda: a.floor_state("tg-1") == NO_PERMISSION)  # release confirmed
    assert server.network.floors["tg-1"].holder is None


async def test_a_burst_waits_in_the_queue_then_talks(
    server: Server, handset: HandsetFactory
) -> None:
    a = await handset("u1", "tg-1")
    b = await handset("u2", "tg-1")
    first = asyncio.create_task(a.talk_burst("tg-1", 0.4))
    await eventually(lambda: a.floor_state("tg-1") == HAS_PERMISSION)
    second = await b.talk_burst("tg-1", 0.1)
    assert (second.outcome, second.queued) == ("talked", True)
    assert (await first).outcome == "talked"
    assert b.stats.queued_access_s and not b.stats.access_s  # not an access-time sample


async def test_a_burst_says_why_it_got_nothing_or_was_cut_short(
    server: Server, handset: HandsetFactory
) -> None:
    a = await handset("u1", "tg-1", "tg-bc")
    refused = await a.talk_burst("tg-bc", 0.2)
    assert (refused.outcome, refused.cause) == ("denied", "receive_only")
    disp = await handset("disp", "tg-1")
    talk = asyncio.create_task(a.talk_burst("tg-1", 5))
    await eventually(lambda: a.floor_state("tg-1") == HAS_PERMISSION)
    assert isinstance(await disp.press("tg-1"), m.Granted)
    cut = await talk
    assert (cut.outcome, cut.cause) == ("revoked", "preempted") and cut.talked
    disp.release("tg-1")


async def test_an_unanswered_press_is_sent_again_then_fails(
    broker: BrokerConfig, prefix: str, mqtt_client: str
) -> None:
    """No server: the request goes out 1 + C101 times (same ref), then the press fails."""
    timers = Timers(t101=0.05, c101=3, give_up_s=0.4)
    h = Handset("u1", broker, prefix=prefix, mqtt_client=mqtt_client, timers=timers)
    spy = make_transport(mqtt_client, broker, client_id="spy")
    refs: list[int | None] = []
    spy.on_message = lambda t, p: refs.append(codec.decode(p).ref)
    await spy.start()
    await spy.subscribe(f"{prefix}/tg/+/up/+/floor")
    await h.start()
    try:
        with pytest.raises(TimeoutError):
            await h.press("tg-1")
        assert h.floor_state("tg-1") == NO_PERMISSION
        await eventually(lambda: len(refs) == 4)
        assert len(set(refs)) == 1
        burst = await h.talk_burst("tg-1", 1.0)
        assert burst.outcome == "no_answer"
    finally:
        await h.stop()
        await spy.stop()


async def test_a_refused_affiliation_is_a_typed_error(
    broker: BrokerConfig, prefix: str, mqtt_client: str
) -> None:
    closed = parse_fleet({"defaults": {"open_registration": False}, "talkgroup": [{"id": "tg-1"}]})
    srv = Server(
        Config(broker=broker, prefix=prefix, server_id=f"srv-{prefix}", mqtt_client=mqtt_client),
        closed,
    )
    await srv.start()
    h = Handset("stranger", broker, prefix=prefix, mqtt_client=mqtt_client)
    await h.start()
    try:
        with pytest.raises(Refused) as refused:
            await h.affiliate("tg-1", "tg-1")  # twice: forgetting it once must be enough
        assert refused.value.cause == "forbidden" and "not registered" in str(refused.value)
        assert h.groups == {}  # nothing left to re-affiliate to when the server restarts
    finally:
        await h.stop()
        await srv.stop()


def test_a_handset_and_the_console_can_be_built_before_their_loop_runs() -> None:
    """`esn console` builds its app (and its handset) before Textual starts the loop."""
    from esn.console.app import ConsoleApp

    Handset("u1", BrokerConfig())
    ConsoleApp(BrokerConfig(), "disp")


async def fake_server(
    broker: BrokerConfig, prefix: str, mqtt_client: str, *answers: m.Message
) -> Transport:
    """Answers every floor request with `answers`, published back to back."""
    t = make_transport(mqtt_client, broker, client_id="fake-server")

    def on_request(topic: str, payload: bytes) -> None:
        request = codec.decode(payload)
        if isinstance(request, m.Request):
            unit = topic.split("/")[-2]
            for answer in answers:
                reply = dataclasses.replace(answer, ref=request.ref)
                t.publish(f"{prefix}/unit/{unit}/down", codec.encode(reply), qos=1)

    t.on_message = on_request
    await t.start()
    await t.subscribe(f"{prefix}/tg/+/up/+/floor")
    return t


GRANT = m.Granted(tg="tg-1", call="c1", prio=100, kind="normal", max_ms=30000)


@pytest.mark.parametrize(
    ("answers", "outcome", "queued"),
    [
        ((m.Queued(tg="tg-1", pos=1, prio=100), GRANT), "talked", True),
        ((GRANT, m.Revoke(tg="tg-1", cause="preempted")), "revoked", False),
    ],
)
async def test_answers_arriving_together_are_all_heard(
    broker: BrokerConfig,
    prefix: str,
    mqtt_client: str,
    answers: tuple[m.Message, ...],
    outcome: str,
    queued: bool,
) -> None:
    server = await fake_server(broker, prefix, mqtt_client, *answers)
    h = Handset("u1", broker, prefix=prefix, mqtt_client=mqtt_client)
    await h.start()
    try:
        burst = await h.talk_burst("tg-1", 0.3, queue_wait=2)
        assert (burst.outcome, burst.queued) == (outcome, queued)
    finally:
        await h.stop()
        await server.stop()


async def test_a_burst_tells_its_outcomes_as_they_happen(
    server: Server, handset: HandsetFactory
) -> None:
    """The load generator counts a grant when it comes, not when the talk is over."""
    a = await handset("u1", "tg-1")
    told: list[str] = []
    burst = asyncio.create_task(a.talk_burst("tg-1", 30, on_outcome=lambda o: told.append(o.what)))
    await eventually(lambda: told == ["granted"])
    assert not burst.done()
    burst.cancel()
    a.release("tg-1")


async def test_affiliating_twice_to_one_group_in_one_call_is_harmless(
    server: Server, handset: HandsetFactory
) -> None:
    h = await handset("u1")
    reply = await h.affiliate("tg-1", "tg-1", "tg-nope")
    assert reply.groups == ["tg-1"] and list(h.groups) == ["tg-1"]


def test_a_restarted_handset_does_not_reuse_its_refs() -> None:
    """The server takes a ref it has seen (with the same content) for a duplicate."""
    refs = {Handset("u1", BrokerConfig()).next_ref() for _ in range(20)}
    assert len(refs) == 20


async def test_a_link_that_stops_first_sends_what_it_was_handed(
    broker: BrokerConfig, prefix: str, mqtt_client: str
) -> None:
    """A unit's last word is its `offline`, published just before a clean disconnect,
    which discards the will: on paho it could be lost, and the server never told."""
    sink = make_transport(mqtt_client, broker, client_id="sink")
    got: list[bytes] = []
    sink.on_message = lambda topic, payload: got.append(payload)
    await sink.start()
    await sink.subscribe(f"{prefix}/last")
    t = make_transport(mqtt_client, broker, client_id="leaving")
    await t.start()
    for i in range(200):
        t.publish(f"{prefix}/last", str(i).encode(), qos=1)
    await t.stop()
    try:
        await eventually(lambda: len(got) == 200)
    finally:
        await sink.stop()


async def test_each_press_is_told_once_with_its_access_outcome(
    server: Server, handset: HandsetFactory
) -> None:
    """What the demo writes to its access trace: one report per press, once its access
    is decided (granted, denied, or let go while queued), with its times."""
    told: list[tuple[str, str, str, str]] = []
    a = await handset("u1", "tg-1")
    b = await handset("u2", "tg-1")
    c = await handset("u3")  # (in no group)
    for h in (a, b, c):
        h.on_access = lambda tg, x, u=h.unit: told.append((u, tg, x.outcome, x.cause))
    assert isinstance(await a.press("tg-1"), m.Granted)
    assert isinstance(await b.press("tg-1"), m.Queued)
    b.release("tg-1")  # (let go while queued)
    assert isinstance(await c.press("tg-1"), m.Deny)
    a.release("tg-1")  # (after the grant: nothing more to tell)
    assert told == [
        ("u1", "tg-1", "immediate", ""),
        ("u2", "tg-1", "abandoned", ""),
        ("u3", "tg-1", "denied", "not_affiliated"),
    ]


async def test_location_reports_begin_after_the_delay_asked(
    broker: BrokerConfig, prefix: str, mqtt_client: str, handset: HandsetFactory
) -> None:
    """A fleet's handsets can spread their reports: 5,000 at once held a load test's loop."""
    loop = asyncio.get_running_loop()
    watcher = make_transport(mqtt_client, broker, client_id=f"{prefix}-watcher")
    first: asyncio.Future[float] = loop.create_future()

    def heard(topic: str, payload: bytes) -> None:
        if isinstance(codec.decode(payload), m.Location) and not first.done():
            first.set_result(loop.time())

    watcher.on_message = heard
    await watcher.start()
    try:
        a = await handset("u1")
        await watcher.subscribe(a.topics.unit_up("u1"))
        began = loop.time()
        a.start_location_reports(10, first_after=0.3)
        assert await asyncio.wait_for(first, 5) - began >= 0.3
    finally:
        await watcher.stop()
