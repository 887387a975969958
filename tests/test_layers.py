"""The package layout is the architecture: imports only go downwards, and the core stays
pure (docs/architecture.md). Read from the source, so a stray import fails here first."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "esn"

# Lower layers first. A module may import its own package and any lower layer, nothing of
# its own layer's other packages, nothing above.
LAYERS = [
    {"esn.protocol", "esn.extras", "esn.runtime", "esn.exporter", "esn.kpi"},
    {"esn.core", "esn.transport", "esn.store"},
    {"esn.tomlfile", "esn.server", "esn.client"},
    {"esn.console", "esn.tools"},
    {"esn.loadtest", "esn.exercise"},
    {"esn.cli"},
]
RANK = {part: i for i, layer in enumerate(LAYERS) for part in layer}

# The core knows no I/O: no clock, no sockets, no event loop, no wire encoding, no files.
NOT_IN_CORE = {
    "msgpack",
    "asyncio",
    "socket",
    "time",
    "datetime",
    "pathlib",
    "tomllib",
    "os",
    "esn.protocol.codec",
    "esn.protocol.topics",
}


def part_of(module: str) -> str:
    """`esn.core.floor` -> `esn.core`; `esn.cli` -> `esn.cli`."""
    parts = module.split(".")
    return ".".join(parts[:2])


def modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        if name != "esn":
            out.append((name, path))
    return out


def imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return found


def test_every_package_has_a_layer() -> None:
    assert {part_of(name) for name, _ in modules()} == set(RANK)


@pytest.mark.parametrize(("name", "path"), modules(), ids=[n for n, _ in modules()])
def test_imports_only_go_downwards(name: str, path: Path) -> None:
    mine = part_of(name)
    for target in imports(path):
        if not target.startswith("esn.") or part_of(target) not in RANK:
            continue
        theirs = part_of(target)
        assert theirs == mine or RANK[theirs] < RANK[mine], f"{name} imports {target}"


@pytest.mark.parametrize(
    ("name", "path"), [(n, p) for n, p in modules() if n.startswith("esn.core")]
)
def test_the_core_does_no_io(name: str, path: Path) -> None:
    for target in imports(path):
        assert not any(target == bad or target.startswith(bad + ".") for bad in NOT_IN_CORE), (
            f"{name} imports {target}"
        )
    calls = {
        n.func.id
        for n in ast.walk(ast.parse(path.read_text()))
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
    }
    assert "open" not in calls and "print" not in calls, name
