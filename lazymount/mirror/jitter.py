"""When to look at a mirror's index again, so that a fleet does not ask all at once.

10,000 nodes booted by one job scheduler, or restarted together after maintenance, would
otherwise refresh their index in the same second, every interval, and each such second
sends 10,000 revalidations through the site's proxies to the origin. A node therefore
waits a random phase (uniform over one interval) before its first refresh, and each
interval after that varies by up to ``SPREAD`` either way, so phases that drifted together
do not stay together.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

SPREAD = 0.1  # each interval varies by up to 10 % either way


def refresh_delays(interval: float, rng: random.Random | None = None) -> Iterator[float]:
    """Seconds to wait before each refresh of an index checked every ``interval`` seconds:
    a random phase first, then ``interval`` with jitter, forever."""
    if interval <= 0:
        raise ValueError(f"refresh interval must be positive, not {interval}")
    rng = rng or random.Random()
    yield rng.uniform(0.0, interval)
    while True:
        yield interval * rng.uniform(1.0 - SPREAD, 1.0 + SPREAD)
