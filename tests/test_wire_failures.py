"""Faults a real deployment sees: a handset dying mid-call, the server and broker going
away and coming back, and the `esn server` command line's promises."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import msgpack
import pytest

from esn.client.handset import Handset
from esn.core.fleet import parse_fleet
from esn.protocol import messages as m
from esn.server.shell import Config, Server
from esn.tools.broker import Mosquitto
from esn.tools.processes import server_command
from esn.transport import BrokerConfig, make_transport
from tests.conftest import FLEET, REAL_CLIENTS, HandsetFactory, eventually, spawn_handset

pytestmark = [pytest.mark.broker, pytest.mark.fault]


@pytest.fixture(params=REAL_CLIENTS)
def mqtt_client(request: pytest.FixtureRequest) -> str:
    """Real processes and real brokers are killed here: the MQTT stacks only."""
    return str(request.param)


async def test_the_will_releases_the_floor_when_a_handset_dies(
    server: Server, handset: HandsetFactory, mosquitto: Mosquitto, prefix: str, mqtt_client: str
) -> None:
    proc, said = await spawn_handset(
        mosquitto.url, prefix, "u1", talk=True, mqtt_client=mqtt_client
    )
    try:
        assert said == "granted"
        waiting = await handset("u2", "tg-1")
        assert isinstance(await waiting.press("tg-1"), m.Queued)
        granted = waiting.expect(lambda i: isinstance(i.msg, m.Granted), timeout=10)
        proc.send_signal(signal.SIGKILL)  # no DISCONNECT: the broker publishes the will
        await granted
        assert server.network.offline == {"u1"}
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def test_handsets_reaffiliate_when_the_server_restarts(
    server: Server, handset: HandsetFactory, broker: BrokerConfig, prefix: str, mqtt_client: str
) -> None:
    a = await handset("u1", "tg-1")
    await server.stop()
    replacement = Server(
        Config(broker=broker, prefix=prefix, server_id=f"srv-{prefix}", mqtt_client=mqtt_client),
        parse_fleet(FLEET),
    )
    await replacement.start()
    try:
        await eventually(
            lambda: (
                "u1" in replacement.network.affiliations
                and "tg-1" in replacement.network.affiliations["u1"]
            )
        )
        assert isinstance(await a.press("tg-1"), m.Granted)
    finally:
        await replacement.stop()


@contextlib.asynccontextmanager
async def own_broker(
    prefix: str, mqtt_client: str, *units: str
) -> AsyncIterator[tuple[Mosquitto, Server, list[Handset]]]:
    """A Mosquitto of the test's own (to restart), a server and started handsets on it."""
    with Mosquitto() as own:
        cfg = BrokerConfig.from_url(own.url)
        srv = Server(Config(broker=cfg, prefix=prefix, mqtt_client=mqtt_client), parse_fleet(FLEET))
        await srv.start()
        made = [
            Handset(u, cfg, prefix=prefix, mqtt_client=mqtt_client, media_interval=0.02)
            for u in units
        ]
        try:
            for h in made:
                await h.start()
            yield own, srv, made
        finally:
            for h in made:
                await h.stop()
            await srv.stop()


async def restart(own: Mosquitto, srv: Server, handsets: list[Handset]) -> None:
    """Stop the broker until everyone has seen it go, start it, and wait for everyone back."""
    own.stop()
    await eventually(lambda: not (srv.transport.connected or handsets[0].transport.connected))
    own.start()
    links = [srv.transport, *(h.transport for h in handsets)]
    await eventually(lambda: all(link.connected for link in links), timeout=20)


async def test_everyone_reconnects_after_a_broker_restart(prefix: str, mqtt_client: str) -> None:
    async with own_broker(prefix, mqtt_client, "u1", "u2") as (own, srv, (a, b)):
        for h in (a, b):
            await h.affiliate("tg-1")
        await restart(own, srv, [a, b])
        # re-affiliated by the handsets themselves on reconnect
        await eventually(lambda: {"u1", "u2"} <= set(srv.network.affiliations))
        media = b.expect(lambda i: isinstance(i.msg, m.Media), timeout=5)
        assert isinstance(await a.press("tg-1"), m.Granted)
        await media


async def test_a_subscription_the_broker_does_not_answer_is_made_again(
    prefix: str, mqtt_client: str
) -> None:
    """Tried: a subscribe sent to a broker frozen with SIGSTOP (it takes the bytes and
    answers nothing). Expect: the subscribe returns after `connect_timeout` instead of
    waiting for good, the link is dropped, and once the broker answers again the
    reconnect makes the subscription: a message published there arrives."""
    with Mosquitto() as own:
        cfg = BrokerConfig.from_url(own.url)
        sub = make_transport(mqtt_client, cfg, client_id=f"{prefix}-sub")
        pub = make_transport(mqtt_client, cfg, client_id=f"{prefix}-pub")
        sub.connect_timeout = 1.0
        got: asyncio.Queue[bytes] = asyncio.Queue()
        sub.on_message = lambda topic, payload: got.put_nowait(payload)
        await sub.start()
        await pub.start()
        assert own.proc is not None
        try:
            own.proc.send_signal(signal.SIGSTOP)
            await asyncio.wait_for(sub.subscribe(f"{prefix}/x", qos=1), 10)
            own.proc.send_signal(signal.SIGCONT)
            await eventually(lambda: sub.reconnects >= 1 and sub.connected, timeout=20)
            await eventually(lambda: pub.connected, timeout=20)
            pub.publish(f"{prefix}/x", b"after", qos=1)
            assert await asyncio.wait_for(got.get(), 5) == b"after"
        finally:
            own.proc.send_signal(signal.SIGCONT)
            await asyncio.gather(sub.stop(), pub.stop())


async def run(cmd: list[str], timeout: float = 20) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(*cmd, stderr=asyncio.subprocess.PIPE)
    try:
        _, err = await asyncio.wait_for(proc.communicate(), timeout)
    finally:
        if proc.returncode is None:  # timed out: nothing of the test may outlive it
            proc.kill()
            await proc.wait()
    return proc.returncode or 0, err.decode()


async def test_invalid_fleet_file_is_a_one_line_error(tmp_path: Path, mosquitto: Mosquitto) -> None:
    bad = tmp_path / "fleet.toml"
    bad.write_text('[[talkgroup]]\nid = "tg 1"\n')
    rc, err = await run(server_command("--broker", mosquitto.url, "--fleet", str(bad)))
    assert rc == 2
    assert err.strip().count("\n") == 0 and "talkgroup[0].id" in err
    rc, err = await run(server_command("--broker", mosquitto.url, "--fleet", str(tmp_path / "no")))
    assert rc == 2 and "cannot read fleet file" in err and err.strip().count("\n") == 0


async def test_unreachable_broker_is_a_one_line_error(tmp_path: Path) -> None:
    fleet = tmp_path / "fleet.toml"
    fleet.write_text('[[talkgroup]]\nid = "tg-1"\n')
    from esn.tools.processes import free_port

    rc, err = await run(
        server_command("--broker", f"mqtt://127.0.0.1:{free_port()}", "--fleet", str(fleet))
    )
    assert rc == 1 and "cannot reach broker" in err and err.strip().count("\n") == 0
    rc, err = await run(server_command("--broker", "http://x", "--fleet", str(fleet)))
    assert rc == 2 and "mqtt://" in err


async def test_sigterm_publishes_offline_status_and_exits_zero(
    tmp_path: Path, mosquitto: Mosquitto, prefix: str
) -> None:
    fleet = tmp_path / "fleet.toml"
    fleet.write_text('[[talkgroup]]\nid = "tg-1"\n')
    watcher = make_transport("gmqtt", BrokerConfig.from_url(mosquitto.url), client_id="watch")
    states: asyncio.Queue[str] = asyncio.Queue()
    watcher.on_message = lambda t, p: states.put_nowait(msgpack.unpackb(p)["state"]) if p else None
    await watcher.start()
    await watcher.subscribe(f"{prefix}/server/+/status")
    proc = await asyncio.create_subprocess_exec(
        *server_command("--broker", mosquitto.url, "--fleet", str(fleet), "--prefix", prefix)
    )
    try:
        assert await asyncio.wait_for(states.get(), 20) == "online"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
        assert await asyncio.wait_for(states.get(), 5) == "offline"
    finally:
        if proc.returncode is None:
            proc.kill()
        await watcher.stop()


async def test_a_server_says_in_one_line_what_it_serves_and_the_metrics_port_it_chose(
    tmp_path: Path, mosquitto: Mosquitto, prefix: str
) -> None:
    fleet = tmp_path / "fleet.toml"
    fleet.write_text('[[talkgroup]]\nid = "tg-1"\n[[talkgroup]]\nid = "tg-2"\n')
    args = ("--fleet", str(fleet), "--prefix", prefix, "--state", ":memory:")
    proc = await asyncio.create_subprocess_exec(
        *server_command("--broker", mosquitto.url, *args, "--metrics-port", "0"),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
        said = re.fullmatch(
            rf"esn server esn-1: serving 2 talkgroups on {re.escape(mosquitto.url)} \(alone\); "
            r"metrics (http://127\.0\.0\.1:(\d+)/metrics); Ctrl-C or SIGTERM stops it\n",
            line,
        )
        assert said is not None and int(said[2]) > 0, line
        body = await asyncio.to_thread(lambda: urllib.request.urlopen(said[1], timeout=5).read())
        assert b"esn_floor_access_seconds" in body
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()


async def test_a_second_server_under_the_same_id_refuses_to_start(
    tmp_path: Path, mosquitto: Mosquitto, prefix: str
) -> None:
    """Tried: start `esn server` with the id of a server that is online. Expect: it exits 1
    with one line naming the id; the first server goes on serving (it used to be pushed off
    and push back, endlessly)."""
    fleet = tmp_path / "fleet.toml"
    fleet.write_text('[[talkgroup]]\nid = "tg-1"\n')
    cfg = BrokerConfig.from_url(mosquitto.url)
    first = Server(Config(broker=cfg, prefix=prefix, server_id="twin"), parse_fleet(FLEET))
    await first.start()
    u1 = Handset("u1", cfg, prefix=prefix)
    try:
        rc, err = await run(
            server_command(
                "--broker",
                mosquitto.url,
                "--fleet",
                str(fleet),
                "--prefix",
                prefix,
                "--server-id",
                "twin",
            )
        )
        last = err.strip().splitlines()[-1]  # after the link warnings of the push-offs
        assert rc == 1 and "Traceback" not in err and "'twin' is online" in last, err
        back = u1.expect(  # the first one's own online: it has its session back
            lambda i: (
                isinstance(i.msg, m.Status)
                and (i.msg.state, i.msg.started_ts) == ("online", first.started_ns)
            ),
            timeout=10,
        )
        await u1.start()
        await back
        await u1.affiliate("tg-1")
        assert isinstance(await u1.press("tg-1"), m.Granted)  # the first one still serves
    finally:
        await u1.stop()
        await first.stop()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
async def test_a_demo_stopped_by_a_signal_leaves_nothing_behind(
    sig: signal.Signals, tmp_path: Path
) -> None:
    """Tried: Ctrl-C, SIGTERM, and closing the terminal (SIGHUP) in the middle of a demo.
    Expect: one line, the signal's exit status, and its broker, server and work folder
    gone (they used to be left running, with thousands of traceback lines)."""
    scratch = tmp_path / "tmp"  # the demo's own temp folder: it must end empty
    scratch.mkdir()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "esn.cli",
        "demo",
        "--duration",
        "60",
        "--handsets",
        "30",
        env={**os.environ, "TMPDIR": str(scratch)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert proc.stdout is not None
    ports = []
    try:
        async with asyncio.timeout(30):
            while not (line := (await proc.stdout.readline()).decode()).startswith("t="):
                ports += [int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)", line)]
        proc.send_signal(sig)
        rest, _ = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 128 + sig
    assert b"Traceback" not in rest and b"never awaited" not in rest, rest.decode()[-2000:]
    assert rest.decode().strip().endswith("everything it started is stopped")
    assert len(ports) >= 2  # the broker's and the server's metrics
    for port in ports:
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)
    assert list(scratch.iterdir()) == []
