"""Debian's Prometheus, started with `grafana/prometheus/` (shipped in the package) for the
demo and the tests, and `scrape` for reading any /metrics endpoint.

The configuration is copied to a scratch folder and the scrape targets written beside it
(file-based discovery), so the checked-in files stay what a deployment would use.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from esn.tools import shipped
from esn.tools.processes import end_process, free_port


class MonitoringError(RuntimeError):
    pass


Samples = dict[str, list[tuple[dict[str, str], float]]]  # sample name -> (labels, value)


def scrape(port: int, timeout: float = 5.0) -> Samples:
    """Every sample a /metrics endpoint on 127.0.0.1:`port` serves; OSError if unreachable."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as r:
        text = r.read().decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


class Prometheus:
    def __init__(
        self,
        targets: dict[str, list[str]],
        *,
        port: int | None = None,
        scrape_interval: str | None = None,
    ) -> None:
        self.port = port or free_port()
        self.targets = targets  # job file name (server, handsets) -> host:port list
        self.scrape_interval = scrape_interval
        self._dir = tempfile.TemporaryDirectory(prefix="esn-prometheus-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> Prometheus:
        binary = shutil.which("prometheus")
        if binary is None:
            raise MonitoringError("prometheus is not installed (Debian: apt install prometheus)")
        root = Path(self._dir.name)
        conf = root / "config"
        shutil.copytree(shipped("prometheus"), conf)
        for job, hosts in self.targets.items():
            (conf / "targets" / f"{job}.json").write_text(json.dumps([{"targets": hosts}]))
        if self.scrape_interval:
            main = conf / "prometheus.yml"
            main.write_text(
                main.read_text()
                .replace("scrape_interval: 5s", f"scrape_interval: {self.scrape_interval}")
                .replace("evaluation_interval: 5s", f"evaluation_interval: {self.scrape_interval}")
            )
        with open(root / "prometheus.log", "wb") as log:
            self.proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={conf / 'prometheus.yml'}",
                    f"--storage.tsdb.path={root / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = (root / "prometheus.log").read_text(errors="replace").strip()[-300:]
                raise MonitoringError(f"prometheus exited at start: {tail}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise MonitoringError(f"prometheus was not ready within {timeout:g} s")

    def query(self, expr: str) -> dict[str, Any]:
        """An instant query through the HTTP API; returns the `data` part or raises."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                body = json.loads(r.read())
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read())
        if body.get("status") != "success":
            raise MonitoringError(f"{expr}: {body.get('error', body)}")
        return body["data"]  # type: ignore[no-any-return]

    def stop(self) -> None:
        if self.proc is not None:
            end_process(self.proc)

    def close(self) -> None:
        self.stop()
        self._dir.cleanup()
