"""Per-unit rate limits: token buckets with explicit time, and a cap on our own answers.

A unit that floods gets its excess refused (`rate_limited`), and is told so at most once
per `notice_s`: answering every message of a flood would let one unit make the server
flood the broker on its behalf.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


@dataclass(frozen=True, slots=True)
class Rate:
    per_s: float
    burst: float


class Verdict(Enum):
    ALLOW = "allow"
    REFUSE_AND_TELL = "refuse_and_tell"  # refused; the first refusal in `notice_s` is told
    REFUSE_QUIETLY = "refuse_quietly"


class RateLimiter:
    def __init__(
        self, rates: dict[str, Rate], notice_s: float = 1.0, max_keys: int = 100_000
    ) -> None:
        self.rates = rates
        self.notice_s = notice_s
        self.max_keys = max_keys
        self._buckets: dict[tuple[str, str], tuple[float, float]] = {}  # -> (tokens, at)
        self._told: dict[tuple[str, str], float] = {}

    def check(self, unit: str, kind: str, now: float) -> Verdict:
        rate = self.rates.get(kind)
        if rate is None:
            return Verdict.ALLOW
        key = (unit, kind)
        tokens, at = self._buckets.get(key, (rate.burst, now))
        tokens = min(rate.burst, tokens + (now - at) * rate.per_s)
        if tokens >= 1.0:
            self._store(key, tokens - 1.0, now)
            return Verdict.ALLOW
        self._store(key, tokens, now)
        told = self._told.get(key)
        if told is not None and now - told < self.notice_s:
            return Verdict.REFUSE_QUIETLY
        self._told[key] = now
        return Verdict.REFUSE_AND_TELL

    def _store(self, key: tuple[str, str], tokens: float, now: float) -> None:
        if len(self._buckets) >= self.max_keys and key not in self._buckets:
            self._buckets.clear()  # many spoofed ids: forget all rather than grow without bound
            self._told.clear()
        self._buckets[key] = (tokens, now)
