"""Unit and talkgroup ids: `[A-Za-z0-9_.-]{1,64}`, the one syntax every layer checks."""

from __future__ import annotations

import re

ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def is_id(value: object) -> bool:
    return isinstance(value, str) and ID_RE.fullmatch(value) is not None
