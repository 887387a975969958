"""The debrief: how the dispatcher did, ask by ask, in the terminal and as an HTML page
with a timeline (one bar per ask, from when it was raised to when it was answered)."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import TYPE_CHECKING

from esn.exercise.script import Exercise

if TYPE_CHECKING:
    from esn.exercise.run import Ask, Moment

COLOURS = {"on time": "#2e7d32", "late": "#ef8f00", "missed": "#c62828"}


def clock(seconds: float) -> str:
    s = max(0, int(seconds))
    return f"{s // 60}:{s % 60:02d}"


def summarise(asks: list[Ask]) -> dict[str, object]:
    answered = [a for a in asks if a.seconds is not None]
    sos = [a.seconds for a in answered if a.event.do == "sos" and a.seconds is not None]
    return {
        "asks": len(asks),
        "answered": len(answered),
        "on_time": sum(a.verdict == "on time" for a in asks),
        "late": sum(a.verdict == "late" for a in asks),
        "missed": sum(a.verdict == "missed" for a in asks),
        "sos_ack_mean_s": round(sum(sos) / len(sos), 1) if sos else None,
        "sos_ack_max_s": round(max(sos), 1) if sos else None,
    }


def text_table(
    ex: Exercise, asks: list[Ask], total: float, ended: str, s: dict[str, object]
) -> str:
    """The debrief in words; `s` is `summarise(asks)`."""
    lines = [
        f"Debrief: {ex.name}, {clock(total)} played ({ended}), trainee {ex.trainee}",
        f"{'#':>3}  {'raised':>6}  {'what the dispatcher had to do':48} {'asked':>5}"
        f"  {'answered':>8}  {'took':>7}  {'by':12} verdict",
    ]
    for a in asks:
        took = f"{a.seconds:.1f} s" if a.seconds is not None else "-"
        lines.append(
            f"{a.event.n:>3}  {clock(a.raised):>6}  {a.event.asks()[:48]:48} "
            f"{1 + len(a.asked):>5}  {clock(a.answered) if a.answered is not None else '-':>8}"
            f"  {took:>7}  {(a.by or ('-' if a.answered is None else 'a dispatcher'))[:12]:12}"
            f" {a.verdict}{'' if a.answered is None else ' (' + a.how + ')'}"
        )
    if not asks:
        lines.append("  (nothing in this exercise waited on the dispatcher)")
    sos = (
        f"; SOS acknowledged in {s['sos_ack_mean_s']} s on average (longest {s['sos_ack_max_s']} s)"
        if s["sos_ack_mean_s"] is not None
        else ""
    )
    lines.append(
        f"Answered {s['answered']} of {s['asks']}: {s['on_time']} on time, {s['late']} late, "
        f"{s['missed']} missed{sos}"
    )
    return "\n".join(lines)


def timeline_svg(asks: list[Ask], timeline: list[Moment], total: float) -> str:
    """One row per ask (a bar from raised to answered, or to the end when missed, a tick
    for each time it was asked again) under a strip of every scripted event."""
    width, left, row = 900, 260, 26
    span = max(total, 1.0)
    height = 40 + row * (len(asks) + 1) + 20

    def x(t: float) -> float:
        return left + (width - left - 20) * min(t, span) / span

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="12">'
    ]
    step = next(s for s in (10, 30, 60, 120, 300, 600, 1800, 3600, 1e9) if span / s <= 10)
    t = 0.0
    while t <= span:
        out.append(
            f'<line x1="{x(t):.1f}" y1="20" x2="{x(t):.1f}" y2="{height - 20}" stroke="#ddd"/>'
            f'<text x="{x(t):.1f}" y="{height - 5}" text-anchor="middle">{clock(t)}</text>'
        )
        t += step
    out.append('<text x="4" y="34">scripted events</text>')
    for mo in timeline:
        if mo.kind in ("scripted", "repeated"):
            colour = "#555" if mo.kind == "scripted" else "#999"
            out.append(
                f'<circle cx="{x(mo.at):.1f}" cy="30" r="4" fill="{colour}">'
                f"<title>{clock(mo.at)} {html.escape(mo.text)}</title></circle>"
            )
    for i, a in enumerate(asks):
        y = 40 + row * (i + 1)
        end = a.answered if a.answered is not None else span
        colour = COLOURS[a.verdict]
        label = f"#{a.event.n} {a.event.asks()}"
        label = html.escape(label if len(label) <= 40 else label[:39] + "…")
        tip = html.escape(
            f"{a.event.asks()}: raised {clock(a.raised)}, "
            + (f"answered in {a.seconds:.1f} s ({a.how})" if a.seconds is not None else "missed")
        )
        out.append(
            f'<text x="4" y="{y + 4}">{label}</text>'
            f'<rect x="{x(a.raised):.1f}" y="{y - 8}" width="{max(2.0, x(end) - x(a.raised)):.1f}" '
            f'height="16" rx="3" fill="{colour}" opacity="0.85"><title>{tip}</title></rect>'
        )
        for again in a.asked:
            out.append(
                f'<line x1="{x(again):.1f}" y1="{y - 10}" x2="{x(again):.1f}" y2="{y + 10}" '
                f'stroke="#000" stroke-width="2">'
                f"<title>asked again at {clock(again)}</title></line>"
            )
    out.append("</svg>")
    return "".join(out)


def write_report(
    ex: Exercise, asks: list[Ask], timeline: list[Moment], total: float, ended: str, out: Path
) -> str:
    """The debrief in words, also written to `out`: debrief.html and debrief.json."""
    summary = summarise(asks)
    text = text_table(ex, asks, total, ended, summary)
    out.mkdir(parents=True, exist_ok=True)
    rows = "".join(
        f"<tr><td>{a.event.n}</td><td>{clock(a.raised)}</td><td>{html.escape(a.event.asks())}</td>"
        f"<td>{1 + len(a.asked)}</td><td>{'-' if a.seconds is None else f'{a.seconds:.1f} s'}</td>"
        f"<td>{html.escape(a.by or '-')}</td><td>{html.escape(a.how or '-')}</td>"
        f'<td style="color:{COLOURS[a.verdict]}"><b>{a.verdict}</b></td></tr>'
        for a in asks
    )
    log = "".join(
        f"<tr><td>{clock(mo.at)}</td><td>{mo.kind}</td><td>{html.escape(mo.text)}</td></tr>"
        for mo in timeline
    )
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Debrief: {html.escape(ex.name)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:60em}}
table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:left}}</style>
</head><body>
<h1>Debrief: {html.escape(ex.name)}</h1>
<p>{html.escape(ex.brief)}</p>
<p>Trainee <b>{html.escape(ex.trainee)}</b>; {clock(total)} played ({html.escape(ended)}).
Answered {summary["answered"]} of {summary["asks"]}: {summary["on_time"]} on time,
{summary["late"]} late, {summary["missed"]} missed.</p>
<h2>Timeline</h2>
{timeline_svg(asks, timeline, total)}
<p>Green: answered in time; amber: late; red: missed. A black tick: asked again.
Hover for details.</p>
<h2>What the dispatcher had to do</h2>
<table><tr><th>#</th><th>raised</th><th>what</th><th>asked</th><th>took</th><th>by</th>
<th>how</th><th>verdict</th></tr>{rows}</table>
<h2>Everything that happened</h2>
<table><tr><th>at</th><th>kind</th><th>what</th></tr>{log}</table>
</body></html>
"""
    (out / "debrief.html").write_text(page)
    data = {
        "exercise": ex.name,
        "trainee": ex.trainee,
        "played_s": round(total, 2),
        "ended": ended,
        "summary": summary,
        "asks": [
            {
                "event": a.event.n,
                "what": a.event.asks(),
                "raised_s": a.raised,
                "asked_again_s": a.asked,
                "answered_s": a.answered,
                "took_s": a.seconds,
                "by": a.by,
                "how": a.how,
                "verdict": a.verdict,
            }
            for a in asks
        ],
        "timeline": [{"at_s": mo.at, "kind": mo.kind, "text": mo.text} for mo in timeline],
    }
    (out / "debrief.json").write_text(json.dumps(data, indent=1) + "\n")
    return text
