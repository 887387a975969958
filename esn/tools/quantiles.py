"""Percentiles of raw samples, and Prometheus' histogram_quantile over scraped buckets."""

from __future__ import annotations

import math


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def histogram_quantile(buckets: list[tuple[float, float]], q: float) -> float:
    """Prometheus' histogram_quantile over cumulative (le, count) buckets."""
    if not buckets or buckets[-1][1] == 0:
        return math.nan
    rank = q * buckets[-1][1]
    prev_le, prev_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return prev_le
            return prev_le + (le - prev_le) * (rank - prev_count) / max(count - prev_count, 1e-9)
        prev_le, prev_count = le, count
    return math.nan


def buckets(
    samples: dict[str, list[tuple[dict[str, str], float]]], metric: str
) -> list[tuple[float, float]]:
    """A scraped histogram's cumulative (le, count) buckets, summed over its other labels."""
    total: dict[float, float] = {}
    for labels, value in samples.get(f"{metric}_bucket", []):
        le = float(labels["le"])
        total[le] = total.get(le, 0.0) + value
    return sorted(total.items())
