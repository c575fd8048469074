"""A histogram of plain counters (cumulative buckets are made at scrape time), for the hot path
and the checks: an observation is one bisection (in C) and three additions."""

from __future__ import annotations

from bisect import bisect_left


class Histogram:
    __slots__ = ("bounds", "count", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # the first bound >= value (le)
        self.total += value
        self.count += 1

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative (le, count) pairs, as Prometheus wants them."""
        out: list[tuple[str, float]] = []
        cum = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            cum += n
            out.append(("+Inf" if bound == float("inf") else repr(bound), cum))
        return out
