"""The affinity table: which backend each masked client address is pinned to.

Theory of operation
-------------------
This is the userspace form of an LVS persistence template. One table serves one mark group,
so a client pinned through any port of the group is pinned for all of them.

An entry is *active* while at least one connection under it is open or being dialed, and
*idle* otherwise. The two live in two containers:

- `_active` (a dict): entries with `refs > 0`. They never expire and are never evicted: a
  client with an open connection keeps its pin however long the connection lasts (IPVS does the
  same with `n_control`, but re-arms 60 s steps; we simply hold the entry).
- `_idle` (an OrderedDict in the order entries became idle): entries with `refs == 0`. An
  entry's expiry is set when its last connection closes, to `now + timeout`. Because the
  timeout is the same for the whole table, the idle order *is* the expiry order, so expiring is
  popping from the front until an unexpired entry shows up, and evicting "the oldest idle
  entry" is the same pop. A hit checks its own entry's expiry, so the sweep from the front need
  not run on every lookup: it runs at most once per `SWEEP_INTERVAL` of the clock, which keeps
  the lookup-and-refresh path to a dict miss, one pop, one clock read and one insert.

So an entry expires `timeout` after the later of the last connection opened under it and the
last one closed: while one is open it cannot expire, and the last close always comes after the
last open. cachetools' TTLCache fixes expiry at write time and cannot tell a busy entry from an
idle one, hence the two containers.

The table is bounded by `max_entries` over both containers. A new client when the table is full
evicts the oldest idle entry; when every entry is active the connection goes unpinned
(`acquire` returns None) and `overflows` counts it.

Entries a UDP flow made are *provisional* until the flow is validated (its client sent again
after the backend answered): a datagram's source costs nothing to forge, so such an entry must
not cost a real client its pin. A provisional entry never evicts a confirmed one: when the table
is full it may only take the place of an idle provisional entry (`_prov` indexes those, in
`_idle`'s order), else its flow goes unpinned; a confirmed new entry evicts idle provisional
entries first. Idle provisional entries are also bounded on their own (`max_entries // 4`). A
TCP connection or a validated flow under an entry confirms it (`confirm`).

The table does not judge backends: the router decides whether the pinned backend may still be
used, and re-pins by assigning `entry.backend`. The clock is injected, so tests use a fake one.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

B = TypeVar("B")


class Entry(Generic[B]):
    __slots__ = ("backend", "expires", "home", "key", "provisional", "refs", "repin", "since")

    def __init__(self, key: int) -> None:
        self.key = key
        self.backend: B | None = None
        self.home: B | None = None  # where the client was before its backend failed
        self.refs = 0
        self.since = 0.0  # the clock when the current pin was made (0: not yet)
        self.repin: tuple[float, str, str] | None = None  # the last: (clock, reason, from)
        # Idle: when it expires. Active: when it became active (a shared store renews what
        # became active since its last round; `_active`'s order is the activation order).
        self.expires = 0.0
        self.provisional = False  # made by an unvalidated UDP flow (see above)


class AffinityTable(Generic[B]):
    SWEEP_INTERVAL = 1.0  # seconds between sweeps of expired idle entries

    def __init__(self, timeout: float, max_entries: int, clock: Callable[[], float]) -> None:
        if timeout <= 0:
            raise ValueError("an affinity table needs a positive timeout")
        self.timeout = timeout
        self.max_entries = max_entries
        self.clock = clock
        self._active: dict[int, Entry[B]] = {}
        self._idle: OrderedDict[int, Entry[B]] = OrderedDict()
        self._prov: OrderedDict[int, None] = OrderedDict()  # the idle provisional, in order
        self._sweep_at = 0.0
        # Plain counters, read by whoever reports them.
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.expirations = 0
        self.overflows = 0

    def __len__(self) -> int:
        return len(self._active) + len(self._idle)

    @property
    def active_count(self) -> int:
        return len(self._active)

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    def acquire(self, key: int, provisional: bool = False) -> Entry[B] | None:
        """Take a reference on `key`'s entry for a new connection, creating it if needed.

        A new entry has `backend` None: the caller pins it. None is returned only when the table
        is full of entries this one may not evict (active ones; confirmed ones, for a
        `provisional` one). A confirmed acquire confirms a provisional entry.
        """
        entry = self._active.get(key)
        if entry is not None:
            entry.refs += 1
            self.hits += 1
            if not provisional:
                entry.provisional = False
            return entry
        idle = self._idle
        if idle:
            now = self.clock()
            if now >= self._sweep_at:
                self._expire(now)
            entry = idle.pop(key, None)
            if entry is not None:
                if entry.provisional:
                    del self._prov[key]
                    entry.provisional = provisional
                if entry.expires > now:
                    entry.refs = 1
                    entry.expires = now
                    self._active[key] = entry
                    self.hits += 1
                    return entry
                self.expirations += 1
        self.misses += 1
        if len(self._active) + len(idle) >= self.max_entries and not self._evict(provisional):
            self.overflows += 1
            return None
        entry = Entry(key)
        entry.refs = 1
        entry.provisional = provisional
        entry.expires = self.clock()
        self._active[key] = entry
        return entry

    def _evict(self, provisional: bool) -> bool:
        """Make room for a new entry: the oldest idle provisional entry, else (for a confirmed
        one only) the oldest idle entry. False: nothing it may evict."""
        prov = self._prov
        if prov:
            key, _ = prov.popitem(last=False)
            del self._idle[key]
        elif provisional or not self._idle:
            return False
        else:
            self._idle.popitem(last=False)
        self.evictions += 1
        return True

    def confirm(self, entry: Entry[B]) -> None:
        """A provisional entry's client proved its address (it sent again after an answer)."""
        if entry.provisional:
            entry.provisional = False
            if entry.key in self._prov:  # (idle: an active entry is not indexed)
                del self._prov[entry.key]

    def release(self, entry: Entry[B]) -> None:
        """Drop a connection's reference; the last one starts the entry's timeout."""
        entry.refs -= 1
        if entry.refs > 0:
            return
        del self._active[entry.key]
        if entry.backend is None:  # never pinned (every dial failed): nothing to remember
            return
        entry.expires = self.clock() + self.timeout
        self._idle[entry.key] = entry
        if entry.provisional:
            prov = self._prov
            prov[entry.key] = None
            if len(prov) > max(1, self.max_entries // 4):  # a pool of its own, bounded
                key, _ = prov.popitem(last=False)
                del self._idle[key]
                self.evictions += 1

    def expire(self) -> int:
        """Drop every idle entry whose time is up; returns how many went."""
        return self._expire(self.clock())

    def _expire(self, now: float) -> int:
        self._sweep_at = now + self.SWEEP_INTERVAL
        idle = self._idle
        n = 0
        prov = self._prov
        while idle:
            first = next(iter(idle.values()))
            if first.expires > now:
                break
            idle.popitem(last=False)
            if first.provisional:
                del prov[first.key]
            n += 1
        self.expirations += n
        return n

    def get(self, key: int) -> Entry[B] | None:
        """Look without taking a reference (for inspection, not for routing)."""
        entry = self._active.get(key)
        if entry is not None:
            return entry
        entry = self._idle.get(key)
        if entry is not None and entry.expires > self.clock():
            return entry
        return None

    def entries(self) -> Iterator[Entry[B]]:
        """Every live entry, active first; expired idle entries are skipped."""
        yield from self._active.values()
        now = self.clock()
        for entry in self._idle.values():
            if entry.expires > now:
                yield entry

    def active(self) -> Iterator[Entry[B]]:
        """Entries with open connections."""
        return iter(list(self._active.values()))

    def activated_since(self, when: float) -> Iterator[Entry[B]]:
        """Active entries that became active at `when` or later, newest first."""
        out = []
        for entry in reversed(self._active.values()):
            if entry.expires < when:
                break
            out.append(entry)
        return iter(out)

    def released_since(self, expires_after: float) -> Iterator[Entry[B]]:
        """Idle entries that expire after `expires_after`, newest first: those whose last
        connection closed less than `timeout` before it. The idle order is the release order,
        so this walks back from the end and stops at the first older one."""
        out = []
        for entry in reversed(self._idle.values()):
            if entry.expires <= expires_after:
                break
            out.append(entry)
        return iter(out)

    def snapshot(self) -> list[tuple[int, B, float]]:
        """(key, backend, seconds left) of every pinned entry; an active entry counts as just
        released, with the whole timeout left."""
        now = self.clock()
        out: list[tuple[int, B, float]] = []
        for e in self.entries():
            if e.backend is not None:
                out.append((e.key, e.backend, self.timeout if e.refs else e.expires - now))
        return out

    def restore(self, items: list[tuple[int, B, float]]) -> int:
        """Load idle entries (key, backend, seconds left), as a snapshot gave them; keys already
        present are left alone. Returns how many were loaded."""
        now = self.clock()
        n = 0
        for key, backend, left in sorted(items, key=lambda item: item[2]):
            if (
                left <= 0
                or key in self._active
                or key in self._idle
                or len(self) >= self.max_entries
            ):
                continue
            entry: Entry[B] = Entry(key)
            entry.backend = backend
            entry.expires = now + min(left, self.timeout)
            self._idle[key] = entry
            n += 1
        return n

    def forget(self, key: int) -> bool:
        """Flush one client's pin. An active entry stays (its connections are open) but is
        unpinned, so the client's next connection is scheduled afresh."""
        entry = self._active.get(key)
        if entry is not None:
            entry.backend = None
            return True
        self._prov.pop(key, None)
        return self._idle.pop(key, None) is not None
