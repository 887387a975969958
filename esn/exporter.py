"""Prometheus exposition shared by the server, the handsets and the load generator: the
latency buckets every histogram uses, and a minimal `/metrics` endpoint served from the
running event loop, so a scrape never races the code it measures."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from prometheus_client import CollectorRegistry, disable_created_metrics, generate_latest

disable_created_metrics()  # type: ignore[no-untyped-call]
# `_created` series only add noise to every dashboard query

# 0.3 s and 1 s are the 3GPP TS 22.179 targets; the finer buckets are where we live.
BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.3, 1.0, 2.5)


async def serve_metrics(
    registry: CollectorRegistry, port: int, host: str = "127.0.0.1"
) -> asyncio.Server:
    """A minimal HTTP endpoint for GET /metrics on the running event loop."""
    render: Callable[[], bytes] = lambda: generate_latest(registry)  # noqa: E731

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            path = request.split(b" ", 2)[1] if request.count(b" ") >= 2 else b""
            if path.split(b"?")[0] == b"/metrics":
                body, status = render(), b"200 OK"
            else:
                body, status = b"not found: try /metrics\n", b"404 Not Found"
            writer.write(
                b"HTTP/1.1 " + status + b"\r\nContent-Type: text/plain; version=0.0.4"
                b"\r\nContent-Length: "
                + str(len(body)).encode()
                + b"\r\nConnection: close\r\n\r\n"
                + body
            )
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port)
