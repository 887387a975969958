"""ESN push-to-talk simulator: MCPTT-style group communication over MQTT."""

__version__ = "0.1.0"
