"""Reading the TOML files people write (fleets, scenarios) with one-line errors of the
caller's type, and writing a fleet file from the document `parse_fleet` reads; the core
only ever sees the parsed document."""

from __future__ import annotations

import json
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


def find_file(name: str | Path, shipped: Path) -> Path:
    """A file by its path, or, when no such file is here, one the package ships in
    `shipped` by its bare name (`city`, `flood`): a path always wins."""
    path = Path(name)
    ours = shipped / f"{path.stem}.toml"
    if not path.exists() and path.parent == Path(".") and ours.exists():
        return ours
    return path


def load_fleet(path: str | Path) -> Fleet:
    return parse_fleet(read_toml(path, "fleet file", FleetError))


def dump_fleet(doc: dict[str, Any]) -> str:
    """A fleet document (`defaults`, `limits`, `talkgroup`, `unit` and `status` lists) as TOML."""
    out: list[str] = []
    for table in ("defaults", "limits"):
        if doc.get(table):
            out += [f"[{table}]", *(f"{k} = {_value(v)}" for k, v in doc[table].items()), ""]
    for array in ("talkgroup", "unit", "status"):
        for entry in doc.get(array, []):
            out += [f"[[{array}]]", *(f"{k} = {_value(v)}" for k, v in entry.items()), ""]
    return "\n".join(out)


def _value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_value(x)}" for k, x in v.items()) + " }"
    if isinstance(v, list | tuple | frozenset | set):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    return json.dumps(v)  # numbers, and strings quoted and escaped as TOML reads them
