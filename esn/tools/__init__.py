"""What runs around the server: the embedded Mosquitto and Prometheus, the secure broker
profile, the benchmark and the demo. The configuration they run ships inside the package
(`profiles/`, built from the repository's `broker_config/` and `grafana/`), so an installed
`esn` works from any folder."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def shipped(*parts: str) -> Path:
    """A file or folder under the package's `profiles/`: `mosquitto.conf`, `prometheus/`
    (configuration, alert rules, rule tests) and `provisioning/` (Grafana)."""
    path = Path(str(resources.files(__name__).joinpath("profiles", *parts)))
    if not path.exists():
        raise FileNotFoundError(f"the installed esn package lacks {path}; reinstall it")
    return path
