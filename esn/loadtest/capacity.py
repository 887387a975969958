"""A capacity curve: one scenario at several sizes, one run after another, and a table and
a plot of what each size measured (docs/benchmarks.md).

Each size keeps the scenario's shape: its talkgroups are scaled to keep their size, and
its fleet-wide rates (emergencies, statuses, private calls, ... per minute) to keep what
each handset does; its dispatchers and late joiners stay as they are. Each run writes its
own report into OUT/N; the curve goes beside them (capacity.md, capacity.svg,
capacity.json), rewritten after each size, so a sweep cut short keeps what it measured.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from esn.kpi import FLOOR_ACCESS
from esn.loadtest.runner import run_loadtest
from esn.loadtest.scenario import Scenario, ScenarioError, parse_scenario


def sized(s: Scenario, handsets: int) -> Scenario:
    if s.fleet.fleet_file:
        raise ScenarioError("--sizes needs a scenario whose fleet is a shape, not a fleet file")
    scale = handsets / s.fleet.handsets
    traffic = dataclasses.replace(
        s.traffic,
        **{
            f.name: getattr(s.traffic, f.name) * scale
            for f in dataclasses.fields(s.traffic)
            if f.name.endswith("_per_min")
        },
    )
    fleet = dataclasses.replace(
        s.fleet, handsets=handsets, talkgroups=max(1, round(s.fleet.talkgroups * scale))
    )
    doc = dataclasses.asdict(dataclasses.replace(s, fleet=fleet, traffic=traffic))
    del doc["path"], doc["overrides"]
    try:  # (the scenario's own checks, on the size asked)
        return dataclasses.replace(parse_scenario(doc, s.path), overrides=s.overrides)
    except ScenarioError as exc:
        raise ScenarioError(f"--sizes {handsets}: {exc}") from None


async def run_sizes(s: Scenario, sizes: list[int], out: Path) -> int:
    """Run `s` at each size in turn; 0 if every run passed."""
    rcs, rows = [], []
    for i, n in enumerate(sizes):
        print(f"\n=== {n} handsets ({i + 1} of {len(sizes)}) ===", flush=True)
        try:
            rcs.append(await run_loadtest(sized(s, n), out / str(n)))
        finally:  # (interrupted, or failed: the sizes so far are drawn all the same)
            done = out / str(n) / "result.json"
            if done.exists():
                rows.append(row(json.loads(done.read_text())))
            if rows:
                (out / "capacity.json").write_text(json.dumps(rows, indent=2) + "\n")
                (out / "capacity.md").write_text(table(rows))
                plot(rows, out / "capacity.svg")
    print(f"\n{table(rows)}\ncapacity curve: {out / 'capacity.md'}, {out / 'capacity.svg'}")
    return 0 if all(rc == 0 for rc in rcs) else 1


def row(r: dict[str, Any]) -> dict[str, Any]:
    """The figures of one run that the curve shows."""
    k, g, u = r["kpis"], r["generator"], r.get("system", {})
    c, cpus = r["counts"], r["machine"]["cpus"] or 1
    handsets = c.get("connected", 0) + c.get("connect_failures", 0)

    def q(kpi: str) -> list[float | None]:
        return [k.get(kpi, {}).get(p) for p in ("p50", "p95", "p99")]

    cpu = {
        "generator": round(g.get("cpu_share", 0.0) * r["workers"], 3),
        "server": u.get("server_cpu_share", 0.0),
        "broker": u.get("broker_cpu_share", 0.0),
    }
    return {
        "handsets": handsets,
        "connect_failures": c.get("connect_failures", 0),
        "cluster": r["scenario"]["run"]["cluster"],
        "floor_access": q("floor_access"),
        "mouth_to_ear": q("mouth_to_ear"),
        "broker_alone": q("broker_alone"),
        "loop_lag_p99": g["loop_lag_p99_ms"],
        "late": [g["overruns"], g["actions"]],
        "cpu": cpu,
        "machine_cpu": round(sum(cpu.values()) / cpus, 3),  # (of all its cores)
        "kb_per_handset": {
            "generator": g.get("kb_per_handset", 0.0),
            "server": u.get("server_kb_per_handset", 0.0),
        },
        "saturated": saturated(r, cpu, cpus),
    }


def saturated(r: dict[str, Any], cpu: dict[str, float], cpus: int) -> str:
    """What gave way first, in words, by the report's own verdicts."""
    said = []
    if r["counts"].get("connect_failures"):
        said.append("connections refused")
    if r["generator"]["limited"]:
        said.append("the generator")
    for name in ("server", "broker"):  # (one thread each, where not a cluster)
        if cpu[name] >= 0.9 and not r["scenario"]["run"]["cluster"]:
            said.append(f"the {name}'s core")
    if sum(cpu.values()) >= 0.9 * cpus:
        said.append("the machine's CPU")
    if (r["kpis"]["floor_access"].get("p95") or 0) >= FLOOR_ACCESS.target_ms:
        said.append(f"KPI1 past {FLOOR_ACCESS.target_ms:g} ms")
    return ", ".join(said) or "nothing"


def _ms(values: list[float | None]) -> str:
    return " / ".join("-" if v is None else f"{v:.1f}" for v in values)


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| handsets | KPI1 floor access p50 / p95 / p99 (from plan) | KPI3 mouth-to-ear "
        "p50 / p95 / p99 | broker alone p50 / p95 / p99 | generator loop lag p99, late "
        "starts | CPU: generator / server / broker (cores) | KB per handset: generator / "
        "server | saturated first |",
        "|---:|---|---|---|---|---|---|---|",
    ]
    for x in rows:
        cpu, kb = x["cpu"], x["kb_per_handset"]
        where = " (NATS cluster)" if x["cluster"] else ""
        lines.append(
            f"| {x['handsets']:,}{where} | {_ms(x['floor_access'])} ms "
            f"| {_ms(x['mouth_to_ear'])} ms | {_ms(x['broker_alone'])} ms "
            f"| {x['loop_lag_p99']:.0f} ms, {x['late'][0]} of {x['late'][1]} "
            f"| {cpu['generator']:.2f} / {cpu['server']:.2f} / {cpu['broker']:.2f} "
            f"| {kb['generator']:.0f} / {kb['server']:.1f} | {x['saturated']} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [x["handsets"] for x in rows]
    fig, (lat, cpu) = plt.subplots(2, 1, figsize=(8, 7), sharex=True, height_ratios=(3, 2))
    for key, label, style, colour in (
        ("floor_access", "KPI1 floor access (from plan)", "o-", "C0"),
        ("mouth_to_ear", "KPI3 mouth-to-ear", "s-", "C1"),
        ("broker_alone", "the broker alone (same run)", "^--", "C2"),
    ):
        for i, (p, alpha) in enumerate((("p95", 0.45), ("p99", 1.0))):
            ys = [x[key][i + 1] for x in rows]
            lat.plot(xs, ys, style, color=colour, alpha=alpha, label=f"{label} {p}")
    lat.axhline(
        FLOOR_ACCESS.target_ms,
        color="red",
        ls="--",
        lw=1,
        label=f"TS 22.179 KPI1/KPI3 target, {FLOOR_ACCESS.target_ms:g} ms",
    )
    lat.set_yscale("log")
    lat.set_ylabel("latency (ms)")
    lat.set_title("Capacity on one machine: latency and CPU by number of handsets")
    lat.grid(True, which="both", alpha=0.3)
    lat.legend(fontsize=7, ncol=2)
    for name in ("generator", "server", "broker"):
        cpu.plot(xs, [x["cpu"][name] for x in rows], "o-", label=name)
    cpu.set_ylabel("CPU (cores)")
    cpu.set_xlabel("handsets (each its own MQTT connection)")
    cpu.set_xscale("log")
    ticks = [f"{x['handsets']:,}" + ("\nNATS" if x["cluster"] else "") for x in rows]
    cpu.set_xticks(xs, ticks, minor=False)
    cpu.set_xticks([], minor=True)
    cpu.grid(True, which="both", alpha=0.3)
    cpu.legend(fontsize=8)
    fig.savefig(path, bbox_inches="tight")  # (in the format its name says)
    plt.close(fig)
