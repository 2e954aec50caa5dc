"""Index refreshes of a fleet spread over the interval instead of coming all at once."""

from __future__ import annotations

import itertools
import random
from collections import Counter

import pytest

from lazymount.mirror.jitter import SPREAD, refresh_delays


def test_a_fleet_started_together_refreshes_spread_over_the_interval():
    interval, nodes, buckets = 300.0, 10_000, 30
    firsts = [next(refresh_delays(interval, random.Random(node))) for node in range(nodes)]
    assert all(0 <= delay <= interval for delay in firsts)
    per_bucket = Counter(int(delay / interval * buckets) for delay in firsts)
    # evenly spread: each 10 s of the interval gets about 1/30 of the nodes, never a crowd
    assert len(per_bucket) == buckets
    assert max(per_bucket.values()) < 1.25 * nodes / buckets
    assert min(per_bucket.values()) > 0.75 * nodes / buckets


def test_later_refreshes_vary_around_the_interval_and_drift_apart():
    delays = list(itertools.islice(refresh_delays(60.0, random.Random(1)), 1, 2001))
    assert all(60 * (1 - SPREAD) <= d <= 60 * (1 + SPREAD) for d in delays)
    assert min(delays) < 60 * (1 - SPREAD / 2) and max(delays) > 60 * (1 + SPREAD / 2)
    # two nodes in the same phase are apart after a few intervals
    a, b = refresh_delays(60.0, random.Random(2)), refresh_delays(60.0, random.Random(3))
    next(a), next(b)
    gap = abs(sum(itertools.islice(a, 20)) - sum(itertools.islice(b, 20)))
    assert gap > 1.0


def test_a_refresh_interval_must_be_positive():
    with pytest.raises(ValueError, match="positive"):
        next(refresh_delays(0))
