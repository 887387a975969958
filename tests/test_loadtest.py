"""The load generator: scenario validation, the coordinated-omission correction, and a
small scenario end to end against a real Mosquitto and server."""

from __future__ import annotations

import asyncio
import csv
import json
import os
import re
import signal
import sys
import tempfile
from pathlib import Path

import pytest

from esn.cli import main
from esn.client.trace import (
    FIELDS,
    FLOOR_FIELDS,
    MESSAGE_FIELDS,
    OUTCOMES,
    Access,
    AccessTrace,
    merge,
)
from esn.loadtest.capacity import run_sizes, sized
from esn.loadtest.recorder import Recorder, summary_ms
from esn.loadtest.runner import plan, run_loadtest
from esn.loadtest.scenario import ScenarioError, load_scenario, parse_scenario

SCENARIOS = Path(__file__).resolve().parent.parent / "esn" / "loadtest" / "scenarios"


def test_shipped_scenarios_are_valid() -> None:
    for path in sorted(SCENARIOS.glob("*.toml")):
        s = load_scenario(path)
        assert s.fleet.handsets > 0 and s.run.duration_s > 0


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"run": {"duration_s": 0}}, "[run] duration_s must be above 0"),
        ({"run": {"durration_s": 5}}, "[run] unknown key 'durration_s'"),
        ({"run": {"mqtt_client": "mosquitto"}}, "[run] mqtt_client must be gmqtt or paho"),
        ({"fleet": {"handsets": "many"}}, "[fleet] handsets must be int, got 'many'"),
        ({"fleet": {"handsets": 10, "talkgroups": 6}}, "at least two per talkgroup"),
        ({"traffic": {"activity": 1.5}}, "[traffic] activity must be between 0 and 1"),
        ({"traffic": {"mean_talk_s": 10, "mean_session_s": 5}}, "mean_session_s must be at least"),
        ({"thresholds": {"floor_access_p95_ms": -1}}, "must not be negative"),
        ({"servers": {}}, "unknown section [servers]"),
        ({"run": {"cluster": True, "broker": "mqtt://127.0.0.1:1"}}, "cluster starts its own"),
    ],
)
def test_bad_scenarios_are_refused_with_the_key_named(doc: dict[str, object], message: str) -> None:
    with pytest.raises(ScenarioError) as err:
        parse_scenario(doc)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_unreadable_scenario(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="cannot read scenario"):
        load_scenario(tmp_path / "none.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[run\n")
    with pytest.raises(ScenarioError, match="not valid TOML"):
        load_scenario(bad)


@pytest.mark.parametrize(
    ("answers", "outcome"),
    [
        (["granted"], "immediate"),
        (["granted", "revoked"], "immediate"),
        (["queued", "granted"], "queued"),
        (["queued"], "abandoned"),
        (["denied"], "denied"),
        (["no_answer"], "failed"),
        (["queued", "no_answer"], "failed"),
        (["queued", "denied"], "denied"),
        ([], "failed"),
    ],
)
def test_each_request_gets_one_outcome(answers: list[str], outcome: str) -> None:
    access = Access(sent=10.0)
    for i, what in enumerate(answers):
        access.seen(what, 10.0 + 0.01 * (i + 1), "busy" if what == "denied" else None)
    assert access.outcome == outcome
    assert (access.answered is None) == (not set(answers) & {"granted", "queued", "denied"})


def test_the_workers_traces_merge_in_request_order(tmp_path: Path) -> None:
    parts = [tmp_path / "access-0.csv", tmp_path / "access-1.csv"]
    for part, sent in zip(parts, ([3.0, 1.0], [2.0, 0.5]), strict=True):
        trace = AccessTrace(part, t0=0.0)
        for t in sent:  # (written as each ends: out of order)
            a = Access(t)
            a.seen("granted", t + 0.002)
            trace.write(a, "u1", "tg-1", "normal", planned=t)
        trace.close()
    with open(parts[1], "a") as f:
        f.write("4.0,u2")  # (a worker killed mid-row)
    outcomes = merge(parts, tmp_path / "access.csv")
    with open(tmp_path / "access.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == list(FIELDS)
    assert [r[0] for r in rows[1:]] == ["0.500", "1.000", "2.000", "3.000"]
    assert rows[1][FIELDS.index("access_ms")] == "2.000"
    assert outcomes == {"immediate": 4} and not any(p.exists() for p in parts)


def test_coordinated_omission_is_corrected_on_a_stalled_schedule() -> None:
    """Presses planned every 10 ms for 1 s; each takes 1 ms once sent; the generator stalls
    from 0.3 s and sends what fell due in the stall all at once at 0.85 s. Measured
    from the send, everything looks like 1 ms: the stall is omitted. Measured from the plan,
    half the presses waited up to 0.55 s, which is what users saw."""
    rec = Recorder()
    for i in range(100):
        planned = i * 0.010
        sent = 0.85 if 0.3 <= planned < 0.8 else planned
        rec.started(planned, sent)
        rec.completed("floor_access", planned, sent, sent + 0.001)
    corrected = summary_ms(rec.hist["floor_access"])
    naive = summary_ms(rec.hist["floor_access_sent"])
    assert naive["p99"] == pytest.approx(1.0, rel=0.01)
    assert naive["max"] == pytest.approx(1.0, rel=0.01)
    assert corrected["p50"] == pytest.approx(1.0, rel=0.01)  # most presses were on time
    assert corrected["p90"] > 400 and corrected["max"] == pytest.approx(551, rel=0.01)
    assert rec.overruns == 50 and rec.actions == 100  # the report will call this out


@pytest.mark.broker
async def test_a_small_scenario_runs_end_to_end(tmp_path: Path) -> None:
    scenario = tmp_path / "tiny.toml"
    scenario.write_text("""
[run]
name = "tiny"
duration_s = 6
workers = 2
full_trace = true
profile = true
[fleet]
handsets = 40
dispatchers = 2
talkgroups = 4
[traffic]
mean_talk_s = 1.0
mean_session_s = 2.0
activity = 0.6
location_interval_s = 2
emergencies_per_min = 20
preemptions_per_min = 20
imminent_per_min = 120
statuses_per_min = 120
private_calls_per_min = 120
late_joiners = 2
""")
    out = tmp_path / "out"
    rc = await run_loadtest(load_scenario(scenario), out)
    result = json.loads((out / "result.json").read_text())
    for kpi in (
        "floor_access",
        "floor_access_sent",
        "mouth_to_ear",
        "broker_alone",  # (the raw broker beside them, in the same run)
        "late_entry",
        "private_setup",
        "connect",
        "loop_lag",
        "gc_pause",
    ):
        assert result["kpis"][kpi]["n"] > 0, kpi
        assert result["kpis"][kpi]["p95"] >= result["kpis"][kpi]["p50"]
    assert result["counts"]["connected"] == 42 and "connect_failures" not in result["counts"]
    g = result["generator"]  # (what the workers cost, besides what they measured)
    assert g["cpu_share"] > 0 and g["max_rss_mb"] > 0 and g["kb_per_handset"] > 0
    u = result["system"]  # (and what the server and the broker cost, beside it)
    for name in ("server", "broker"):
        assert u[f"{name}_cpu_share"] > 0 and u[f"{name}_rss_mb"] > 0, name
    assert result["counts"]["statuses_confirmed"] > 0  # (12 expected: none is 1 in 160,000)
    assert "statuses_unconfirmed" not in result["counts"]
    assert result["counts"].get("imminent_calls", 0) > 0  # (12 expected: none is 1 in 160,000)
    assert result["counts"].get("imminent_cancelled", 0) > 0  # (most of those talk at +1.5 s)
    assert result["counts"].get("private_calls", 0) > 0  # (12 expected)
    assert "private_calls_failed" not in result["counts"]
    # `full_trace`: every message and floor state change, the workers' merged in time order
    for name, fields in (("messages", MESSAGE_FIELDS), ("floor", FLOOR_FIELDS)):
        rows = list(csv.DictReader((out / f"{name}.csv").read_text().splitlines()))
        assert list(rows[0]) == list(fields) and len(rows) == result[f"{name}_trace"]["rows"]
        assert [float(r["t_s"]) for r in rows] == sorted(float(r["t_s"]) for r in rows)
        assert {r["tg"] for r in rows} >= {"tg-0000", "tg-0001"}  # (both workers' groups)
        assert not list(out.glob(f"{name}-*.csv"))
    assert set(result["thresholds"]) == {
        "floor_access_p95_ms",
        "private_setup_p95_ms",
        "mouth_to_ear_p95_ms",
        "late_entry_p95_ms",
        "connect_failures",
    }
    assert result["server_metrics"]['esn_floor_outcomes_total{outcome="granted"}'] > 0
    assert rc == (0 if result["passed"] else 1)
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2 and "KPI 1 floor access" in html
    assert "<h2>Scenario</h2>" in html and "late_joiners = 2" in html
    # the access trace: a row per request, in the order made, each with its outcome
    rows = list(csv.DictReader((out / "access.csv").read_text().splitlines()))
    assert rows and {r["outcome"] for r in rows} <= set(OUTCOMES)
    assert [float(r["t_s"]) for r in rows] == sorted(float(r["t_s"]) for r in rows)
    for r in rows:
        assert (r["access_ms"] != "") == (r["outcome"] in ("immediate", "queued")), r
        assert (r["cause"] != "") == (r["outcome"] == "denied"), r
    outcomes = result["access_trace"]["outcomes"]
    assert outcomes == {o: sum(r["outcome"] == o for r in rows) for o in outcomes}
    callers = {r["caller"] for r in rows}
    assert {"normal", "dispatcher"} <= callers <= {"normal", "imminent", "emergency", "dispatcher"}
    assert not list(out.glob("access-*.csv"))  # (the workers' parts, merged)
    # `profile`: each worker's, where its time went, the handsets' receive path among it
    assert result["profiles"] == ["profile-0.txt", "profile-1.txt"]
    for i in range(2):
        assert (out / f"profile-{i}.pstats").stat().st_size > 0
        assert "_on_message" in (out / f"profile-{i}.txt").read_text()


def test_overrides_change_one_run_and_are_checked() -> None:
    s = load_scenario(
        SCENARIOS / "city.toml",
        ["fleet.handsets=2000", "traffic.activity=0.05", "run.name=city-2k"],
    )
    assert (s.fleet.handsets, s.traffic.activity, s.run.name) == (2000, 0.05, "city-2k")
    with pytest.raises(ScenarioError, match=r"must look like section\.key=value"):
        load_scenario(SCENARIOS / "city.toml", ["handsets=5"])
    with pytest.raises(ScenarioError, match=r"\[fleet\] handsets must be int"):
        load_scenario(SCENARIOS / "city.toml", ["fleet.handsets=lots"])


def test_shipped_scenarios_are_found_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # from any folder, as an installed package is used
    assert load_scenario("city").run.name == "city"
    assert load_scenario("ci-small.toml").run.name == "ci-small"
    (tmp_path / "city.toml").write_text('[run]\nname = "mine"\n')
    assert load_scenario("city.toml").run.name == "mine"  # a file of that name comes first
    with pytest.raises(ScenarioError, match="cannot read scenario nowhere"):
        load_scenario("nowhere")


@pytest.mark.broker
@pytest.mark.fault
async def test_an_interrupted_load_test_writes_its_partial_report_and_stops_everything(
    tmp_path: Path,
) -> None:
    """Tried: Ctrl-C in the middle of a 60 s load test. Expect: it stops within seconds
    (it used to run to its scheduled end), writes its report so far, marked interrupted,
    exits 130, and leaves no broker, server or worker behind."""
    scratch = tmp_path / "tmp"  # the run's own temp folder: it must end empty
    scratch.mkdir()
    scenario = tmp_path / "long.toml"
    scenario.write_text(
        '[run]\nname = "long"\nduration_s = 60\nworkers = 2\n'
        "[fleet]\nhandsets = 40\ntalkgroups = 4\n"
        "[traffic]\nmean_talk_s = 1.0\nmean_session_s = 2.0\n"
    )
    out = tmp_path / "out"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "esn.cli",
        "loadtest",
        str(scenario),
        "--out",
        str(out),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "TMPDIR": str(scratch)},
    )
    assert proc.stdout is not None
    ports: list[int] = []  # the broker's and the workers' metrics
    try:
        async with asyncio.timeout(60):
            while not (line := (await proc.stdout.readline()).decode()).startswith("t="):
                ports += [int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)", line)]
        proc.send_signal(signal.SIGINT)
        rest, _ = await asyncio.wait_for(proc.communicate(), 40)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 130 and b"Traceback" not in rest, rest.decode()[-2000:]
    report = json.loads((out / "result.json").read_text())
    assert report["interrupted"] is True and report["passed"] is False
    assert report["counts"].get("connected") == 41  # 40 handsets, 1 dispatcher: measured
    assert len(ports) >= 3
    for port in ports:
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)
    assert list(scratch.iterdir()) == []


@pytest.mark.broker
def test_a_bad_fleet_file_is_one_line_and_leaves_no_broker(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    scratch = tmp_path / "tmp"  # where a broker it started would keep its files
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    (tmp_path / "fleet.toml").write_text('[[talkgroup]]\nid = "no spaces allowed"\n')
    scenario = tmp_path / "s.toml"
    scenario.write_text('[fleet]\nfleet_file = "fleet.toml"\n')
    assert main(["loadtest", str(scenario), "--out", str(tmp_path / "out")]) == 2
    assert "talkgroup[0].id" in capsys.readouterr().err
    assert list(scratch.iterdir()) == []


@pytest.mark.broker
@pytest.mark.cluster
async def test_a_load_test_runs_on_a_cluster_of_servers(tmp_path: Path) -> None:
    """`run.cluster`: three NATS nodes, three instances sharing the partitions, the
    handsets spread over the nodes; grants and voice go on, summed over the instances."""
    out = tmp_path / "out"
    scenario = load_scenario(
        "ci-small",
        ["run.cluster=true", "run.duration_s=8", "fleet.handsets=60", "traffic.late_joiners=2"],
    )
    rc = await run_loadtest(scenario, out)
    result = json.loads((out / "result.json").read_text())
    server = result["server_metrics"]
    assert server['esn_cluster_partitions_served{server="esn-1"}'] > 0
    assert sum(v for k, v in server.items() if k.startswith("esn_cluster_partitions_served")) == 32
    assert server['esn_floor_outcomes_total{outcome="granted"}'] > 0
    assert result["kpis"]["mouth_to_ear"]["n"] > 0
    assert result["counts"]["connected"] == 62 and "connect_failures" not in result["counts"]
    assert result["counts"]["statuses_confirmed"] > 0  # (8 expected) on the units' instances
    u = result["system"]  # (the three instances' and the three NATS nodes' costs, summed)
    assert u["server_cpu_share"] > 0 and u["broker_cpu_share"] > 0 and u["broker_rss_mb"] > 0
    assert rc == (0 if result["passed"] else 1)


def test_a_share_of_the_handsets_scans_two_to_four_groups_by_priority() -> None:
    """`[fleet] scan_fraction`: those handsets listen to their own group and 1-3 others,
    with priorities from the run's seed, and talk in their own only."""
    doc = {"fleet": {"handsets": 200, "talkgroups": 10, "scan_fraction": 0.25}}
    plans, _ = plan(parse_scenario(doc), 2)
    scans = {u: s for p in plans for u, s in p.scans.items()}
    groups = {u: g for p in plans for u, g in p.units}
    assert len(scans) == int((200 - 5) * 0.25)  # (the late joiners scan nothing)
    for unit, scanned in scans.items():
        own, *others = groups[unit]
        assert 1 <= len(scanned) <= 3 and sorted(scanned) == sorted(others) and own not in scanned
        assert all(1 <= p <= 15 for p in scanned.values())
        assert all(
            unit not in members or own == tg for p in plans for tg, members in p.talkers.items()
        )
    again, _ = plan(parse_scenario(doc), 2)
    assert {u: s for p in again for u, s in p.scans.items()} == scans  # the seed's, again


async def test_a_capacity_curve_runs_each_size_and_draws_them(tmp_path: Path) -> None:
    """`--sizes`: the scenario at each size in turn, its groups and fleet-wide rates
    scaled alike, then one table and one plot over the runs."""
    scenario = load_scenario("ci-small", ["run.duration_s=3", "traffic.late_joiners=0"])
    assert sized(scenario, 240).fleet.talkgroups == 12
    assert sized(scenario, 240).traffic.statuses_per_min == 2 * scenario.traffic.statuses_per_min
    with pytest.raises(ScenarioError, match=r"--sizes 4: .*late_joiners"):
        sized(load_scenario("ci-small"), 4)  # (its 4 late joiners need more handsets)
    await run_sizes(scenario, [30, 60], tmp_path)
    rows = json.loads((tmp_path / "capacity.json").read_text())
    assert [r["handsets"] for r in rows] == [32, 62]  # (with the two dispatchers)
    for r in rows:
        assert r["floor_access"][1] is not None and r["broker_alone"][1] is not None
        assert r["cpu"]["server"] > 0 and r["saturated"]
    table = (tmp_path / "capacity.md").read_text().splitlines()
    assert len(table) == 4 and table[2].startswith("| 32 |")
    assert (tmp_path / "capacity.svg").read_text().lstrip().startswith("<?xml")
    assert all((tmp_path / n / "report.html").exists() for n in ("30", "60"))


async def test_dispatchers_of_a_worker_with_many_groups_connect(tmp_path: Path) -> None:
    """A dispatcher watches at most the 256 groups one affiliation may name: above that,
    the server refused its affiliation and every dispatcher counted as a failed connect."""
    scenario = load_scenario(
        "ci-small",
        [
            "run.workers=1",
            "run.duration_s=1",
            "run.ramp_per_s=1000",
            "fleet.handsets=600",
            "fleet.talkgroups=300",
            "traffic.late_joiners=0",
        ],
    )
    await run_loadtest(scenario, tmp_path)
    counts = json.loads((tmp_path / "result.json").read_text())["counts"]
    assert counts["connected"] == 602 and "connect_failures" not in counts
