"""The wire protocol (docs/protocol.md): message value objects, ids, the msgpack codec and
the MQTT topic names. Everything above this package speaks through it."""
