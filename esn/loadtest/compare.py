"""Our generator beside Locust's MQTT user, on the same workload, measured in one run.

Workload: N clients, each on its own MQTT connection, publish a 60-byte msgpack location
report at R messages/s (QoS 1) to their own up topic and subscribe to it, for S seconds.
Each side reports the round trip publish -> delivered back through the broker, and we
read each generator's CPU time from /proc: messages per CPU-second is the figure that
tells how many handsets one core can simulate.

    ./run compare --users 500 --rate 2 --seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgpack

from esn.loadtest.recorder import new_histogram, record_s, summary_ms
from esn.runtime import run
from esn.tools.broker import Mosquitto
from esn.transport import BrokerConfig, Transport, make_transport


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # utime, stime, and those of waited-for children (threads are counted in the process)
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def run_ours(port: int, users: int, rate: float, seconds: float) -> dict[str, float]:
    """Our transport (gmqtt on uvloop), one process: N connections on one event loop."""
    args = [
        "--ours",
        "--port",
        str(port),
        "--users",
        str(users),
        "--rate",
        str(rate),
        "--seconds",
        str(seconds),
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "esn.loadtest.compare", *args], stdout=subprocess.PIPE, text=True
    )
    out = _finish(proc)
    result: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    return result | {"cpu_s": out_cpu(proc)}


async def ours(port: int, users: int, rate: float, seconds: float) -> dict[str, float]:
    """The workload on our side (in the process `run_ours` measures)."""
    cfg = BrokerConfig.from_url(f"mqtt://127.0.0.1:{port}")
    h = new_histogram()
    sent = 0
    clients = []

    def heard(topic: str, payload: bytes) -> None:
        record_s(h, (time.time_ns() - msgpack.unpackb(payload)["ts"]) / 1e9)

    for i in range(users):
        t = make_transport("gmqtt", cfg, client_id=f"ours-{i}")
        t.on_message = heard
        await t.start()
        await t.subscribe(f"cmp/unit/ours-{i}/up", qos=1)
        clients.append((t, f"cmp/unit/ours-{i}/up"))

    async def one(t: Transport, topic: str) -> None:
        nonlocal sent
        loop = asyncio.get_running_loop()
        start = loop.time() + random.random() / rate  # users out of step, as Locust's are
        await asyncio.sleep(start - loop.time())
        n = 0
        while loop.time() - start < seconds:
            report = {"t": "location", "lat": 51.5, "lon": -0.12, "ts": time.time_ns()}
            t.publish(topic, msgpack.packb(report), qos=1)
            sent += 1
            n += 1
            await asyncio.sleep(max(0, start + n / rate - loop.time()))

    await asyncio.gather(*(one(t, topic) for t, topic in clients))
    await asyncio.sleep(1)
    for t, _ in clients:
        await t.stop()
    return {"sent": sent, **summary_ms(h)}


_cpu: dict[int, float] = {}


def _finish(proc: subprocess.Popen[str]) -> str:
    """Wait for the process, sampling its CPU time until it exits (then /proc is gone)."""
    while proc.poll() is None:
        try:
            _cpu[proc.pid] = cpu_seconds(proc.pid)
        except OSError:
            break
        time.sleep(0.2)
    out, _ = proc.communicate()
    return out or ""


def out_cpu(proc: subprocess.Popen[str]) -> float:
    return round(_cpu.get(proc.pid, 0.0), 2)


def run_locust(port: int, users: int, rate: float, seconds: float) -> dict[str, float]:
    locust = shutil.which("locust", path=str(Path(sys.executable).parent))
    if locust is None:
        raise SystemExit("locust is not installed: ./run compare installs it")
    env = {**os.environ, "ESN_COMPARE_PORT": str(port), "ESN_COMPARE_RATE": str(rate)}
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.Popen(
            [
                locust,
                "-f",
                str(Path(__file__).with_name("locustfile.py")),
                "--headless",
                "-u",
                str(users),
                "-r",
                str(users),
                "-t",
                f"{int(seconds)}s",
                "--stop-timeout",
                "5",
                "--csv",
                str(Path(tmp) / "stats"),
                "--only-summary",
                "--loglevel",
                "ERROR",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )  # its figures come from the CSV
        _finish(proc)
        rows = list(csv.DictReader((Path(tmp) / "stats_stats.csv").read_text().splitlines()))
    rt = next((r for r in rows if r["Name"] == "round trip"), None)
    published = sum(float(r["Request Count"]) for r in rows if r["Name"].startswith("publish:"))
    if rt is None:
        return {"error": 1.0, "cpu_s": out_cpu(proc)}
    return {
        "n": float(rt["Request Count"]),
        "p50": float(rt["50%"]),
        "p95": float(rt["95%"]),
        "p99": float(rt["99%"]),
        "max": float(rt["Max Response Time"]),
        "sent": published,
        "cpu_s": out_cpu(proc),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="compare", description=__doc__.split("\n")[0])
    p.add_argument("--users", type=int, default=500)
    p.add_argument("--rate", type=float, default=2.0, help="messages/s per user")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--out", default="docs/compare-locust.json")
    p.add_argument("--ours", action="store_true", help=argparse.SUPPRESS)  # run_ours' child
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.ours:
        print(json.dumps(run(ours(a.port, a.users, a.rate, a.seconds))))
        return 0
    results = {}
    for name, fn in (("esn (gmqtt, asyncio)", run_ours), ("Locust MqttUser (paho)", run_locust)):
        with Mosquitto() as broker:
            print(f"{name}: {a.users} users x {a.rate:g} msg/s for {a.seconds:g} s ...", flush=True)
            r = fn(broker.port, a.users, a.rate, a.seconds)
        r["msg_per_cpu_s"] = round(r.get("n", 0) / r["cpu_s"]) if r.get("cpu_s") else 0
        results[name] = r
    print(
        f"\n{'generator':26} {'delivered':>10} {'CPU s':>7} {'msg/CPU-s':>10} "
        f"{'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}"
    )
    for name, r in results.items():
        print(
            f"{name:26} {int(r.get('n', 0)):>10} {r['cpu_s']:>7} {r['msg_per_cpu_s']:>10} "
            f"{r.get('p50', float('nan')):>8.2f} {r.get('p95', float('nan')):>8.2f} "
            f"{r.get('p99', float('nan')):>8.2f}"
        )
    Path(a.out).write_text(
        json.dumps(
            {"users": a.users, "rate": a.rate, "seconds": a.seconds, "results": results}, indent=2
        )
        + "\n"
    )
    print(f"\nwritten to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
