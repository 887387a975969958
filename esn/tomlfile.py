"""Reading the TOML files people write (fleets, scenarios) with one-line errors of the
caller's type; the core only ever sees the parsed document."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from esn.core.fleet import Fleet, FleetError, parse_fleet


def read_toml(path: str | Path, what: str, error: type[Exception]) -> dict[str, Any]:
    """`what` names the file for the person reading the error ("fleet file", "scenario")."""
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{what} {path} is not valid TOML: {exc}") from None


def load_fleet(path: str | Path) -> Fleet:
    return parse_fleet(read_toml(path, "fleet file", FleetError))
