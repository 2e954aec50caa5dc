"""Bounds on talking to a mirror: a value of its own, so that the command line builds one
without importing the transports (httpx, trio)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Timeouts:
    """Bounds on talking to a mirror."""

    connect: float = 10.0  # seconds to open a connection
    read: float = 30.0  # seconds without a byte before giving up
    min_rate: float = 256 * 1024  # bytes/s a download must average, past its base allowance
    base: float | None = None  # seconds every request may take regardless of size (None: read)
    retries: int = 2  # extra attempts after a connection failure or a 5xx answer

    @property
    def allowance(self) -> float:
        """Seconds a request may take before its rate counts (``base``, else ``read``)."""
        return self.read if self.base is None else self.base

    def deadline(self, length: int | None) -> float:
        """Seconds a transfer of ``length`` bytes may take in all."""
        return self.allowance + (length or 0) / self.min_rate

    def too_slow(self, received: int, elapsed: float) -> bool:
        """True when a transfer is behind ``min_rate`` past its allowance: a trickle ends
        after about ``allowance`` seconds, however large the blob it pretends to send."""
        return received < (elapsed - self.allowance) * self.min_rate
