"""The raw broker beside the system under test, in the same run.

Two clients of the load test's own pass voice-sized packets straight to each other
through the broker (no server, no handset), a fixed number a second, from the start of
the traffic to its end; each is timed like mouth-to-ear. What the system adds to the
broker under the same load is then the difference between this and KPI3.
"""

from __future__ import annotations

import asyncio
import os
import time

from hdrh.histogram import HdrHistogram

from esn.loadtest.recorder import new_histogram, record_s
from esn.transport import BrokerConfig, make_transport

PER_S = 50
PAD = bytes(135)  # (with the 8-byte send time: as long as a handset's voice packet)


class BrokerProbe:
    def __init__(self, url: str) -> None:
        broker = BrokerConfig.from_url(url)
        me = f"esn-probe-{os.getpid()}"  # (two load tests on one broker time their own)
        self.topic = f"loadtest/{me}"
        self.tx = make_transport("gmqtt", broker, client_id=f"{me}-tx")
        self.rx = make_transport("gmqtt", broker, client_id=f"{me}-rx")
        self.rx.on_message = self._heard
        self.hist: HdrHistogram = new_histogram()
        self.sent = 0
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Connect both (before the traffic: raising TransportError if they cannot)."""
        await self.rx.start()
        await self.tx.start()
        await self.rx.subscribe(self.topic, qos=0)

    def begin(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._send())

    def end(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def stop(self) -> None:
        self.end()
        await asyncio.gather(self.tx.stop(), self.rx.stop(), return_exceptions=True)

    def _heard(self, topic: str, payload: bytes) -> None:
        if len(payload) == 8 + len(PAD):
            record_s(self.hist, (time.time_ns() - int.from_bytes(payload[:8])) / 1e9)

    async def _send(self) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        while True:
            self.tx.publish(self.topic, time.time_ns().to_bytes(8) + PAD, qos=0)
            self.sent += 1
            await asyncio.sleep(max(0.0, start + self.sent / PER_S - loop.time()))
