"""Training exercises (`esn exercise`): the file is checked before anything starts, and an
exercise played on a real Mosquitto and server waits on the dispatcher, here the console
driven by Textual's pilot as the trainee would, then says how the trainee did."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from esn.console.app import ConsoleApp
from esn.exercise.run import run_exercise
from esn.exercise.script import ExerciseError, load_exercise, parse_exercise, shipped_names
from esn.tools.broker import Mosquitto
from esn.transport import BrokerConfig
from tests.conftest import eventually
from tests.test_console import row, select


def doc(*events: dict[str, Any], duration: float = 60) -> dict[str, Any]:
    return {
        "exercise": {"name": "Test drill", "duration_s": duration, "answer_within_s": 30},
        "fleet": {"talkgroup": [{"id": "tg-a"}, {"id": "tg-b", "name": "Bravo"}]},
        "crew": [
            {"group": "tg-a", "prefix": "a", "count": 3, "near": [51.5, -0.1]},
            {"group": "tg-b", "ids": ["b-01", "b-02"]},
        ],
        "traffic": {"gap_mean_s": 3600},  # (no background talk in these tests)
        "event": list(events),
    }


def test_every_shipped_exercise_is_valid() -> None:
    assert {"flood", "officer-down", "pursuit"} <= set(shipped_names())
    for name in shipped_names():
        ex = load_exercise(name)
        assert ex.events and any(e.answer for e in ex.events), name


@pytest.mark.parametrize(
    ("event", "says"),
    [
        (
            {"at": 1, "do": "sos", "unit": "a-01", "colour": "red"},
            "event 1 (sos): unknown key 'colour'",
        ),
        ({"at": 1, "do": "sos", "unit": "z-99"}, "event 1 (sos) unit: 'z-99' is not a field unit"),
        ({"at": 1, "do": "dance", "unit": "a-01"}, "event 1 do: want one of sos, talk"),
        ({"at": 99, "do": "sos", "unit": "a-01"}, "event 1 (sos) at: want 0 to 60"),
        ({"at": 1, "do": "status", "unit": "a-01", "code": 77}, "code: want a status code"),
        ({"at": 1, "do": "sds", "unit": "a-01"}, "event 1 (sds) text: want some text"),
        ({"at": 1, "do": "regroup_request", "unit": "a-01", "units": ["a-01"]}, "two or more"),
        ({"at": 1, "do": "move", "unit": "a-01", "to": [95, 0]}, "want [lat, lon] in degrees"),
    ],
)
def test_a_mistake_in_an_exercise_is_told_in_one_line_naming_it(
    event: dict[str, Any], says: str
) -> None:
    with pytest.raises(ExerciseError) as err:
        parse_exercise(doc(event))
    assert says in str(err.value) and "\n" not in str(err.value)


def test_the_trainee_must_be_a_dispatcher() -> None:
    d = doc()
    d["fleet"]["unit"] = [{"id": "disp-1", "role": "handset"}]
    with pytest.raises(ExerciseError, match="trainee 'disp-1': not a dispatcher"):
        parse_exercise(d)


@pytest.mark.broker
async def test_a_trainee_at_the_console_answers_everything_and_the_debrief_says_so(
    tmp_path: Path,
) -> None:
    ex = parse_exercise(
        doc(
            {"at": 0.5, "do": "sos", "unit": "a-02", "repeat_s": 2, "note": "officer down"},
            {"at": 0.5, "do": "sds", "unit": "a-01", "text": "need a van"},
            {"at": 0.5, "do": "regroup_request", "unit": "a-03", "units": ["a-03", "b-01"]},
            {"at": 0.5, "do": "status", "unit": "b-02", "code": 3},
        )
    )
    with Mosquitto() as broker:
        played = asyncio.create_task(
            run_exercise(ex, broker_url=broker.url, out=tmp_path, wait_for_trainee=True)
        )
        app = ConsoleApp(BrokerConfig.from_url(broker.url), "disp-1")
        try:
            async with app.run_test(size=(160, 50), notifications=True) as pilot:
                # the SOS: shown on its group, acknowledged from there
                await eventually(lambda: "SOS" in "".join(row(app, "groups", "tg-a")), 20)
                await select(app, pilot, "groups", "tg-a")
                await pilot.press("a")
                # the crew's SDS: answered with one to the unit
                await eventually(lambda: any("need a van" in e.text for e in app.model.events))
                await select(app, pilot, "units", "a-01")
                await pilot.press("s")
                await pilot.press(*"on its way", "enter")
                # the regroup asked for: both units marked, one group made
                for unit in ("a-03", "b-01"):
                    await select(app, pilot, "units", unit)
                    await pilot.press("x")
                await pilot.press("r")
                await pilot.press(*"inc-1", "enter", "enter")
                assert await asyncio.wait_for(played, 20) == 0
        finally:
            played.cancel()
    debrief = json.loads((tmp_path / "debrief.json").read_text())
    assert debrief["ended"] == "every event is over and answered"
    asks = {a["event"]: a for a in debrief["asks"]}
    assert set(asks) == {1, 2, 3}  # (the status report waits on nobody)
    assert all(a["verdict"] == "on time" for a in asks.values()), asks
    assert asks[1]["by"] == "disp-1" and asks[1]["how"] == "acknowledged"
    assert asks[2]["by"] == "disp-1" and "on its way" in asks[2]["how"]
    assert "regrouped into inc-1" in asks[3]["how"]
    page = (tmp_path / "debrief.html").read_text()
    assert "<svg" in page and "officer down" in page


@pytest.mark.broker
async def test_an_sos_nobody_acknowledges_repeats_and_is_missed(tmp_path: Path) -> None:
    ex = parse_exercise(doc({"at": 0, "do": "sos", "unit": "a-01", "repeat_s": 1}, duration=3.5))
    with Mosquitto() as broker:
        assert (
            await run_exercise(ex, broker_url=broker.url, out=tmp_path, wait_for_trainee=False) == 0
        )
    debrief = json.loads((tmp_path / "debrief.json").read_text())
    (sos,) = debrief["asks"]
    assert sos["verdict"] == "missed" and len(sos["asked_again_s"]) >= 2
    assert debrief["ended"] == "its 3.5 s are up"
    assert any(m["kind"] == "missed" for m in debrief["timeline"])


@pytest.mark.broker
async def test_a_request_by_voice_on_a_busy_channel_is_raised_once_it_is_said(
    tmp_path: Path,
) -> None:
    """The crew talks back to back; a unit asking by voice queues for the floor, and a try
    that found none is on the timeline, not held against the dispatcher."""
    ex = parse_exercise(
        doc(
            {"at": 0, "do": "busy", "group": "tg-a", "seconds": 6},
            {"at": 0.2, "do": "talk", "unit": "a-03", "seconds": 1, "answer": True, "repeat_s": 1},
            duration=12,
        )
    )
    with Mosquitto() as broker:
        assert (
            await run_exercise(ex, broker_url=broker.url, out=tmp_path, wait_for_trainee=False) == 0
        )
    debrief = json.loads((tmp_path / "debrief.json").read_text())
    (ask,) = debrief["asks"]  # (one ask, however many tries it took to be heard)
    failed = [m["at_s"] for m in debrief["timeline"] if m["kind"] == "failed"]
    # (seed 1: the crew's first burst outlasts a-03's wait in the queue)
    assert failed and all(at < ask["raised_s"] for at in failed), debrief["timeline"]
    assert ask["verdict"] == "missed"  # (nobody answered: there was no trainee)
