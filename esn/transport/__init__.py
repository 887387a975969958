"""MQTT transports behind one small interface (`Transport`): gmqtt (default) and aiomqtt/paho."""

from __future__ import annotations

from esn.transport.base import BrokerConfig, Transport, TransportError, Will

CLIENTS = ("gmqtt", "paho")


def make_transport(kind: str, broker: BrokerConfig, *, client_id: str, will: Will | None = None,
                   keepalive: int = 30) -> Transport:
    if kind == "gmqtt":
        from esn.transport.gmqtt_client import GmqttTransport

        return GmqttTransport(broker, client_id=client_id, will=will, keepalive=keepalive)
    if kind == "paho":
        from esn.transport.paho_client import PahoTransport

        return PahoTransport(broker, client_id=client_id, will=will, keepalive=keepalive)
    raise ValueError(f"unknown MQTT client {kind!r}; choose one of {', '.join(CLIENTS)}")


__all__ = ["CLIENTS", "BrokerConfig", "Transport", "TransportError", "Will", "make_transport"]
