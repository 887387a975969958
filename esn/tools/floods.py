"""`esn bench --floods`: floor access in one group while a unit of another floods the server.

For each message class, Mosquitto's own C publisher sends one payload from unit `u9` as
fast as the broker takes it (QoS 0), while ten handsets, each in a group of its own, press
and release PTT twice a second (well inside their own floor limit) and measure their floor
access. The same measurement with no flood
comes first, in the same run, so each figure stands beside its baseline. The server runs
as its own process, as in a deployment; everything is on loopback.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from esn.client.handset import Handset
from esn.protocol import codec
from esn.protocol import messages as m
from esn.protocol.topics import Topics
from esn.tools.bench import write_json
from esn.tools.broker import Mosquitto
from esn.tools.monitoring import scrape
from esn.tools.processes import free_port, start_server
from esn.tools.quantiles import percentile
from esn.transport import BrokerConfig

WATCHERS = 10  # measuring handsets, one group each
FLEET = "".join(f'[[talkgroup]]\nid = "tg-{i}"\n' for i in range(1, WATCHERS + 2))

T = Topics()
# class -> (topic, payload) sent by the flooder u9, a member of tg-1
FLOODS: dict[str, tuple[str, bytes]] = {
    "queue_status": (T.floor_up("tg-1", "u9"), codec.encode(m.QueueStatus(ref=1))),
    "request": (T.floor_up("tg-1", "u9"), codec.encode(m.Request(ref=1))),
    "affiliate": (T.unit_up("u9"), codec.encode(m.Affiliate(groups=["tg-1"], ref=1))),
    "emergency_alert": (T.unit_up("u9"), codec.encode(m.EmergencyAlert(tg="tg-1", ref=1))),
    "sds": (T.unit_up("u9"), codec.encode(m.Sds(to="tg:tg-1", text="x" * 100, ref=1))),
    "garbage": (T.unit_up("u9"), b"\xc1" * 64),
    "voice from a non-holder": (
        T.media_up("tg-1", "u9"),
        msgpack.packb({"t": "media", "call": "c", "seq": 1, "data": bytes(99)}),
    ),
}


@dataclass(frozen=True)
class FloodOptions:
    seconds: float = 5.0  # of each flood
    presses_per_s: float = 2.0  # each measuring handset's pace
    out: str = "docs/floods.json"


async def _presses(hs: list[Handset], seconds: float, per_s: float) -> list[float]:
    """Every handset presses and releases in its own group at a steady pace."""
    runs = await asyncio.gather(*(_pace(h, f"tg-{i}", seconds, per_s) for i, h in enumerate(hs, 2)))
    return [x for run in runs for x in run]


async def _pace(h: Handset, tg: str, seconds: float, per_s: float) -> list[float]:
    """Press and release at a steady pace; the access times (2 s for no answer)."""
    access: list[float] = []
    loop = asyncio.get_running_loop()
    start = loop.time()
    n = 0
    while loop.time() - start < seconds:
        began = time.perf_counter()
        try:
            answer = await h.press(tg, timeout=2.0)
        except TimeoutError:
            access.append(2.0)  # no answer counts as the longest wait
        else:
            if isinstance(answer, m.Granted):
                access.append(time.perf_counter() - began)
        h.release(tg)
        n += 1
        await asyncio.sleep(max(0.0, start + n / per_s - loop.time()))
    return access


async def _flood(broker: Mosquitto, topic: str, payload: bytes, seconds: float) -> int:
    """mosquitto_pub as u9, flat out for about `seconds`; returns how many it sent."""
    count = 0
    with tempfile.NamedTemporaryFile(suffix=".bin") as f:
        f.write(payload)
        f.flush()
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        while loop.time() < end:
            pub = await asyncio.create_subprocess_exec(
                "mosquitto_pub",
                "-h",
                "127.0.0.1",
                "-p",
                str(broker.port),
                "-i",
                "u9",
                "-t",
                topic,
                "-f",
                f.name,
                "--repeat",
                "20000",
                "-q",
                "0",
            )
            await pub.wait()
            count += 20000
    return count


def _summary(access: list[float]) -> dict[str, float]:
    return {
        "grants": len(access),
        "p50_ms": round(percentile(access, 0.5) * 1000, 3),
        "p99_ms": round(percentile(access, 0.99) * 1000, 3),
        "max_ms": round(max(access, default=float("nan")) * 1000, 3),
    }


async def run_floods(opts: FloodOptions) -> int:
    if shutil.which("mosquitto_pub") is None:
        raise RuntimeError("mosquitto_pub is not installed (Debian: mosquitto-clients)")
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "seconds": opts.seconds,
        "presses_per_s": opts.presses_per_s,
        "classes": {},
    }
    with Mosquitto() as broker, tempfile.TemporaryDirectory() as tmp:
        fleet = Path(tmp) / "fleet.toml"
        fleet.write_text(FLEET)
        port = free_port()
        server = await start_server(
            broker.url,
            fleet,
            metrics_port=port,
            state=Path(tmp) / "state.sqlite3",
            log=Path(tmp) / "server.log",
        )
        cfg = BrokerConfig.from_url(broker.url)
        hs = [Handset(f"w{i}", cfg) for i in range(2, WATCHERS + 2)]
        try:
            for i, h in enumerate(hs, 2):
                await h.start()
                await h.affiliate(f"tg-{i}")
            print("no flood (baseline) ...", flush=True)
            results["baseline"] = _summary(await _presses(hs, opts.seconds, opts.presses_per_s))
            for name, (topic, payload) in FLOODS.items():
                print(f"flooding {name} ...", flush=True)
                before = await _sent(port)
                began = time.monotonic()
                flood = asyncio.create_task(_flood(broker, topic, payload, opts.seconds))
                access = await _presses(hs, opts.seconds, opts.presses_per_s)
                sent = await flood
                after = await _sent(port)
                row: dict[str, Any] = {**_summary(access)}
                row["flood_msg_per_s"] = round(sent / (time.monotonic() - began))
                # "?": the server could not even answer its metrics endpoint in time
                row["server_sent"] = "?" if before is None or after is None else int(after - before)
                results["classes"][name] = row
        finally:
            await asyncio.gather(*(h.stop() for h in hs), return_exceptions=True)
            server.terminate()
            await server.wait()
    _print(results)
    write_json(Path(opts.out), results)
    print(f"\nwritten to {opts.out}")
    return 0


async def _sent(port: int) -> float | None:
    """Messages the server has sent in all (answers and events), or None when it could not
    even answer its metrics endpoint in time."""
    try:
        samples = await asyncio.to_thread(scrape, port)
    except (OSError, TimeoutError):
        return None
    out = samples.get("esn_messages_total", [])
    return sum(v for labels, v in out if labels.get("direction") == "out")


def _print(r: dict[str, Any]) -> None:
    print(
        f"\nFloor access in {WATCHERS} other groups while u9 floods ({r['seconds']:g} s "
        f"each, {r['presses_per_s']:g} presses/s in each group)"
    )
    print(
        f"  {'flood':26} {'flood msg/s':>11} {'server sent':>11} {'grants':>7} "
        f"{'p50':>9} {'p99':>9} {'max':>9}"
    )
    b = r["baseline"]
    print(
        f"  {'(none)':26} {'':>11} {'':>11} {b['grants']:>7} {b['p50_ms']:>7.2f}ms "
        f"{b['p99_ms']:>7.2f}ms {b['max_ms']:>7.2f}ms"
    )
    for name, x in r["classes"].items():
        print(
            f"  {name:26} {x['flood_msg_per_s']:>11,} {x['server_sent']:>11} "
            f"{x['grants']:>7} {x['p50_ms']:>7.2f}ms {x['p99_ms']:>7.2f}ms "
            f"{x['max_ms']:>7.2f}ms"
        )
