"""The helper processes the tools and the tests run on this machine: free loopback ports,
waiting for a listener, ending a process, the file limit, and `esn server` as a process.

Only loopback addresses are used: nothing here ever reaches another machine.
"""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path


class ServerStartError(RuntimeError):
    """`esn server` did not come up; the message is one line (its last words, if any)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_listening(port: int, timeout: float = 15.0) -> bool:
    """Whether something accepts connections on 127.0.0.1:`port` within `timeout`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        return True
    return False


def end_process(
    proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 10.0
) -> None:
    """Signal a helper process and reap it, killing it if it does not go in time."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def log_tail(path: Path, lines: int = 5) -> str:
    """A helper process's last log lines on one line (for a one-line error), or ""."""
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


def cpu_seconds(pid: int | str = "self") -> float:
    """CPU time (user and system) a process on this machine has used so far; 0 if gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def peak_rss_kb(pid: int | str = "self") -> int:
    """A process's peak memory (VmHWM: its own, where getrusage would count the parent's
    before the exec that started it); 0 if gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss if pid == "self" else 0


def raise_fd_limit() -> None:
    """One socket per simulated handset: take the hard limit (children inherit it)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def server_command(*args: str) -> list[str]:
    """`esn server ARGS` with this interpreter, whether or not `esn` is on PATH."""
    return [sys.executable, "-m", "esn.cli", "server", *args]


async def start_server(
    broker_url: str,
    fleet: Path,
    *,
    metrics_port: int,
    mqtt_client: str = "gmqtt",
    state: Path | None = None,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    log: Path | None = None,
    timeout: float = 15.0,
    own_session: bool = False,
) -> asyncio.subprocess.Process:
    """`esn server` as its own process; returns once its metrics endpoint listens (it has
    subscribed and recovered by then). `state` is its durable state file (else it keeps
    nothing across restarts); `log` takes its output (else it is discarded). With
    `own_session`, Ctrl-C at the terminal reaches only the caller, which stops the server
    in its own time (as it does the broker)."""
    with open(log or os.devnull, "wb") as out:  # noqa: ASYNC230 (a moment, at start)
        proc = await asyncio.create_subprocess_exec(
            *server_command(
                "--broker",
                broker_url,
                "--fleet",
                str(fleet),
                "--metrics-port",
                str(metrics_port),
                "--mqtt-client",
                mqtt_client,
                "--state",
                str(state or ":memory:"),
                *args,
            ),
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            start_new_session=own_session,
        )
    waiting = asyncio.ensure_future(wait_listening(metrics_port, timeout))
    exited = asyncio.ensure_future(proc.wait())
    try:
        await asyncio.wait({waiting, exited}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # (cancelled: a process not handed back must not outlive us)
        waiting.cancel()
        exited.cancel()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    if waiting.done() and waiting.result():
        exited.cancel()
        return proc
    waiting.cancel()
    if proc.returncode is None:
        proc.kill()
        await proc.wait()
        raise ServerStartError(f"the server did not come up within {timeout:g} s")
    last = ""
    if log is not None:
        text = await asyncio.to_thread(log.read_text, errors="replace")
        lines = text.strip().splitlines()
        last = f": {lines[-1]}" if lines else ""
    raise ServerStartError(f"the server exited at start (status {proc.returncode}){last}")
