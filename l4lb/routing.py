"""The routing decision for one group: affinity first, then the scheduler, then failover.

Theory of operation
-------------------
A connection's life, as the router sees it:

1. `begin(key)` takes a reference on the key's affinity entry (or none, when persistence is off
   or the table is full of busy entries) and remembers the backend it was pinned to.
2. `next_backend(route)` gives the backend to dial. The pinned backend comes first if it still
   accepts pinned clients (up or draining); otherwise, or once it has failed, the scheduler
   picks among the backends not yet tried. A new entry is pinned to the first pick right
   away, so a second connection of the same client arriving mid-dial follows it.
   After as many attempts as there are backends, it gives None: the client is closed.
3. `connected(route, backend)` confirms the pin. If the entry pointed elsewhere before this
   connection (its backend died, drained out or was removed), that is a re-pin and is counted.
4. `failed(route, backend)` records a refused or timed-out dial; the next call to
   `next_backend` skips that backend.
5. `finish(route)` releases the entry (starting its timeout when it was the last connection)
   and the backend's connection count.

A pinned backend that is unavailable is never waited on: the connection is rescheduled at
once and the entry re-pinned to whichever backend accepts it. Pure logic, no I/O.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from .affinity import AffinityTable, Entry
from .backends import Backend
from .config import GroupSpec
from .keys import Keyer, make_keyer
from .schedulers import Scheduler, make_scheduler


class GroupStats:
    """Plain counters for one group, read at scrape time (never labelled per connection)."""

    __slots__ = ("accepted", "connect_failures", "no_backend", "rejected", "repins", "unpinned")

    def __init__(self) -> None:
        self.accepted = 0
        self.rejected = 0  # clients refused before routing (an address we could not key)
        self.no_backend = 0  # connections closed because no backend accepted them
        self.connect_failures = 0  # single dial attempts that were refused or timed out
        self.repins = 0
        self.unpinned = 0  # connections routed without a pin because the table was full


class Route:
    __slots__ = ("backend", "entry", "key", "pinned", "tried")

    def __init__(self, key: int, entry: Entry[Backend] | None, pinned: Backend | None) -> None:
        self.key = key
        self.entry = entry
        self.pinned = pinned  # the backend the entry held when this connection arrived
        self.backend: Backend | None = None  # the backend being dialed, then connected
        self.tried: list[Backend] = []


class Router:
    def __init__(
        self,
        spec: GroupSpec,
        clock: Callable[[], float],
        rng: random.Random | None = None,
    ) -> None:
        self.spec = spec
        self.name = spec.name
        self.backends = [Backend(b, i) for i, b in enumerate(spec.backends)]
        self.by_name = {b.name: b for b in self.backends}
        self.scheduler: Scheduler = make_scheduler(spec.scheduler, self.backends, rng)
        p = spec.persistence
        self.keyer: Keyer = make_keyer(p.netmask, p.ipv6_prefix)
        self.table: AffinityTable[Backend] | None = (
            AffinityTable(p.timeout, p.max_entries, clock) if p.enabled else None
        )
        self.stats = GroupStats()

    def begin(self, key: int) -> Route:
        self.stats.accepted += 1
        table = self.table
        if table is None:
            return Route(key, None, None)
        entry = table.acquire(key)
        if entry is None:
            self.stats.unpinned += 1
            return Route(key, None, None)
        return Route(key, entry, entry.backend)

    def next_backend(self, route: Route) -> Backend | None:
        tried = route.tried
        if len(tried) >= len(self.backends):
            return None
        entry = route.entry
        pinned = entry.backend if entry is not None else None
        if pinned is not None and pinned.accepts_pinned and pinned not in tried:
            choice: Backend | None = pinned
        else:
            choice = self.scheduler.pick(route.key, tried)
            if choice is not None and entry is not None:
                entry.backend = choice  # tentative pin, confirmed by `connected`
        if choice is not None:
            tried.append(choice)
            choice.active += 1
        route.backend = choice
        return choice

    def failed(self, route: Route, backend: Backend) -> None:
        backend.active -= 1
        backend.connect_failures += 1
        self.stats.connect_failures += 1
        route.backend = None

    def connected(self, route: Route, backend: Backend) -> None:
        backend.connections += 1
        entry = route.entry
        if entry is None:
            return
        if route.pinned is not None and route.pinned is not backend:
            self.stats.repins += 1
            route.pinned = backend
        entry.backend = backend

    def give_up(self, route: Route) -> None:
        """No backend accepted the connection: the pin stays as it was before this one."""
        self.stats.no_backend += 1
        entry = route.entry
        if entry is not None and entry.refs == 1:
            entry.backend = route.pinned
        self.finish(route)

    def finish(self, route: Route) -> None:
        if route.backend is not None:
            route.backend.active -= 1
            route.backend = None
        entry = route.entry
        if entry is not None and self.table is not None:
            route.entry = None
            if entry.backend is not None and not entry.backend.accepts_pinned and entry.refs == 1:
                entry.backend = None  # a pin to a dead backend is not worth remembering
            self.table.release(entry)
