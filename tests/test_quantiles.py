"""The two quantile helpers the demo, the benchmark and the load report print from."""

from __future__ import annotations

import math

import pytest

from esn.tools.quantiles import buckets, histogram_quantile, percentile


def test_percentile_is_the_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 0.5), percentile(values, 0.95), percentile(values, 1.0)) == (
        50.0,
        95.0,
        100.0,
    )
    assert math.isnan(percentile([], 0.5))


def test_histogram_quantile_interpolates_like_prometheus() -> None:
    # 100 observations: 60 below 1 ms, 30 between 1 and 5 ms, 10 between 5 and 10 ms
    buckets = [(0.001, 60.0), (0.005, 90.0), (0.01, 100.0), (math.inf, 100.0)]
    assert histogram_quantile(buckets, 0.5) == pytest.approx(0.001 * 50 / 60)
    assert histogram_quantile(buckets, 0.75) == pytest.approx(0.001 + 0.004 * 15 / 30)
    assert histogram_quantile(buckets, 0.95) == pytest.approx(0.005 + 0.005 * 5 / 10)
    # in the +Inf bucket the answer is the highest finite bound, as in Prometheus
    assert histogram_quantile([(0.3, 0.0), (math.inf, 4.0)], 0.95) == 0.3
    assert math.isnan(histogram_quantile([], 0.5))


def test_scraped_buckets_are_summed_over_the_other_labels() -> None:
    samples = {
        "x_bucket": [
            ({"kind": "normal", "le": "0.1"}, 2.0),
            ({"kind": "normal", "le": "+Inf"}, 3.0),
            ({"kind": "emergency", "le": "0.1"}, 1.0),
            ({"kind": "emergency", "le": "+Inf"}, 1.0),
        ],
        "x_count": [({"kind": "normal"}, 3.0)],
    }
    assert buckets(samples, "x") == [(0.1, 3.0), (math.inf, 4.0)]
    assert buckets(samples, "y") == []
