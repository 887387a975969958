"""Running a process: a coroutine on uvloop when it is importable (plain asyncio
otherwise), and logs that a flood cannot turn into a flood of lines."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


# closing the terminal (SIGHUP), Ctrl-C (SIGINT) and a service manager (SIGTERM) alike
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(Exception):
    """The command was asked to stop by a signal, and has stopped what it started."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


def run(main: Coroutine[Any, Any, T], *, stoppable: bool = True) -> T:
    """Run `main` to its end. A stop signal cancels it instead, so that its `finally`
    blocks stop every process and remove every folder it made, then raises Interrupted.
    (A command may set its own handlers for a gentler stop, as the server does; a helper
    process whose parent decides when it stops passes `stoppable=False`.)"""
    received: list[int] = []

    async def guarded() -> T:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None

        def stop(signum: int) -> None:
            received.append(signum)
            task.cancel()

        for signum in STOP_SIGNALS if stoppable else ():
            loop.add_signal_handler(signum, stop, signum)
        return await main

    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        try:
            return runner.run(guarded())
        except asyncio.CancelledError:
            if received:
                raise Interrupted(received[0]) from None
            raise


AUDIT_LOGGER = "esn.audit"  # what units authorised by the fleet did (docs/protocol.md, 11.13)


class Throttle(logging.Filter):
    """Lets each distinct message (logger, level, format string) through at most `burst`
    times per `window_s`, then says once how many it held back: a flood of bad input, or a
    link failing on every publish, must not fill the disk with the same line."""

    def __init__(self, burst: int = 5, window_s: float = 60.0, max_keys: int = 1000) -> None:
        super().__init__()
        self.burst, self.window_s, self.max_keys = burst, window_s, max_keys
        self._seen: dict[tuple[str, int, str], tuple[float, int]] = {}  # -> (since, count)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == AUDIT_LOGGER:
            return True  # (every use of an authority is kept: few, and bounded by limits)
        key = (record.name, record.levelno, str(record.msg))
        since, count = self._seen.get(key, (record.created, 0))
        if record.created - since >= self.window_s:
            if count > self.burst:
                record.msg = f"{record.msg} ({count - self.burst} like it held back)"
            since, count = record.created, 0
        if len(self._seen) >= self.max_keys and key not in self._seen:
            self._seen.clear()
        self._seen[key] = (since, count + 1)
        return count < self.burst
