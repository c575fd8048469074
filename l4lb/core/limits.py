"""Limits per client network (`client_limits`): open connections and new connections per second,
keyed by the same masked address as the affinity table, after HAProxy's `conn_cur`/`conn_rate`
on a stick table and nginx's `limit_conn`.

Theory of operation
-------------------
- **Open connections** are counted per key in a plain dict, an entry per network with at least
  one connection open (removed when its last one closes), so its size is bounded by the open
  connections themselves.
- **Rate** is a token bucket per key: `burst` tokens, refilled at `rate` per second, one taken by
  each new connection. A bucket left alone for `burst / rate` seconds is full again, exactly as
  a new one would be, so the buckets live in a `cachetools.TTLCache` with that TTL: expiry
  forgets nothing that matters. The cache is also bounded (`MAX_TRACKED` networks): a flood of
  distinct sources evicts the least recently used buckets, which start full if their network
  comes back; memory stays bounded whatever the sources.

Pure logic, with an injected clock; no I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from .spec import ClientLimitsSpec

if TYPE_CHECKING:
    from cachetools import TTLCache

MAX_TRACKED = 100_000  # client networks whose rate is tracked at once


class ClientLimits:
    __slots__ = ("_buckets", "clock", "open", "spec")

    def __init__(self, spec: ClientLimitsSpec, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.open: dict[int, int] = {}  # key -> connections open
        self.spec = spec
        self._buckets: TTLCache[int, list[float]] | None = None
        self.reconfigure(spec)

    def reconfigure(self, spec: ClientLimitsSpec) -> None:
        """New limits in place: open counts stay (they are facts); buckets restart full."""
        self.spec = spec
        if spec.rate > 0:
            from cachetools import TTLCache  # loaded only by a configuration with a rate

            refill = spec.burst / spec.rate
            self._buckets = TTLCache(MAX_TRACKED, refill, timer=self.clock)
        else:
            self._buckets = None

    @property
    def tracked(self) -> int:
        """Networks with state: open connections, or a bucket not yet full."""
        return len(self.open) + (len(self._buckets) if self._buckets is not None else 0)

    def admit(self, key: int) -> str | None:
        """Take a connection for `key`; None if admitted (then `release` it), else the limit it
        is over: 'max_conns' or 'rate'."""
        spec = self.spec
        n = self.open.get(key, 0)
        if spec.max_conns and n >= spec.max_conns:
            return "max_conns"
        buckets = self._buckets
        if buckets is not None:
            now = self.clock()
            try:  # (not .get: a TTLCache's get looks the key up twice)
                bucket = buckets[key]
            except KeyError:
                tokens = spec.burst
            else:
                tokens = min(spec.burst, bucket[0] + (now - bucket[1]) * spec.rate)
            if tokens < 1.0:
                return "rate"
            buckets[key] = [tokens - 1.0, now]  # (re)set: the TTL counts from the last take
        self.open[key] = n + 1
        return None

    def release(self, key: int) -> None:
        n = self.open.get(key, 0)
        if n <= 1:
            self.open.pop(key, None)
        else:
            self.open[key] = n - 1
