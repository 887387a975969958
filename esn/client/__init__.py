"""The unit side of the protocol: a handset's floor state machine (sans-I/O), the handset
that drives it over MQTT, and the measurements its user would notice."""
