"""An embedded Mosquitto for the demo, the tests and the benchmarks.

Starts Debian's `mosquitto` with the local profile (`broker_config/mosquitto.conf`, shipped
in the package) on a free loopback port
and stops it again; `esn demo` and the test harness both use it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from esn.tools import shipped
from esn.tools.processes import end_process, free_port, log_tail


class BrokerError(RuntimeError):
    pass


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.path.exists(p)), None
    )
    if found is None:
        raise BrokerError("mosquitto is not installed (Debian: apt-get install mosquitto)")
    return found


class Mosquitto:
    """A Mosquitto process on 127.0.0.1:`port`; `start()` returns once it accepts connections."""

    def __init__(
        self, port: int | None = None, config: Path | None = None, complete: bool = False
    ) -> None:
        """`config` is a profile without listeners (the launcher adds one on `port`), or,
        with `complete`, a whole configuration with its own listeners on `port`."""
        self.port = port or free_port()
        self.config = config or shipped("mosquitto.conf")
        self.complete = complete
        self.proc: subprocess.Popen[bytes] | None = None
        self._dir = tempfile.TemporaryDirectory(prefix="esn-mosquitto-")
        self.log_path = Path(self._dir.name) / "mosquitto.log"

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> Mosquitto:
        conf = Path(self._dir.name) / "mosquitto.conf"
        listener = "" if self.complete else f"listener {self.port} 127.0.0.1\n"
        conf.write_text(listener + self.config.read_text())
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [mosquitto_binary(), "-c", str(conf)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BrokerError(f"mosquitto exited at start: {self.log_tail()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise BrokerError(f"mosquitto did not listen on port {self.port} within {timeout:g} s")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None:
            end_process(self.proc, sig)

    def close(self) -> None:
        self.stop()
        self._dir.cleanup()

    def log_tail(self, lines: int = 5) -> str:
        return log_tail(self.log_path, lines)

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
