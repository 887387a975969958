"""Locust's side of `./run compare`: its MQTT user on the same workload as ours.

Run by `esn.loadtest.compare` as `locust -f` this file, with the broker's port and the
per-user rate in ESN_COMPARE_PORT and ESN_COMPARE_RATE. Each user publishes a location
report to its own topic at the rate (QoS 1), subscribes to it, and reports the round trip
as a Locust request named "round trip".
"""

from __future__ import annotations

import os
import time
from typing import Any

import msgpack
from locust import constant_throughput, events, task
from locust.contrib.mqtt import MqttUser


class Handset(MqttUser):
    host = "127.0.0.1"
    port = int(os.environ.get("ESN_COMPARE_PORT", "1883"))
    wait_time = constant_throughput(float(os.environ.get("ESN_COMPARE_RATE", "2")))

    def on_start(self) -> None:
        self.topic = f"cmp/unit/{self.client.client_id}/up"
        self.client.on_message = self.on_message
        deadline = time.time() + 10
        while not self.client.is_connected() and time.time() < deadline:
            time.sleep(0.05)  # the user connects asynchronously
        self.client.subscribe(self.topic, qos=1)

    def on_message(self, client: Any, userdata: Any, message: Any) -> None:
        sent = msgpack.unpackb(message.payload)["ts"]
        events.request.fire(
            request_type="MQTT",
            name="round trip",
            response_length=0,
            response_time=(time.time_ns() - sent) / 1e6,
            exception=None,
            context={},
        )

    @task
    def report_position(self) -> None:
        report = {"t": "location", "lat": 51.5, "lon": -0.12, "ts": time.time_ns()}
        self.client.publish(self.topic, msgpack.packb(report), qos=1)
