"""The sans-I/O core: fleet, floor control, affiliation, presence, emergencies, location.

Nothing in this package reads a clock, touches a socket or imports asyncio or MQTT.
"""
