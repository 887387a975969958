"""MQTT transports behind one small interface (`Transport`): gmqtt (default), aiomqtt/paho,
and an in-process broker for the fast test tier (`memory`)."""

from __future__ import annotations

from esn.extras import installed, need
from esn.transport.base import BrokerConfig, Transport, TransportError, Will

CLIENTS = ("gmqtt", "paho")  # the MQTT stacks a user can choose; "memory" is for tests
_NEEDS = {"paho": "aiomqtt"}  # stack -> the module its extra (esn[paho]) brings


def available_clients() -> list[str]:
    """The MQTT stacks installed here (paho is an extra)."""
    return [c for c in CLIENTS if c not in _NEEDS or installed(_NEEDS[c])]


def make_transport(
    kind: str,
    broker: BrokerConfig,
    *,
    client_id: str,
    will: Will | None = None,
    keepalive: int = 30,
    persistent: bool = False,
    others: tuple[BrokerConfig, ...] = (),
) -> Transport:
    """A transport to `broker`; `others` are more nodes of the same clustered broker,
    tried in turn when the link is lost."""
    made: type[Transport]
    if kind == "gmqtt":
        from esn.transport.gmqtt_client import GmqttTransport as made
    elif kind == "paho":
        need("aiomqtt", "paho", "the paho MQTT client")
        from esn.transport.paho_client import PahoTransport as made
    elif kind == "memory":
        from esn.transport.memory import MemoryTransport as made
    else:
        raise ValueError(f"unknown MQTT client {kind!r}; choose one of {', '.join(CLIENTS)}")
    return made(
        broker,
        client_id=client_id,
        will=will,
        keepalive=keepalive,
        persistent=persistent,
        others=others,
    )


__all__ = [
    "CLIENTS",
    "BrokerConfig",
    "Transport",
    "TransportError",
    "Will",
    "available_clients",
    "make_transport",
]
