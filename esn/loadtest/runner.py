"""`esn loadtest SCENARIO.toml`: plan the fleet, start the system under test, spread the
handsets over worker processes, show live progress, then merge and report.

The run fails (exit status 1) when a threshold is missed or handsets could not connect;
the report also says when the generator, not the system under test, limited the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import os
import platform
import queue as queue_mod
import random
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from esn.client import trace
from esn.core.fleet import DEFAULT_STATUSES, MAY
from esn.core.partitions import PARTITIONS
from esn.loadtest.probe import BrokerProbe
from esn.loadtest.recorder import merge, spectrum_ms, summary_ms
from esn.loadtest.report import kpi_table, write_html
from esn.loadtest.scenario import Scenario
from esn.loadtest.worker import WorkerPlan, run_worker
from esn.tomlfile import dump_fleet, load_fleet
from esn.tools.broker import Mosquitto
from esn.tools.monitoring import scrape
from esn.tools.nats import ClusterError, NatsCluster
from esn.tools.processes import (
    cpu_seconds,
    free_port,
    peak_rss_kb,
    raise_fd_limit,
    start_server,
)
from esn.tools.quantiles import buckets, histogram_quantile
from esn.transport import TransportError

CLUSTER_NODES = 3  # [run] cluster: NATS nodes, and server instances (one per node)
LAG_LIMIT_MS = 50.0  # generator loop lag p99 above this: the generator limited the run
OVERRUN_LIMIT = 0.01  # share of actions started more than 10 ms late


def plan(s: Scenario, workers: int) -> tuple[list[WorkerPlan], str]:
    """Split the fleet: each talkgroup (and its talkers) lives in one worker, so a burst's
    competing presses and its listeners' timing share one clock. Returns the plans and the
    fleet file text for our own server."""
    f, t = s.fleet, s.traffic
    if f.fleet_file:
        fleet = load_fleet(Path(s.path).parent / f.fleet_file)
        groups = [g.id for g in fleet.groups.values() if not g.broadcast and not g.members]
        dispatchers = [u.id for u in fleet.units.values() if u.is_dispatcher]
        fleet_text = (Path(s.path).parent / f.fleet_file).read_text()
        statuses = sorted(fleet.statuses)
    else:
        groups = [f"tg-{i:04d}" for i in range(f.talkgroups)]
        dispatchers = [f"disp-{i}" for i in range(f.dispatchers)]
        fleet_text = dump_fleet(
            {
                "defaults": {"queue_depth": 8, "preempt_threshold": 200},
                "talkgroup": [{"id": tg} for tg in groups],
                "unit": [
                    {"id": d, "role": "dispatcher", "priority": 250, "may": MAY}
                    for d in dispatchers
                ],
            }
        )
        statuses = sorted(DEFAULT_STATUSES)
    units = [f"u-{i:05d}" for i in range(f.handsets)]
    late, regular = units[len(units) - t.late_joiners :], units[: len(units) - t.late_joiners]
    owner = {tg: i % workers for i, tg in enumerate(groups)}
    plans = [
        WorkerPlan(
            index=w,
            mqtt_client=s.run.mqtt_client,
            units=[],
            talkers={},
            dispatchers=dispatchers[w::workers],
            late=[],
            traffic=t,
            ramp_per_s=s.run.ramp_per_s / workers,
            duration_s=s.run.duration_s,
            share=1 / workers,
            seed=s.run.seed,
            metrics_port=free_port(),
            statuses=statuses,
        )
        for w in range(workers)
    ]
    n_multi = int(len(regular) * f.multi_group_fraction)
    n_scan = int(len(regular) * f.scan_fraction) if len(groups) > 1 else 0
    rng = random.Random(s.run.seed)
    for i, unit in enumerate(regular):
        first = groups[i % len(groups)]
        mine = [first] + (
            [groups[(i + 1) % len(groups)]] if i < n_multi and len(groups) > 1 else []
        )
        p = plans[owner[first]]
        if n_multi <= i < n_multi + n_scan:  # scans its group and 1-3 others, by priority
            others = [g for g in groups if g != first]
            scanned = rng.sample(others, min(len(others), rng.randint(1, 3)))
            p.scans[unit] = {tg: rng.randint(1, 15) for tg in scanned}
            mine += scanned
        p.units.append((unit, mine))
        p.talkers.setdefault(first, []).append(unit)
    for i, unit in enumerate(late):
        tg = groups[i % len(groups)]
        plans[owner[tg]].late.append((unit, tg))
    for p in plans:  # dispatchers affiliate to the groups their worker drives
        if not p.talkers:
            p.dispatchers = []
    return plans, fleet_text


async def run_loadtest(s: Scenario, out_dir: Path | None = None) -> int:
    raise_fd_limit()  # before the broker starts: it inherits the limit
    workers = s.workers
    out = out_dir or Path("runs") / f"{s.run.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    plans, fleet_text = plan(s, workers)  # first: a bad fleet file must cost no broker
    work = tempfile.TemporaryDirectory(prefix="esn-loadtest-")
    broker = None
    nats: NatsCluster | None = None
    servers: list[asyncio.subprocess.Process] = []
    server_ports: list[int] = []
    procs: list[multiprocessing.process.BaseProcess] = []
    probe: BrokerProbe | None = None
    ctx = multiprocessing.get_context("spawn")
    q, go, stop = ctx.Queue(), ctx.Event(), ctx.Event()
    finals: dict[int, dict[str, Any]] = {}
    interrupted = False
    try:
        if s.run.cluster:
            nats = NatsCluster(CLUSTER_NODES)
            await asyncio.to_thread(nats.start)
            url = ",".join(nats.mqtt_urls)
        else:
            broker = None if s.run.broker else Mosquitto().start()
            url = s.run.broker or broker.url  # type: ignore[union-attr]
        for p in plans:
            p.broker_url = url
            p.qos = 0 if nats else 1
        out.mkdir(parents=True, exist_ok=True)
        for p in plans:
            p.trace = str(out / f"access-{p.index}.csv")
            p.full_trace = str(out) if s.run.full_trace else ""
            p.profile = str(out / f"profile-{p.index}") if s.run.profile else ""
        if s.run.server:
            fleet = Path(work.name) / "fleet.toml"
            fleet.write_text(fleet_text)
            for i, node_url in enumerate(url.split(",")):
                server_ports.append(free_port())
                cluster_args = ("--cluster", ",".join(nats.nats_urls)) if nats else ()
                servers.append(
                    await start_server(
                        nats.brokers_from(i) if nats else node_url,
                        fleet,
                        metrics_port=server_ports[-1],
                        mqtt_client=s.run.mqtt_client,
                        state=None if nats else Path(work.name) / "state.sqlite3",
                        args=("--server-id", f"esn-{i + 1}", *cluster_args),
                        log=Path(work.name) / f"server-{i + 1}.log",
                    )
                )
            if nats:
                await _shared(server_ports)
        total = sum(len(p.units) + len(p.dispatchers) + len(p.late) for p in plans)
        print(
            f"esn loadtest {s.run.name}: {total} handsets on {workers} worker(s), "
            f"{s.fleet.talkgroups} talkgroups, {s.run.duration_s:g} s, broker {url}"
        )
        print(
            "worker metrics: "
            + ", ".join(f"http://127.0.0.1:{p.metrics_port}/metrics" for p in plans)
        )
        probe = BrokerProbe(url.split(",")[0])
        try:
            await probe.start()
        except TransportError as exc:  # (a broker that refuses it: the run goes on without)
            print(f"esn loadtest: the broker alone is not timed: {exc}", file=sys.stderr)
            await probe.stop()
            probe = None
        procs = [ctx.Process(target=run_worker, args=(p, q, go, stop), daemon=True) for p in plans]
        for proc in procs:
            proc.start()
        watched = {  # the system under test, on this machine (not a remote broker)
            "server": [server.pid for server in servers],
            "broker": [broker.proc.pid] if broker is not None and broker.proc else [],
        }
        if nats is not None:
            watched["broker"] = [n.proc.pid for n in nats.nodes if n.proc is not None]
        at: dict[str, dict[str, float]] = {}

        def phase(name: str) -> None:  # "go", then "end" (the first worker's traffic ended)
            at[name] = _cpu(watched)
            if probe is not None:
                probe.begin() if name == "go" else probe.end()

        try:
            await _drive(s, q, go, workers, total, finals, phase)
        except asyncio.CancelledError:  # interrupted: the workers end early and report
            interrupted = True
            stop.set()
            go.set()
            print("\ninterrupted: collecting what the workers measured ...", flush=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(_finals(q, finals, workers), 30)
        result: dict[str, Any] = {"finals": [finals[w] for w in sorted(finals)]}
        if probe is not None:
            probe.end()
            result["probe"] = probe.hist
        result["system"] = _system(watched, at, total)
        result["server_metrics"] = _scrape(server_ports)
    finally:
        stop.set()
        for proc in procs:
            proc.join(20)
            if proc.is_alive():
                proc.kill()
        for server in servers:
            if server.returncode is None:
                server.terminate()
            await server.wait()
        if probe is not None:
            await probe.stop()
        if broker is not None:
            broker.close()
        if nats is not None:
            await asyncio.to_thread(nats.close)
        work.cleanup()
    report = build_report(s, result, workers)
    parts = sorted(out.glob("access-*.csv"))
    if parts:  # (none when interrupted before the traffic began)
        outcomes = trace.merge(parts, out / "access.csv")
        report["access_trace"] = {"file": "access.csv", "outcomes": dict(sorted(outcomes.items()))}
    for name, fields in (("messages", trace.MESSAGE_FIELDS), ("floor", trace.FLOOR_FIELDS)):
        rows = sorted(out.glob(f"{name}-*.csv"))  # (with `full_trace`)
        if rows:
            report[f"{name}_trace"] = {
                "file": f"{name}.csv",
                "rows": trace.merge_rows(rows, out / f"{name}.csv", fields),
            }
    profiles = [f"profile-{p.index}.txt" for p in plans if p.profile]
    if profiles:  # (a worker killed before it wrote its own is said so)
        report["profiles"] = [p for p in profiles if (out / p).exists()]
        for missing in sorted(set(profiles) - set(report["profiles"])):
            print(f"esn loadtest: no {missing}: its worker did not write it", file=sys.stderr)
        profiles = report["profiles"]
    if interrupted:
        report["interrupted"] = True  # a partial run: figures so far, and no verdict
        report["passed"] = False
    (out / "result.json").write_text(json.dumps(report, indent=2) + "\n")
    write_html(out / "report.html", report)
    print()
    print(kpi_table(report))
    print(f"\nJSON: {out / 'result.json'}\nHTML: {out / 'report.html'}")
    if parts:
        more = " and messages.csv, floor.csv" if "messages_trace" in report else ""
        print(f"access trace: {out / 'access.csv'}{more} (docs/traces.md)")
    if profiles:
        print(f"worker profiles: {', '.join(str(out / p) for p in profiles)} (and .pstats)")
    if interrupted:
        print("RESULT: INTERRUPTED (a partial report of the run so far)")
        raise asyncio.CancelledError  # the command ends as interrupted, its report written
    print("RESULT:", "PASS" if report["passed"] else "FAIL")
    return 0 if report["passed"] else 1


async def _drive(
    s: Scenario,
    q: Any,
    go: Any,
    workers: int,
    total: int,
    finals: dict[int, dict[str, Any]],
    on_phase: Callable[[str], None],
) -> None:
    """Ramp, start everyone together, show progress, collect the finals into `finals`;
    `on_phase("go")` as the traffic starts, `on_phase("end")` when the first worker's
    traffic has ended (its final came)."""
    latest: dict[int, dict[str, Any]] = {}
    ready: set[int] = set()
    started = None
    tty = sys.stdout.isatty()
    last_print = 0.0
    deadline = time.monotonic() + total / s.run.ramp_per_s + 120
    while len(finals) < workers:
        try:
            msg = await asyncio.to_thread(q.get, True, 0.5)
        except queue_mod.Empty:
            msg = None
        if msg is not None:
            kind, w = msg["kind"], msg["worker"]
            if kind == "error":
                raise RuntimeError(f"worker {w} failed: {msg['error']}")
            if kind == "ready":
                ready.add(w)
                if len(ready) == workers:
                    on_phase("go")
                    go.set()
                    started = time.monotonic()
                    deadline = started + s.run.duration_s + 60
            elif kind == "status":
                latest[w] = msg
            elif kind == "final":
                if not finals:
                    on_phase("end")
                finals[w] = msg
        if time.monotonic() > deadline:
            raise RuntimeError(f"workers did not finish in time ({len(finals)}/{workers})")
        now = time.monotonic()
        if latest and now - last_print >= (1 if tty else 5):
            last_print = now
            line = _progress(latest, total, started, s.run.duration_s)
            print(f"\r{line}\033[K" if tty else line, end="" if tty else "\n", flush=True)


async def _finals(q: Any, finals: dict[int, dict[str, Any]], workers: int) -> None:
    """After an interruption: only the workers' finals matter now."""
    while len(finals) < workers:
        try:
            msg = await asyncio.to_thread(q.get, True, 0.5)
        except queue_mod.Empty:
            continue
        if msg["kind"] == "final":
            finals[msg["worker"]] = msg


def _progress(
    latest: dict[int, dict[str, Any]], total: int, started: float | None, duration: float
) -> str:
    v = list(latest.values())
    elapsed = time.monotonic() - started if started else 0.0
    phase = (
        "ramp"
        if not started
        else f"t={elapsed:5.1f}/{duration:g}s"
        if elapsed <= duration
        else "draining"
    )
    return (
        f"{phase}  connected {sum(x['connected'] for x in v)}/{total}"
        f"  talking {sum(x['talking'] for x in v)}  grants {sum(x['grants'] for x in v)}"
        f"  access p95 {max(x['access_p95_ms'] for x in v):.1f} ms"
        f"  mouth-to-ear p95 {max(x['m2e_p95_ms'] for x in v):.1f} ms"
        f"  loop lag p99 {max(x['lag_p99_ms'] for x in v):.1f} ms"
    )


def _cpu(watched: dict[str, list[int]]) -> dict[str, float]:
    return {
        "t": time.monotonic(),
        **{name: sum(cpu_seconds(pid) for pid in pids) for name, pids in watched.items()},
    }


def _system(
    watched: dict[str, list[int]], at: dict[str, dict[str, float]], handsets: int
) -> dict[str, Any]:
    """What the server(s) and the broker cost during the traffic (each as a share of a
    core, all their processes together) and at their peak in memory (from the start)."""
    if "go" not in at:
        return {}  # (interrupted during the ramp)
    go, end = at["go"], at.get("end") or _cpu(watched)
    out: dict[str, Any] = {}
    for name, pids in watched.items():
        if pids:
            rss_mb = sum(peak_rss_kb(pid) for pid in pids) / 1024
            out[f"{name}_cpu_share"] = round((end[name] - go[name]) / (end["t"] - go["t"]), 3)
            out[f"{name}_rss_mb"] = round(rss_mb, 1)
            out[f"{name}_kb_per_handset"] = round(rss_mb * 1024 / max(handsets, 1), 1)
    return out


def _usage(finals: list[dict[str, Any]]) -> dict[str, Any]:
    """What the workers cost during the traffic: each one's CPU as a share of that time
    (1.0: a core, all the time) and the mean of those shares, and each one's peak memory
    with their sum, in all and per handset."""
    if not finals or any("cpu_s" not in f for f in finals):
        return {}
    rss_mb = sum(f["max_rss_kb"] for f in finals) / 1024
    handsets = sum(f["handsets"] for f in finals)
    shares = [round(f["cpu_s"] / max(f["wall_s"], 1e-9), 3) for f in finals]
    return {
        "cpu_share": round(sum(shares) / len(shares), 3),
        "cpu_shares": shares,
        "max_rss_mb": round(rss_mb, 1),  # (the sum of each one's peak)
        "max_rss_mb_each": [round(f["max_rss_kb"] / 1024, 1) for f in finals],
        "kb_per_handset": round(rss_mb * 1024 / handsets, 1) if handsets else 0.0,
    }


def build_report(s: Scenario, result: dict[str, Any], workers: int) -> dict[str, Any]:
    finals = result["finals"]
    hist = merge([f["hist"] for f in finals])
    if "probe" in result:
        hist["broker_alone"] = result["probe"]
    counts: dict[str, int] = {}
    for f in finals:
        for k, v in f["counts"].items():
            counts[k] = counts.get(k, 0) + v
    actions = sum(f["actions"] for f in finals)
    overruns = sum(f["overruns"] for f in finals)
    kpis = {k: summary_ms(h) for k, h in hist.items()}
    lag_p99 = kpis["loop_lag"].get("p99", 0.0)
    generator_limited = lag_p99 > LAG_LIMIT_MS or (actions and overruns / actions > OVERRUN_LIMIT)
    th = s.thresholds
    checks = {
        "floor_access_p95_ms": (kpis["floor_access"].get("p95"), th.floor_access_p95_ms),
        "private_setup_p95_ms": (kpis["private_setup"].get("p95"), th.private_setup_p95_ms),
        "mouth_to_ear_p95_ms": (kpis["mouth_to_ear"].get("p95"), th.mouth_to_ear_p95_ms),
        "late_entry_p95_ms": (kpis["late_entry"].get("p95"), th.late_entry_p95_ms),
        "connect_failures": (counts.get("connect_failures", 0), th.connect_failures),
    }
    verdicts = {  # (a latency is met under its target, as TS 22.179 says; a count up to it)
        k: {
            "value": v,
            "limit": lim,
            "passed": v is not None and (v < lim if k.endswith("_ms") else v <= lim),
        }
        for k, (v, lim) in checks.items()
    }
    if s.traffic.late_joiners == 0:
        verdicts["late_entry_p95_ms"]["passed"] = True
    if s.traffic.private_calls_per_min == 0:
        verdicts["private_setup_p95_ms"]["passed"] = True
    return {
        "scenario": {"path": s.path, **asdict(s)},
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
        "workers": workers,
        "kpis": kpis,
        "spectra": {k: spectrum_ms(h) for k, h in hist.items()},
        "counts": counts,
        "generator": {
            "actions": actions,
            "overruns": overruns,
            "loop_lag_p99_ms": lag_p99,
            "limited": bool(generator_limited),
            **_usage(finals),
        },
        "thresholds": verdicts,
        "passed": all(v["passed"] for v in verdicts.values()),
        "system": result.get("system", {}),
        "series": [f["series"] for f in finals],
        "server_metrics": result.get("server_metrics", {}),
    }


async def _shared(ports: list[int], timeout: float = 30.0) -> None:
    """Wait until the instances of a cluster serve every partition between them."""
    deadline = time.monotonic() + timeout
    while True:
        served = 0.0
        for port in ports:
            with contextlib.suppress(OSError):
                for _, v in scrape(port, timeout=2).get("esn_cluster_partitions_served", []):
                    served += v
        if served >= PARTITIONS:
            return
        if time.monotonic() > deadline:
            raise ClusterError(f"the server instances serve {served:g} of {PARTITIONS} partitions")
        await asyncio.sleep(0.2)


def _scrape(ports: list[int]) -> dict[str, float]:
    """The servers' figures for result.json (summed over a cluster's instances), with
    quantiles of their histograms."""
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for port in ports:
        with contextlib.suppress(OSError):
            for name, values in scrape(port).items():
                samples.setdefault(name, []).extend(values)
    if not samples:
        return {}
    out: dict[str, float] = {}
    for name, values in samples.items():
        if name.endswith("_bucket"):  # summed over labels, for server-side quantiles
            metric = name.removesuffix("_bucket")
            for q in (0.5, 0.95, 0.99):
                value = histogram_quantile(buckets(samples, metric), q)
                out[f"{metric}:p{q * 100:g}_ms"] = round(value * 1000, 3)
            continue
        for labels, value in values:
            # (as Prometheus writes a series: name{a="x",b="y"})
            inner = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
            key = f"{name}{{{inner}}}" if inner else name
            same = name in ("esn_cluster_partitions", "esn_server_info")  # (not to be summed)
            out[key] = value if same else out.get(key, 0.0) + value
    return out
