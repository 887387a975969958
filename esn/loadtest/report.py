"""The load test's report: a KPI table for the terminal and an HTML page with plots.

Plots: each KPI's latency percentile spectrum (from the plan, corrected for coordinated
omission, and from the actual send) against its TS 22.179 target (esn/kpi.py), and the
load over time, each quantity on its own axis. The page also shows the scenario as run,
with the `--set` overrides of the run.
"""

from __future__ import annotations

import base64
import html
import io
import itertools
from pathlib import Path
from typing import Any

from esn.kpi import KPIS

NAMES = {
    "floor_access": "KPI 1 floor access (press→granted, from plan)",
    "floor_access_sent": "floor access (from actual send)",
    "private_setup": "KPI 2 end-to-end access (private call set-up)",
    "mouth_to_ear": "KPI 3 mouth-to-ear",
    "broker_alone": "the broker alone, same run (no server)",
    "late_entry": "KPI 4 late entry",
    "scan_entry": "scan switch → first media heard",
    "connect": "connect time",
    "loop_lag": "generator loop lag",
    "gc_pause": "generator garbage-collection pause",
}
TARGETS = {k.key: k.target_ms for k in KPIS}  # TS 22.179, at the 95th percentile


def kpi_table(r: dict[str, Any]) -> str:
    lines = [f"{'KPI':46} {'n':>8} {'p50':>9} {'p95':>9} {'p99':>9} {'max':>9}  target"]
    for key, name in NAMES.items():
        k = r["kpis"].get(key, {})
        if not k.get("n"):
            lines.append(f"{name:46} {0:8d} {'-':>9} {'-':>9} {'-':>9} {'-':>9}")
            continue
        target = TARGETS.get(key)
        verdict = (
            ""
            if target is None
            else (f"p95 < {target:g} ms " + ("PASS" if k["p95"] < target else "FAIL"))
        )
        lines.append(
            f"{name:46} {k['n']:8d} {k['p50']:8.2f}ms {k['p95']:8.2f}ms "
            f"{k['p99']:8.2f}ms {k['max']:8.2f}ms  {verdict}"
        )
    c = r["counts"]
    granted = sum(v for k, v in c.items() if k.startswith("granted"))
    denied = sum(v for k, v in c.items() if k.startswith("denied"))
    lines.append("")
    lines.append(
        f"connected {c.get('connected', 0)}, connect failures "
        f"{c.get('connect_failures', 0)}; grants {granted} "
        f"(after queuing {c.get('granted_after_queue', 0)}), queued "
        f"{c.get('queued', 0)}, denied {denied}, revoked {c.get('revoked', 0)}, "
        f"no answer {c.get('no_answer', 0)}; imminent-peril calls "
        f"{c.get('imminent_calls', 0)} (cancelled during the call "
        f"{c.get('imminent_cancelled', 0)}); statuses {c.get('statuses', 0)} "
        f"(confirmed {c.get('statuses_confirmed', 0)}); listened in {c.get('listen_ins', 0)}, "
        f"remote talks {c.get('remote_talks', 0)}; private calls "
        f"{c.get('private_calls', 0)} (failed {c.get('private_calls_failed', 0)})"
    )
    sm = r.get("server_metrics") or {}
    if "esn_floor_access_seconds:p95_ms" in sm:
        lines.append(
            f"server side: floor access p95 {sm['esn_floor_access_seconds:p95_ms']} ms, "
            f"media relay p95 {sm.get('esn_media_relay_seconds:p95_ms', '-')} ms, "
            f"broker dropped {int(sm.get('esn_broker_messages_dropped_total', 0))} "
            "messages"
        )
    u = r.get("system") or {}
    if "server_cpu_share" in u or "broker_cpu_share" in u:
        lines.append(
            "system under test: "
            + ", ".join(
                f"{name} CPU {u[f'{name}_cpu_share']:.0%} of a core, memory "
                f"{u[f'{name}_rss_mb']:.0f} MB ({u[f'{name}_kb_per_handset']:.1f} KB per handset)"
                for name in ("server", "broker")
                if f"{name}_cpu_share" in u
            )
        )
    g = r["generator"]
    lines.append(
        f"generator: {g['actions']} actions, {g['overruns']} started >10 ms late, "
        f"loop lag p99 {g['loop_lag_p99_ms']:.1f} ms"
        + (
            f", CPU {g['cpu_share']:.0%} of a core per worker (mean), memory "
            f"{g['max_rss_mb']:.0f} MB (the workers' peaks summed; "
            f"{g['kb_per_handset']:.0f} KB per handset)"
            if "cpu_share" in g
            else ""
        )
        + " — "
        + (
            "THE GENERATOR LIMITED THIS RUN: its figures overstate the system's latency"
            if g["limited"]
            else "kept its schedule"
        )
    )
    failed = [k for k, v in r["thresholds"].items() if not v["passed"]]
    lines.append(
        "thresholds: "
        + (
            "all met"
            if not failed
            else "missed "
            + ", ".join(
                f"{k} ({r['thresholds'][k]['value']} > {r['thresholds'][k]['limit']})"
                for k in failed
            )
        )
    )
    return "\n".join(lines)


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def plots(r: dict[str, Any]) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    fig, ax = plt.subplots(figsize=(9, 5))
    keys = ("floor_access", "floor_access_sent", "private_setup", "mouth_to_ear", "late_entry")
    for key in keys:
        pts = r["spectra"].get(key) or []
        if pts:
            xs = [1 / (1 - min(q, 99.999) / 100) for q, _ in pts]
            ax.plot(xs, [v for _, v in pts], marker="o", ms=3, label=NAMES[key])
    targets = sorted({k.target_ms for k in KPIS}, reverse=True)
    for target, style in zip(targets, (":", "--", "-.", (0, (1, 4))), strict=False):
        which = " and ".join(f"KPI {k.number}" for k in KPIS if k.target_ms == target)
        ax.axhline(target, color="red", ls=style, lw=1, label=f"{which} target, {target} ms")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ticks = [1, 2, 10, 100, 1000, 10000, 100000]
    ax.set_xticks(ticks, ["0%", "50%", "90%", "99%", "99.9%", "99.99%", "99.999%"])
    ax.set_xlabel("percentile")
    ax.set_ylabel("latency (ms)")
    ax.set_title("Latency by percentile")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # (beside the lines)
    out.append(("Latency percentile spectra", _png(fig)))
    plt.close(fig)

    fig, (a1, a2, a3) = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    merged: dict[int, dict[str, float]] = {}
    for series in r["series"]:
        for p in series:
            slot = merged.setdefault(
                int(p["t"]), {"connected": 0, "talking": 0, "grants": 0, "media_rx": 0}
            )
            for k in slot:
                slot[k] += p[k]
    if merged:
        ts = sorted(merged)
        t0 = ts[0]
        x = [t - t0 for t in ts]
        a1.plot(x, [merged[t]["connected"] for t in ts], label="handsets connected")
        a1.plot(x, [merged[t]["talking"] for t in ts], label="talking now")
        a1.set_ylabel("handsets")
        a1.legend(fontsize=8)
        a1.grid(alpha=0.3)
        rate = [0.0] + [
            max(0.0, merged[b]["media_rx"] - merged[a]["media_rx"]) / max(b - a, 1)
            for a, b in itertools.pairwise(ts)
        ]
        grants = [0.0] + [
            max(0.0, merged[b]["grants"] - merged[a]["grants"]) / max(b - a, 1)
            for a, b in itertools.pairwise(ts)
        ]
        a2.plot(x, rate, color="tab:green")
        a2.set_ylabel("voice packets\nreceived /s")
        a2.grid(alpha=0.3)
        a3.plot(x, grants, color="tab:purple")
        a3.set_ylabel("floor grants /s")
        a3.set_xlabel("seconds")
        a3.grid(alpha=0.3)
    a1.set_title("Load over time")
    out.append(("Load over time", _png(fig)))
    plt.close(fig)
    return out


def scenario_text(s: dict[str, Any]) -> str:
    """The scenario as run, overrides applied, in the file's own form."""
    lines = []
    for section in ("run", "fleet", "traffic", "thresholds"):
        lines.append(f"[{section}]")
        for key, value in (s.get(section) or {}).items():
            shown = str(value).lower() if isinstance(value, bool) else repr(value)
            lines.append(f"{key} = {shown.replace(chr(39), chr(34))}")
        lines.append("")
    return "\n".join(lines).strip()


def _cell(v: object) -> str:
    return "-" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)


def write_html(path: Path, r: dict[str, Any]) -> None:
    rows = "".join(
        f"<tr><td>{html.escape(NAMES[k])}</td>"
        + "".join(
            f"<td>{_cell(r['kpis'].get(k, {}).get(c))}</td>"
            for c in ("n", "p50", "p95", "p99", "max")
        )
        + "</tr>"
        for k in NAMES
    )
    figures = "".join(
        f"<h2>{html.escape(t)}</h2><img src='data:image/png;base64,{b}'>" for t, b in plots(r)
    )
    verdict = "PASS" if r["passed"] else "FAIL"
    page = f"""<!doctype html><html><head><meta charset="utf-8">
<title>ESN load test — {html.escape(r["scenario"]["run"]["name"])}</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
td:first-child{{text-align:left}}.PASS{{color:green}}.FAIL{{color:#c00}}
pre{{background:#f6f6f6;padding:1em}}img{{max-width:100%}}</style></head><body>
<h1>ESN load test: {html.escape(r["scenario"]["run"]["name"])}
<span class="{verdict}">{verdict}</span></h1>
<p>{r["machine"]["date"]}, {r["workers"]} worker(s) on {r["machine"]["cpus"]} CPUs.</p>
<h2>Scenario</h2>
<p>{html.escape(r["scenario"].get("path") or "(built in)")}; overrides of this run:
{html.escape(", ".join(r["scenario"].get("overrides") or []) or "none")}</p>
<pre>{html.escape(scenario_text(r["scenario"]))}</pre>
<table><tr><th>KPI (ms)</th><th>n</th><th>p50</th><th>p95</th><th>p99</th><th>max</th></tr>
{rows}</table>
<pre>{html.escape(kpi_table(r))}</pre>
{figures}
</body></html>"""
    path.write_text(page)
