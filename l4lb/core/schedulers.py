"""Schedulers: which backend a new (unpinned) client gets.

Every scheduler sees the group's backends in configuration order and skips those that are not
`schedulable` (down, drained, disabled, removed, weight 0) and those in `exclude` (already
tried for this connection). `pick` returns None when nothing is left. They are pure: no
sockets, no loop; randomness comes from an injected `random.Random`.

The hash schedulers (sh, mh) hash the affinity key with a fixed integer mixer and backends by
name with blake2b, never with Python's per-process `hash()`, so every worker and every instance
computes the same answer.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Collection, Sequence
from math import gcd
from typing import Protocol

from .backends import Backend
from .keys import hash_key, hash_name

_EMPTY: tuple[Backend, ...] = ()


def rendezvous_score(key_hash: int, name_seed: int, weight: int) -> float:
    """Weighted rendezvous (HRW) score: `weight / -ln(u)` with u uniform in (0, 1) from the
    pair's hash, so a backend wins a key with probability weight / total weight, and removing
    a backend moves exactly the keys it won (Schindelhauer and Schomaker, 2005)."""
    u = ((hash_key(key_hash ^ name_seed) >> 11) + 0.5) / (1 << 53)
    return weight / -math.log(u)


def rendezvous(key: int, backends: Sequence[Backend]) -> Backend | None:
    """The backend every instance picks for `key` among the same `backends`, whatever their
    order: what a balancer uses when it cannot ask the shared table."""
    best: Backend | None = None
    top = -1.0
    kh = hash_key(key)
    for b in backends:
        score = rendezvous_score(kh, b.seed, b.weight)
        if score > top:
            best, top = b, score
    return best


class Scheduler(Protocol):
    def pick(self, key: int, exclude: Collection[Backend] = _EMPTY) -> Backend | None: ...

    def rebuild(self) -> None:
        """Backends were added, removed or re-weighted."""


class _Base:
    def __init__(self, backends: Sequence[Backend], rng: random.Random | None = None) -> None:
        self.backends = backends
        self.rng = rng or random.Random()
        self.rebuild()

    def rebuild(self) -> None:
        pass


class RoundRobin(_Base):
    """Each eligible backend in turn, from a random start so that instances restarted together
    do not all send their first clients to the first backend."""

    def rebuild(self) -> None:
        self._next = self.rng.randrange(len(self.backends)) if self.backends else 0

    def pick(self, key: int, exclude: Collection[Backend] = _EMPTY) -> Backend | None:
        bs = self.backends
        n = len(bs)
        for i in range(n):
            b = bs[(self._next + i) % n]
            if b.schedulable and b not in exclude:
                self._next = (self._next + i + 1) % n
                return b
        return None


class WeightedRoundRobin(_Base):
    """Smooth weighted round robin, as nginx does: for weights 5,1,1 the order is
    a a b a c a a, never a burst of five."""

    def rebuild(self) -> None:
        self._current: list[float] = [0] * len(self.backends)

    def pick(self, key: int, exclude: Collection[Backend] = _EMPTY) -> Backend | None:
        current = self._current
        total: float = 0.0  # ints, unless a backend is ramping up (slow start)
        best = -1
        for i, b in enumerate(self.backends):
            if not b.schedulable or b in exclude:
                continue
            current[i] += b.eff
            total += b.eff
            if best < 0 or current[i] > current[best]:
                best = i
        if best < 0:
            return None
        current[best] -= total
        return self.backends[best]


class _LeastLoaded(_Base):
    """Shared loop for lc and wlc: the least loaded eligible backend, ties taken in turn so an
    idle pool still spreads new clients."""

    def rebuild(self) -> None:
        self._start = self.rng.randrange(len(self.backends)) if self.backends else 0

    def _less(self, a: Backend, b: Backend) -> bool:
        raise NotImplementedError

    def pick(self, key: int, exclude: Collection[Backend] = _EMPTY) -> Backend | None:
        bs = self.backends
        n = len(bs)
        best: Backend | None = None
        start = self._start
        for i in range(n):
            b = bs[(start + i) % n]
            if b.schedulable and b not in exclude and (best is None or self._less(b, best)):
                best = b
        if best is not None:
            self._start = (best.index + 1) % n
        return best


class LeastConnections(_LeastLoaded):
    def _less(self, a: Backend, b: Backend) -> bool:
        return a.active < b.active


class WeightedLeastConnections(_LeastLoaded):
    """Fewest connections per unit of weight (LVS's default scheduler)."""

    def _less(self, a: Backend, b: Backend) -> bool:
        return a.active * b.eff < b.active * a.eff


class _HashTable(_Base):
    """A table of backend slots indexed by the key's hash; an ineligible slot falls through to
    the next slots in order (LVS's sh-fallback / mh-fallback), so only the clients of a failed
    backend move."""

    _table: list[Backend]

    def pick(self, key: int, exclude: Collection[Backend] = _EMPTY) -> Backend | None:
        table = self._table
        size = len(table)
        if not size:
            return None
        start = hash_key(key) % size
        for i in range(size):
            b = table[(start + i) % size]
            if b.schedulable and b not in exclude:
                return b
        return None


class SourceHash(_HashTable):
    """A static weighted bucket table on the source address (LVS `sh`)."""

    BUCKETS = 1021

    def rebuild(self) -> None:
        # Fill the buckets with a smooth weighted sequence, so weights set the share.
        weighted = [b for b in self.backends if b.weight > 0]
        current = [0] * len(weighted)
        total = sum(b.weight for b in weighted)
        table: list[Backend] = []
        for _ in range(self.BUCKETS if weighted else 0):
            best = 0
            for i, b in enumerate(weighted):
                current[i] += b.weight
                if current[i] > current[best]:
                    best = i
            current[best] -= total
            table.append(weighted[best])
        self._table = table


_PRIMES = (4093, 16381, 65521, 262139)


class Maglev(_HashTable):
    """Maglev consistent hashing (LVS `mh`, Eisenbud et al. 2016).

    Each backend walks its own permutation of the table (offset and skip from its name) and
    claims the next free slot, `weight / gcd` claims per round, until the table is full. A
    backend that fails keeps its slots and is skipped at lookup, so only its clients move;
    the table is rebuilt only when weights or membership change.
    """

    def rebuild(self) -> None:
        weighted = [b for b in self.backends if b.weight > 0 and not b.removed]
        size = next((p for p in _PRIMES if p >= 100 * len(weighted)), _PRIMES[-1])
        table: list[Backend | None] = [None] * size
        if not weighted:
            self._table = []
            return
        g = 0
        for b in weighted:
            g = gcd(g, b.weight)
        turns = [b.weight // g for b in weighted]
        offsets = [hash_name(b.name, "offset") % size for b in weighted]
        skips = [hash_name(b.name, "skip") % (size - 1) + 1 for b in weighted]
        nexts = [0] * len(weighted)
        filled = 0
        while True:
            for i in range(len(weighted)):
                for _ in range(turns[i]):
                    c = (offsets[i] + nexts[i] * skips[i]) % size
                    while table[c] is not None:
                        nexts[i] += 1
                        c = (offsets[i] + nexts[i] * skips[i]) % size
                    table[c] = weighted[i]
                    nexts[i] += 1
                    filled += 1
                    if filled == size:
                        self._table = [b for b in table if b is not None]
                        return


class PowerOfTwo(_Base):
    """Two weighted random choices; the one with fewer connections per weight wins."""

    def pick(self, key: int, exclude: Collection[Backend] = _EMPTY) -> Backend | None:
        eligible = [b for b in self.backends if b.schedulable and b not in exclude]
        if len(eligible) < 2:
            return eligible[0] if eligible else None
        weights = [b.eff for b in eligible]
        a, b = self.rng.choices(eligible, weights, k=2)
        return a if a.active * b.eff <= b.active * a.eff else b


class Failover(_Base):
    """The highest-weight eligible backend; among equals, the first in the file."""

    def pick(self, key: int, exclude: Collection[Backend] = _EMPTY) -> Backend | None:
        best: Backend | None = None
        for b in self.backends:
            if b.schedulable and b not in exclude and (best is None or b.weight > best.weight):
                best = b
        return best


SCHEDULER_CLASSES: dict[str, Callable[[Sequence[Backend], random.Random | None], Scheduler]] = {
    "rr": RoundRobin,
    "wrr": WeightedRoundRobin,
    "lc": LeastConnections,
    "wlc": WeightedLeastConnections,
    "sh": SourceHash,
    "mh": Maglev,
    "p2c": PowerOfTwo,
    "fo": Failover,
}


def make_scheduler(
    name: str, backends: Sequence[Backend], rng: random.Random | None = None
) -> Scheduler:
    return SCHEDULER_CLASSES[name](backends, rng)
