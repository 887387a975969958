"""One server instance's cluster link, as its own process, for the ownership tests.

`python -m tests.cluster_member NATS_URLS ID PREFIX` joins the cluster and prints a JSON
line each time the partitions it acts for change: {"id", "t" (Unix time), "owned"}. It
also prints the set it acts for every tick after a pause (SIGSTOP, SIGCONT), so a test
sees what it believed at the first moment it could act again.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time

from esn.server.cluster import ClusterLink


def say(me: str, owned: set[int]) -> None:
    print(json.dumps({"id": me, "t": time.time(), "owned": sorted(owned)}), flush=True)


async def main(urls: str, me: str, prefix: str) -> None:
    link = ClusterLink(urls.split(","), me, prefix=prefix)
    link.on_change = lambda owned: say(me, owned)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    # after a SIGCONT: what this instance would act for, at once (before its next tick)
    loop.add_signal_handler(signal.SIGCONT, lambda: say(me, link.own.owned(link.clock())))
    await link.start()
    say(me, set())
    await stop.wait()
    await link.stop()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
