"""Optional parts of the package and the one-line hint when one is not installed."""

from __future__ import annotations

import importlib


class MissingExtra(ImportError):
    """A feature's optional dependencies are missing; the message says what to install."""


def installed(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def need(module: str, extra: str, feature: str) -> None:
    """Raise `MissingExtra` unless `module` imports (`extra` names the pip extra)."""
    if not installed(module):
        raise MissingExtra(
            f"{feature} needs {module}, which is not installed: pip install 'esn[{extra}]'"
        )
