"""A shared affinity table in Redis (or Valkey): a client pinned by one instance is found by all.

Theory of operation
-------------------
The local table (affinity.py) stays the first word: a client it knows is routed without Redis.
Redis is asked only for a *fresh* pin, the first connection of a key this process has no entry
for, and then in one round trip: `SET key <candidate> NX GET EX <timeout>`, where the candidate
is the group scheduler's pick. Nil means nobody had the client: the candidate is now the pin,
for everyone. A name means another instance (or an earlier life of this one) pinned it: the
connection goes there if that backend may take pinned clients here, and the pin is cached
locally; if not, the new pin overwrites it at the next flush.

Redis never holds a connection longer than `budget`. A lookup that fails or runs out of time
turns the store *down*: that connection, and every fresh pin until Redis answers again, goes to
the consistent hash (rendezvous over the backends that take new clients), which every instance
computes alike, so instances cut off from Redis still agree on new clients. A prober pings every
`retry_interval`; when Redis answers, the store writes every local pin back (the reconcile:
pins made during the outage win, since their clients are on those backends now) and is up.

The TTL in Redis is the persistence timeout, renewed by the flusher, which runs once a second
and writes (SET EX, pipelined) the pins that moved and the entries whose last connection closed
since the previous round; every `timeout / 3` it also renews every entry with open connections
(the instance's lease), so an entry cannot lapse in Redis while a client is connected here.
Last writer wins: the instance that served a client most recently holds its pin.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from .backends import Backend
from .config import StoreSpec
from .routing import Route, Router
from .throttle import Throttle, held_note

log = logging.getLogger("l4lb.store")
FLUSH_INTERVAL = 1.0
PIPELINE = 1000  # commands in one round trip
MAX_LEASE = 30.0


class StoreStats:
    __slots__ = (
        "errors",
        "fallbacks",
        "found",
        "outages",
        "reconciled",
        "stale",
        "stored",
        "writes",
    )

    def __init__(self) -> None:
        self.found = 0  # fresh pins another instance had made
        self.stored = 0  # fresh pins this instance made for everyone
        self.stale = 0  # found pins to a backend that may not take them here
        self.fallbacks = 0  # fresh pins made by the consistent hash (Redis slow or down)
        self.errors = 0  # failed or timed-out Redis calls
        self.outages = 0
        self.writes = 0  # pins written by the flusher
        self.reconciled = 0  # pins written back when Redis returned


class RedisStore:
    def __init__(
        self,
        spec: StoreSpec,
        routers: Callable[[], dict[str, Router]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        from redis.asyncio import Redis  # imported only when a store is configured

        self.spec = spec
        self.routers = routers
        self.clock = clock
        self.up = False
        self.stats = StoreStats()
        self._throttle = Throttle()
        self.client: Any
        if spec.cluster:
            from redis.asyncio.cluster import RedisCluster

            self.client = RedisCluster.from_url(spec.url, socket_connect_timeout=0.5)
        else:
            self.client = Redis.from_url(
                spec.url, socket_connect_timeout=0.5, socket_timeout=1.0, max_connections=64
            )
        self._tasks: list[asyncio.Task[None]] = []
        self._flushed_at = clock()
        self._leased_at = clock()
        self._probing: asyncio.Task[None] | None = None

    def key(self, router: Router, key: int) -> str:
        return f"{self.spec.key_prefix}{router.name}:{key:x}"

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Never blocks start-up on Redis: an unreachable store starts down and is probed."""
        for router in self.routers().values():
            router.repinned = []
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._flush_forever()))
        if await self._ping():
            self.up = True
            log.info("affinity store %s: connected", self.spec.url)
        else:
            self._down("not reachable at start")

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._probing is not None:
            self._probing.cancel()
        if self.up:
            try:
                async with asyncio.timeout(1.0):
                    await self._flush()
            except Exception:  # best effort on the way out
                pass
        await self.client.aclose()

    def routers_changed(self) -> None:
        for router in self.routers().values():
            if router.repinned is None:
                router.repinned = []

    # ------------------------------------------------------------------ the fresh pin

    async def settle(self, router: Router, route: Route, candidate: Backend) -> Backend:
        """The backend a fresh pin goes to: the shared table's, or the candidate (now shared),
        or, with Redis slow or down, the consistent hash's."""
        route.fresh = False
        table = router.table
        if table is None:
            return candidate
        if self.up:
            try:
                async with asyncio.timeout(self.spec.budget):
                    old = await self.client.set(
                        self.key(router, route.key),
                        candidate.name,
                        nx=True,
                        get=True,
                        px=int(table.timeout * 1000),
                    )
            except Exception as exc:  # whatever Redis did, the client goes on
                self._failed(exc)
            else:
                if old is None:
                    self.stats.stored += 1
                    return candidate
                found = router.usable_pin(old.decode("utf-8", "replace"))
                if found is None:
                    self.stats.stale += 1
                    if router.repinned is not None:
                        router.repinned.append(route.key)  # ours replaces it at the next flush
                    return candidate
                self.stats.found += 1
                router.swap(route, found)
                return found
        self.stats.fallbacks += 1
        chosen = router.consistent(route.key)
        if chosen is None or route.backend is None:
            return candidate
        router.swap(route, chosen)
        return chosen

    # ------------------------------------------------------------------ health of the store

    def _failed(self, exc: BaseException) -> None:
        self.stats.errors += 1
        self._down(type(exc).__name__ if isinstance(exc, TimeoutError) else str(exc) or repr(exc))

    def _down(self, why: str) -> None:
        if self.up or self.stats.outages == 0:
            self.stats.outages += 1
            held = self._throttle.allow("down")
            if held is not None:
                log.warning(
                    "affinity store %s unavailable (%s): new clients go to the consistent hash"
                    " until it answers%s",
                    self.spec.url,
                    "timed out" if why == "TimeoutError" else why,
                    held_note(held),
                )
        self.up = False
        if self._probing is None or self._probing.done():
            self._probing = asyncio.get_running_loop().create_task(self._probe())

    async def _ping(self) -> bool:
        try:
            async with asyncio.timeout(max(self.spec.budget, 0.5)):
                await self.client.ping()
            return True
        except Exception:
            return False

    async def _probe(self) -> None:
        while True:
            await asyncio.sleep(self.spec.retry_interval)
            if not await self._ping():
                continue
            try:
                n = await self._write(self._all_pins())
            except Exception:  # down again: go on probing
                continue
            self.stats.reconciled += n
            self._flushed_at = self.clock()
            self.up = True
            log.info("affinity store %s is back: wrote %d local pins to it", self.spec.url, n)
            return

    # ------------------------------------------------------------------ writing pins

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            if not self.up:
                for router in self.routers().values():
                    if router.repinned:
                        router.repinned.clear()  # the reconcile writes everything
                continue
            try:
                await self._flush()
            except Exception as exc:
                self._failed(exc)

    async def _flush(self) -> None:
        now = self.clock()
        since, self._flushed_at = self._flushed_at, now
        lease = False
        for router in self.routers().values():
            if router.table is not None and now - self._leased_at >= min(
                MAX_LEASE, router.table.timeout / 3
            ):
                lease = True
        if lease:
            self._leased_at = now
        self.stats.writes += await self._write(self._touched(since, lease))

    def _touched(self, since: float, lease: bool) -> Iterator[tuple[str, str, int]]:
        """(key, backend, ms to live) of pins that moved, were released since `since`, or,
        with `lease`, have open connections."""
        for router in self.routers().values():
            table = router.table
            moved, router.repinned = router.repinned or [], []
            if table is None:
                continue
            ttl = int(table.timeout * 1000)
            for key in moved:
                entry = table.get(key)
                if entry is not None and entry.backend is not None:
                    yield self.key(router, key), entry.backend.name, ttl
            for entry in table.released_since(since + table.timeout):
                if entry.backend is not None:
                    left = int((entry.expires - self.clock()) * 1000)
                    if left > 0:
                        yield self.key(router, entry.key), entry.backend.name, left
            if lease:
                for entry in table.active():
                    if entry.backend is not None:
                        yield self.key(router, entry.key), entry.backend.name, ttl

    def _all_pins(self) -> Iterator[tuple[str, str, int]]:
        for router in self.routers().values():
            table = router.table
            if table is None:
                continue
            for key, backend, left in table.snapshot():
                yield self.key(router, key), backend.name, max(1, int(left * 1000))

    async def _write(self, pins: Iterator[tuple[str, str, int]]) -> int:
        n = 0
        batch: list[tuple[str, str, int]] = []
        for pin in pins:
            batch.append(pin)
            if len(batch) >= PIPELINE:
                n += await self._send(batch)
                batch = []
        if batch:
            n += await self._send(batch)
        return n

    async def _send(self, batch: list[tuple[str, str, int]]) -> int:
        async with asyncio.timeout(5.0):
            async with self.client.pipeline(transaction=False) as pipe:
                for key, name, ms in batch:
                    pipe.set(key, name, px=ms)
                await pipe.execute()
        return len(batch)
