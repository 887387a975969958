"""`esn bench`: the server's media relay measured against the raw broker, in one run.

1. Raw pass-through: `mosquitto_pub --repeat` into `mosquitto_sub`, the broker alone.
2. Relay throughput: the same C publisher sends voice packets as the floor holder; the
   server (its own process, on each transport) relays them to `mosquitto_sub` listeners.
3. Latency: at a fixed packet rate, Python clients measure publish -> receive directly
   through the broker, then talker -> server -> listener; the difference is our hop.

Figures are printed, written as JSON, and given as ratios to the raw broker measured in
the same run, so a noisy shared machine still yields comparable numbers.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from esn.client.handset import Handset
from esn.tools.broker import Mosquitto
from esn.tools.processes import cpu_seconds, free_port, start_server
from esn.tools.quantiles import percentile
from esn.transport import CLIENTS, BrokerConfig, available_clients, make_transport

PACKET_DATA = bytes(99)  # three 20 ms AMR-WB 12.65 kbit/s frames
FLEET = """
[defaults]
max_talk_ms = 3600000
end_of_media_ms = 60000
[[talkgroup]]
id = "tg-bench"
"""


@dataclass(frozen=True)
class BenchOptions:
    seconds: float = 5.0
    rate: int = 0
    out: str = "docs/benchmarks.json"
    listeners: int = 1
    latency_rate: int = 500  # packets/s for the latency runs: well below saturation


def _packet() -> bytes:
    packet = {"t": "media", "call": "bench", "seq": 1, "data": PACKET_DATA, "ts": time.time_ns()}
    return bytes(msgpack.packb(packet))


async def _count_through(
    broker: Mosquitto,
    pub_topic: str,
    sub_topic: str,
    count: int,
    listeners: int,
    seconds: float,
    rate: int = 0,
) -> dict[str, float]:
    """Publish `count` packets with mosquitto_pub (`rate`/s, or flat out when 0); count what
    each mosquitto_sub gets, and what the broker's CPU did meanwhile."""
    tool = shutil.which("mosquitto_sub")
    if tool is None:
        raise RuntimeError("mosquitto_sub is not installed (Debian: mosquitto-clients)")
    subs = []
    for _ in range(listeners):
        proc = await asyncio.create_subprocess_exec(
            "stdbuf",
            "-oL",
            "mosquitto_sub",
            "-p",
            str(broker.port),
            "-h",
            "127.0.0.1",
            "-t",
            sub_topic,
            "-d",
            "-N",
            "-F",
            "|",
            "-W",
            str(int(seconds * 4 + 60)),
            "-C",
            str(count),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        assert proc.stdout is not None
        while b"SUBACK" not in (line := await asyncio.wait_for(proc.stdout.readline(), 10)):
            if not line:
                raise RuntimeError("mosquitto_sub exited before subscribing")
        subs.append(proc)
    broker_pid = broker.proc.pid if broker.proc else 0
    broker_cpu = cpu_seconds(broker_pid)
    with tempfile.NamedTemporaryFile(suffix=".bin") as f:
        f.write(_packet())
        f.flush()
        start = time.perf_counter()
        pace = ["--repeat-delay", f"{1 / rate:.6f}"] if rate else []
        pub = await asyncio.create_subprocess_exec(
            "mosquitto_pub",
            "-p",
            str(broker.port),
            "-h",
            "127.0.0.1",
            "-t",
            pub_topic,
            "-f",
            f.name,
            "--repeat",
            str(count),
            "-q",
            "0",
            *pace,
        )
        results = await asyncio.gather(*(_drain(p, start) for p in subs))
        await pub.wait()
    received = min(n for n, _ in results)
    elapsed = max(t for _, t in results)
    broker_cpu = cpu_seconds(broker_pid) - broker_cpu
    return {
        "sent": count,
        "received": received,
        "seconds": round(elapsed, 3),
        "msg_per_s": round(received / elapsed) if elapsed else 0.0,
        # (a share of one core: Mosquitto has one thread)
        "broker_cpu_share": round(broker_cpu / elapsed, 3) if elapsed else 0.0,
    }


async def _drain(proc: asyncio.subprocess.Process, start: float) -> tuple[int, float]:
    assert proc.stdout is not None
    n = 0
    last = start
    while chunk := await proc.stdout.read(65536):
        n += chunk.count(b"|")  # one per message (-F "|"); the -d lines have none
        last = time.perf_counter()
    await proc.wait()
    return n, last - start


async def _latency_direct(cfg: BrokerConfig, client: str, rate: int, seconds: float) -> list[float]:
    """Publish -> subscribe straight through the broker: the floor under any relay."""
    got: list[float] = []
    pub = make_transport(client, cfg, client_id="bench-pub")
    sub = make_transport(client, cfg, client_id="bench-sub")
    sub.on_message = lambda t, p: got.append((time.time_ns() - msgpack.unpackb(p)["ts"]) / 1e9)
    await pub.start()
    await sub.start()
    await sub.subscribe("bench/direct", qos=0)
    await _paced(lambda: pub.publish("bench/direct", _packet()), rate, seconds)
    await asyncio.sleep(0.5)
    await pub.stop()
    await sub.stop()
    return got


async def _latency_relay(cfg: BrokerConfig, client: str, rate: int, seconds: float) -> list[float]:
    talker = Handset("talker", cfg, mqtt_client=client, media_interval=0)
    listener = Handset("listener", cfg, mqtt_client=client)
    for h in (talker, listener):
        await h.start()
        await h.affiliate("tg-bench")
    await talker.press("tg-bench")
    topic = talker.topics.media_up("tg-bench", "talker")
    await _paced(lambda: talker.transport.publish(topic, _packet()), rate, seconds)
    await asyncio.sleep(0.5)
    talker.release("tg-bench")
    await talker.stop()
    await listener.stop()
    return listener.stats.mouth_to_ear_s


async def _relay_throughput(
    broker: Mosquitto, cfg: BrokerConfig, client: str, fleet: Path, count: int, opts: BenchOptions
) -> dict[str, float]:
    server = await _with_server(broker, client, fleet)
    try:
        talker = Handset("talker", cfg, media_interval=0)
        await talker.start()
        await talker.affiliate("tg-bench")
        await talker.press("tg-bench")
        cpu_before = cpu_seconds(server.pid)
        relay = await _count_through(
            broker,
            "esn/tg/tg-bench/up/talker/media",
            "esn/tg/tg-bench/down/media",
            count,
            opts.listeners,
            opts.seconds,
            opts.rate,
        )
        cpu = cpu_seconds(server.pid) - cpu_before
        relay["server_cpu_s"] = round(cpu, 3)
        relay["msg_per_server_cpu_s"] = round(relay["received"] / cpu) if cpu > 0 else 0
        await talker.stop()
    finally:
        server.terminate()
        await server.wait()
    relay["loss"] = round(1 - relay["received"] / relay["sent"], 4)
    return relay


async def _paced(send: Any, rate: int, seconds: float) -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    n = int(rate * seconds)
    for i in range(n):
        send()
        delay = start + (i + 1) / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)


def _summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        **{f"p{q}_ms": round(percentile(values, q / 100) * 1000, 3) for q in (50, 95, 99)},
    }


async def _with_server(broker: Mosquitto, client: str, fleet: Path) -> asyncio.subprocess.Process:
    return await start_server(
        broker.url,
        fleet,
        metrics_port=free_port(),
        mqtt_client=client,
        state=fleet.with_name(f"state-{client}.sqlite3"),
        log=fleet.with_name(f"server-{client}.log"),  # its last line, should it not start
        args=("--server-id", f"bench-{client}"),
    )


async def run_bench(opts: BenchOptions) -> int:
    results: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "cpu": _cpu_model(),
            "mosquitto": _mosquitto_version(),
            "date": time.strftime("%Y-%m-%d"),
        },
        "payload_bytes": len(_packet()),
        "relay": {},
        "latency": {},
    }
    count = opts.rate * int(opts.seconds) if opts.rate else 100_000
    with Mosquitto() as broker, tempfile.TemporaryDirectory() as tmp:
        fleet = Path(tmp) / "fleet.toml"
        fleet.write_text(FLEET)
        cfg = BrokerConfig.from_url(broker.url)
        print(f"raw broker: mosquitto_pub -> mosquitto_sub, {count} packets ...", flush=True)
        raw = await _count_through(
            broker, "bench/raw", "bench/raw", count, opts.listeners, opts.seconds, opts.rate
        )
        results["raw"] = raw
        direct = _summary(await _latency_direct(cfg, "gmqtt", opts.latency_rate, opts.seconds))
        results["latency"]["direct_gmqtt"] = direct
        for client in CLIENTS:
            if client not in available_clients():
                print(f"server relay on {client}: skipped, pip install 'esn[{client}]'")
                continue
            print(f"server relay on {client} ...", flush=True)
            relay = await _relay_throughput(broker, cfg, client, fleet, count, opts)
            relay["ratio_to_raw"] = round(relay["msg_per_s"] / max(raw["msg_per_s"], 1), 3)
            results["relay"][client] = relay
            # a fresh server: the throughput run may have left a backlog queued at the broker
            server = await _with_server(broker, client, fleet)
            try:
                lat = _summary(await _latency_relay(cfg, client, opts.latency_rate, opts.seconds))
            finally:
                server.terminate()
                await server.wait()
            lat["p50_ratio_to_direct"] = round(lat["p50_ms"] / max(direct["p50_ms"], 1e-6), 2)
            results["latency"][f"relay_{client}"] = lat
    _print(results, opts)
    write_json(Path(opts.out), results)
    print(f"\nwritten to {opts.out}")
    return 0


def _print(r: dict[str, Any], opts: BenchOptions) -> None:
    raw = r["raw"]
    print(
        f"\nThroughput ({r['payload_bytes']}-byte voice packets, QoS 0, "
        f"{opts.listeners} listener(s))"
    )
    print(
        f"  {'raw broker (C clients)':28} {raw['msg_per_s']:>9,} msg/s  "
        f"(broker CPU {raw['broker_cpu_share']:.0%} of a core)"
    )
    for client, x in r["relay"].items():
        print(
            f"  {'server relay on ' + client:28} {x['msg_per_s']:>9,} msg/s  "
            f"= {x['ratio_to_raw']:.1%} of raw, loss {x['loss']:.1%}, "
            f"{x['msg_per_server_cpu_s']:,} msg per server CPU-second, "
            f"broker CPU {x['broker_cpu_share']:.0%} of a core"
        )
    print(f"\nLatency at {opts.latency_rate} packets/s (publish -> receive)")
    for name, x in r["latency"].items():
        extra = f"  ({x['p50_ratio_to_direct']}x direct)" if "p50_ratio_to_direct" in x else ""
        print(
            f"  {name:28} p50 {x['p50_ms']:.3f} ms  p95 {x['p95_ms']:.3f} ms  "
            f"p99 {x['p99_ms']:.3f} ms{extra}"
        )


def write_json(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mosquitto_version() -> str:
    try:
        out = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True, timeout=5)
        return (out.stdout or out.stderr).splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "unknown"
