"""A handset in a process of its own, for the tests that kill, freeze or starve one:

    python -m tests.handset_process URL PREFIX UNIT [--keepalive N] [--talk]
                                    [--mqtt-client gmqtt|paho]

It connects, affiliates to tg-1 and, with --talk, presses PTT (voice every 20 ms once
granted). It prints one line, the answer's type (`granted`, `queued`, `deny`) or `ready`,
then waits to be killed.
"""

from __future__ import annotations

import argparse
import asyncio

from esn.client.handset import Handset
from esn.transport import BrokerConfig


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("url")
    p.add_argument("prefix")
    p.add_argument("unit")
    p.add_argument("--keepalive", type=int, default=30)
    p.add_argument("--talk", action="store_true")
    p.add_argument("--mqtt-client", default="gmqtt")
    a = p.parse_args()
    h = Handset(
        a.unit,
        BrokerConfig.from_url(a.url),
        prefix=a.prefix,
        keepalive=a.keepalive,
        mqtt_client=a.mqtt_client,
        media_interval=0.02,
    )
    await h.start()
    await h.affiliate("tg-1")
    print((await h.press("tg-1")).T if a.talk else "ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
